"""The row space of a perturbation design: numerical rank with explicit tolerances, projections,
least-squares coefficients and convex-hull membership.

A design is a matrix ``L`` (rows = measured perturbations as label vectors, one column per
elementary perturbation, entries = doses) and a reference label ``l_0`` (the control, the zero
vector). Everything here works on ``D = rows of L - l_0`` after removing duplicate rows and rows
equal to ``l_0`` (they add nothing to the row space).

Numerical rank
--------------
``rank(D)`` counts singular values above ``tol = rtol * s_max(D)`` (default ``rtol = 1e-8``). Two
methods compute the same row space:

- ``"svd"``: one SVD of the distinct rows (QR first when the matrix is tall). Used when at most
  256 columns are active. The reported singular values are those of ``D``.
- ``"peel"`` (large designs): rows that are a *single* elementary perturbation (after removing the
  columns already found) put that unit vector exactly into the row space; this is repeated until no
  such row is left (sparse, linear in the number of non-zeros), then the remaining block
  ``D[:, not yet found]`` gets one SVD with the same absolute tolerance ``rtol * s_max(D)`` (for
  a large tall block: eigendecomposition of its Gram matrix, with the directions below
  ``1e-3 * s_max`` resolved by an SVD of the block restricted to them, see
  :func:`_right_svd_gram`). A
  control + singles + combinations design of any size is resolved almost entirely by the first
  step. Singleton rows whose dose is ``<= tol`` are left to the SVD. The two methods agree except
  for designs within about ``tol`` of losing rank through a mix of huge and tiny doses.

Coverage of a vector ``t`` (``t = l* - l_0``) is decided on the residual of its orthogonal
projection onto the row space: covered iff ``||t - P t|| <= residual_rtol * ||t||`` (default
``1e-6``; the projection itself is accurate to about ``1e-8`` relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_RESIDUAL_RTOL",
    "RowSpace",
    "distinct_rows",
    "min_norm_coefficients",
    "convex_coefficients",
    "is_convex",
]

DEFAULT_RTOL = 1e-8
DEFAULT_RESIDUAL_RTOL = 1e-6
_SVD_MAX_ACTIVE = 256
_CHUNK = 2048


def _csr(x, K: int | None = None, what: str = "matrix") -> sp.csr_matrix:
    """A float64 CSR copy of a dense or sparse 2-D array (finite values checked)."""
    if sp.issparse(x):
        M = sp.csr_matrix(x, dtype=np.float64, copy=True)
    else:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"{what} must be 2-D (rows x elementary perturbations), got shape {a.shape}.")
        M = sp.csr_matrix(a)
    if K is not None and M.shape[1] != K:
        raise ValueError(
            f"{what} has {M.shape[1]} columns but there are {K} elementary perturbations; "
            f"use one column per elementary perturbation, in the same order."
        )
    if M.nnz and not np.isfinite(M.data).all():
        bad = np.unique(np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))[~np.isfinite(M.data)])
        raise ValueError(f"{what} has NaN/Inf entries in row(s) {bad[:10].tolist()}; doses must be finite.")
    M.sum_duplicates()
    M.eliminate_zeros()
    M.sort_indices()
    return M


def distinct_rows(D: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Distinct non-zero rows of ``D`` in order of first occurrence.

    Returns ``(D_distinct, first, counts)``: ``first[i]`` is the index in ``D`` of the first copy of
    distinct row ``i`` and ``counts[i]`` how many rows of ``D`` equal it. Zero rows are dropped.
    """
    D = _csr(D)
    seen: dict[tuple[bytes, bytes], int] = {}
    first: list[int] = []
    counts: list[int] = []
    ip, ind, dat = D.indptr, D.indices, D.data
    for i in range(D.shape[0]):
        s, e = ip[i], ip[i + 1]
        if s == e:
            continue
        key = (ind[s:e].tobytes(), dat[s:e].tobytes())
        j = seen.get(key)
        if j is None:
            seen[key] = len(first)
            first.append(i)
            counts.append(1)
        else:
            counts[j] += 1
    first_a = np.asarray(first, dtype=np.int64)
    return D[first_a], first_a, np.asarray(counts, dtype=np.int64)


