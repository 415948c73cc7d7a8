"""Checks of the inputs of the latent dynamics: cell times and the stability of ``B``."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["check_times", "check_stable"]


def check_times(t: Any) -> np.ndarray:
    """Validate per-cell times (hours since the perturbation was switched on) and return them as
    a float64 array. Call it where data enter a fit or a prediction (the model itself can only
    check concrete values, not traced ones).

    Raises ``ValueError`` for missing times, a wrong shape, NaN/Inf or negative values.
    """
    if t is None:
        raise ValueError(
            "The latent dynamics model needs the time of every cell (batch.t), measured from the moment "
            "the perturbation was switched on (t = 0). Pass the time column of your data (e.g. "
            "obs['time']) when fitting or predicting."
        )
    arr = np.asarray(t, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"Times must be a 1-d array with one time per cell, got shape {arr.shape}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{bad.size} cell time(s) are NaN or infinite (first: cell {bad[0]}, value {arr[bad[0]]}). "
            f"Every cell needs a finite time since the perturbation was switched on; drop or fill those cells."
        )
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        raise ValueError(
            f"{neg.size} cell time(s) are negative (first: cell {neg[0]}, t={arr[neg[0]]:g}; minimum "
            f"{arr.min():g}). Times are measured from the moment the perturbation is switched on (t = 0), "
            f"and cells before it are control cells at t = 0: shift the time column so that the switch "
            f"happens at 0, or give pre-perturbation cells the control label and t = 0."
        )
    return arr


def check_stable(B: Any) -> float:
    """Raise ``ValueError`` unless the linear drift ``(B - I)`` is stable (all eigenvalues with
    negative real part); returns the spectral abscissa ``max Re eig(B - I)``. Eager (numpy) check.

    Always satisfied for ``B`` on an acyclic mask (spectral abscissa exactly -1); needed for
    cyclic masks (``allow_cycles=True``) or user-supplied ``B``.
    """
    b = np.asarray(B, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"B must be a square matrix, got shape {b.shape}.")
    if not np.all(np.isfinite(b)):
        raise ValueError("B has NaN/Inf entries.")
    abscissa = float(np.max(np.linalg.eigvals(b - np.eye(b.shape[0])).real))
    if abscissa >= 0:
        raise ValueError(
            f"The linear drift (B - I) is unstable: its largest eigenvalue real part is {abscissa:.4g} >= 0, "
            f"so z(t) grows without bound instead of relaxing to an equilibrium. Use an acyclic causal mask "
            f"(the default strictly lower-triangular one is always stable) or smaller feedback weights."
        )
    return abscissa


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)
