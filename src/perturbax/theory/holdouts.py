"""Which training conditions can be held out for in-span cross-validation.

Settings chosen from training data must be judged on the task the user has: predicting a
condition whose label lies in the span of the measured ones. A training condition ``j`` can
play that part if its label vector is a linear combination of the *other* perturbed training
labels, i.e. removing it leaves it identified (DESIGN section 3). In least-squares terms that is
a leverage ``h_jj < 1`` in the regression of condition means on labels: a row with leverage 1 is
the only support of some direction of the design, and holding it out would test extrapolation
outside the span instead.
"""

from __future__ import annotations

import numpy as np

from perturbax.theory.rowspace import DEFAULT_RTOL

__all__ = ["label_leverage", "in_span_holdouts"]

#: A held-out row counts as in the span of the others when its leverage is below ``1 - LEVERAGE_TOL``.
LEVERAGE_TOL = 1e-6


def label_leverage(design: np.ndarray, *, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Leverage ``h_jj`` of each row of ``design`` (rows = label vectors, shape ``(n, K)``).

    ``h = diag(D D^+)``, from a thin SVD with singular values below ``rtol * s_max`` dropped.
    ``h_jj = 1`` means row ``j`` is not in the span of the other rows; ``h_jj < 1`` means it is.
    """
    D = np.asarray(design, dtype=np.float64)
    if D.ndim != 2:
        raise ValueError(f"design must be a 2-D array (conditions x perturbations), got shape {D.shape}.")
    if D.shape[0] == 0:
        return np.zeros(0)
    U, s, _ = np.linalg.svd(D, full_matrices=False)
    keep = s > rtol * (s[0] if s.size else 0.0)
    if not np.any(keep):
        return np.zeros(D.shape[0])
    return np.sum(U[:, keep] ** 2, axis=1)


def in_span_holdouts(design: np.ndarray, *, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Indices of the rows of ``design`` that lie in the span of the other rows.

    Zero rows (the control) are never returned. Holding out any one of the returned rows keeps
    its label identified by the rest of the design, which is what in-span cross-validation needs.

    >>> in_span_holdouts(np.array([[1, 0], [0, 1], [1, 1], [0, 0]]))
    array([0, 1, 2])
    >>> in_span_holdouts(np.array([[1, 0], [0, 1]]))
    array([], dtype=int64)
    """
    D = np.asarray(design, dtype=np.float64)
    h = label_leverage(D, rtol=rtol)
    nonzero = np.any(D != 0, axis=1) if D.size else np.zeros(D.shape[0], dtype=bool)
    return np.flatnonzero(nonzero & (h < 1.0 - LEVERAGE_TOL))
