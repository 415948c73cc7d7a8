"""The closed-form solution of the linear drift: ``E_t = e^{(B-I)t}``, the path ``z(t)`` and the
equilibrium shift ``W = (I - B)^{-1} S``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Float

from perturbax.models.linear_scm import bs_to_w

__all__ = ["equilibrium_shift", "transition_matrix", "linear_solution"]


def equilibrium_shift(B: Float[Array, "l l"], S: Float[Array, "l K"]) -> Float[Array, "l K"]:
    """``W = (I - B)^{-1} S``: the equilibrium shift of the linear drift, i.e. the ``W`` of the
    additive shift model that the dynamics reach at long times (DESIGN 2.3).

    The one implementation is :func:`perturbax.models.linear_scm.bs_to_w` (also
    :func:`perturbax.theory.bs_to_w`): NumPy inputs give a float64 NumPy result (with a clear error
    if ``I - B`` is singular), JAX inputs or tracers a differentiable JAX result.
    """
    return bs_to_w(B, S)


def _powers(B: Float[Array, "l l"]) -> Float[Array, "l l l"]:
    """``[I, B, B^2, ..., B^{l-1}]``."""
    n = B.shape[-1]
    out = [jnp.eye(n, dtype=B.dtype)]
    for _ in range(1, n):
        out.append(out[-1] @ B)
    return jnp.stack(out)


def _poisson_weights(t: Float[Array, ""], n: int) -> Float[Array, " n"]:
    """``e^{-t} t^k / k!`` for ``k < n`` by recursion (no overflow, finite gradients at t = 0)."""
    c = [jnp.exp(-t)]
    for k in range(1, n):
        c.append(c[-1] * t / k)
    return jnp.stack(c)


def _transition_single(B: Float[Array, "l l"], t: Float[Array, ""], nilpotent: bool) -> Float[Array, "l l"]:
    n = B.shape[-1]
    if nilpotent:
        return jnp.einsum("k,kij->ij", _poisson_weights(t, n), _powers(B))
    return jsl.expm((B - jnp.eye(n, dtype=B.dtype)) * t)


def _progress_single(B: Float[Array, "l l"], t: Float[Array, ""], nilpotent: bool) -> Float[Array, "l l"]:
    """``I - E_t``, with the identity part ``1 - e^{-t}`` as ``-expm1(-t)`` in the series (exactly
    0 at ``t = 0`` and accurate for small ``t``)."""
    n = B.shape[-1]
    eye = jnp.eye(n, dtype=B.dtype)
    if nilpotent:
        c = _poisson_weights(t, n)
        return -jnp.expm1(-t) * eye - jnp.einsum("k,kij->ij", c[1:], _powers(B)[1:])
    return eye - jsl.expm((B - eye) * t)


def _map_cells(fn: Callable, B: Array, t: Array) -> Array:
    """Apply ``fn(B_i, t_i)`` with ``B`` shared ``(l, l)`` or per cell ``(n, l, l)`` and ``t``
    a scalar or ``(n,)``."""
    if B.ndim == 2 and t.ndim == 0:
        return fn(B, t)
    return jax.vmap(fn, in_axes=(0 if B.ndim == 3 else None, 0 if t.ndim == 1 else None))(B, t)


def transition_matrix(B: Array, t: Array, *, nilpotent: bool = False) -> Array:
    """``E_t = e^{(B - I) t}``.

    ``B``: ``(l, l)`` or per cell ``(n, l, l)``; ``t``: a scalar or ``(n,)``. With
    ``nilpotent=True`` (``B`` on an acyclic mask, so ``B^l = 0``) the exact finite series
    ``sum_{k<l} e^{-t} t^k / k! B^k`` is used (cheap, no overflow, exact gradients); otherwise
    ``jax.scipy.linalg.expm``. For a strictly lower-triangular ``B``, ``B - I`` is triangular with
    every eigenvalue -1 and both agree.
    """
    B = jnp.asarray(B)
    t = jnp.asarray(t, dtype=B.dtype)
    return _map_cells(lambda b, s: _transition_single(b, s, nilpotent), B, t)


def linear_solution(
    z0: Float[Array, "n l"],
    t: Float[Array, " n"],
    B: Array,
    shift: Float[Array, "n l"],
    anchor: Array,
    *,
    nilpotent: bool = False,
) -> Float[Array, "n l"]:
    """Closed-form solution of ``dz/dt = (B - I)(z - anchor) + shift`` from ``z(0) = z0``:

        z(t) = anchor + (I - E_t) w + E_t (z0 - anchor)
             = z0 + (I - E_t)(anchor + w - z0),            w = (I - B)^{-1} shift,

    with ``E_t = e^{(B-I)t}`` (:func:`transition_matrix`). ``B`` is shared ``(l, l)`` or per cell
    ``(n, l, l)``; ``shift`` is ``S l`` per cell; ``anchor`` broadcasts to ``(n, l)``
    (``mu`` for relaxing dynamics, ``z0`` for persistent ones). As ``t -> inf``,
    ``z(t) -> anchor + (I - B)^{-1} S l``.
    """
    z0 = jnp.asarray(z0)
    B = jnp.asarray(B, dtype=z0.dtype)
    t = jnp.asarray(t, dtype=z0.dtype)
    anchor = jnp.broadcast_to(jnp.asarray(anchor, dtype=z0.dtype), z0.shape)
    eye = jnp.eye(z0.shape[-1], dtype=z0.dtype)
    if B.ndim == 2:
        w = jnp.linalg.solve(eye - B, shift.T).T
    else:
        w = jax.vmap(lambda b, s: jnp.linalg.solve(eye - b, s))(B, shift)
    R = _map_cells(lambda b, s: _progress_single(b, s, nilpotent), B, t)  # I - E_t
    if R.ndim == 2:
        R = jnp.broadcast_to(R, (z0.shape[0], *R.shape))
    # z0 + (I - E_t)(anchor + w - z0): exactly z0 at t = 0, no cancellation of large shifts.
    return z0 + jnp.einsum("nij,nj->ni", R, anchor + w - z0)
