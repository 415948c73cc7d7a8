"""Fitting (SVI with the ELBO or the energy score), prediction, save/load and ArviZ export."""

from perturbax.inference.causal_order import fitted_causal_order, refit_in_causal_order
from perturbax.inference.dynamics_recipe import held_out_contexts, order_candidates
from perturbax.inference.energy import (
    EnergyOptions,
    EnergyScore,
    energy_score_groups,
    mean_distance_groups,
    pairwise_distance,
)
from perturbax.inference.fitting import data_start, fit
from perturbax.inference.guides import GLOBAL_GUIDES, global_sites, hide_cells, local_sites, make_guide
from perturbax.inference.identifiability import fit_identifiability
from perturbax.inference.prediction import (
    UnseenPerturbationError,
    pair_key,
    posterior_draws,
    posterior_globals,
    predict,
    to_arviz,
)
from perturbax.inference.result import FitResult
from perturbax.inference.times import default_time_scale, training_times
from perturbax.models.registry import BUILTIN_MODELS, uses_time

__all__ = [
    "BUILTIN_MODELS",
    "EnergyOptions",
    "EnergyScore",
    "FitResult",
    "GLOBAL_GUIDES",
    "UnseenPerturbationError",
    "data_start",
    "default_time_scale",
    "energy_score_groups",
    "fit",
    "fit_identifiability",
    "fitted_causal_order",
    "global_sites",
    "held_out_contexts",
    "hide_cells",
    "local_sites",
    "make_guide",
    "mean_distance_groups",
    "order_candidates",
    "pair_key",
    "pairwise_distance",
    "posterior_draws",
    "posterior_globals",
    "predict",
    "refit_in_causal_order",
    "to_arviz",
    "training_times",
    "uses_time",
]
