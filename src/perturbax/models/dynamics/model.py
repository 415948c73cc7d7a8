"""The latent dynamics model function (:func:`latent_dynamics_model`); the maths it uses is in
the sibling modules of :mod:`perturbax.models.dynamics`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array

from perturbax.models import ode
from perturbax.models.batch import Batch
from perturbax.models.blocks import (
    CELL_PLATE,
    gaussian_likelihood,
    implicit_likelihood,
    negative_binomial_likelihood,
    network,
    perturbation_effects,
)
from perturbax.models.dynamics.checks import _is_concrete, check_stable, check_times
from perturbax.models.dynamics.closed_form import linear_solution
from perturbax.models.dynamics.config import LatentDynamicsConfig
from perturbax.models.dynamics.drift import (
    causal_drift_network,
    causal_weights,
    linear_drift,
    mechanism_changes,
    mechanism_weights,
)
from perturbax.models.dynamics.noise import ou_noise_cov
from perturbax.models.dynamics.ordering import acyclicity_measure

__all__ = ["latent_dynamics_model"]

_NOISE_JITTER = 1e-6


def _cell_times(batch: Batch, config: LatentDynamicsConfig) -> Array:
    if batch.t is None:
        check_times(None)
    t = batch.t
    if _is_concrete(t):
        check_times(t)
        if np.shape(t) != (batch.size,):
            raise ValueError(f"batch.t must have one time per cell, shape ({batch.size},), got {np.shape(t)}.")
    return jnp.asarray(t, dtype=jnp.result_type(float)) / config.time_unit


def latent_dynamics_model(batch: Batch, *, config: LatentDynamicsConfig, n_cells: int,
                          causal_mask: Array | None = None) -> None:
    """Latent dynamical causal programs: ``z(0) = z_base ~ N(a, Sigma_0)``, ``z(t_i)`` from the
    drift chosen in ``config``, ``x_i ~ likelihood(decoder([z(t_i), s_i]))``.

    ``batch.t`` (time since the perturbation was switched on, ``>= 0``) is required; ``batch.l``
    holds the labels (active for ``t > 0``). See the module docstring for the drifts and the
    table of sites. ``causal_mask`` (linear drift only): an ``(l, l)`` 0/1 array, possibly traced,
    used instead of ``config``'s mask as the support of ``B``; it must have as many ones as
    ``config.mask`` and be acyclic when that is (one compiled fit serves every causal order:
    the order refits of :mod:`perturbax.inference.dynamics_recipe`).
    """
    ell, K = config.latent_dim, config.n_perturbations
    nilpotent = config.acyclic
    t = _cell_times(batch, config)
    labels = jnp.asarray(batch.l)

    mask = config.mask
    if causal_mask is not None and config.drift != "linear":
        raise ValueError(f"causal_mask= is for the linear drift (its shapes do not depend on the mask); got "
                         f"drift={config.drift!r}. Set the mask in the config instead.")
    B = None
    if config.drift in ("linear", "mechanism"):
        B = causal_weights("B", mask, prior=config.b_prior, scale=config.b_scale, support=causal_mask)
        if not nilpotent and _is_concrete(B):
            check_stable(B)
        if config.acyclicity > 0:
            numpyro.factor("acyclicity", -config.acyclicity * acyclicity_measure(B))
    if config.target_mask is None:
        S = perturbation_effects("S", ell, K, prior=config.s_prior, scale=config.s_scale)
    else:  # zero outside the mask, only the allowed entries sampled (as for B)
        S = causal_weights("S", np.asarray(config.target_mask), prior=config.s_prior, scale=config.s_scale)
    delta = None
    if config.drift == "mechanism":
        delta = mechanism_changes("B_delta", mask, config.targets, scale=config.mechanism_scale)
    if config.basal == "learned":
        mu = numpyro.sample("mu", dist.Normal(0.0, config.mu_scale).expand((ell,)).to_event(1))
        basal_sd = numpyro.sample("basal_sd", dist.HalfNormal(config.basal_sd_scale).expand((ell,)).to_event(1))
    else:
        mu, basal_sd = jnp.zeros(ell), jnp.ones(ell)
    V = None
    if config.n_covariates:
        V = perturbation_effects("V", ell, config.n_covariates, prior="normal", scale=config.s_scale)
    if config.learn_rate:
        t = t * numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
    sigma = numpyro.sample("diffusion", dist.HalfNormal(config.diffusion_scale)) if config.diffusion else None
    g = None
    if config.drift == "neural":
        g = causal_drift_network("drift", mask, config.drift_hidden, seed=config.seed)
    decoder = network("decoder", config.decoder_input_size, config.n_genes, config.decoder_hidden, seed=config.seed)

    with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
        base_mean = jnp.broadcast_to(mu, (batch.size, ell))
        if V is not None:
            base_mean = base_mean + batch.c @ V.T
        z_base = numpyro.sample("z_base", dist.Normal(base_mean, basal_sd).to_event(1))
        anchor = z_base if config.heterogeneity == "persistent" else base_mean
        shift = labels @ S.T
        B_cell = mechanism_weights(B, delta, labels) if delta is not None else B

        if config.solver == "closed_form":
            z_t = linear_solution(z_base, t, B_cell, shift, anchor, nilpotent=nilpotent)
        else:
            if g is not None:
                g0 = g(jnp.zeros(ell))

                def field(_t, y, args):
                    a, s = args
                    u = y - a
                    return -u + g(u) - g0 + s

                args = (anchor, shift)
            elif delta is not None:
                field, args = linear_drift, (B_cell, anchor, shift)
            else:

                def field(_t, y, args):
                    return linear_drift(_t, y, (B, *args))

                args = (anchor, shift)
            sol = ode.solve(field, z_base, t, args=args, max_steps=config.max_steps, rtol=config.rtol, atol=config.atol)
            z_t = sol.y
            numpyro.factor("ode_failure", -sol.penalty(config.failure_penalty))

        if sigma is not None:
            Q = ou_noise_cov(B_cell, t, nilpotent=nilpotent)
            if Q.ndim == 2:
                Q = jnp.broadcast_to(Q, (batch.size, ell, ell))
            L = jnp.linalg.cholesky(Q + _NOISE_JITTER * jnp.eye(ell))
            z_noise = numpyro.sample("z_noise", dist.Normal(0.0, 1.0).expand((ell,)).to_event(1))
            z_t = z_t + sigma * jnp.einsum("nij,nj->ni", L, z_noise)

        z = numpyro.deterministic("z", z_t)
        dec_in = z
        if config.state_dim:
            s = numpyro.sample("s", dist.Normal(0.0, 1.0).expand((config.state_dim,)).to_event(1))
            dec_in = jnp.concatenate([z, s], axis=-1)
        if config.likelihood == "gaussian":
            gaussian_likelihood(decoder, dec_in, batch.x, n_genes=config.n_genes)
        elif config.likelihood == "negative_binomial":
            negative_binomial_likelihood(decoder, dec_in, batch.x, batch.library, n_genes=config.n_genes)
        else:
            implicit_likelihood(decoder, dec_in, batch.x, noise_dim=config.noise_dim)
