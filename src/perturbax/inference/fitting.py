"""``fit``: stochastic variational inference for perturbax models (ELBO or energy score).

The loop is functional: a jitted ``lax.scan`` runs ``eval_every`` SVI steps at a time, drawing
each minibatch inside the scan from device-resident data, then the host checks for NaN/Inf,
evaluates the held-out loss for early stopping, and updates the progress bar.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

# a widget bar in notebooks when ipywidgets is installed; the text bar otherwise (tqdm.auto warns)
if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

from perturbax.data.core import PerturbationData, check_counts
from perturbax.inference.energy import EnergyOptions, EnergyScore
from perturbax.inference.guides import hide_cells, make_guide
from perturbax.inference.result import FitResult
from perturbax.inference.times import training_times
from perturbax.models.batch import Batch
from perturbax.models.registry import BUILTIN_MODELS, uses_time

__all__ = ["fit", "BUILTIN_MODELS", "DeviceData", "training_times", "data_start", "EarlyStopping", "track_held_out",
           "default_objective", "default_learning_rate", "DEFAULT_LEARNING_RATE"]

OBJECTIVES = ("elbo", "energy")
#: Initial step size of ``fit`` and ``perturbax fit`` per built-in model: the settings their benchmarks
#: used (additive shift: the Norman runs of issue 17; latent dynamics: docs/benchmarks.md, dynamics).
DEFAULT_LEARNING_RATE = {"additive_shift": 2e-3, "latent_dynamics": 5e-3}
#: ... and for custom model functions (the earlier default of ``fit``).
CUSTOM_LEARNING_RATE = 5e-3


def default_learning_rate(model_name: str | None) -> float:
    """The initial step size of ``fit(learning_rate=None)`` and ``perturbax fit`` for a model."""
    return DEFAULT_LEARNING_RATE.get(model_name, CUSTOM_LEARNING_RATE)


def default_objective(model_name: str | None, likelihood: str) -> str:
    """The objective of ``fit(objective=None)`` and ``perturbax fit``: ``"elbo"`` for the latent
    dynamics model (what its benchmarks validate) and for the negative binomial (a density that
    cannot be sampled differentiably); ``"energy"`` otherwise (gaussian and implicit)."""
    return "elbo" if model_name == "latent_dynamics" or likelihood == "negative_binomial" else "energy"


class DeviceData(NamedTuple):
    """Training cells on the device (float32) plus the per-group index table.

    Groups are the conditions, or for models of time the (condition, time) contexts.
    """

    x: jax.Array  # (N, G)
    l: jax.Array  # (N, K)
    c: jax.Array | None  # (N, C)
    library: jax.Array  # (N,)
    table: jax.Array  # (E, max_cells) cell indices per group (padded)
    counts: jax.Array  # (E,) cells per group
    t: jax.Array | None = None  # (N,) time of each cell (models of time only)
    is_control: jax.Array | None = None  # (E,) whether each group holds control cells

    def batch(self, idx: jax.Array) -> Batch:
        return Batch(
            x=self.x[idx],
            l=self.l[idx],
            c=None if self.c is None else self.c[idx],
            library=self.library[idx],
            t=None if self.t is None else self.t[idx],
        )


class EarlyStopping(NamedTuple):
    """Early-stopping record: the best held-out loss so far, the step and SVI state it was reached
    at (``state`` is ``None`` before the first finite evaluation), and the evaluations since."""

    best: float = math.inf
    step: int = 0
    state: Any = None
    waited: int = 0


def track_held_out(rec: EarlyStopping, value: float, step: int, state: Any, rel_tol: float = 1e-4) -> EarlyStopping:
    """``rec`` after a held-out evaluation ``value`` at ``step``: the first finite value, and any
    later one below the best by more than ``rel_tol`` of its size, is the new best (its state
    kept); anything else (NaN included) counts one more evaluation without improvement."""
    if math.isfinite(value) and (rec.state is None or value < rec.best - rel_tol * abs(rec.best)):
        return EarlyStopping(float(value), int(step), state, 0)
    return rec._replace(waited=rec.waited + 1)


def _groups(data: PerturbationData, timed: bool) -> np.ndarray:
    """Group id of each cell: its condition, or its (condition, time) context if ``timed``."""
    env = np.asarray(data.env)
    if not timed:
        return env
    pairs = np.stack([env.astype(np.float64), np.asarray(data.times, dtype=np.float64)], axis=1)
    return np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _context_check(data: PerturbationData, config) -> dict[str, Any]:
    """:func:`perturbax.theory.count_contexts` on the distinct (condition, time) contexts."""
    from perturbax.theory.dynamics import count_contexts

    ids = _groups(data, True)
    first = np.unique(ids, return_index=True)[1]
    rep = count_contexts(
        np.asarray(data.L)[first], np.asarray(data.times)[first], registry=data.registry,
        latent_dim=getattr(config, "latent_dim", None),
    )
    return {"status": rep.status, "message": rep.message, "n_contexts": rep.n_contexts, "n_times": rep.n_times}


def _device_data(data: PerturbationData, cells: np.ndarray, timed: bool = False) -> DeviceData:
    sub = data.subset(cells)
    env = _groups(sub, timed)
    E = int(env.max()) + 1 if env.size else 0
    counts = np.bincount(env, minlength=E)
    table = np.zeros((E, int(counts.max())), dtype=np.int32)
    is_control = np.zeros(E, dtype=bool)
    for e in range(E):
        members = np.flatnonzero(env == e)
        table[e, : members.size] = members
        is_control[e] = sub.control_index is not None and bool(np.all(sub.env[members] == sub.control_index))
    return DeviceData(
        x=jnp.asarray(sub.dense()),
        l=jnp.asarray(sub.L, dtype=jnp.float32),
        c=None,  # (contexts are label columns: data.registry.contexts)
        library=jnp.asarray(sub.library_size),
        table=jnp.asarray(table),
        counts=jnp.asarray(counts, dtype=jnp.int32),
        t=jnp.asarray(sub.times, dtype=jnp.float32) if timed else None,
        is_control=jnp.asarray(is_control),
    )


def _validation_split(
    data: PerturbationData, fraction: float, seed: int, timed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of cell indices by condition (by (condition, time) context for models of
    time); groups with < 10 cells stay in training."""
    rng = np.random.default_rng(seed)
    groups = _groups(data, timed)
    train, val = [], []
    for e in range(int(groups.max()) + 1 if groups.size else 0):
        members = np.flatnonzero(groups == e)
        n_val = int(math.floor(fraction * members.size)) if members.size >= 10 else 0
        perm = rng.permutation(members)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _resolve_model(model, config, data: PerturbationData):
    n_cov = 0  # contexts enter the label vector (data.registry.contexts), not the covariate site V
    if isinstance(model, str):
        if model not in BUILTIN_MODELS:
            raise ValueError(f"Unknown model {model!r}; built-in models are {sorted(BUILTIN_MODELS)}, or pass a function.")
        fn, cfg_cls = BUILTIN_MODELS[model]
        name = model
        if config is None:
            config = cfg_cls(n_genes=data.n_genes, n_perturbations=data.K, n_covariates=n_cov)
    elif callable(model):
        fn = model
        name = next((k for k, (f, _) in BUILTIN_MODELS.items() if f is model), None)
        if config is None:
            if name is None:
                raise ValueError(
                    "A custom model needs config= (any object with n_genes, n_perturbations, latent_dim; "
                    "e.g. perturbax.models.AdditiveShiftConfig)."
                )
            config = BUILTIN_MODELS[name][1](n_genes=data.n_genes, n_perturbations=data.K, n_covariates=n_cov)
    else:
        raise TypeError(f"model must be a built-in name or a NumPyro model function, got {type(model).__name__}.")
    for attr, want in (("n_genes", data.n_genes), ("n_perturbations", data.K)):
        got = getattr(config, attr, None)
        if got != want:
            raise ValueError(
                f"config.{attr}={got} but the data has {want}. Build the config from the data you fit "
                f"(n_genes=data.n_genes, n_perturbations=data.K)."
            )
    if getattr(config, "n_covariates", 0) != n_cov:
        raise ValueError(f"config.n_covariates={getattr(config, 'n_covariates', 0)} but the data has {n_cov} covariate columns.")
    return name or getattr(fn, "__name__", "custom"), fn, config


