"""Distances between two sets of cells: energy distance, RBF MMD, mean L2.

All functions take cell matrices of shape ``(n_cells, n_genes)`` (a 1-D array is read as
``n_cells`` values of a single feature; SciPy sparse matrices are densified) and compute in
float64 with NumPy. Pairwise quantities are evaluated block by block over rows of the first set
with the matrix form ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0 before any square root), so the
extra memory is ``O(chunk_size * m)`` and never ``O(n * m)`` or ``O(n * m * G)``. Both sets are
centred by their pooled mean first, which reduces cancellation in the matrix form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "energy_distance",
    "mean_l2",
    "median_heuristic",
    "mmd_rbf",
    "pairwise_mean_distance",
]

#: Multipliers of the median pairwise distance used as default RBF bandwidths in :func:`mmd_rbf`.
DEFAULT_BANDWIDTH_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Largest number of pooled cells used to estimate the median pairwise distance.
MEDIAN_SUBSAMPLE: int = 1000
#: Seed of the subsample used for the median heuristic (fixed: same data, same bandwidths).
MEDIAN_SEED: int = 0

_FORMS = ("U", "V")
#: Pairs with a matrix-form squared distance below this fraction of the largest squared norms in
#: the block are recomputed exactly from their difference (near-duplicate cells).
_NEAR_DUPLICATE_RTOL = 1e-8


# --------------------------------------------------------------------------------------------
# validation helpers (shared with the other metric modules)
# --------------------------------------------------------------------------------------------
def _as_cells(a, name: str, *, min_cells: int = 1) -> np.ndarray:
    """``a`` as a finite float64 array of shape ``(n_cells, n_features)``."""
    if sp.issparse(a):
        a = a.toarray()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be a numeric array of cells, got {type(a).__name__}."
        ) from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape (n_cells, n_genes); got an array with shape {arr.shape}. "
            "Reshape it so that rows are cells."
        )
    if arr.shape[0] < min_cells:
        raise ValueError(
            f"`{name}` has {arr.shape[0]} cell(s); at least {min_cells} are needed here."
        )
    _check_finite(arr, name)
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        value = arr[tuple(bad)]
        raise ValueError(
            f"`{name}` contains a non-finite value ({value}) at index "
            f"{tuple(int(i) for i in bad)}; remove or impute NaN/Inf entries before computing "
            "metrics."
        )


def _check_same_genes(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`{name_a}` has {a.shape[1]} genes/features but `{name_b}` has {b.shape[1]}; both "
            "must be in the same expression space (same genes, same order)."
        )


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    return int(chunk_size)


def _check_form(form) -> str:
    if form not in _FORMS:
        raise ValueError(
            f"`form` must be 'U' (unbiased, off-diagonal within-sample pairs) or 'V' (all pairs), "
            f"got {form!r}."
        )
    return form


def _pooled_centre(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, m = x.shape[0], y.shape[0]
    mu = (x.sum(axis=0) + y.sum(axis=0)) / (n + m)
    return x - mu, y - mu


# --------------------------------------------------------------------------------------------
# chunked kernel
# --------------------------------------------------------------------------------------------
# A reducer receives a block of squared distances (modified in place is allowed) and a scratch
# buffer of the same shape, and returns a 1-D float64 array of block sums (one per statistic).
_Reducer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _sqdist_block(a_blk: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray,
                  out: np.ndarray, *, zero_diagonal: bool = False) -> np.ndarray:
    """Squared distances between rows of ``a_blk`` and ``b`` written into ``out``, clamped >= 0.

    ``out`` must be C-contiguous (so that the product goes to BLAS without a temporary). With
    ``zero_diagonal`` (``a_blk`` is the first rows of ``b``) entries ``(i, i)`` are set to 0.
    """
    np.matmul(a_blk * -2.0, b.T, out=out)
    out += a_sq[:, None]
    out += b_sq[None, :]
    if zero_diagonal:
        idx = np.arange(a_blk.shape[0])
        out[idx, idx] = np.inf  # excluded from the near-duplicate search, zeroed below
    # The matrix form loses ~eps * (|a|^2 + |b|^2) absolutely, which the square root of the energy
    # distance turns into ~sqrt(eps) * |a| for (near-)duplicate cells. Recompute those few pairs
    # directly from their differences, in batches of at most out.size numbers.
    thr = _NEAR_DUPLICATE_RTOL * (float(a_sq.max()) + float(b_sq.max()))
    if out.min() < thr:
        ii, jj = np.nonzero(out < thr)
        step = max(1, out.size // max(1, a_blk.shape[1]))
        for s in range(0, ii.size, step):
            i, j = ii[s : s + step], jj[s : s + step]
            diff = a_blk[i] - b[j]
            out[i, j] = np.einsum("ij,ij->i", diff, diff)
        np.maximum(out, 0.0, out=out)
    if zero_diagonal:
        out[idx, idx] = 0.0
    return out


def _block_view(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A C-contiguous ``(rows, cols)`` view on the front of a flat buffer."""
    return buf[: rows * cols].reshape(rows, cols)


