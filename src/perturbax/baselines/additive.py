"""Additive baseline: control + the sum of the measured single-perturbation effects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from perturbax.baselines.base import (
    TrainingSummary,
    _context_effects,
    _context_relative_deltas,
    _Fitted,
    _ShiftBaseline,
)

__all__ = ["AdditiveBaseline"]

_UNMEASURED = ("error", "least_squares", "zero")


@dataclass(frozen=True, repr=False)
class AdditiveBaseline(_ShiftBaseline):
    """Predicts ``control mean + sum_k dose_k * delta_k`` with control residuals added.

    ``delta_k`` is the per-unit-dose effect of elementary perturbation ``k`` measured alone:
    ``mean(single k) - mean(control)``. If ``k`` was measured alone at several doses, ``delta_k``
    is the least-squares fit through the origin over those singles,
    ``sum_d d * delta_{k,d} / sum_d d^2`` (for one single at dose 1 it is just its delta). Works for
    any number of components. Exact for data that are additive in gene space.

    With contexts, a single is one perturbation in any context, its delta taken from the control of
    its own context, and ``delta_k`` the fit over all of them (for one dose: the mean over the
    contexts where ``k`` was measured alone); a context adds its control's shift from the reference
    control. So ``A @ line=z`` is predicted as the control of ``z`` + A's mean effect in the other
    lines.

    Parameters
    ----------
    unmeasured
        What to do with a component never measured alone in training:

        - ``"error"`` (default): predicting a label that contains it raises, naming it;
        - ``"least_squares"``: estimate its delta from the training *combinations* that contain
          it: subtract the known single deltas from each such combination's delta and solve for
          the unknown deltas by least squares (minimum-norm solution when they are not
          identifiable separately, e.g. two unmeasured genes only ever seen together). A
          component in no training condition at all still raises;
        - ``"zero"``: assume it has no effect (the prediction keeps the measured components only).
    """

    unmeasured: Literal["error", "least_squares", "zero"] = "error"
    name: ClassVar[str] = "additive"

    def __post_init__(self) -> None:
        if self.unmeasured not in _UNMEASURED:
            raise ValueError(f"unmeasured must be one of {_UNMEASURED}, got {self.unmeasured!r}.")

    def _estimate(self, summary: TrainingSummary) -> _Fitted:
        names = summary.registry.names
        K, P, G = summary.registry.K, summary.registry.n_perturbations, summary.control_mean.shape[0]
        deltas, has_control = _context_relative_deltas(summary)
        design = summary.design[:, :P]  # perturbation columns; the context columns follow
        n_comp = np.where(has_control, np.count_nonzero(design, axis=1), 0)
        effects = np.zeros((K, G))
        alone = np.zeros(K, dtype=bool)
        effects[P:], alone[P:] = _context_effects(summary)
        for k in range(P):
            rows = np.flatnonzero((n_comp == 1) & (design[:, k] != 0))
            if rows.size:
                d = design[rows, k]
                effects[k] = (d[:, None] * deltas[rows]).sum(0) / float(d @ d)
                alone[k] = True
        in_training = summary.in_training
        blocked: dict[str, str] = {}
        info: dict = {"measured_alone": [names[k] for k in np.flatnonzero(alone[:P])]}
        for k in np.flatnonzero(~alone[P:]) + P:
            blocked[names[k]] = (f"no training control cells in context {names[k]!r}, so there is no control of "
                                 f"that context to add the effects to; train on its control cells.")
        missing = np.flatnonzero(~alone[:P])
        if self.unmeasured == "zero":
            info["zero_effect"] = [names[k] for k in missing]
        elif self.unmeasured == "error":
            for k in missing:
                blocked[names[k]] = _reason(summary, k, in_training[k])
        else:  # least squares from combinations
            est = missing[in_training[missing]]
            for k in missing[~in_training[missing]]:
                blocked[names[k]] = _reason(summary, k, False)
            if est.size:
                rows = np.flatnonzero((n_comp >= 2) & np.any(design[:, est] != 0, axis=1))
                known = np.flatnonzero(alone[:P])
                resid = deltas[rows] - design[np.ix_(rows, known)] @ effects[known]
                A = design[np.ix_(rows, est)]
                sol, _, rank, _ = np.linalg.lstsq(A, resid, rcond=None)
                effects[est] = sol
                info["least_squares"] = {
                    "estimated": [names[k] for k in est],
                    "combinations": [summary.conditions[r] for r in rows],
                    "rank": int(rank),
                }
        return _Fitted(summary, np.zeros(G), effects, blocked, info=info)


def _reason(summary: TrainingSummary, k: int, in_training: bool) -> str:
    name = summary.registry.names[k]
    if in_training:
        combos = [c for c, row in zip(summary.conditions, summary.design) if row[k] != 0][:3]
        return (
            f"{name!r} was never measured alone in training (only in combinations such as {combos}), "
            f"so there is no single delta to add. Pass unmeasured='least_squares' to estimate it from "
            f"those combinations, unmeasured='zero' to assume no effect, or train on its single."
        )
    return (
        f"{name!r} appears in no training condition, so nothing is known about its effect. Pass "
        f"unmeasured='zero' to assume no effect, or train on a condition containing it."
    )
