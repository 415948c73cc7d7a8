"""Plots people would rather look at than read (matplotlib; each returns the Axes it drew on).

All functions take arrays (the prediction AnnData is unpacked with
:func:`perturbax.data.prediction_intervals`), draw on ``ax`` if given, and never call ``show``.
"""

from perturbax.plotting.cells import plot_cell_distributions, plot_scores
from perturbax.plotting.design import plot_design_coverage, plot_design_spectrum, plot_jacobian_spectrum
from perturbax.plotting.latent import plot_latent
from perturbax.plotting.predictions import (
    plot_gene_intervals,
    plot_predicted_vs_observed,
    plot_reliability,
    plot_trajectory,
)
from perturbax.plotting.training import plot_loss

__all__ = [
    "plot_cell_distributions",
    "plot_design_coverage",
    "plot_design_spectrum",
    "plot_gene_intervals",
    "plot_jacobian_spectrum",
    "plot_latent",
    "plot_loss",
    "plot_predicted_vs_observed",
    "plot_reliability",
    "plot_trajectory",
    "plot_scores",
]
