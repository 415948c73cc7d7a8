"""Calibration of credible / prediction intervals: empirical coverage and width."""

from __future__ import annotations

import numpy as np

__all__ = ["interval_coverage", "interval_width", "reliability"]


def _as_float(a, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric array, got {type(a).__name__}.") from err
    if np.isnan(arr).any():
        idx = tuple(int(i) for i in np.argwhere(np.isnan(arr))[0])
        raise ValueError(f"`{name}` contains NaN at index {idx}; remove or impute it first.")
    return arr


def _check_bounds(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    lo = _as_float(lower, "lower")
    hi = _as_float(upper, "upper")
    if lo.shape != hi.shape:
        raise ValueError(
            f"`lower` has shape {lo.shape} but `upper` has shape {hi.shape}; they must match "
            "elementwise (no broadcasting)."
        )
    if lo.size == 0:
        raise ValueError("The intervals are empty (size 0); pass at least one interval.")
    bad = lo > hi
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} interval(s) have lower > upper, first at index {idx} "
            f"(lower={lo[idx]}, upper={hi[idx]}); check that the bounds were not swapped."
        )
    return lo, hi


def interval_coverage(lower, upper, truth) -> float:
    """Fraction of true values inside their closed interval ``[lower, upper]``.

    Parameters
    ----------
    lower, upper, truth
        Arrays of the same shape (any shape, compared elementwise; no broadcasting). Infinite
        bounds are allowed (one-sided intervals).

    Returns
    -------
    float
        ``mean(lower <= truth <= upper)`` over all elements.
    """
    lo, hi = _check_bounds(lower, upper)
    t = _as_float(truth, "truth")
    if t.shape != lo.shape:
        raise ValueError(
            f"`truth` has shape {t.shape} but the intervals have shape {lo.shape}; they must "
            "match elementwise."
        )
    return float(np.mean((lo <= t) & (t <= hi)))


def interval_width(lower, upper) -> float:
    """Mean width ``mean(upper - lower)`` of the intervals (same shapes, ``lower <= upper``)."""
    lo, hi = _check_bounds(lower, upper)
    return float(np.mean(hi - lo))


def reliability(intervals, truth) -> dict[float, float]:
    """Empirical coverage at each nominal level: ``{level: interval_coverage(lower, upper, truth)}``
    for ``intervals = {level: (lower, upper)}`` (levels in (0, 1), sorted in the result); the data
    of a reliability diagram (:func:`perturbax.plotting.plot_reliability`)."""
    out = {}
    for level in sorted(intervals):
        if not 0 < float(level) < 1:
            raise ValueError(f"Nominal levels must be in (0, 1), got {level!r}.")
        lower, upper = intervals[level]
        out[float(level)] = interval_coverage(lower, upper, truth)
    if not out:
        raise ValueError("intervals is empty; pass {level: (lower, upper)} for at least one level.")
    return out
