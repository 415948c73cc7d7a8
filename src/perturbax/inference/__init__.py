"""Fitting (SVI with the ELBO or the energy score), prediction, save/load and ArviZ export."""

from perturbax.inference.energy import EnergyOptions, EnergyScore, energy_score_groups, pairwise_distance
from perturbax.inference.fitting import BUILTIN_MODELS, fit, training_times
from perturbax.inference.guides import GLOBAL_GUIDES, global_sites, local_sites, make_guide, uses_time
from perturbax.inference.prediction import UnseenPerturbationError, pair_key, posterior_globals, predict, to_arviz
from perturbax.inference.result import FitResult

__all__ = [
    "BUILTIN_MODELS",
    "EnergyOptions",
    "EnergyScore",
    "FitResult",
    "GLOBAL_GUIDES",
    "UnseenPerturbationError",
    "energy_score_groups",
    "fit",
    "global_sites",
    "local_sites",
    "make_guide",
    "pair_key",
    "pairwise_distance",
    "posterior_globals",
    "predict",
    "to_arviz",
    "training_times",
    "uses_time",
]
