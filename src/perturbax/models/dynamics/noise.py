"""Ornstein-Uhlenbeck noise of the linear drift: the stationary covariance ``P`` and the
transition covariance ``Q_t = P - E_t P E_t^T``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from perturbax.models.dynamics.closed_form import _map_cells, _powers, _transition_single

__all__ = ["stationary_noise_cov", "ou_noise_cov"]


def _stationary_single(B: Float[Array, "l l"], nilpotent: bool) -> Float[Array, "l l"]:
    n = B.shape[-1]
    if nilpotent:
        # e^{As} = e^{-s} sum_j (sB)^j / j!  and  int_0^inf e^{-2s} s^m ds = m! / 2^{m+1}.
        j = np.arange(n)
        m = j[:, None] + j[None, :]
        coef = np.array([[math.comb(int(a + b), int(a)) for b in j] for a in j], dtype=np.float64) / 2.0 ** (m + 1)
        M = _powers(B)
        return jnp.einsum("jk,jab,kcb->ac", jnp.asarray(coef, dtype=B.dtype), M, M)
    A = B - jnp.eye(n, dtype=B.dtype)
    eye = jnp.eye(n, dtype=B.dtype)
    lyap = jnp.kron(A, eye) + jnp.kron(eye, A)
    P = jnp.linalg.solve(lyap, -eye.reshape(-1)).reshape(n, n)
    return 0.5 * (P + P.T)


def stationary_noise_cov(B: Array, *, nilpotent: bool = False) -> Array:
    """``P`` with ``(B - I) P + P (B - I)^T + I = 0``: the covariance unit Brownian noise builds up
    as ``t -> inf`` (needs a stable drift). ``B``: ``(l, l)`` or ``(n, l, l)``."""
    B = jnp.asarray(B)
    if B.ndim == 2:
        return _stationary_single(B, nilpotent)
    return jax.vmap(lambda b: _stationary_single(b, nilpotent))(B)


def ou_noise_cov(B: Array, t: Array, *, nilpotent: bool = False) -> Array:
    """Covariance ``Q_t = P - E_t P E_t^T`` that unit Brownian noise adds to ``z(t)`` between 0
    and ``t`` (multiply by ``sigma^2``). ``B``: ``(l, l)`` or ``(n, l, l)``; ``t``: scalar or
    ``(n,)``."""
    B = jnp.asarray(B)
    t = jnp.asarray(t, dtype=B.dtype)

    def one(b, s):
        P = _stationary_single(b, nilpotent)
        E = _transition_single(b, s, nilpotent)
        Q = P - E @ P @ E.T
        return 0.5 * (Q + Q.T)

    return _map_cells(one, B, t)
