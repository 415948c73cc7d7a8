"""The causal order read from the transients of condition means: a closed-form second opinion for the
recipe's order search (:mod:`perturbax.inference.dynamics_recipe`).

Under the linear latent dynamics with a stationary control (the package default), the mean shift of
a condition with labels ``l`` at time ``t`` is ``Phi(u) S l`` with ``u = t / time_unit`` and

    Phi(u) = int_0^u e^{(B - I)s} ds = sum_{k < l} B^k P(k + 1, u)

(``B`` nilpotent, ``P`` the regularised lower incomplete gamma function); a decoder that is linear
near the control maps it to genes. The equilibrium ``W = (I - B)^{-1} S`` fixes the latent space
only up to a rotation; the transients fix it up to a permutation of the programs, so they carry the
order. A *hypothesis* is a sequence ``p`` of ``l`` perturbations, causes first: program ``j`` is the
sole direct target of perturbation ``p[j]`` (every other perturbation may shift any program) and
``B`` is strictly lower triangular in that order. For each one, a linear decoder ``D``, ``B``,
``S`` and a rate are fitted by least squares to the mean shifts of the training contexts from the
pooled control, projected on their top ``l`` principal components (:func:`transient_residual`);
the residual ranks the hypotheses, and a bootstrap over cells (:func:`transient_scores`) says
which of them the data cannot tell apart.

The decoder of the model is not linear, so the reading is an approximation: it is used to narrow
the orders the energy search chooses among, not to fix the order alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from scipy.optimize import least_squares
from scipy.special import gammainc

from perturbax.data.core import PerturbationData

__all__ = ["TRANSIENT_RESTARTS", "TRANSIENT_BOOTSTRAP", "condition_shifts", "transient_residual", "transient_scores"]

#: Least-squares starts per hypothesis (random ``B``, ``D`` near the identity, ``S`` ones).
TRANSIENT_RESTARTS = 4
#: Bootstrap replicates (cells resampled within each context) of :func:`transient_scores`.
TRANSIENT_BOOTSTRAP = 10


def condition_shifts(
    data: PerturbationData, n_components: int, *, time_unit: float, rng: np.random.Generator | None = None
) -> tuple[Float[np.ndarray, "m c"], Float[np.ndarray, "m K"], Float[np.ndarray, " m"]]:
    """Mean shift of every perturbed (condition, time) context from the mean of the control cells
    (all times pooled), projected on the top ``n_components`` principal components of those shifts;
    with each row's labels and time in units of ``time_unit``. ``rng``: a bootstrap replicate
    (cells resampled with replacement within each context and within the control)."""
    if data.times is None or data.control_index is None:
        raise ValueError("The transient reading needs times and control cells (time_key= and control= of from_anndata).")
    env, t = np.asarray(data.env), np.asarray(data.times, dtype=np.float64)
    keys = np.stack([env.astype(np.float64), t], axis=1)
    contexts, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    X = data.dense()
    ctrl_cells = np.flatnonzero(env == data.control_index)
    if rng is not None:
        ctrl_cells = rng.choice(ctrl_cells, ctrl_cells.size)
    ctrl = X[ctrl_cells].astype(np.float64).mean(0)
    rows, labels, times = [], [], []
    for i, (e, tt) in enumerate(contexts):
        if int(e) == data.control_index:
            continue
        cells = np.flatnonzero(inverse == i)
        if rng is not None:
            cells = rng.choice(cells, cells.size)
        rows.append(X[cells].astype(np.float64).mean(0) - ctrl)
        labels.append(np.asarray(data.design[int(e)], dtype=np.float64))
        times.append(tt / time_unit)
    R = np.asarray(rows)
    Vt = np.linalg.svd(R, full_matrices=False)[2]
    return R @ Vt[:n_components].T, np.asarray(labels), np.asarray(times)


def _phi(B: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``int_0^u e^{(B - I)s} ds`` for a nilpotent ``B`` at each ``u``: ``(n, l, l)``."""
    ell = B.shape[0]
    out = np.zeros((u.size, ell, ell))
    Bk = np.eye(ell)
    for k in range(ell):
        out += gammainc(k + 1, u)[:, None, None] * Bk
        Bk = Bk @ B
    return out


def transient_residual(Y: Float[np.ndarray, "m l"], L: Float[np.ndarray, "m K"], u: Float[np.ndarray, " m"],
                       hypothesis: Sequence[int], *, restarts: int = TRANSIENT_RESTARTS, seed: int = 0) -> float:
    """Least residual sum of squares of ``Y ~ D Phi(rate u) S l`` under ``hypothesis`` (perturbation
    ``hypothesis[j]`` the sole direct target of program ``j``; ``B`` strictly lower triangular: causes
    first), the best of ``restarts`` starts."""
    p = [int(k) for k in hypothesis]
    ell, K = Y.shape[1], L.shape[1]
    if len(p) != ell or len(set(p)) != ell:
        raise ValueError(f"hypothesis must name {ell} distinct perturbation columns, got {p}.")
    rows, cols = np.tril_indices(ell, -1)
    smask = np.ones((ell, K))
    smask[:, p] = 0.0
    smask[np.arange(ell), p] = 1.0
    s_idx = np.flatnonzero(smask.ravel())
    nb, nd = rows.size, ell * ell

    def resid(th):
        B = np.zeros((ell, ell))
        B[rows, cols] = th[:nb]
        D = th[nb + 1:nb + 1 + nd].reshape(ell, ell)
        S = np.zeros(ell * K)
        S[s_idx] = th[nb + 1 + nd:]
        z = np.einsum("nij,nj->ni", _phi(B, np.exp(th[nb]) * u), L @ S.reshape(ell, K).T)
        return (z @ D.T - Y).ravel()

    rng = np.random.default_rng(seed)
    best = np.inf
    for _ in range(restarts):
        th0 = np.concatenate([rng.normal(0, 0.3, nb), [0.0], (np.eye(ell) + rng.normal(0, 0.3, (ell, ell))).ravel(),
                              np.ones(s_idx.size)])
        best = min(best, 2.0 * float(least_squares(resid, th0).cost))
    return best


def transient_scores(data: PerturbationData, hypotheses: Sequence[Sequence[int]], *, latent_dim: int,
                     time_unit: float, bootstrap: int = TRANSIENT_BOOTSTRAP, seed: int = 0) -> dict:
    """The residual of each hypothesis on the training contexts (:func:`transient_residual`), and
    the hypotheses that come first in the point estimate or in any of ``bootstrap`` replicates (the
    ones the data cannot tell apart).

    Returns ``{"residual": {hypothesis: rss}, "first": [hypotheses], "bootstrap": n}`` with
    hypotheses as tuples of perturbation columns."""
    hyps = [tuple(int(k) for k in h) for h in hypotheses]
    if not hyps:
        raise ValueError("transient_scores needs at least one hypothesis.")

    def score(rng):
        Y, L, u = condition_shifts(data, latent_dim, time_unit=time_unit, rng=rng)
        return {h: transient_residual(Y, L, u, h, seed=seed) for h in hyps}

    point = score(None)
    first = {min(point, key=point.get)}
    rng = np.random.default_rng(seed + 1)
    for _ in range(bootstrap):
        b = score(rng)
        first.add(min(b, key=b.get))
    return {"residual": point, "first": sorted(first, key=point.get), "bootstrap": int(bootstrap)}
