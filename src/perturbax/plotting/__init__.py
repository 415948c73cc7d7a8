"""Plots people would rather look at than read (matplotlib; each returns the Axes it drew on).

All functions take arrays (the prediction AnnData is unpacked with
:func:`perturbax.data.prediction_intervals`), draw on ``ax`` if given, and never call ``show``.
"""

from perturbax.plotting.predictions import plot_gene_intervals, plot_predicted_vs_observed
from perturbax.plotting.training import plot_loss

__all__ = ["plot_gene_intervals", "plot_loss", "plot_predicted_vs_observed"]
