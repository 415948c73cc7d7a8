"""Variational families: an amortised encoder for the per-cell basal state and an automatic
guide for the global sites (W and friends).

``global_sites(model, ...)`` finds the global latent sites of any model that follows the
conventions of :mod:`perturbax.models.blocks`, so user-written models get a guide too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.initialization import init_to_median

from perturbax.models.batch import Batch
from perturbax.models.blocks import CELL_PLATE, network
from perturbax.models.registry import uses_time

__all__ = ["GLOBAL_GUIDES", "encoder_input", "global_sites", "hide_cells", "local_sites", "make_guide", "uses_time"]

GLOBAL_GUIDES = ("lowrank", "mvn", "normal", "delta")

# Per-cell sites the built-in guide keeps at their standard-normal prior: noise fed into an implicit
# decoder (``eta``) and the Brownian part of a diffusion (``z_noise``).
PRIOR_LOCALS = ("eta", "z_noise")
# Per-cell sites the built-in encoder amortises.
AMORTIZED_LOCALS = ("z_base", "s")


def time_features(t: jax.Array, config: Any) -> jax.Array:
    """What the encoder sees of a cell's time: ``[log1p(t'), exp(-t')]`` with ``t' = t / time_scale``
    (relaxing programs fade like ``e^{-t'}``; the log keeps long time courses in range)."""
    ts = jnp.asarray(t, dtype=jnp.float32) / float(getattr(config, "time_unit", 1.0))
    return jnp.stack([jnp.log1p(ts), jnp.exp(-ts)], axis=-1)


def hide_cells(model: Callable) -> Callable:
    """``model`` with the batch's cells hidden (``batch.x = None``): it then draws cells instead of
    scoring them. The guide is built from this view (it needs the model's latent sites, never its
    density), and the energy objective fits it (so models without a density, such as the
    ``implicit`` likelihood, can be fitted)."""

    def simulator(batch: Batch, **kwargs):
        return model(batch._replace(x=None), **kwargs)

    return simulator


def _site_table(model: Callable, batch: Batch, model_kwargs: dict[str, Any]) -> list[tuple[str, bool, bool]]:
    """``(name, is_latent, in_cell_plate)`` of each sample site, found by abstract evaluation
    (``jax.eval_shape``: nothing is computed or compiled)."""
    rows: list[tuple[str, bool, bool]] = []
    simulator = hide_cells(model)

    def run(b):
        with handlers.block(), handlers.seed(rng_seed=0):
            tr = handlers.trace(simulator).get_trace(b, **model_kwargs)
        for name, s in tr.items():
            # ("x", the cells, is the observation: never a site to infer, even when simulated)
            if s["type"] == "sample" and name != "x":
                in_plate = any(f.name == CELL_PLATE for f in s.get("cond_indep_stack", ()))
                rows.append((name, not s["is_observed"], in_plate))
        return 0

    jax.eval_shape(run, batch)
    return rows


def global_sites(model: Callable, batch: Batch, model_kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Names of latent sample sites outside the ``"cells"`` plate (the global parameters)."""
    return tuple(n for n, latent, in_plate in _site_table(model, batch, model_kwargs) if latent and not in_plate)


def local_sites(model: Callable, batch: Batch, model_kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Names of latent sample sites inside the ``"cells"`` plate."""
    return tuple(n for n, latent, in_plate in _site_table(model, batch, model_kwargs) if latent and in_plate)


def encoder_input(batch: Batch, likelihood: str, config: Any = None) -> jax.Array:
    """What the encoder sees: expression (log-normalised if counts), labels and covariates, and
    for models of time (:func:`uses_time`) the cell's time features (:func:`time_features`)."""
    x = batch.x
    if likelihood == "negative_binomial":
        lib = batch.library if batch.library is not None else x.sum(-1)
        x = jnp.log1p(1e4 * x / jnp.maximum(lib, 1.0)[:, None])
    parts = [x, batch.l]
    if batch.c is not None:
        parts.append(batch.c)
    if config is not None and uses_time(config):
        if batch.t is None:
            raise ValueError(
                "This model describes cells over time, so the encoder needs each cell's time (batch.t); "
                "build the data with from_anndata(..., time_key=...)."
            )
        parts.append(time_features(batch.t, config))
    return jnp.concatenate(parts, axis=-1)


def _amortized_part(config, *, delta: bool, local_names: tuple[str, ...]):
    if "z_base" not in local_names:
        raise ValueError(
            f"The built-in guide amortises the per-cell site 'z_base', but the model's per-cell latent "
            f"sites are {list(local_names)}. Name the basal state 'z_base' or pass your own guide=."
        )
    others = [n for n in local_names if n not in AMORTIZED_LOCALS + PRIOR_LOCALS]
    if others:
        raise ValueError(
            f"The built-in guide cannot infer the per-cell latent sites {others}; pass your own guide=."
        )
    d = config.latent_dim
    # Widths of the amortised sites, in the order of the encoder output.
    widths = {"z_base": d}
    if "s" in local_names:
        widths["s"] = int(getattr(config, "state_dim", 0))
        if widths["s"] < 1:
            raise ValueError("The model has a per-cell site 's' but its config has no state_dim >= 1.")
    likelihood = getattr(config, "likelihood", "gaussian")
    timed = uses_time(config)
    in_size = config.n_genes + config.n_perturbations + getattr(config, "n_covariates", 0) + (2 if timed else 0)
    out_size = 2 * sum(widths.values())
    hidden = getattr(config, "encoder_hidden", (128, 128))
    seed = getattr(config, "seed", 0)

    def encoder_guide(batch: Batch, *, config, n_cells: int) -> None:
        enc = network("encoder", in_size, out_size, hidden, seed=seed)
        out = jax.vmap(enc)(encoder_input(batch, likelihood, config if timed else None))
        with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
            start = 0
            for name, w in widths.items():
                loc, raw_scale = out[:, start : start + w], out[:, start + w : start + 2 * w]
                start += 2 * w
                if delta:
                    numpyro.sample(name, dist.Delta(loc, event_dim=1))
                else:
                    scale = jax.nn.softplus(raw_scale - 2.0) + 1e-4
                    numpyro.sample(name, dist.Normal(loc, scale).to_event(1))
            if "eta" in local_names:
                # Noise fed into an implicit decoder stays at its prior.
                numpyro.sample("eta", dist.Normal(0.0, 1.0).expand((config.noise_dim,)).to_event(1))
            if "z_noise" in local_names:
                # The Brownian part of a diffusion stays at its prior (the likelihood averages over it).
                numpyro.sample("z_noise", dist.Normal(0.0, 1.0).expand((d,)).to_event(1))

    return encoder_guide


def make_guide(
    model: Callable,
    batch: Batch,
    model_kwargs: dict[str, Any],
    *,
    global_guide: str = "lowrank",
    amortized: str = "normal",
    rank: int | None = None,
    init_scale: float = 0.05,
) -> tuple[Callable, tuple[str, ...]]:
    """Guide = automatic guide over the global sites + amortised encoder for ``z_base``.

    The encoder sees ``(x, l, c)`` and, for models of time (:func:`uses_time`), the cell's time,
    so for the latent dynamics model it is ``q(z(0) | x, l, t)``. It also amortises an invariant
    per-cell state ``s`` if the model has one; ``eta`` (implicit decoder noise) and ``z_noise``
    (diffusion) stay at their standard-normal priors.

    Parameters
    ----------
    global_guide
        ``"lowrank"`` (low-rank + diagonal multivariate normal; default, avoids the overconfidence
        of a mean-field guide), ``"mvn"`` (full covariance), ``"normal"`` (mean-field) or
        ``"delta"`` (point estimate, no uncertainty).
    amortized
        ``"normal"`` for q(z_base | x, l) = N(enc(x, l)) (ELBO) or ``"delta"`` for a deterministic
        encoder (energy objective).

    Returns the guide and the names of the global sites.
    """
    if global_guide not in GLOBAL_GUIDES:
        raise ValueError(f"global_guide={global_guide!r} is not supported; choose one of {GLOBAL_GUIDES}.")
    config = model_kwargs["config"]
    globals_ = global_sites(model, batch, model_kwargs)
    locals_ = local_sites(model, batch, model_kwargs)
    enc = _amortized_part(config, delta=(amortized == "delta"), local_names=locals_)
    auto = None
    if globals_:
        keep = set(globals_)
        blocked = handlers.block(hide_cells(model), hide_fn=lambda site: site.get("name") not in keep)
        if global_guide == "lowrank":
            auto = AutoLowRankMultivariateNormal(
                blocked, init_loc_fn=init_to_median, init_scale=init_scale, rank=rank, prefix="q"
            )
        elif global_guide == "mvn":
            auto = AutoMultivariateNormal(blocked, init_loc_fn=init_to_median, init_scale=init_scale, prefix="q")
        elif global_guide == "normal":
            auto = AutoNormal(blocked, init_loc_fn=init_to_median, init_scale=init_scale, prefix="q")
        else:
            auto = AutoDelta(blocked, init_loc_fn=init_to_median, prefix="q")

    def guide(batch: Batch, *, config, n_cells: int, **model_kw) -> None:
        # (model_kw: the model's other keyword arguments, e.g. the latent dynamics' causal_mask; the
        # global guide's shapes were fixed at its first call, the encoder does not use them)
        if auto is not None:
            auto(batch, config=config, n_cells=n_cells)
        enc(batch, config=config, n_cells=n_cells)

    return guide, globals_
