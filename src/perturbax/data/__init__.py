"""Data layer: AnnData in, arrays out (and back). The only layer that touches AnnData."""

from perturbax.data.core import PerturbationData, check_counts, from_anndata
from perturbax.data.labels import PerturbationRegistry, format_label, parse_label

__all__ = [
    "PerturbationData",
    "PerturbationRegistry",
    "check_counts",
    "format_label",
    "from_anndata",
    "parse_label",
]
