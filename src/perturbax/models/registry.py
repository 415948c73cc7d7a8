"""The built-in models by name: ``name -> (model function, config class)``, and which configs
describe models of time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from perturbax.models.additive_shift import additive_shift_model
from perturbax.models.config import AdditiveShiftConfig
from perturbax.models.dynamics import LatentDynamicsConfig, latent_dynamics_model

__all__ = ["BUILTIN_MODELS", "uses_time"]

BUILTIN_MODELS: dict[str, tuple[Callable, type]] = {
    "additive_shift": (additive_shift_model, AdditiveShiftConfig),
    "latent_dynamics": (latent_dynamics_model, LatentDynamicsConfig),
}


def uses_time(config: Any) -> bool:
    """Whether a model configuration describes a model of time (cells are snapshots at times
    ``batch.t``): the latent dynamics model, or any config with a true ``uses_time`` attribute."""
    return isinstance(config, LatentDynamicsConfig) or bool(getattr(config, "uses_time", False))