def _cross_sums(a: np.ndarray, b: np.ndarray, reduce: _Reducer, chunk_size: int) -> np.ndarray:
    """Sum of ``f(|a_i - b_j|^2)`` over all pairs ``(i, j)``, block by block over rows of ``a``."""
    n, m = a.shape[0], b.shape[0]
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    c = min(chunk_size, n)
    buf = np.empty(c * m)
    scratch = np.empty(c * m) if getattr(reduce, "needs_scratch", False) else buf
    total = None
    for s in range(0, n, c):
        e = min(s + c, n)
        blk = _sqdist_block(a[s:e], a_sq[s:e], b, b_sq, _block_view(buf, e - s, m))
        sums = reduce(blk, _block_view(scratch, e - s, m))
        total = sums if total is None else total + sums
    return total


def _self_sums(a: np.ndarray, reduce: _Reducer, chunk_size: int) -> np.ndarray:
    """Sum of ``f(|a_i - a_j|^2)`` over all ordered pairs, diagonal included (``d^2 = 0`` exactly).

    Uses symmetry: row block ``[s, e)`` is compared with rows ``s:`` only; the block-diagonal part
    counts once and the part to its right twice.
    """
    n = a.shape[0]
    a_sq = np.einsum("ij,ij->i", a, a)
    c = min(chunk_size, n)
    buf = np.empty(c * n)
    scratch = np.empty(c * n) if getattr(reduce, "needs_scratch", False) else buf
    total = None
    for s in range(0, n, c):
        e = min(s + c, n)
        w = e - s
        width = n - s
        blk = _sqdist_block(a[s:e], a_sq[s:e], a[s:], a_sq[s:], _block_view(buf, w, width),
                            zero_diagonal=True)
        sc = _block_view(scratch, w, width)
        diag_part = reduce(blk[:, :w], sc[:, :w])
        sums = diag_part
        if width > w:
            off = reduce(blk[:, w:], sc[:, w:])
            sums = diag_part + 2.0 * off
        total = sums if total is None else total + sums
    return total


