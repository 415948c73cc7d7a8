"""Linear (ridge) baseline: condition means regressed on the label vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from perturbax.baselines.base import TrainingSummary, _Fitted, _ShiftBaseline

__all__ = ["LinearBaseline"]

_UNMEASURED = ("error", "zero")


@dataclass(frozen=True, repr=False)
class LinearBaseline(_ShiftBaseline):
    """Ridge regression of the training condition means on their label vectors.

    With ``D`` the deltas ``mean(condition) - mean(control)`` of the perturbed training conditions
    (one row per condition, each weighted equally) and ``L`` their label vectors (doses as
    values), the per-unit effects are ``W = (L^T L + alpha I)^{-1} L^T D``; the predicted mean of
    a label ``l`` is ``control mean + l W`` and the predicted cells add the control residuals
    (``cells = predicted mean + (control cells - control mean)``). The control mean is not
    penalised (it is the fixed intercept), so the control label predicts the control exactly.
    With ``alpha -> 0`` on a design of singles this is the :class:`AdditiveBaseline`; with
    combinations in training it is their least-squares compromise. ``alpha=0`` uses the
    minimum-norm least-squares solution.

    Parameters
    ----------
    alpha
        Ridge penalty (>= 0) on the scale of the label vectors (doses ~ 1).
    unmeasured
        A component in no training condition has no data behind it (its ridge effect is 0):
        ``"error"`` (default) raises when a label contains it; ``"zero"`` predicts no effect for it.
    """

    alpha: float = 0.1
    unmeasured: Literal["error", "zero"] = "error"
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating, np.integer)) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}.")
        if self.unmeasured not in _UNMEASURED:
            raise ValueError(f"unmeasured must be one of {_UNMEASURED}, got {self.unmeasured!r}.")

    def _estimate(self, summary: TrainingSummary) -> _Fitted:
        names = summary.registry.names
        K, G = summary.registry.K, summary.control_mean.shape[0]
        rows = summary.perturbed
        if rows.size == 0:
            raise ValueError(
                "LinearBaseline needs perturbed training conditions, but the training data hold only "
                "the control."
            )
        L = summary.design[rows]
        D = summary.deltas[rows]
        if self.alpha > 0:
            W = np.linalg.solve(L.T @ L + float(self.alpha) * np.eye(K), L.T @ D)
        else:
            W = np.linalg.lstsq(L, D, rcond=None)[0]
        absent = np.flatnonzero(~summary.in_training)
        W[absent] = 0.0
        blocked = {}
        if self.unmeasured == "error":
            for k in absent:
                blocked[names[k]] = (
                    f"{names[k]!r} appears in no training condition, so the regression has no data on "
                    f"its effect. Pass unmeasured='zero' to predict no effect for it, or train on a "
                    f"condition containing it."
                )
        info = {"rank": int(np.linalg.matrix_rank(L)), "n_conditions": int(rows.size),
                "zero_effect": [names[k] for k in absent] if self.unmeasured == "zero" else []}
        return _Fitted(summary, np.zeros(G), W, blocked, info=info)