def _right_svd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending) and right singular vectors (rows of ``Vt``) of a dense matrix;
    a QR first when it is tall, so the left factor is never formed."""
    n, k = A.shape
    if n == 0 or k == 0:
        return np.zeros(0), np.zeros((0, k))
    if n >= 2 * k:
        A = sla.qr(A, mode="r", check_finite=False)[0][:k]
    try:
        _, s, Vt = sla.svd(A, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:  # pragma: no cover - gesdd rarely fails to converge
        _, s, Vt = sla.svd(A, full_matrices=False, check_finite=False, lapack_driver="gesvd")
    return s, Vt


def _right_svd_gram(B: sp.csr_matrix, split: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_right_svd` for a large, tall sparse block, without a dense QR of it.

    The eigendecomposition of ``G = B^T B`` gives the singular values above ``split * s_max``
    and their right singular subspace accurately (the gap to the rest is at least
    ``split^2 * s_max^2``, so the subspace error is about ``eps / split^2 ~ 2e-10``); the
    remaining directions ``V_s`` are resolved by an SVD of ``B V_s`` (a QR of an ``n x k_s``
    matrix), which gives the small singular values to about ``2e-10 * s_max`` -- well below the
    rank tolerance ``rtol * s_max`` for ``rtol >= 1e-9``.
    """
    G = np.asarray((B.T @ B).toarray(), dtype=np.float64)
    lam, V = sla.eigh(G, check_finite=False)
    lam, V = lam[::-1], V[:, ::-1]
    if lam.size == 0 or lam[0] <= 0:
        return np.zeros(0), np.zeros((0, B.shape[1]))
    big = lam > (split**2) * lam[0]
    s_big = np.sqrt(lam[big])
    Vt_big = V[:, big].T
    Vs = V[:, ~big]
    if Vs.shape[1] == 0:
        return s_big, Vt_big
    s_small, Wt = _right_svd(np.asarray(B @ Vs))
    Vt_small = Wt @ Vs.T
    s = np.concatenate([s_big, s_small])
    Vt = np.concatenate([Vt_big, Vt_small], axis=0)
    order = np.argsort(-s, kind="stable")
    return s[order], Vt[order]


def _spectral_norm(D: sp.csr_matrix) -> float:
    """Largest singular value of a sparse matrix (ARPACK; power iteration if that fails)."""
    n, k = D.shape
    if min(n, k) <= 2 or D.nnz == 0:
        return float(np.linalg.norm(D.toarray(), 2)) if D.nnz else 0.0
    from scipy.sparse.linalg import svds

    try:
        v0 = np.linspace(1.0, 2.0, min(n, k))
        s = svds(D, k=1, return_singular_vectors=False, tol=1e-8, v0=v0)
        return float(s[0])
    except Exception:  # pragma: no cover - ARPACK failure; fall back to power iteration
        v = np.linspace(1.0, 2.0, k)
        v /= np.linalg.norm(v)
        est = 0.0
        for _ in range(500):
            w = D.T @ (D @ v)
            nw = float(np.linalg.norm(w))
            if nw == 0:
                return 0.0
            v = w / nw
            if abs(np.sqrt(nw) - est) <= 1e-10 * np.sqrt(nw):
                break
            est = np.sqrt(nw)
        return float(np.linalg.norm(D @ v))


