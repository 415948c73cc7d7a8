"""Drift blocks of the latent dynamics: causal weights ``B`` on a mask, mechanism changes, the
linear drift and the masked neural drift (:class:`CausalMLP`)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro.contrib.module import eqx_module

from perturbax.models.blocks import MLP

__all__ = [
    "causal_weights",
    "mechanism_changes",
    "mechanism_weights",
    "linear_drift",
    "CausalMLP",
    "causal_drift_network",
    "neural_drift",
]


def _vector_prior(name: str, n: int, prior: str, scale: float) -> Float[Array, " n"]:
    if prior == "normal":
        return numpyro.sample(name, dist.Normal(0.0, scale).expand((n,)).to_event(1))
    if prior == "horseshoe":
        tau = numpyro.sample(f"{name}_tau", dist.HalfCauchy(scale))
        lam = numpyro.sample(f"{name}_lambda", dist.HalfCauchy(1.0).expand((n,)).to_event(1))
        raw = numpyro.sample(f"{name}_raw", dist.Normal(0.0, 1.0).expand((n,)).to_event(1))
        return numpyro.deterministic(name, raw * tau * lam)
    raise ValueError(f"prior={prior!r} is not supported; choose 'normal' or 'horseshoe'.")


def causal_weights(name: str, mask: np.ndarray, *, prior: str = "normal", scale: float = 0.5,
                   support: Array | None = None) -> Float[Array, "l m"]:
    """Causal weights ``B`` (deterministic site ``name``), zero outside ``mask`` (any 2-d shape:
    also the targets ``S`` under a ``target_mask``); only the free
    entries are sampled (site ``name + "_free"``, shape ``(mask.sum(),)``, in row-major order of
    the mask's ones) under a ``"normal"`` or ``"horseshoe"`` prior with median 0.

    ``support``: a 0/1 array of the mask's shape and number of ones (may be traced) that places
    the free entries instead of ``mask`` (one compiled fit for several masks of one size)."""
    mask = np.asarray(mask)
    rows, cols = np.nonzero(mask)
    if support is not None:
        rows, cols = jnp.nonzero(jnp.asarray(support), size=rows.size)
    B = jnp.zeros(mask.shape)
    if rows.size:
        free = _vector_prior(f"{name}_free", int(rows.size), prior, scale)
        B = B.at[rows, cols].set(free)
    return numpyro.deterministic(name, B)


def mechanism_changes(name: str, mask: np.ndarray, targets: np.ndarray, *, scale: float = 0.5) -> Float[Array, "K l l"]:
    """Per-perturbation changes ``D_k`` of the causal weights (deterministic site ``name``,
    ``(K, l, l)``): entry ``(k, i, j)`` is free iff ``targets[i, k]`` and ``mask[i, j]``; free
    entries ``~ N(0, scale^2)`` (site ``name + "_free"``)."""
    mask = np.asarray(mask) != 0
    targets = np.asarray(targets) != 0
    n_prog, n_pert = targets.shape
    allowed = targets.T[:, :, None] & mask[None, :, :]  # (K, l, l)
    k_idx, i_idx, j_idx = np.nonzero(allowed)
    D = jnp.zeros((n_pert, n_prog, n_prog))
    if k_idx.size:
        free = numpyro.sample(f"{name}_free", dist.Normal(0.0, scale).expand((int(k_idx.size),)).to_event(1))
        D = D.at[k_idx, i_idx, j_idx].set(free)
    return numpyro.deterministic(name, D)


def mechanism_weights(B: Float[Array, "l l"], delta: Float[Array, "K l l"], labels: Float[Array, "n K"]) -> Array:
    """Per-cell causal weights ``B_l = B + sum_k l_k D_k`` for label vectors ``labels`` (doses as
    entries), shape ``(n, l, l)``."""
    return B[None] + jnp.einsum("nk,kij->nij", labels, delta)


def linear_drift(t: Any, z: Float[Array, " l"], args: tuple) -> Float[Array, " l"]:
    """``(B - I)(z - a) + s`` for one cell, ``args = (B, a, s)`` (diffrax signature)."""
    B, a, s = args
    u = z - a
    return B @ u - u + s


class CausalMLP(eqx.Module):
    """``g: R^l -> R^l`` with ``g_i(u) = MLP_i(u * mask[i])``: one MLP per program whose input
    is masked to the program's parents, so ``dg_i/du_j`` is exactly 0 wherever ``mask[i, j] = 0``.

    The per-program MLPs are stored stacked (every array leaf has a leading axis ``l``). The
    last layer is scaled by ``init_scale`` so that the drift starts close to ``-u`` (the
    programs' own decay) and early solves are easy.
    """

    nets: MLP
    mask: tuple[tuple[float, ...], ...] = eqx.field(static=True)

    def __init__(
        self,
        mask: np.ndarray,
        hidden: Sequence[int],
        *,
        key: jax.Array,
        activation: Callable = jax.nn.silu,
        init_scale: float = 0.1,
    ):
        m = np.asarray(mask, dtype=np.float64)
        n = m.shape[0]
        keys = jax.random.split(key, n)
        nets = eqx.filter_vmap(lambda k: MLP(n, 1, tuple(hidden), key=k, activation=activation))(keys)
        self.nets = eqx.tree_at(
            lambda net: (net.layers[-1].weight, net.layers[-1].bias), nets, replace_fn=lambda w: w * init_scale
        )
        self.mask = tuple(tuple(float(v) for v in row) for row in m)

    def __call__(self, u: Float[Array, " l"]) -> Float[Array, " l"]:
        m = jnp.asarray(self.mask, dtype=u.dtype)
        return eqx.filter_vmap(lambda net, mi: net(u * mi)[0], in_axes=(eqx.if_array(0), 0))(self.nets, m)


def causal_drift_network(
    name: str, mask: np.ndarray, hidden: Sequence[int], *, seed: int = 0, init_scale: float = 0.1
) -> CausalMLP:
    """A :class:`CausalMLP` whose weights are NumPyro params ``name + "$params"``; the initial
    weights depend only on ``name`` and ``seed`` (as :func:`perturbax.models.network`)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return eqx_module(name, CausalMLP(mask, hidden, key=key, init_scale=init_scale))


def neural_drift(
    g: Callable[[Array], Array], z: Float[Array, " l"], anchor: Float[Array, " l"], shift: Float[Array, " l"]
) -> Float[Array, " l"]:
    """``F(z - a) + s`` with ``F(u) = -u + g(u) - g(0)`` for one cell: zero drift at the control
    steady state ``a``; Jacobian ``-I + dg/du`` (lower triangular with diagonal -1 for a
    :class:`CausalMLP` on an acyclic mask, hence locally stable everywhere)."""
    u = z - anchor
    return -u + g(u) - g(jnp.zeros_like(u)) + shift
