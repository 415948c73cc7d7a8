"""Recovery of latent variables up to the expected indeterminacies.

``z_hat`` (estimated) and ``z`` (ground truth) are matrices with the same rows (samples, e.g.
cells or perturbations) and possibly different numbers of columns (latent dimensions):

- :func:`mcc`: mean correlation coefficient after matching columns one to one (invariant to
  permutation, sign and per-column scaling / monotone maps for Spearman);
- :func:`procrustes_r2`: R^2 after the best similarity map (centring, one global scale, an
  orthogonal map, reflections allowed);
- :func:`linear_r2`: R^2 after the best affine map (least squares).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from perturbax.metrics.distances import _as_cells

__all__ = ["linear_r2", "mcc", "procrustes_r2"]


def _pair(z_hat, z) -> tuple[np.ndarray, np.ndarray]:
    a = _as_cells(z_hat, "z_hat", min_cells=2)
    b = _as_cells(z, "z", min_cells=2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`z_hat` has {a.shape[0]} rows but `z` has {b.shape[0]}; rows must be the same "
            "samples in the same order."
        )
    return a, b


def _standardise(a: np.ndarray, name: str) -> np.ndarray:
    a = a - a.mean(axis=0)
    norms = np.sqrt(np.einsum("ij,ij->j", a, a))
    const = np.flatnonzero(norms == 0)
    if const.size:
        raise ValueError(
            f"Column(s) {const.tolist()} of `{name}` are constant, so their correlation is "
            "undefined; drop them before computing the MCC."
        )
    return a / norms


def mcc(z_hat, z, *, method: str = "pearson") -> float:
    """Mean correlation coefficient between matched latent dimensions.

    The absolute correlation matrix between the columns of ``z_hat`` and those of ``z`` is
    computed, columns are matched one to one to maximise the total absolute correlation
    (Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`), and the mean over the
    ``min(d_hat, d)`` matched pairs is returned.

    Parameters
    ----------
    z_hat, z
        Shapes ``(n, d_hat)`` and ``(n, d)``, ``n >= 2``; no constant columns.
    method
        ``"pearson"`` (linear) or ``"spearman"`` (rank; invariant to monotone maps per column).

    Returns
    -------
    float
        MCC in ``[0, 1]``; 1 for a permuted, sign-flipped and rescaled copy.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"`method` must be 'pearson' or 'spearman', got {method!r}.")
    a, b = _pair(z_hat, z)
    if method == "spearman":
        a = rankdata(a, axis=0)
        b = rankdata(b, axis=0)
    corr = np.abs(_standardise(a, "z_hat").T @ _standardise(b, "z"))
    corr = np.clip(corr, 0.0, 1.0)
    rows, cols = linear_sum_assignment(corr, maximize=True)
    return float(corr[rows, cols].mean())


def _pooled_r2(pred: np.ndarray, b: np.ndarray) -> float:
    """``1 - SS_res / SS_tot`` pooled over all columns; ``SS_tot`` around the column means."""
    ss_tot = float(np.sum((b - b.mean(axis=0)) ** 2))
    if ss_tot == 0:
        raise ValueError("`z` is constant (zero total variance), so R^2 is undefined.")
    return 1.0 - float(np.sum((b - pred) ** 2)) / ss_tot


def procrustes_r2(z_hat, z) -> float:
    """R^2 of ``z`` explained by ``z_hat`` after the best similarity transformation.

    Both are centred; then ``s * A @ R + mean(z)`` is fitted in least squares, with ``A`` the
    centred ``z_hat``, ``R`` a ``(d_hat, d)`` matrix with orthonormal rows or columns (rotation
    and reflection when ``d_hat == d``; from the SVD of ``A^T B``) and ``s = trace(S) / |A|_F^2``
    the optimal global scale. R^2 is pooled over dimensions:
    ``1 - sum (z - fit)^2 / sum (z - mean(z))^2``.

    Parameters
    ----------
    z_hat, z
        Shapes ``(n, d_hat)`` and ``(n, d)``, ``n >= 2``.

    Returns
    -------
    float
        R^2 (at most 1; 1 for a rotated, scaled and shifted copy).
    """
    a, b = _pair(z_hat, z)
    a = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    u, svals, vt = np.linalg.svd(a.T @ bc, full_matrices=False)
    rot = u @ vt
    denom = float(np.sum(a * a))
    scale = float(svals.sum()) / denom if denom > 0 else 0.0
    fit = scale * (a @ rot) + b.mean(axis=0)
    return _pooled_r2(fit, b)


def linear_r2(z_hat, z) -> float:
    """R^2 of ``z`` explained by an affine map of ``z_hat`` (least squares with intercept).

    ``z ~ z_hat @ W + c`` is fitted by :func:`numpy.linalg.lstsq`; R^2 is pooled over the columns
    of ``z`` (``SS_tot`` around the column means). In-sample: with ``d_hat >= n - 1`` it is 1.

    Parameters
    ----------
    z_hat, z
        Shapes ``(n, d_hat)`` and ``(n, d)``, ``n >= 2``.
    """
    a, b = _pair(z_hat, z)
    design = np.column_stack([a - a.mean(axis=0), np.ones(a.shape[0])])
    coef, *_ = np.linalg.lstsq(design, b, rcond=None)
    return _pooled_r2(design @ coef, b)