def _peel(D: sp.csr_matrix, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Columns whose unit vector is exactly in the row space through singleton rows (see module
    docstring); returns ``(known mask, pivot magnitudes in order found)``."""
    n, K = D.shape
    ip, ind, dat = D.indptr, D.indices, D.data
    csc = D.tocsc()
    cip, cind = csc.indptr, csc.indices
    count = np.diff(ip).astype(np.int64)
    known = np.zeros(K, dtype=bool)
    pivots: list[float] = []
    stack = list(np.flatnonzero(count == 1)[::-1])
    while stack:
        i = stack.pop()
        if count[i] != 1:
            continue
        s, e = ip[i], ip[i + 1]
        cols = ind[s:e]
        free = ~known[cols]
        k = int(cols[free][0])
        a = abs(float(dat[s:e][free][0]))
        if a <= tol:
            continue
        known[k] = True
        pivots.append(a)
        for j in cind[cip[k] : cip[k + 1]]:
            count[j] -= 1
            if count[j] == 1:
                stack.append(j)
    return known, np.asarray(pivots, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class RowSpace:
    """Orthonormal description of ``rowspace(D)`` at a stated tolerance.

    ``rowspace(D) = span{e_k : known[k]}  (+)  span(basis)``, where ``basis`` has orthonormal
    columns supported on ``block_cols``; the two parts are orthogonal.

    Attributes
    ----------
    K
        Number of elementary perturbations (columns).
    known
        Columns whose unit vector was found exactly by singleton elimination (``method="peel"``).
    pivots
        Magnitudes of the singleton rows used for ``known`` (margins of those decisions).
    block_cols
        Columns of the block that got the SVD.
    basis
        ``(len(block_cols), r)`` orthonormal basis of the block's retained right singular space.
    singular_values
        All singular values of the block, descending (for ``method="svd"``: of ``D``).
    tolerance
        Absolute threshold ``rtol * s_max``: singular values (and pivots) at or below are dropped.
    s_max
        Largest singular value of ``D``.
    rtol
        The relative tolerance used.
    method
        ``"svd"`` or ``"peel"``.
    """

    K: int
    known: np.ndarray
    pivots: np.ndarray
    block_cols: np.ndarray
    basis: np.ndarray
    singular_values: np.ndarray
    tolerance: float
    s_max: float
    rtol: float
    method: str

    # ------------------------------------------------------------------ build
    @classmethod
    def from_rows(cls, D, *, rtol: float = DEFAULT_RTOL, method: str = "auto") -> RowSpace:
        """Row space of the rows of ``D`` (dense or sparse, ``(n, K)``), see the module docstring."""
        if not (0 < rtol < 1):
            raise ValueError(f"rtol must be in (0, 1), got {rtol}.")
        if method not in ("auto", "svd", "peel"):
            raise ValueError(f"method must be 'auto', 'svd' or 'peel', got {method!r}.")
        D = _csr(D, what="design")
        K = D.shape[1]
        active = np.unique(D.indices)
        if method == "auto":
            method = "svd" if active.size <= _SVD_MAX_ACTIVE else "peel"
        known = np.zeros(K, dtype=bool)
        pivots = np.zeros(0)
        if D.nnz == 0:
            return cls(K, known, pivots, np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros(0), 0.0, 0.0, rtol, method)
        if method == "svd":
            s, Vt = _right_svd(D[:, active].toarray())
            s_max = float(s[0]) if s.size else 0.0
            tol = rtol * s_max
            block_cols = active
        else:
            s_max = _spectral_norm(D)
            tol = rtol * s_max
            known, pivots = _peel(D, tol)
            block_cols = active[~known[active]]
            block = D[:, block_cols]
            block = block[np.diff(block.indptr) > 0]
            if block.shape[0]:
                block, _, _ = distinct_rows(block)
            if block.shape[1] > _SVD_MAX_ACTIVE and block.shape[0] >= 2 * block.shape[1] and rtol >= 1e-9:
                s, Vt = _right_svd_gram(block)
            else:
                s, Vt = _right_svd(block.toarray())
        r = int(np.sum(s > tol))
        basis = np.ascontiguousarray(Vt[:r].T)
        for a in (known, pivots, block_cols, basis, s):
            a.flags.writeable = False
        return cls(K, known, pivots, block_cols.astype(np.int64), basis, s, float(tol), s_max, rtol, method)

    # --------------------------------------------------------------- queries
    @property
    def rank(self) -> int:
        """Numerical rank of ``D``."""
        return int(self.known.sum()) + int(self.basis.shape[1])

    @property
    def n_eliminated(self) -> int:
        """Number of unit vectors found by singleton elimination."""
        return int(self.known.sum())

    @property
    def smallest_retained(self) -> float | None:
        """Smallest singular value of the block above the tolerance (``None`` if none)."""
        r = self.basis.shape[1]
        return float(self.singular_values[r - 1]) if r else None

    @property
    def largest_dropped(self) -> float | None:
        """Largest singular value of the block at or below the tolerance (``None`` if none)."""
        r = self.basis.shape[1]
        return float(self.singular_values[r]) if self.singular_values.size > r else None

    def residuals(self, T) -> np.ndarray:
        """``T - P T`` for rows ``T`` (dense ``(m, K)`` result; ``T`` dense or sparse)."""
        R = T.toarray() if sp.issparse(T) else np.array(T, dtype=np.float64, copy=True)
        if R.ndim == 1:
            R = R[None, :]
        if R.shape[1] != self.K:
            raise ValueError(f"Expected vectors with {self.K} entries, got shape {R.shape}.")
        R[:, self.known] = 0.0
        if self.basis.shape[1]:
            c = self.block_cols
            Tc = R[:, c]
            R[:, c] = Tc - (Tc @ self.basis) @ self.basis.T
        return R

    def residual_norms(self, T) -> np.ndarray:
        """``||t - P t||`` for each row ``t`` of ``T`` (processed in chunks; ``T`` may be sparse)."""
        m = T.shape[0] if T.ndim == 2 else 1
        out = np.empty(m)
        for s in range(0, m, _CHUNK):
            chunk = T[s : s + _CHUNK]
            out[s : s + _CHUNK] = np.linalg.norm(self.residuals(chunk), axis=1)
        return out

    def elementary_residuals(self) -> np.ndarray:
        """``||e_k - P e_k||`` for every elementary perturbation ``k`` (0 means identified).

        Computed as ``sqrt(1 - ||P e_k||^2)``; accurate to about ``1e-8``.
        """
        res = np.ones(self.K)
        res[self.known] = 0.0
        if self.basis.shape[1]:
            inside = np.sum(self.basis**2, axis=1)
            res[self.block_cols] = np.sqrt(np.clip(1.0 - inside, 0.0, None))
        return res

    def coordinates(self, T: np.ndarray) -> np.ndarray:
        """Coordinates of the projections of rows ``T`` in the orthonormal basis
        ``[e_known..., basis columns...]``: shape ``(m, rank)``."""
        if sp.issparse(T):
            T = sp.csr_matrix(T, dtype=np.float64)
            parts = [T[:, np.flatnonzero(self.known)].toarray()]
            if self.basis.shape[1]:
                parts.append(np.asarray(T[:, self.block_cols] @ self.basis))
        else:
            T = np.atleast_2d(np.asarray(T, dtype=np.float64))
            parts = [T[:, self.known]]
            if self.basis.shape[1]:
                parts.append(T[:, self.block_cols] @ self.basis)
        return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- coefficients
def _cgne(D: sp.csr_matrix, B: np.ndarray, *, tol: float = 1e-12, maxiter: int | None = None):
    """Minimum-norm ``X`` with ``D^T X = B`` (columns independent), by conjugate gradients on
    ``D^T D Y = B`` with ``X = D Y`` (CGNE). ``B`` must lie in ``rowspace(D)``."""
    K, m = B.shape
    n = D.shape[0]
    maxiter = maxiter if maxiter is not None else max(50, min(4 * K, 5000))
    X = np.zeros((n, m))
    R = B.copy()
    P = R.copy()
    rr = np.sum(R * R, axis=0)
    target = (tol**2) * rr
    live = rr > target
    DT = D.T.tocsr()
    for _ in range(maxiter):
        if not live.any():
            break
        DP = D @ P
        pGp = np.sum(DP * DP, axis=0)
        ok = live & (pGp > 0)
        alpha = np.where(ok, rr / np.where(pGp > 0, pGp, 1.0), 0.0)
        X += DP * alpha
        R -= (DT @ DP) * alpha
        rr_new = np.sum(R * R, axis=0)
        beta = np.where(ok, rr_new / np.where(rr > 0, rr, 1.0), 0.0)
        P = R + P * beta
        rr = rr_new
        live = ok & (rr > target)
    b2 = np.sum(B * B, axis=0)
    rel = np.sqrt(np.sum(R * R, axis=0) / np.where(b2 > 0, b2, 1.0))
    return X, rel


def min_norm_coefficients(D: sp.csr_matrix, space: RowSpace, T: np.ndarray) -> np.ndarray:
    """Minimum-norm coefficients ``C`` (``(m, n_rows)``) with ``C @ D = P T`` (the projections of
    the rows of ``T`` on the row space). ``D`` must be the matrix ``space`` was built from.

    Method ``"svd"``: ``c = D V S^-2 V^T t`` from the SVD (exact up to rounding). Method
    ``"peel"``: conjugate gradients on the normal equations (CGNE) to a relative residual of
    ``1e-12``; rows that do not reach ``1e-8`` within the iteration limit (very ill-conditioned
    designs) are returned as NaN.
    """
    D = _csr(D)
    T = np.atleast_2d(np.asarray(T, dtype=np.float64))
    if T.shape[0] == 0 or D.shape[0] == 0:
        return np.zeros((T.shape[0], D.shape[0]))
    PT = T - space.residuals(T)
    if space.method == "svd":
        r = space.basis.shape[1]
        if r == 0:
            return np.zeros((T.shape[0], D.shape[0]))
        c = space.block_cols
        s = space.singular_values[:r]
        Y = (PT[:, c] @ space.basis) / s**2  # (m, r)
        return np.asarray((D[:, c] @ (space.basis @ Y.T)).T)
    X, rel = _cgne(D, PT.T)
    X[:, rel > 1e-8] = np.nan
    return X.T


def convex_coefficients(
    D: sp.csr_matrix,
    space: RowSpace,
    t: np.ndarray,
    *,
    reference_is_row: bool = True,
    atol: float = 1e-6,
    time_limit: float = 10.0,
) -> np.ndarray | None:
    """Coefficients ``c >= 0`` with ``sum(c) <= 1`` (``== 1`` when the reference is not a measured
    row) and ``c @ D = P t`` -- a certificate that ``l_0 + t`` lies in the convex hull of the
    training labels -- or ``None`` if there is none.

    Solved as the linear program ``min ||D^T c - P t||_1`` over that simplex (HiGHS; always
    feasible, so rounding in ``P t`` cannot make it fail): the point is inside the hull iff the
    optimum is at most ``atol * max(1, ||t||_1)``. The solution is a vertex, so it uses few training
    labels. Raises ``RuntimeError`` when HiGHS does not finish (time limit, numerical trouble), i.e.
    when membership is undetermined.
    """
    from scipy.optimize import linprog

    D = _csr(D)
    n, K = D.shape
    t = np.asarray(t, dtype=np.float64).reshape(1, -1)
    pt = (t - space.residuals(t))[0]
    scale = max(1.0, float(np.abs(t).sum()))
    if n == 0:
        return np.zeros(0) if (reference_is_row and np.abs(pt).sum() <= atol * scale) else None
    eye = sp.identity(K, format="csr")
    A_eq = sp.hstack([D.T.tocsr(), eye, -eye], format="csr")
    cost = np.concatenate([np.zeros(n), np.ones(2 * K)])
    simplex = sp.csr_matrix(np.concatenate([np.ones(n), np.zeros(2 * K)])[None, :])
    if reference_is_row:
        A_ub, b_ub = simplex, np.ones(1)
    else:
        A_ub = b_ub = None
        A_eq = sp.vstack([A_eq, simplex], format="csr")
        pt = np.concatenate([pt, [1.0]])
    res = linprog(
        cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=pt, bounds=(0, None), method="highs",
        options={"time_limit": float(time_limit)},
    )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"Convex-hull linear program not solved (HiGHS status {res.status}: {res.message}).")
    c = res.x[:n]
    c = np.where(c < 1e-12, 0.0, c)
    total = float(c.sum())
    gap = float(np.abs(D.T @ c - pt[:K]).sum())
    if (reference_is_row and total > 1 + 1e-9) or (not reference_is_row and abs(total - 1) > 1e-9):
        return None
    return c if gap <= atol * scale else None


def is_convex(c: np.ndarray, *, reference_is_row: bool, atol: float) -> bool:
    """Whether coefficients describe a point of the convex hull (see :func:`convex_coefficients`)."""
    c = np.asarray(c, dtype=np.float64)
    if c.size and c.min() < -atol:
        return False
    total = float(c.sum())
    return total <= 1 + atol if reference_is_row else abs(total - 1) <= atol