def _matching_params(init: Mapping[str, Any] | FitResult | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``init`` whose name is a param site of ``current`` with the same shapes."""
    if init is None:
        return {}
    if isinstance(init, FitResult):
        init = init.params
    if not isinstance(init, Mapping):
        raise TypeError(f"init_params must be a dict of parameter values or a FitResult, got {type(init).__name__}.")
    out = {}
    for name, value in init.items():
        if name not in current:
            continue
        shapes = jax.tree.map(jnp.shape, value)
        if jax.tree.structure(value) == jax.tree.structure(current[name]) and shapes == jax.tree.map(
            jnp.shape, current[name]
        ):
            out[name] = jax.tree.map(jnp.asarray, value)
    if not out:
        raise ValueError(
            f"init_params matches none of this fit's parameter sites ({', '.join(sorted(current)[:10])}"
            f"{' ...' if len(current) > 10 else ''}) by name and shape; was it fitted with another config?"
        )
    return out


def _draw_groups(key: jax.Array, dev: DeviceData, n_groups: int, source: str = "other") -> jax.Array:
    """The groups of one energy step: ``n_groups`` distinct ones at random; with
    ``source="control"`` the first is a control group (a random one, for models of time) and the
    others are non-control groups where there are enough."""
    E = dev.counts.shape[0]
    if source == "control":
        u = jax.random.uniform(key, (E,)) + 2.0 * dev.is_control
        return jnp.concatenate([jnp.argmax(u)[None], jnp.argsort(u)[: n_groups - 1]])
    if n_groups < E:
        return jax.random.permutation(key, E)[:n_groups]
    return jnp.arange(E)


def _val_blocks(is_control: np.ndarray, n_groups: int, source: str = "other") -> list[np.ndarray]:
    """Blocks of ``n_groups`` group ids that together cover every group (the last block filled up
    from the start); with ``source="control"`` each block starts with a control group."""
    E = is_control.size
    if source == "control" and is_control.any() and n_groups > 1:
        ctrl = np.flatnonzero(is_control)
        rest = np.flatnonzero(~is_control)
        if rest.size == 0:
            rest = ctrl
        k = n_groups - 1
        n = -(-rest.size // k)
        others = np.resize(rest, n * k).reshape(n, k)
        return [np.concatenate([[ctrl[i % ctrl.size]], o]) for i, o in enumerate(others)]
    n = -(-E // n_groups)
    return list(np.resize(np.arange(E), n * n_groups).reshape(n, n_groups))


def data_start(params: Mapping[str, Any], dev: DeviceData, *, likelihood: str, objective: str,
               floor: float = 0.01) -> dict[str, Any]:
    """Starting values read from the training cells, for the param sites of the built-in models.

    - ``"decoder$params"`` (an :class:`~perturbax.models.blocks.MLP` with one output per gene): the
      output bias is shifted to the mean of each gene (``gaussian``/``implicit``) or to the log of
      its mean share of the library (``negative_binomial``), so the network starts at the average
      cell and learns deviations from it;
    - ``"x_scale"`` (Gaussian noise SD per gene), energy objective only: each gene's SD in the
      training cells (at least ``floor``), so simulated cells start as spread as real ones. (Under
      the ELBO a noise scale that already explains all the variance lets the posterior of z
      collapse to the prior, so it keeps its default there.)

    Returns the entries to replace; sites that are absent or shaped otherwise are left alone.
    """
    x = dev.x  # (summaries on the device: no host copy of the training matrix)
    G = x.shape[1]
    out: dict[str, Any] = {}
    dec = params.get("decoder$params")
    last = getattr(dec, "layers", (None,))[-1]
    bias = getattr(last, "bias", None)
    if bias is not None and bias.shape == (G,):
        if likelihood == "negative_binomial":
            share = jnp.mean(x / jnp.maximum(dev.library, 1.0)[:, None], axis=0)
            target = jnp.log(jnp.maximum(share, 1e-8))
            target = target - target.mean()  # softmax is shift-invariant
        else:
            target = jnp.mean(x, 0)
        out["decoder$params"] = eqx.tree_at(lambda m: m.layers[-1].bias, dec, bias + target.astype(bias.dtype))
    scale = params.get("x_scale")
    if objective == "energy" and likelihood == "gaussian" and scale is not None and jnp.shape(scale) == (G,):
        out["x_scale"] = jnp.maximum(jnp.std(x, 0), floor).astype(jnp.result_type(scale))
    return out


def fit(
    model: str | Callable,
    data: PerturbationData,
    *,
    config: Any = None,
    objective: str | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float | None = None,
    seed: int = 0,
    guide: Callable | None = None,
    global_guide: str = "lowrank",
    energy: EnergyOptions | None = None,
    validation_fraction: float = 0.1,
    eval_every: int = 100,
    patience: int | None = 10,
    progress: bool = True,
    init_params: Mapping[str, Any] | FitResult | None = None,
    data_init: bool | None = None,
    select: bool | None = None,
) -> FitResult:
    """Fit a model to perturbed cells by stochastic variational inference.

    Parameters
    ----------
    model
        ``"additive_shift"``, ``"latent_dynamics"`` or a NumPyro model function
        ``model(batch, *, config, n_cells)`` following the site conventions of
        :mod:`perturbax.models.blocks`.
    data
        Training cells (:func:`perturbax.data.from_anndata`). Models of time (the latent dynamics
        model, or any config with ``uses_time``) need the cells' times
        (``from_anndata(..., time_key=...)``), all ``>= 0`` and at least two distinct time points;
        each cell's time then travels with it in ``batch.t``.
    config
        Model configuration (default: :class:`~perturbax.models.AdditiveShiftConfig` or
        :class:`~perturbax.models.LatentDynamicsConfig` sized to ``data``).
    objective
        ``None`` (default): :func:`default_objective` (energy for the additive shift model with
        gaussian or implicit likelihood; the CLI's default too). ``"elbo"`` (amortised encoder
        q(z_base | x, l) -- for models of time q(z(0) | x, l, t) -- + a posterior over the global
        sites) or ``"energy"`` (PDAE's energy score with a generalised-Bayes posterior over the
        globals; for models of time each (condition, time) context is one group, simulated at its
        own time from the basal states of other groups).
    steps, batch_size, learning_rate
        Optimiser steps (Adam with gradient clipping), cells per step, and the initial step size
        (cosine-decayed to 5% over ``steps``; ``None``: :func:`default_learning_rate`, 2e-3 for
        the additive shift model, 5e-3 for latent dynamics and custom models).
    guide
        A custom guide with the model's signature (default: :func:`make_guide`).
    global_guide
        Posterior family of the global sites, see :func:`~perturbax.inference.guides.make_guide`.
    energy
        :class:`EnergyOptions` for ``objective="energy"``.
    validation_fraction, eval_every, patience
        Held-out cells per condition; the held-out loss is computed at the start and every
        ``eval_every`` steps, and training stops after ``patience`` evaluations in a row without
        improvement (``None``: no held-out cells, no early stopping; the last parameters are
        returned). Otherwise the parameters of the best evaluation are returned
        (``info["best_step"]``, ``info["best_val_loss"]``). The held-out loss is a paired
        estimate: every evaluation scores the same held-out cells with the same random draws
        (guide noise, simulation noise, source cells), so two evaluations differ only through the
        parameters, not through Monte-Carlo noise -- which matters for the energy objective,
        whose loss is a sampled estimate.
    progress
        Show a progress bar with the running loss.
    init_params
        Warm start: parameter values (constrained, as in ``FitResult.params``, or a
        ``FitResult``) for the param sites whose name and shape match this fit's; the others start
        as usual. For example, the encoder and decoder networks of an earlier fit
        (``{k: v for k, v in old.params.items() if "$params" in k}``). ``info["warm_started"]``
        lists the sites used.
    data_init
        Start the decoder at the average training cell and, for the energy objective, the
        Gaussian noise at each gene's SD (:func:`data_start`; ``info["data_init"]`` lists the
        sites set). ``None`` (default): on for ``objective="energy"``, off for the ELBO.
        ``init_params`` takes precedence where both set a site.
    select
        The nested estimator with settings chosen on training conditions
        (:mod:`perturbax.inference.selection`): the prediction's mean is the ridge baseline's
        plus ``lambda`` x the model's nonlinear remainder, ``lambda`` and the cell mode chosen by
        in-span CV over the training conditions (two extra fits with these settings), intervals
        calibrated on the held-out ones; ``info["selection"]`` says what was chosen.
        ``None`` (default): on for ``"additive_shift"`` with a gaussian or implicit likelihood
        (and ``init_params`` not given); ``False``: the plain model fit.
    """
    builtin = model if isinstance(model, str) else next((k for k, (f, _) in BUILTIN_MODELS.items() if f is model), None)
    if objective is None:
        objective = default_objective(builtin, getattr(config, "likelihood", "gaussian"))
    if learning_rate is None:
        learning_rate = default_learning_rate(builtin)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; choose one of {OBJECTIVES}.")
    if not isinstance(data, PerturbationData):
        raise TypeError("fit expects a PerturbationData; build one with perturbax.data.from_anndata(adata, ...).")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    name, model_fn, config = _resolve_model(model, config, data)
    likelihood = getattr(config, "likelihood", "gaussian")
    if likelihood == "negative_binomial":
        check_counts(data.X, "the training expression")
    if objective == "energy" and likelihood == "negative_binomial":
        raise ValueError(
            "objective='energy' needs a likelihood that can be sampled differentiably ('gaussian' or "
            "'implicit'); fit negative_binomial counts with objective='elbo'."
        )
    if objective == "elbo" and likelihood == "implicit":
        raise ValueError("The implicit likelihood has no density; fit it with objective='energy'.")
    if data.control_index is None:
        raise ValueError(f"The training data have no control cells ({data.control!r}); predictions start from them.")
    timed = uses_time(config)
    eligible = name == "additive_shift" and likelihood != "negative_binomial" and not timed
    if select is None:
        select = eligible and init_params is None
    if select:  # the nested estimator: CV fits and the final fit are this function with select=False
        if not eligible:
            raise ValueError(
                f"select=True needs the additive_shift model with a gaussian or implicit likelihood (got model "
                f"{name!r}, likelihood {likelihood!r}); pass select=False."
            )
        from functools import partial

        from perturbax.inference.selection import fit_with_selection

        plain = partial(fit, model, config=config, objective=objective, steps=steps, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, guide=guide, global_guide=global_guide,
                        energy=energy, validation_fraction=validation_fraction, eval_every=eval_every,
                        patience=patience, progress=progress, init_params=init_params, data_init=data_init,
                        select=False)
        return fit_with_selection(plain, data, seed=seed)
    time_info: dict[str, Any] = {}
    if timed:
        uniq = training_times(data, name)
        time_info = {
            "times": [float(v) for v in uniq],
            "time_key": data.time_key,
            "contexts": _context_check(data, config),
        }

    train_idx, val_idx = _validation_split(data, validation_fraction if patience is not None else 0.0, seed, timed)
    n_train = train_idx.size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if objective == "elbo" and batch_size > n_train:
        # (the energy objective draws cells per condition with replacement; there batch_size only
        # sets how many conditions a step uses)
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n_train} training cells; use batch_size <= {n_train}."
        )
    train = _device_data(data, train_idx, timed)
    val = _device_data(data, val_idx, timed) if val_idx.size else None
    n_cond = int(train.counts.shape[0])

    if objective == "energy":
        opts = energy or EnergyOptions()
        m = int(opts.cells_per_condition)
        n_groups = opts.conditions_per_step or max(1, batch_size // m)
        if opts.source == "control":
            n_groups = max(n_groups, 2)  # the control block and at least one other
        n_groups = min(n_groups, n_cond)
        step_size = n_groups * m
    else:
        opts, m, n_groups, step_size = None, None, None, batch_size

    def cells_of(dev: DeviceData, groups, key) -> tuple[Batch, dict[str, jax.Array]]:
        """The batch of ``m`` cells of each group, and the loss's keyword arguments: the cells'
        rows (``cell_ids``: the energy score pairs distinct cells only)."""
        pos = jax.random.randint(key, (groups.shape[0], m), 0, dev.counts[groups][:, None])
        idx = dev.table[groups[:, None], pos].reshape(-1)
        return dev.batch(idx), {"cell_ids": idx}

    def draw_batch(dev: DeviceData, key) -> tuple[Batch, dict[str, jax.Array]]:
        if objective == "elbo":
            idx = jax.random.randint(key, (batch_size,), 0, dev.x.shape[0])
            return dev.batch(idx), {}
        k1, k2 = jax.random.split(key)
        return cells_of(dev, _draw_groups(k1, dev, n_groups, opts.source), k2)

    # (the plate must hold a step's cells: an energy step can draw more cells than there are, with
    # replacement; the energy score does not use the plate size, the ELBO scales by it)
    model_kwargs = {"config": config, "n_cells": max(n_train, step_size)}
    key = jax.random.PRNGKey(seed)
    k_init, k_data, k_val = jax.random.split(key, 3)
    init_batch = draw_batch(train, k_data)[0]
    if guide is None:
        guide, global_names = make_guide(
            model_fn,
            init_batch,
            model_kwargs,
            global_guide=global_guide,
            amortized="delta" if objective == "energy" else "normal",
        )
    else:
        from perturbax.inference.guides import global_sites

        global_names = global_sites(model_fn, init_batch, model_kwargs)

    if objective == "energy":
        loss = EnergyScore(
            n_groups=n_groups, cells_per_group=m, global_names=global_names, n_cells=n_train, options=opts
        )
    else:
        loss = Trace_ELBO()
    schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=steps, alpha=0.05)
    optim = optax_to_numpyro(optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule)))
    # The energy objective uses the model only as a simulator (cells drawn, never scored), so SVI
    # sees it with the cells hidden: models without a density (the implicit likelihood) fit too.
    svi_model = hide_cells(model_fn) if objective == "energy" else model_fn
    svi = SVI(svi_model, guide, optim, loss, **model_kwargs)
    state = jax.jit(svi.init)(k_init, init_batch)
    start = svi.get_params(state)
    if data_init is None:
        data_init = objective == "energy"
    from_data = data_start(start, train, likelihood=likelihood, objective=objective) if data_init else {}
    warm = _matching_params(init_params, start)
    if from_data or warm:
        transforms = svi.constrain_fn.args[0]  # name -> bijection from unconstrained values
        raw = dict(svi.optim.get_params(state.optim_state))
        new = {**from_data, **warm}
        raw.update({k: transforms[k].inv(v) if k in transforms else v for k, v in new.items()})
        state = state._replace(optim_state=svi.optim.init(raw))
    per_cell = 1.0 / n_train if objective == "elbo" else 1.0

    @jax.jit
    def run_chunk(state, keys):
        def body(st, k):
            b, loss_kw = draw_batch(train, k)
            st, value = svi.update(st, b, **loss_kw)
            return st, value * per_cell

        return jax.lax.scan(body, state, keys)

    # Held-out loss: the ELBO on 4 random batches of held-out cells; the energy score on every
    # held-out group (condition or context), in blocks of a step's layout, so that evaluations (and
    # fits from different seeds) score the same groups. Paired: the keys (cells drawn and the
    # loss's own draws) are the same at every evaluation.
    if objective == "energy" and val is not None:
        val_blocks = jnp.asarray(np.stack(_val_blocks(np.asarray(val.is_control), n_groups, opts.source)))
    else:
        val_blocks = None
    val_keys = jax.random.split(k_val, 4 if val_blocks is None else val_blocks.shape[0])

    def held_out(params, batch_and_kw, key):
        b, loss_kw = batch_and_kw
        return loss.loss(key, params, svi_model, guide, b, **loss_kw, **model_kwargs)

    @jax.jit
    def val_loss(state):
        if val is None:
            return jnp.nan
        params = svi.get_params(state)

        def one(a):
            k_cells, k_loss = jax.random.split(a[1])
            drawn = draw_batch(val, k_cells) if val_blocks is None else cells_of(val, a[0], k_cells)
            return held_out(params, drawn, k_loss)

        blocks = jnp.zeros((val_keys.shape[0],), jnp.int32) if val_blocks is None else val_blocks
        return jnp.mean(jax.lax.map(one, (blocks, val_keys))) * per_cell

    history_loss, val_steps, val_losses = [], [], []
    tracking = val is not None and patience is not None
    record = EarlyStopping()
    if tracking:  # the starting state is the first candidate (a warm start the fit makes worse is kept)
        v = float(val_loss(state))
        val_steps.append(0)
        val_losses.append(v)
        record = track_held_out(record, v, 0, state)
    stop_reason = "steps"
    step = 0
    t0 = time.perf_counter()
    keys_all = jax.random.split(k_data, steps)
    bar = tqdm(total=steps, disable=not progress, desc=f"fit {name} ({objective})", unit="step", leave=False)
    try:
        while step < steps:
            n = min(eval_every, steps - step)
            new_state, losses = run_chunk(state, keys_all[step : step + n])
            losses = np.asarray(losses)
            if not np.all(np.isfinite(losses)):
                first = int(np.flatnonzero(~np.isfinite(losses))[0])
                stop_reason = "nan"
                warnings.warn(
                    f"The loss became {losses[first]} at step {step + first + 1}; training stopped and the "
                    f"parameters of step {step} (the last finite state) are returned. Try a smaller "
                    f"learning_rate (now {learning_rate}), a larger batch_size, or check the data for "
                    f"extreme values.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                history_loss.extend(losses[:first].tolist())
                break
            state = new_state
            step += n
            history_loss.extend(losses.tolist())
            bar.update(n)
            if tracking:
                v = float(val_loss(state))
                val_steps.append(step)
                val_losses.append(v)
                record = track_held_out(record, v, step, state)
                bar.set_postfix(loss=f"{np.mean(losses[-max(1, n // 4):]):.4g}", val=f"{v:.4g}")
                if record.waited >= patience:
                    stop_reason = "early_stopping"
                    break
            else:
                bar.set_postfix(loss=f"{np.mean(losses[-max(1, n // 4):]):.4g}")
    finally:
        bar.close()
    fit_seconds = time.perf_counter() - t0
    if record.state is not None and stop_reason != "nan":
        final_state, best_step, best_val = record.state, record.step, record.best
    else:  # no held-out evaluation (patience=None), none finite, or the NaN guard fired
        final_state, best_step, best_val = state, step, None
    params = {k: v for k, v in svi.get_params(final_state).items()}

    return FitResult.build(
        model_name=name,
        model=model_fn,
        guide=guide,
        config=config,
        params=params,
        global_names=global_names,
        data=data,
        train_cells=train_idx,
        objective=objective,
        global_guide=global_guide,
        history={
            "loss": np.asarray(history_loss, dtype=np.float64),
            "val_step": np.asarray(val_steps, dtype=np.int64),
            "val_loss": np.asarray(val_losses, dtype=np.float64),
        },
        info={
            "seed": seed,
            "steps_run": step,
            "best_step": best_step,
            "best_val_loss": best_val,
            "stop_reason": stop_reason,
            "fit_seconds": fit_seconds,
            "batch_size": batch_size,
            "cells_per_step": step_size,
            "learning_rate": learning_rate,
            "energy_options": None if opts is None else opts._asdict(),
            "warm_started": sorted(warm),
            "data_init": sorted(set(from_data) - set(warm)),
            **time_info,
        },
    )
