"""Data layer: AnnData in, arrays out (and back). The only layer that touches AnnData."""

from perturbax.data.core import PerturbationData, check_counts, from_anndata
from perturbax.data.labels import PerturbationRegistry, format_label, parse_label
from perturbax.data.simulate import (
    AdditiveShiftTruth,
    LatentDynamicsTruth,
    SimulationDecoder,
    sample_base,
    simulate_additive_shift,
    simulate_latent_dynamics,
)

__all__ = [
    "AdditiveShiftTruth",
    "LatentDynamicsTruth",
    "PerturbationData",
    "PerturbationRegistry",
    "check_counts",
    "format_label",
    "from_anndata",
    "parse_label",
    "SimulationDecoder",
    "sample_base",
    "simulate_additive_shift",
    "simulate_latent_dynamics",
]
