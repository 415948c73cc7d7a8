"""NumPyro models and the blocks they are built from (no AnnData here).

A model is a plain function ``model(batch, *, config, n_cells)``; see :class:`Batch` and the
site conventions in :mod:`perturbax.models.blocks`.

The names are loaded on first use, so importing :mod:`perturbax.models` alone (or a module
below it such as :mod:`perturbax.models.linear_scm`) does not import JAX.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "additive_shift_model": "perturbax.models.additive_shift",
    "Batch": "perturbax.models.batch",
    "CELL_PLATE": "perturbax.models.blocks",
    "MLP": "perturbax.models.blocks",
    "base_distribution": "perturbax.models.blocks",
    "gaussian_likelihood": "perturbax.models.blocks",
    "implicit_likelihood": "perturbax.models.blocks",
    "negative_binomial_likelihood": "perturbax.models.blocks",
    "network": "perturbax.models.blocks",
    "perturbation_effects": "perturbax.models.blocks",
    "AdditiveShiftConfig": "perturbax.models.config",
    "CausalMLP": "perturbax.models.dynamics",
    "LatentDynamicsConfig": "perturbax.models.dynamics",
    "acyclicity_measure": "perturbax.models.dynamics",
    "causal_drift_network": "perturbax.models.dynamics",
    "causal_order": "perturbax.models.dynamics",
    "causal_weights": "perturbax.models.dynamics",
    "check_stable": "perturbax.models.dynamics",
    "check_times": "perturbax.models.dynamics",
    "equilibrium_shift": "perturbax.models.dynamics",
    "full_mask": "perturbax.models.dynamics",
    "is_acyclic": "perturbax.models.dynamics",
    "latent_dynamics_model": "perturbax.models.dynamics",
    "lower_triangular_mask": "perturbax.models.dynamics",
    "linear_solution": "perturbax.models.dynamics",
    "mechanism_changes": "perturbax.models.dynamics",
    "mechanism_weights": "perturbax.models.dynamics",
    "neural_drift": "perturbax.models.dynamics",
    "order_from_effects": "perturbax.models.dynamics",
    "order_violation": "perturbax.models.dynamics",
    "sole_target_mask": "perturbax.models.dynamics",
    "order_mask": "perturbax.models.dynamics",
    "ou_noise_cov": "perturbax.models.dynamics",
    "transition_matrix": "perturbax.models.dynamics",
    "ODESolution": "perturbax.models.ode",
    "solve": "perturbax.models.ode",
}

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
    "sole_target_mask",
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


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'perturbax.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
