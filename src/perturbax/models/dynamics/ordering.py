"""Causal masks and orders of the latent programs: masks, the order of a weight matrix, the order
read from the total effects ``W``, and acyclicity."""

from __future__ import annotations

import itertools
import math
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
    "sole_target_mask",
    "order_violation",
    "acyclicity_measure",
    "is_acyclic",
]


#: Most subsets of ``l`` perturbations :func:`order_from_effects` compares to find the sole-target ones.
MAX_TARGET_SUBSETS = 256


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
    W: Any, targets: Any = None, *, cycle_tol: float = 0.05, return_targets: bool = False
) -> tuple[list[int], np.ndarray] | tuple[list[int], np.ndarray, list[int]]:
    """A causal order of the programs read from the total effects ``W = (I - B)^{-1} S``
    (``l x K``, one column per elementary perturbation, ``K >= l``). Returns ``(order, B_hat)``,
    and with ``return_targets=True`` also the perturbation (column of ``W``) matched to each
    program as its sole direct target (:func:`sole_target_mask` makes the mask of that reading).

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
    consistent with ``W``). Without ``targets`` the condition cannot be checked from ``W``: the ``l``
    perturbations whose ``B_hat`` is closest to acyclic are used (every subset of ``l`` columns with
    linearly independent effects, up to ``MAX_TARGET_SUBSETS`` of them, else the ``l`` of QR with
    column pivoting; a perturbation that targets several programs, read as a sole target, can make
    ``B_hat`` cyclic) and a ``UserWarning`` is raised only when ``B_hat`` shows the condition fails -- more than
    ``cycle_tol`` of its squared weight points against the order read (exactly 0 when the chosen
    perturbations each target one program). Dense targets can still give an acyclic, wrong
    ``B_hat`` without a warning.
    """
    import warnings

    import scipy.linalg as sla

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
        # l perturbations with linearly independent effects whose B_hat is closest to acyclic (exactly
        # acyclic when each targets one program): every subset of l columns when there are at most
        # MAX_TARGET_SUBSETS, else QR with column pivoting (two perturbations with the same target have
        # parallel columns)
        subsets = [np.sort(sla.qr(w, mode="r", pivoting=True)[1][:ell])]
        if w.shape[1] > ell and math.comb(w.shape[1], ell) <= MAX_TARGET_SUBSETS:
            subsets += [np.asarray(c) for c in itertools.combinations(range(w.shape[1]), ell)]
        reads = [r for r in (_read_subset(w, c) for c in subsets) if r is not None]
        if not reads:
            raise ValueError("No l perturbations have linearly independent effects in W; the order is not identified.")
        order, b_hat, cols_used, backward = min(reads, key=lambda r: r[3])  # (ties: the QR choice)
    else:
        read = _read_subset(w, np.asarray(cols_used))
        if read is None:
            raise ValueError("The sole-target perturbations' effects in W are linearly dependent; the order is not "
                             "identified.")
        order, b_hat, cols_used, backward = read
    if targets is None and backward > cycle_tol:
        warnings.warn(
            f"order_from_effects: {backward:.0%} of the squared weight of B_hat read from W points against the "
            f"order {order}, so the perturbations used do not each target a single program and the causal order "
            f"is not identified by W (every acyclic B' reproduces W with S' = (I - B') W). Give the targets' "
            f"support (targets=, e.g. a target_mask) if it is known, or read B from a time course's transients.",
            UserWarning,
            stacklevel=2,
        )
    if return_targets:
        return order, b_hat, cols_used
    return order, b_hat


def _read_subset(w: np.ndarray, cols: np.ndarray) -> tuple[list[int], np.ndarray, list[int], float] | None:
    """``(order, B_hat, matched perturbation per program, order_violation)`` read from the columns
    ``cols`` of ``W`` taken as one sole-target perturbation per program (None if they are singular)."""
    from scipy.optimize import linear_sum_assignment

    ell = w.shape[0]
    sub = w[:, cols]
    if np.linalg.cond(sub) > 1e8:
        return None
    m = np.linalg.inv(sub)  # (l, l): rows = the chosen perturbations, W_sub^-1 = S_sub^-1 (I - B)
    # programs -> perturbations minimising sum 1/|m| (ICA-LiNGAM): m is triangular up to
    # permutations, and the diagonal is the only matching that avoids its zeros.
    rows, assigned = linear_sum_assignment(1.0 / np.maximum(np.abs(m.T), 1e-12))
    match = assigned[np.argsort(rows)]
    matched = m[match]
    diag = np.diag(matched)
    if np.any(np.abs(diag) < 1e-12):
        return None
    b_hat = np.eye(ell) - matched / diag[:, None]
    order = causal_order(b_hat)
    return order, b_hat, [int(k) for k in np.asarray(cols)[match]], order_violation(b_hat, order)


def sole_target_mask(targets: Sequence[int], n_perturbations: int) -> np.ndarray:
    """``l x K`` 0/1 target mask in which perturbation ``targets[i]`` shifts program ``i`` alone and
    every other perturbation may shift any program (e.g. the matching of
    ``order_from_effects(W, return_targets=True)``, which reads the order under that assumption)."""
    t = [int(k) for k in targets]
    if len(set(t)) != len(t) or any(k < 0 or k >= n_perturbations for k in t):
        raise ValueError(f"targets must be distinct perturbation columns in 0..{n_perturbations - 1}, got {t}.")
    mask = np.ones((len(t), n_perturbations), dtype=np.int64)
    mask[:, t] = np.eye(len(t), dtype=np.int64)
    return mask


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
