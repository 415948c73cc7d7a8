"""Baselines that ignore which perturbation is asked for: control cells, pooled perturbed mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from perturbax.baselines.base import TrainingSummary, _context_effects, _Fitted, _ShiftBaseline

__all__ = ["ControlBaseline", "PooledMeanBaseline"]


@dataclass(frozen=True, repr=False)
class ControlBaseline(_ShiftBaseline):
    """Predicts "no effect": the training control cells, for every label (with contexts: those of the
    label's context)."""

    name: ClassVar[str] = "control"

    def _estimate(self, summary: TrainingSummary) -> _Fitted:
        G, P = summary.control_mean.shape[0], summary.registry.n_perturbations
        effects = np.zeros((summary.registry.K, G))
        effects[P:] = _context_effects(summary)[0]
        return _Fitted(summary, np.zeros(G), effects, {})


@dataclass(frozen=True, repr=False)
class PooledMeanBaseline(_ShiftBaseline):
    """Predicts the same mean for every perturbation: the mean of all perturbed training cells
    (each cell weighs the same), plus the control residuals."""

    name: ClassVar[str] = "pooled_mean"

    def _estimate(self, summary: TrainingSummary) -> _Fitted:
        idx = summary.perturbed
        if idx.size == 0:
            raise ValueError(
                "PooledMeanBaseline needs perturbed training cells, but the training data hold only "
                "the control; add perturbed conditions to the training split."
            )
        w = summary.n_cells[idx].astype(np.float64)
        pooled = (w[:, None] * summary.means[idx]).sum(0) / w.sum()
        G = pooled.shape[0]
        return _Fitted(
            summary, pooled - summary.control_mean, np.zeros((summary.registry.K, G)), {},
            info={"n_perturbed_cells": int(w.sum())},
        )
