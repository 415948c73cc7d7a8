"""NumPyro models and the blocks they are built from (no AnnData here).

A model is a plain function ``model(batch, *, config, n_cells)``; see :class:`Batch` and the
site conventions in :mod:`perturbax.models.blocks`.
"""

from perturbax.models.additive_shift import additive_shift_model
from perturbax.models.batch import Batch
from perturbax.models.blocks import (
    CELL_PLATE,
    MLP,
    base_distribution,
    gaussian_likelihood,
    implicit_likelihood,
    negative_binomial_likelihood,
    network,
    perturbation_effects,
)
from perturbax.models.config import AdditiveShiftConfig
from perturbax.models.dynamics import (
    CausalMLP,
    LatentDynamicsConfig,
    acyclicity_measure,
    causal_drift_network,
    causal_order,
    causal_weights,
    check_stable,
    check_times,
    equilibrium_shift,
    full_mask,
    is_acyclic,
    latent_dynamics_model,
    lower_triangular_mask,
    linear_solution,
    mechanism_changes,
    mechanism_weights,
    neural_drift,
    order_from_effects,
    order_violation,
    order_mask,
    ou_noise_cov,
    transition_matrix,
)
from perturbax.models.ode import ODESolution, solve

__all__ = [
    "AdditiveShiftConfig",
    "CausalMLP",
    "LatentDynamicsConfig",
    "ODESolution",
    "acyclicity_measure",
    "causal_drift_network",
    "causal_order",
    "causal_weights",
    "check_stable",
    "check_times",
    "equilibrium_shift",
    "full_mask",
    "is_acyclic",
    "latent_dynamics_model",
    "lower_triangular_mask",
    "linear_solution",
    "mechanism_changes",
    "mechanism_weights",
    "neural_drift",
    "order_from_effects",
    "order_violation",
    "order_mask",
    "ou_noise_cov",
    "solve",
    "transition_matrix",
    "Batch",
    "CELL_PLATE",
    "MLP",
    "additive_shift_model",
    "base_distribution",
    "gaussian_likelihood",
    "implicit_likelihood",
    "negative_binomial_likelihood",
    "network",
    "perturbation_effects",
]
