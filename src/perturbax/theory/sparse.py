"""The simplest combination of training conditions that reproduces a test perturbation.

A covered test ``t = l* - l_0`` has many representations ``t = sum_e c_e d_e`` over the distinct
training differences ``d_e`` when those are linearly dependent; the minimum-norm one
(:func:`perturbax.theory.rowspace.min_norm_coefficients`) spreads weight over every dependent
condition ("KLF1 0.451, MAP2K3 0.0694, ..."). This module finds a representation with few non-zero
coefficients, which is how an experimenter reads a design ("KLF1+SGK1 = KLF1 + SGK1"):

1. one training condition parallel to ``t``;
2. else every pair of conditions (all pairs up to :data:`PAIR_ROWS` distinct conditions, else
   pairs among the :data:`PAIR_ROWS` conditions most aligned with ``t``);
3. else orthogonal matching pursuit (greedy), followed by backward pruning of conditions that
   are not needed.

Each candidate is verified: it is accepted only if ``||t - sum_e c_e d_e|| <= tol`` (the coverage
tolerance). Among exact supports of the smallest size found, the one with the smallest ``||c||_2``
is returned. Steps 1-2 find a sparsest representation of size at most 2 whenever one exists
(within the candidate rows); step 3 is greedy, so larger supports are small but not guaranteed
minimal. ``None`` means no sparse representation was found; callers fall back to minimum norm.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["PAIR_ROWS", "simplest_coefficients"]

PAIR_ROWS = 300
_MAX_GREEDY = 50


def _exact(D: sp.csr_matrix, t: np.ndarray, rows: list[int], tol: float) -> np.ndarray | None:
    """Least-squares coefficients on ``rows`` if they reproduce ``t`` within ``tol``."""
    A = D[rows].toarray().T  # (K, |rows|)
    c, *_ = np.linalg.lstsq(A, t, rcond=None)
    return c if np.linalg.norm(A @ c - t) <= tol else None


def simplest_coefficients(
    D: sp.csr_matrix, t: np.ndarray, tol: float, *, gram: np.ndarray | None = None
) -> np.ndarray | None:
    """Sparse coefficients ``c`` (length ``n_rows``) with ``||c @ D - t|| <= tol``, or ``None``.

    Parameters
    ----------
    D
        Distinct training differences, CSR ``(n_rows, K)``.
    t
        The test difference (dense, length ``K``).
    tol
        Absolute residual tolerance (``residual_rtol * ||t||`` for the coverage check).
    gram
        ``D D^T`` (dense) when ``n_rows <= PAIR_ROWS``, to share it across tests.
    """
    n = D.shape[0]
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros(n)
    tt = float(t @ t)
    if tt == 0.0 or tt <= tol**2:
        return out
    if n == 0:
        return None
    d = np.asarray(D @ t).ravel()
    nn = np.asarray(D.multiply(D).sum(axis=1)).ravel()
    tol2 = tol**2

    # 1. a single condition
    with np.errstate(divide="ignore", invalid="ignore"):
        single = np.where(nn > 0, d / nn, 0.0)
        res2 = tt - np.where(nn > 0, d * d / nn, 0.0)
    hits = np.flatnonzero((res2 <= tol2) & (d != 0))
    for i in hits[np.argsort(np.abs(single[hits]), kind="stable")]:
        c = _exact(D, t, [int(i)], tol)
        if c is not None:
            out[i] = c[0]
            return out

    # 2. a pair of conditions
    if n <= PAIR_ROWS:
        P = np.arange(n)
        G = gram if gram is not None else (D @ D.T).toarray()
    else:
        touch = np.flatnonzero(d != 0)
        score = np.abs(d[touch]) / np.sqrt(nn[touch])
        P = np.sort(touch[np.argsort(-score, kind="stable")[:PAIR_ROWS]])
        G = (D[P] @ D[P].T).toarray()
    if P.size >= 2:
        iu, ju = np.triu_indices(P.size, k=1)
        a, b = nn[P][iu], nn[P][ju]
        g = G[iu, ju]
        da, db = d[P][iu], d[P][ju]
        det = a * b - g * g
        ok = det > 1e-12 * a * b
        with np.errstate(divide="ignore", invalid="ignore"):
            ca = np.where(ok, (b * da - g * db) / det, 0.0)
            cb = np.where(ok, (a * db - g * da) / det, 0.0)
        res2 = tt - (ca * da + cb * db)
        good = np.flatnonzero(ok & (res2 <= tol2) & (ca != 0) & (cb != 0))
        for k in good[np.argsort(ca[good] ** 2 + cb[good] ** 2, kind="stable")][:20]:
            rows = [int(P[iu[k]]), int(P[ju[k]])]
            c = _exact(D, t, rows, tol)
            if c is not None:
                out[rows] = c
                return out

    # 3. greedy (orthogonal matching pursuit), then prune
    support: list[int] = []
    r = t.copy()
    scale = np.sqrt(np.where(nn > 0, nn, np.inf))
    c = None
    for _ in range(min(n, _MAX_GREEDY)):
        score = np.abs(np.asarray(D @ r).ravel()) / scale
        score[support] = -1.0
        j = int(np.argmax(score))
        if score[j] <= 0:
            break
        support.append(j)
        A = D[support].toarray().T
        c, *_ = np.linalg.lstsq(A, t, rcond=None)
        r = t - A @ c
        if np.linalg.norm(r) <= tol:
            break
    else:
        c = None
    if c is None or np.linalg.norm(r) > tol:
        return None
    for j in sorted(support, key=lambda s: abs(c[support.index(s)])):
        trial = [s for s in support if s != j]
        if trial and _exact(D, t, trial, tol) is not None:
            support = trial
    c = _exact(D, t, support, tol)
    if c is None:  # pragma: no cover - the pruned support was verified just above
        return None
    out[support] = c
    return out
