"""Evaluation metrics (NumPy/SciPy, float64): distances between cell sets, gene-level metrics on
means, interval calibration, latent recovery, and the per-condition evaluation table.

The top-k DE genes are always :func:`top_de_genes` (descending absolute mean change from control).
"""

from perturbax.metrics.distances import (
    energy_distance,
    mean_l2,
    median_heuristic,
    mmd_rbf,
    pairwise_mean_distance,
)
from perturbax.metrics.evaluate import PCAProjector, evaluate_conditions, summarize
from perturbax.metrics.expression import mse_means, pearson_delta, r2_means, top_de_genes
from perturbax.metrics.intervals import interval_coverage, interval_width, reliability
from perturbax.metrics.latent import linear_r2, mcc, procrustes_r2

__all__ = [
    "PCAProjector",
    "energy_distance",
    "evaluate_conditions",
    "interval_coverage",
    "interval_width",
    "linear_r2",
    "mcc",
    "mean_l2",
    "median_heuristic",
    "mmd_rbf",
    "mse_means",
    "pairwise_mean_distance",
    "pearson_delta",
    "procrustes_r2",
    "r2_means",
    "reliability",
    "summarize",
    "top_de_genes",
]
