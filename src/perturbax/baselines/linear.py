"""Linear (ridge) baseline: condition means regressed on the label vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from perturbax.baselines.base import TrainingSummary, _Fitted, _ShiftBaseline
from perturbax.theory.holdouts import in_span_holdouts

__all__ = ["LinearBaseline", "ridge_loo_scores", "ridge_solve", "ALPHA_GRID"]

_UNMEASURED = ("error", "zero")

#: Ridge penalties tried by ``alpha="cv"`` (labels are on the dose scale, ~1 per component).
ALPHA_GRID = (0.0, *np.round(np.logspace(-3, 2, 16), 6).tolist())
#: Penalty used by ``alpha="cv"`` when no training condition can be held out inside the span.
FALLBACK_ALPHA = 0.1


def ridge_solve(L: np.ndarray, D: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge effects ``(L^T L + alpha I)^{-1} L^T D`` (``alpha=0``: minimum-norm least squares)."""
    if alpha > 0:
        return np.linalg.solve(L.T @ L + alpha * np.eye(L.shape[1]), L.T @ D)
    return np.linalg.lstsq(L, D, rcond=None)[0]


def ridge_loo_scores(L: np.ndarray, D: np.ndarray, rows: np.ndarray, alphas) -> np.ndarray:
    """Leave-one-condition-out squared error of ridge fits of ``D`` on ``L``, for each alpha.

    Exact closed form: with the ridge hat matrix ``H = L (L^T L + alpha I)^+ L^T`` the residual of
    row ``j`` refitted without it is ``(D_j - (H D)_j) / (1 - H_jj)``. Returns, per alpha, the mean
    over ``rows`` (which must lie in the span of the other rows) of the per-gene mean squared
    residual.
    """
    U, s, _ = np.linalg.svd(np.asarray(L, dtype=np.float64), full_matrices=False)
    keep = s > 1e-8 * (s[0] if s.size else 0.0)
    U, s2 = U[:, keep], s[keep] ** 2
    UtD = U.T @ D
    scores = []
    for a in alphas:
        shrink = s2 / (s2 + float(a))
        fitted = U[rows] @ (shrink[:, None] * UtD)
        h = np.sum(U[rows] ** 2 * shrink, axis=1)
        resid = (D[rows] - fitted) / (1.0 - h)[:, None]
        scores.append(float(np.mean(resid**2)))
    return np.asarray(scores)


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

    alpha: float | Literal["cv"] = "cv"
    unmeasured: Literal["error", "zero"] = "error"
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "cv":
                raise ValueError(f"alpha must be a finite number >= 0 or 'cv', got {self.alpha!r}.")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating, np.integer)) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0 or 'cv', got {self.alpha!r}.")
        if self.unmeasured not in _UNMEASURED:
            raise ValueError(f"unmeasured must be one of {_UNMEASURED}, got {self.unmeasured!r}.")

    def _estimate(self, summary: TrainingSummary) -> _Fitted:
        names = summary.registry.names
        G = summary.control_mean.shape[0]
        rows = summary.perturbed
        if rows.size == 0:
            raise ValueError(
                "LinearBaseline needs perturbed training conditions, but the training data hold only "
                "the control."
            )
        L = summary.design[rows]
        D = summary.deltas[rows]
        alpha, cv = self._choose_alpha(L, D, [summary.conditions[r] for r in rows])
        W = ridge_solve(L, D, alpha)
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
                "zero_effect": [names[k] for k in absent] if self.unmeasured == "zero" else [],
                "alpha": alpha, "alpha_cv": cv}
        return _Fitted(summary, np.zeros(G), W, blocked, info=info)

    def _choose_alpha(self, L: np.ndarray, D: np.ndarray, conditions: list[str]) -> tuple[float, dict | None]:
        """The penalty to use and, for ``alpha="cv"``, what the cross-validation saw."""
        if self.alpha != "cv":
            return float(self.alpha), None
        held = in_span_holdouts(L)
        if held.size == 0:
            return FALLBACK_ALPHA, {
                "alphas": [], "scores": [], "held_out": [],
                "note": f"no training condition lies in the span of the others, so the penalty cannot "
                        f"be cross-validated; used {FALLBACK_ALPHA}",
            }
        scores = ridge_loo_scores(L, D, held, ALPHA_GRID)
        best = int(np.argmin(scores))
        return float(ALPHA_GRID[best]), {
            "alphas": list(ALPHA_GRID), "scores": scores.tolist(),
            "held_out": [conditions[j] for j in held],
            "note": f"leave-one-condition-out over {held.size} in-span training conditions",
        }
