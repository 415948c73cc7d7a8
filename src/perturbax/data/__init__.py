"""Data layer: AnnData in, arrays out (and back). The only layer that touches AnnData."""

from perturbax.data.core import PerturbationData, check_counts, from_anndata
from perturbax.data.datasets import find_data_file, load_norman19
from perturbax.data.io import (
    cells_by_condition,
    parse_where,
    prediction_cells,
    prediction_intervals,
    prediction_summary,
    prediction_trajectory,
    predictions_to_anndata,
    select_where,
    write_predictions,
)
from perturbax.data.labels import PerturbationRegistry, format_label, parse_label
from perturbax.data.simulate import (
    AdditiveShiftTruth,
    LatentDynamicsTruth,
    SimulationDecoder,
    sample_base,
    simulate_additive_shift,
    simulate_latent_dynamics,
)
from perturbax.data.splits import (
    Split,
    combo_group,
    gears_split,
    holdout_split,
    norman_doubles_folds,
    split_from_column,
)

__all__ = [
    "Split",
    "cells_by_condition",
    "combo_group",
    "find_data_file",
    "gears_split",
    "holdout_split",
    "load_norman19",
    "norman_doubles_folds",
    "parse_where",
    "prediction_cells",
    "prediction_intervals",
    "prediction_summary",
    "prediction_trajectory",
    "predictions_to_anndata",
    "select_where",
    "split_from_column",
    "write_predictions",
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
