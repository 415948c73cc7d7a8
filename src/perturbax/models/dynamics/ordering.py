"""Causal masks and orders of the latent programs: masks, the order of a weight matrix, the order
read from the total effects ``W``, and acyclicity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, Float

from perturbax.models.linear_scm import sole_targets

__all__ = [
    "lower_triangular_mask",
    "full_mask",
    "order_mask",
    "causal_order",
    "order_from_effects",
    "order_violation",
    "acyclicity_measure",
    "is_acyclic",
]


def lower_triangular_mask(n: int) -> np.ndarray:
    """Strictly lower-triangular 0/1 mask: program ``j`` may act on program ``i`` iff ``j < i``."""
    return np.tril(np.ones((n, n), dtype=np.int64), -1)


def full_mask(n: int) -> np.ndarray:
    """0/1 mask with every off-diagonal entry 1 (any program may act on any other; cyclic, so use
    it with ``allow_cycles=True`` and usually ``acyclicity > 0``)."""
    return np.ones((n, n), dtype=np.int64) - np.eye(n, dtype=np.int64)


def order_mask(order: Sequence[int]) -> np.ndarray:
    """Acyclic 0/1 mask of a causal order: ``mask[i, j] = 1`` iff program ``j`` comes before
    program ``i`` in ``order`` (a permutation of ``range(l)``, causes first).
    ``order_mask(range(l))`` is :func:`lower_triangular_mask`."""
    order = [int(i) for i in order]
    n = len(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}, got {order}.")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return (pos[None, :] < pos[:, None]).astype(np.int64)


def causal_order(B: Any) -> list[int]:
    """A causal order (causes first) read from weights ``B`` (edge ``j -> i`` in ``B[i, j]``):
    repeatedly take, among the programs not yet placed, the one whose incoming weights from the
    other unplaced programs have the smallest sum of squares. Exact (the order of the DAG) when
    ``B`` is acyclic; for a nearly acyclic ``B`` (e.g. fitted with ``acyclicity > 0``) the order
    that drops the least squared weight greedily."""
    b = np.asarray(B, dtype=np.float64) ** 2
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"B must be a square matrix, got shape {b.shape}.")
    left = list(range(b.shape[0]))
    order: list[int] = []
    while left:
        incoming = [b[i, left].sum() - b[i, i] for i in left]
        nxt = left[int(np.argmin(incoming))]
        order.append(nxt)
        left.remove(nxt)
    return order


def order_from_effects(
    W: Any, targets: Any = None, *, cycle_tol: float = 0.05
) -> tuple[list[int], np.ndarray]:
    """A causal order of the programs read from the total effects ``W = (I - B)^{-1} S``
    (``l x K``, one column per elementary perturbation, ``K >= l``). Returns ``(order, B_hat)``.

    Identified only when every program is the SOLE direct target of some perturbation
    (:func:`perturbax.theory.check_order_from_effects`); targeting every program is not enough:
    with programs only ever targeted together, every acyclic ``B'`` reproduces ``W`` with
    ``S' = (I - B') W``, whatever the order. For ``l`` perturbations that each target one
    program, ``W_sub^{-1} = S_sub^{-1} (I - B)`` has the row of the perturbation that targets
    program ``i`` proportional to ``e_i - B[i]``. Programs are matched to perturbations by
    minimising ``sum 1 / |entry|`` (Hungarian), each matched row is scaled to a unit diagonal,
    ``B_hat = I - rows`` and the order is :func:`causal_order` of ``B_hat`` (the ICA-LiNGAM idea
    applied to the latent shifts). ``W`` does not depend on the causal mask of a fit, so this
    reads the order from a fit made under any mask.

    ``targets`` (``l x K``, the support of ``S`` in the same program labelling, e.g. a fit's
    ``target_mask``): the condition is checked, and the columns of sole-target perturbations are
    used; a ``UserWarning`` says when the condition fails (the result is then one of many orders
    consistent with ``W``). Without ``targets`` the condition cannot be checked from ``W``: ``l``
    perturbations with linearly independent columns are used (QR with column pivoting) and a
    ``UserWarning`` is raised only when ``B_hat`` shows the condition fails -- more than
    ``cycle_tol`` of its squared weight points against the order read (exactly 0 when the chosen
    perturbations each target one program). Dense targets can still give an acyclic, wrong
    ``B_hat`` without a warning.
    """
    import warnings

    import scipy.linalg as sla
    from scipy.optimize import linear_sum_assignment

    w = np.asarray(W, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < w.shape[0]:
        raise ValueError(
            f"W must be l x K with K >= l (at least one perturbation per program), got shape {w.shape}. "
            f"With fewer perturbations than programs the causal order cannot be read from the shifts."
        )
    ell = w.shape[0]
    cols_used = None
    if targets is not None:
        tm = np.asarray(targets)
        if tm.shape != w.shape:
            raise ValueError(f"targets must have the shape of W, {w.shape}, got {tm.shape}.")
        sole = np.asarray(sole_targets(tm))
        if np.all(sole >= 0):
            cols_used = sole
        else:
            missing = ", ".join(f"z{i + 1}" for i in np.flatnonzero(sole < 0))
            warnings.warn(
                f"order_from_effects: no perturbation targets {missing} alone (programs numbered as the rows of "
                f"W), so the causal order is NOT identified by the total effects W: every acyclic B' gives the same W with S' = (I - B') W "
                f"(perturbax.theory.check_order_from_effects). Read B from the transients of a time course, or "
                f"add a perturbation that targets each such program alone.",
                UserWarning,
                stacklevel=2,
            )
    if cols_used is None:
        # l perturbations with linearly independent effects (QR with column pivoting; two
        # perturbations with the same target have parallel columns), then W_sub^-1 = S_sub^-1 (I - B).
        cols_used = np.sort(sla.qr(w, mode="r", pivoting=True)[1][:ell])
    m = np.linalg.inv(w[:, cols_used])  # (l, l): rows = the chosen perturbations
    # programs -> perturbations minimising sum 1/|m| (ICA-LiNGAM): m is triangular up to
    # permutations, and the diagonal is the only matching that avoids its zeros.
    rows, cols = linear_sum_assignment(1.0 / np.maximum(np.abs(m.T), 1e-12))
    matched = m[cols[np.argsort(rows)]]
    diag = np.diag(matched)
    if np.any(np.abs(diag) < 1e-12):
        raise ValueError("A program has no perturbation with a direct effect on it; the order is not identified.")
    b_hat = np.eye(ell) - matched / diag[:, None]
    order = causal_order(b_hat)
    backward = order_violation(b_hat, order)
    if targets is None and backward > cycle_tol:
        warnings.warn(
            f"order_from_effects: {backward:.0%} of the squared weight of B_hat read from W points against the "
            f"order {order}, so the perturbations used do not each target a single program and the causal order "
            f"is not identified by W (every acyclic B' reproduces W with S' = (I - B') W). Give the targets' "
            f"support (targets=, e.g. a target_mask) if it is known, or read B from a time course's transients.",
            UserWarning,
            stacklevel=2,
        )
    return order, b_hat


def order_violation(B: Any, order: Sequence[int]) -> float:
    """Fraction of the squared off-diagonal weight of ``B`` on edges that point against ``order``
    (causes first): 0 for weights that are acyclic in that order."""
    b = np.asarray(B, dtype=np.float64) ** 2
    off = b * (1 - np.eye(b.shape[0]))
    total = float(off.sum())
    if total == 0:
        return 0.0
    return float((off * (1 - order_mask(order))).sum() / total)


def acyclicity_measure(B: Float[Array, "l l"]) -> Float[Array, ""]:
    """NOTEARS acyclicity measure ``h(B) = tr(e^{B * B}) - l`` (elementwise square): ``>= 0``,
    and ``0`` exactly when the graph of ``B`` has no directed cycle; differentiable."""
    B = jnp.asarray(B)
    return jnp.trace(jsl.expm(B * B)) - B.shape[-1]


def is_acyclic(mask: np.ndarray) -> bool:
    """Whether the directed graph with adjacency ``mask[i, j] != 0`` (edge ``j -> i``) has no
    cycle, i.e. the mask is nilpotent (then every ``B`` on it has ``B^n = 0``)."""
    m = (np.asarray(mask) != 0).astype(np.int64)
    n = m.shape[0]
    p = np.eye(n, dtype=np.int64)
    for _ in range(n):
        p = np.minimum(p @ m, 1)
    return not p.any()
