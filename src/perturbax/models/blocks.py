"""Reusable model blocks: call them inside a NumPyro model function to build a variant.

Each block declares its own sample/param sites with the name you give it, so two blocks of the
same kind can live in one model. Sites inside a model follow one convention that the inference
layer relies on:

- the per-cell basal latent is the sample site ``"z_base"`` inside the plate ``"cells"``;
- the observation is the site ``"x"`` (a sample site with a density, or a deterministic site for
  the implicit likelihood); its mean, where known, is the deterministic site ``"x_mean"``;
- every other sample site outside the plate is a global parameter with a prior (e.g. ``"W"``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro.contrib.module import eqx_module

__all__ = [
    "MLP",
    "network",
    "perturbation_effects",
    "base_distribution",
    "gaussian_likelihood",
    "negative_binomial_likelihood",
    "implicit_likelihood",
    "CELL_PLATE",
]

CELL_PLATE = "cells"


class MLP(eqx.Module):
    """A multilayer perceptron on one input vector (``jax.vmap`` it over cells)."""

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: Sequence[int],
        *,
        key: jax.Array,
        activation: Callable = jax.nn.silu,
    ):
        sizes = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))
        self.activation = activation

    def __call__(self, v: Float[Array, " in_size"]) -> Float[Array, " out_size"]:
        for layer in self.layers[:-1]:
            v = self.activation(layer(v))
        return self.layers[-1](v)


def network(
    name: str, in_size: int, out_size: int, hidden: Sequence[int], *, seed: int = 0, activation=jax.nn.silu
) -> MLP:
    """An :class:`MLP` whose weights are NumPyro params named ``name`` (point estimates).

    The initial weights depend only on ``name`` and ``seed``, so a model and its guide (or two
    calls of a model) see the same network.
    """
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return eqx_module(name, MLP(in_size, out_size, hidden, key=key, activation=activation))


def perturbation_effects(
    name: str, latent_dim: int, n_perturbations: int, *, prior: str = "normal", scale: float = 1.0
) -> Float[Array, "d K"]:
    """Latent shift of each elementary perturbation, a ``(latent_dim, K)`` matrix W.

    ``prior="normal"``: ``W ~ N(0, scale^2)`` elementwise (site ``name``).
    ``prior="horseshoe"``: ``W = W_raw * tau * lambda`` with ``tau ~ HalfCauchy(scale)``,
    ``lambda ~ HalfCauchy(1)`` per entry (sites ``name_raw``, ``name_tau``, ``name_lambda``;
    ``name`` is a deterministic site), which shrinks most entries to zero.
    Doses enter through the label vector: the shift of ``l`` is ``W @ l``.
    """
    shape = (latent_dim, n_perturbations)
    if prior == "normal":
        return numpyro.sample(name, dist.Normal(0.0, scale).expand(shape).to_event(2))
    if prior == "horseshoe":
        tau = numpyro.sample(f"{name}_tau", dist.HalfCauchy(scale))
        lam = numpyro.sample(f"{name}_lambda", dist.HalfCauchy(1.0).expand(shape).to_event(2))
        raw = numpyro.sample(f"{name}_raw", dist.Normal(0.0, 1.0).expand(shape).to_event(2))
        return numpyro.deterministic(name, raw * tau * lam)
    raise ValueError(f"prior={prior!r} is not supported; choose 'normal' or 'horseshoe'.")


def base_distribution(kind: str, latent_dim: int) -> dist.Distribution:
    """Unit-variance base distribution of z_base with event shape ``(latent_dim,)``."""
    if kind == "normal":
        d = dist.Normal(0.0, 1.0)
    elif kind == "laplace":
        d = dist.Laplace(0.0, 1.0 / jnp.sqrt(2.0))
    elif kind == "uniform":
        d = dist.Uniform(-jnp.sqrt(3.0), jnp.sqrt(3.0))
    else:
        raise ValueError(f"base={kind!r} is not supported; choose 'normal', 'laplace' or 'uniform'.")
    return d.expand((latent_dim,)).to_event(1)


def gaussian_likelihood(
    decoder: Callable, z: Float[Array, "B d"], x: Float[Array, "B G"] | None, *, n_genes: int, scale_init: float = 0.5
) -> Float[Array, "B G"]:
    """``x ~ Normal(decoder(z), sigma_g)`` with a learned per-gene scale (param ``x_scale``)."""
    loc = numpyro.deterministic("x_mean", jax.vmap(decoder)(z))
    sigma = numpyro.param("x_scale", jnp.full((n_genes,), scale_init), constraint=dist.constraints.positive)
    return numpyro.sample("x", dist.Normal(loc, sigma).to_event(1), obs=x)


def negative_binomial_likelihood(
    decoder: Callable,
    z: Float[Array, "B d"],
    x: Float[Array, "B G"] | None,
    library: Float[Array, " B"],
    *,
    n_genes: int,
    dispersion_init: float = 10.0,
) -> Float[Array, "B G"]:
    """Counts ``x ~ NB(mean = library * softmax(decoder(z)), inverse dispersion theta_g)``."""
    if library is None:
        raise ValueError("The negative_binomial likelihood needs library sizes (batch.library).")
    probs = jax.nn.softmax(jax.vmap(decoder)(z), axis=-1)
    mean = numpyro.deterministic("x_mean", library[:, None] * probs)
    theta = numpyro.param(
        "x_inverse_dispersion", jnp.full((n_genes,), dispersion_init), constraint=dist.constraints.positive
    )
    return numpyro.sample("x", dist.NegativeBinomial2(mean, theta).to_event(1), obs=x)


def implicit_likelihood(
    decoder: Callable, z: Float[Array, "B d"], x: Float[Array, "B G"] | None, *, noise_dim: int
) -> Float[Array, "B G"]:
    """``x = decoder([z, eta])`` with ``eta ~ N(0, I)`` fed into the network (no density).

    Has no likelihood to evaluate, so it can only be fitted with ``objective="energy"``.
    """
    if x is not None:
        raise ValueError(
            "The implicit likelihood has no density, so observed cells cannot be scored by the ELBO. "
            "Fit it with objective='energy'."
        )
    eta = numpyro.sample("eta", dist.Normal(0.0, 1.0).expand((noise_dim,)).to_event(1))
    return numpyro.deterministic("x", jax.vmap(decoder)(jnp.concatenate([z, eta], axis=-1)))