def _reduce_sqrt(blk: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    # ``scratch`` is unused (and may alias ``blk``): the square root is taken in place.
    np.sqrt(blk, out=blk)
    return np.array([math.fsum(blk.sum(axis=1))])


def _reduce_rbf(gammas: np.ndarray) -> _Reducer:
    def reduce(blk: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        out = np.empty(len(gammas))
        for k, g in enumerate(gammas):
            np.multiply(blk, -g, out=scratch)
            np.exp(scratch, out=scratch)
            out[k] = math.fsum(scratch.sum(axis=1))
        return out

    reduce.needs_scratch = True
    return reduce


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def pairwise_mean_distance(x, y=None, *, exclude_diagonal: bool = False,
                           chunk_size: int = 2048) -> float:
    """Mean Euclidean distance between the rows of ``x`` and the rows of ``y``.

    Parameters
    ----------
    x, y
        Cells, shapes ``(n, G)`` and ``(m, G)``. With ``y=None`` the mean is over pairs of rows of
        ``x`` with itself (``n^2`` ordered pairs, the diagonal contributing exact zeros).
    exclude_diagonal
        Only with ``y=None``: average over the ``n (n - 1)`` off-diagonal pairs instead (the
        U-statistic estimate of ``E|X - X'|``; needs ``n >= 2``).
    chunk_size
        Rows of ``x`` per block; extra memory is about ``2 * chunk_size * m * 8`` bytes.

    Returns
    -------
    float
        ``sum_ij |x_i - y_j| / (n m)`` (or the within-sample version described above).
    """
    chunk_size = _check_chunk(chunk_size)
    if y is None:
        xa = _as_cells(x, "x", min_cells=2 if exclude_diagonal else 1)
        xa = xa - xa.mean(axis=0)
        n = xa.shape[0]
        total = _self_sums(xa, _reduce_sqrt, chunk_size)[0]
        return float(total / (n * (n - 1) if exclude_diagonal else n * n))
    if exclude_diagonal:
        raise ValueError(
            "`exclude_diagonal=True` only applies to within-sample distances; call "
            "pairwise_mean_distance(x) without `y` (or set exclude_diagonal=False)."
        )
    xa = _as_cells(x, "x")
    ya = _as_cells(y, "y")
    _check_same_genes(xa, ya, "x", "y")
    xa, ya = _pooled_centre(xa, ya)
    total = _cross_sums(xa, ya, _reduce_sqrt, chunk_size)[0]
    return float(total / (xa.shape[0] * ya.shape[0]))


def energy_distance(x, y, *, form: str = "U", chunk_size: int = 2048) -> float:
    """Euclidean energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two cell sets.

    Parameters
    ----------
    x, y
        Cells, shapes ``(n, G)`` and ``(m, G)``.
    form
        ``"U"`` (default): unbiased U-statistic; the within-sample means are over the
        ``n (n - 1)`` and ``m (m - 1)`` off-diagonal pairs (needs ``n, m >= 2``). Its expectation
        is exactly 0 when both sets come from the same distribution, so it can be slightly
        negative. ``"V"``: V-statistic, all means over all pairs (``n^2``, ``m^2``, diagonal
        zeros included); always ``>= 0`` and biased upwards by ``E|X-X'|/n + E|Y-Y'|/m``. In 1-D
        it equals ``scipy.stats.energy_distance(x, y) ** 2`` (SciPy returns the square root).
    chunk_size
        Rows per block; extra memory is ``O(chunk_size * max(n, m))``.

    Returns
    -------
    float
        The energy distance (a squared-distance-like quantity; not square-rooted).
    """
    form = _check_form(form)
    chunk_size = _check_chunk(chunk_size)
    min_cells = 2 if form == "U" else 1
    xa = _as_cells(x, "x", min_cells=min_cells)
    ya = _as_cells(y, "y", min_cells=min_cells)
    _check_same_genes(xa, ya, "x", "y")
    xa, ya = _pooled_centre(xa, ya)
    n, m = xa.shape[0], ya.shape[0]
    # the cross term is cheapest with the smaller set in the chunked (row) position
    if n <= m:
        sxy = _cross_sums(xa, ya, _reduce_sqrt, chunk_size)[0]
    else:
        sxy = _cross_sums(ya, xa, _reduce_sqrt, chunk_size)[0]
    sxx = _self_sums(xa, _reduce_sqrt, chunk_size)[0]
    syy = _self_sums(ya, _reduce_sqrt, chunk_size)[0]
    if form == "U":
        exx, eyy = sxx / (n * (n - 1)), syy / (m * (m - 1))
    else:
        exx, eyy = sxx / (n * n), syy / (m * m)
    return float(2.0 * sxy / (n * m) - exx - eyy)


def median_heuristic(x, y, *, subsample: int = MEDIAN_SUBSAMPLE, seed: int = MEDIAN_SEED) -> float:
    """Median Euclidean distance between distinct cells of the pooled sample ``[x; y]``.

    If the pooled sample has more than ``subsample`` cells, a subsample of ``subsample`` cells is
    drawn without replacement with ``numpy.random.default_rng(seed)``. The median is over the
    ``k (k - 1) / 2`` unordered pairs of distinct cells; if it is 0 (many duplicated cells) the
    median of the non-zero distances is used. Raises if all pooled cells are identical.
    """
    xa = _as_cells(x, "x")
    ya = _as_cells(y, "y")
    _check_same_genes(xa, ya, "x", "y")
    pooled = np.concatenate([xa, ya], axis=0)
    if pooled.shape[0] < 2:
        raise ValueError("The median heuristic needs at least 2 pooled cells; pass `bandwidths`.")
    if pooled.shape[0] > subsample:
        rng = np.random.default_rng(seed)
        pooled = pooled[np.sort(rng.choice(pooled.shape[0], size=subsample, replace=False))]
    pooled = pooled - pooled.mean(axis=0)
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T
    iu = np.triu_indices(pooled.shape[0], k=1)
    d = np.sqrt(np.maximum(d2[iu], 0.0))
    med = float(np.median(d))
    if med > 0:
        return med
    nz = d[d > 0]
    if nz.size == 0:
        raise ValueError(
            "All pooled cells are identical, so the median heuristic bandwidth is 0; "
            "pass explicit positive `bandwidths`."
        )
    return float(np.median(nz))


def mmd_rbf(x, y, *, bandwidths: Sequence[float] | None = None, form: str = "U",
            chunk_size: int = 2048) -> float:
    """Squared maximum mean discrepancy with a multi-bandwidth Gaussian (RBF) kernel.

    The kernel is the *mean* over bandwidths ``h`` of ``exp(-|a - b|^2 / (2 h^2))`` (so
    ``k(a, a) = 1``), and ``MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y)``.

    Parameters
    ----------
    x, y
        Cells, shapes ``(n, G)`` and ``(m, G)``.
    bandwidths
        Positive bandwidths ``h``. Default: ``median * (0.25, 0.5, 1, 2, 4)`` where ``median`` is
        :func:`median_heuristic` of the pooled sample (median Euclidean distance between distinct
        cells, on a subsample of at most 1000 pooled cells drawn with
        ``numpy.random.default_rng(0)``).
    form
        ``"U"`` (default): unbiased, within-sample means over off-diagonal pairs (``n, m >= 2``);
        ``"V"``: all pairs, diagonal included (``>= 0``, exactly 0 for identical sets).
    chunk_size
        Rows per block; extra memory is ``O(chunk_size * max(n, m))``.

    Returns
    -------
    float
        The MMD^2 estimate.
    """
    form = _check_form(form)
    chunk_size = _check_chunk(chunk_size)
    min_cells = 2 if form == "U" else 1
    xa = _as_cells(x, "x", min_cells=min_cells)
    ya = _as_cells(y, "y", min_cells=min_cells)
    _check_same_genes(xa, ya, "x", "y")
    if bandwidths is None:
        med = median_heuristic(xa, ya)
        h = med * np.asarray(DEFAULT_BANDWIDTH_FACTORS)
    else:
        h = np.atleast_1d(np.asarray(bandwidths, dtype=np.float64))
        if h.ndim != 1 or h.size == 0 or not np.all(np.isfinite(h)) or np.any(h <= 0):
            raise ValueError(
                f"`bandwidths` must be a non-empty sequence of positive finite numbers, got "
                f"{bandwidths!r}."
            )
    gammas = 1.0 / (2.0 * h**2)
    reduce = _reduce_rbf(gammas)
    xa, ya = _pooled_centre(xa, ya)
    n, m = xa.shape[0], ya.shape[0]
    if n <= m:
        kxy = _cross_sums(xa, ya, reduce, chunk_size)
    else:
        kxy = _cross_sums(ya, xa, reduce, chunk_size)
    kxx = _self_sums(xa, reduce, chunk_size)
    kyy = _self_sums(ya, reduce, chunk_size)
    if form == "U":
        # remove the diagonal, where k = 1 for every bandwidth
        exx = (kxx - n) / (n * (n - 1))
        eyy = (kyy - m) / (m * (m - 1))
    else:
        exx, eyy = kxx / (n * n), kyy / (m * m)
    per_bw = exx + eyy - 2.0 * kxy / (n * m)
    return float(np.mean(per_bw))


def mean_l2(x, y) -> float:
    """Euclidean distance between the mean vectors of two cell sets, ``|mean(x) - mean(y)|``."""
    xa = _as_cells(x, "x")
    ya = _as_cells(y, "y")
    _check_same_genes(xa, ya, "x", "y")
    return float(np.linalg.norm(xa.mean(axis=0) - ya.mean(axis=0)))
