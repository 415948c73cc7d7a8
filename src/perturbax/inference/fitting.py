"""``fit``: stochastic variational inference for perturbax models (ELBO or energy score).

The loop is functional: a jitted ``lax.scan`` runs ``eval_every`` SVI steps at a time, drawing
each minibatch inside the scan from device-resident data, then the host checks for NaN/Inf,
evaluates the held-out loss for early stopping, and updates the progress bar.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from perturbax.data.stream import on_disk
from perturbax.inference.energy import EnergyOptions, EnergyScore
from perturbax.inference.guides import hide_cells, make_guide
from perturbax.inference.result import FitResult
from perturbax.inference.sharding import make_mesh, put_cells, replicate, shard_cells
from perturbax.inference.times import default_time_scale, training_times
from perturbax.models.batch import Batch
from perturbax.models.dynamics.config import mask_variant
from perturbax.models.registry import BUILTIN_MODELS, uses_time

__all__ = ["fit", "BUILTIN_MODELS", "DeviceData", "training_times", "data_start", "EarlyStopping", "track_held_out",
           "default_objective", "default_learning_rate", "DEFAULT_LEARNING_RATE", "DEFAULT_STEPS"]

OBJECTIVES = ("elbo", "energy")
#: Optimiser steps of ``fit`` given no ``steps`` (of one cycle, when the nested estimator chooses the
#: number of cycles; of the first stage of the latent dynamics recipe).
DEFAULT_STEPS = 2000
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
        # (cells on disk: a zero-width placeholder; each step's rows are read from disk, data/stream.py)
        x=jnp.zeros((sub.n_cells, 0), jnp.float32) if on_disk(sub) else jnp.asarray(sub.dense()),
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


def _with_time_scale(config, data: PerturbationData):
    """``config`` with a ``time_scale`` of ``None`` set from the training times
    (:func:`~perturbax.inference.default_time_scale`); other configs unchanged."""
    if uses_time(config) and getattr(config, "time_scale", 0.0) is None and data.times is not None:
        return dataclasses.replace(config, time_scale=default_time_scale(data.times))
    return config


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


class _CosineState(NamedTuple):
    """Steps taken and the length of the cosine decay (a state entry, so runs of any length share
    one compiled step)."""

    count: jax.Array
    total: jax.Array


def _cosine_step(learning_rate: float, alpha: float = 0.05) -> optax.GradientTransformation:
    """``optax.adam``'s last step with ``optax.cosine_decay_schedule(learning_rate, total, alpha)``:
    updates scaled by minus the step size, which decays from ``learning_rate`` to ``alpha`` times
    it over ``total`` steps; ``total`` is read from the state (:func:`_with_total`)."""

    def init(params):
        return _CosineState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32))

    def update(updates, state, params=None):
        count = jnp.minimum(state.count, state.total)
        decayed = (1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * count / state.total)) + alpha
        lr = learning_rate * decayed
        return (jax.tree.map(lambda g: jnp.asarray(-lr, g.dtype) * g, updates),
                _CosineState(state.count + 1, state.total))

    return optax.GradientTransformation(init, update)


def _with_total(optim_state: Any, total: int) -> Any:
    """``optim_state`` with the cosine decay's length set to ``total`` steps."""
    return jax.tree.map(lambda s: s._replace(total=jnp.asarray(total, jnp.int32)) if isinstance(s, _CosineState) else s,
                        optim_state, is_leaf=lambda s: isinstance(s, _CosineState))


class _Allowed(NamedTuple):
    """What a run of the trainer may draw from a :class:`DeviceData`: ``groups`` (E,) bool, and
    ``pool`` (N,) cell rows whose first ``n_cells`` are the allowed cells (for ELBO batches)."""

    groups: jax.Array
    pool: jax.Array
    n_cells: jax.Array


def _group_conditions(data: PerturbationData, cells: np.ndarray, timed: bool) -> np.ndarray:
    """The condition of each group of ``_device_data(data, cells, timed)``."""
    env = np.asarray(data.env)[cells]
    groups = _groups(data.subset(cells), timed)
    out = np.full(int(groups.max()) + 1 if groups.size else 0, -1, dtype=np.int64)
    out[groups] = env
    return out


def _condition_ids(data: PerturbationData, labels) -> np.ndarray:
    """Condition indices of ``labels`` (names of conditions of ``data``)."""
    names = list(data.conditions)
    missing = [lab for lab in labels if lab not in names]
    if missing:
        raise ValueError(f"cannot leave out {missing}: not conditions of the training data ({names[:8]} ...).")
    return np.asarray([names.index(lab) for lab in labels], dtype=np.int64)


def _allowed(dev: DeviceData, group_cond: np.ndarray, held: np.ndarray) -> _Allowed:
    """The groups and cells of ``dev`` outside the conditions ``held``."""
    ok = ~np.isin(group_cond, held)
    table, counts = np.asarray(dev.table), np.asarray(dev.counts)
    cells = np.concatenate([table[e, : counts[e]] for e in np.flatnonzero(ok)] or [np.zeros(0, np.int32)])
    rest = np.setdiff1d(np.arange(dev.x.shape[0]), cells)
    pool = np.concatenate([np.sort(cells), rest]).astype(np.int32)
    return _Allowed(jnp.asarray(ok), jnp.asarray(pool), jnp.asarray(cells.size, jnp.int32))


def _draw_groups(key: jax.Array, dev: DeviceData, n_groups: int, source: str = "other",
                 allowed: jax.Array | None = None) -> jax.Array:
    """The groups of one energy step: ``n_groups`` distinct ones at random among the ``allowed``
    (E,) ones (default all); with ``source="control"`` the first is a control group (a random one,
    for models of time) and the others are non-control groups where there are enough."""
    E = dev.counts.shape[0]
    barred = jnp.zeros(E) if allowed is None else 4.0 * (~allowed)
    u = jax.random.uniform(key, (E,))
    if source == "control":
        first = jnp.argmax(u + 2.0 * dev.is_control - barred)
        rest = jnp.argsort(u + 2.0 * dev.is_control + barred)
        return jnp.concatenate([first[None], rest[: n_groups - 1]])
    return jnp.argsort(u + barred)[:n_groups]


def _val_blocks(is_control: np.ndarray, n_groups: int, source: str = "other",
                allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Blocks of ``n_groups`` group ids that together cover every ``allowed`` group (default all;
    the last block filled up from the start); with ``source="control"`` each block starts with a
    control group. No blocks when no group is allowed."""
    ok = np.ones(is_control.size, bool) if allowed is None else np.asarray(allowed, bool)
    ids = np.flatnonzero(ok)
    if ids.size == 0:
        return []
    if source == "control" and is_control[ids].any() and n_groups > 1:
        ctrl = ids[is_control[ids]]
        rest = ids[~is_control[ids]]
        if rest.size == 0:
            rest = ctrl
        k = n_groups - 1
        n = -(-rest.size // k)
        others = np.resize(rest, n * k).reshape(n, k)
        return [np.concatenate([[ctrl[i % ctrl.size]], o]) for i, o in enumerate(others)]
    n = -(-ids.size // n_groups)
    return list(np.resize(ids, n * n_groups).reshape(n, n_groups))


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
    steps: int | None = None,
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
    devices: int | Sequence[Any] | None = None,
    recipe: bool | None = None,
    validation: Any = None,
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
        the additive shift model, 5e-3 for latent dynamics and custom models). ``steps=None``
        (default): ``DEFAULT_STEPS`` (2000), and with ``select`` the fit's length is chosen by the
        CV over training conditions: up to ``MAX_CYCLES`` cycles of 2000 steps, each a warm
        restart of the schedule (:func:`perturbax.inference.selection.fit_with_selection`). A
        number fixes the length (one cycle).
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
    devices
        Devices the cells of each step are split over (:mod:`perturbax.inference.sharding`):
        ``None`` (default) all devices (of all hosts after ``jax.distributed.initialize()``), a
        number ``n`` the first ``n``, or a list of jax devices; parameters are replicated. The
        mesh uses the most of them that divide a step evenly (``info["devices"]``).

    Data whose cells are on disk (``from_anndata(backed, on_disk=True)``, :mod:`perturbax.data.stream`)
    are streamed: each step's cells are read by a background thread ahead of use, with the same
    draws as in memory (the same seed gives the same fit).
    recipe
        The staged fitting of the latent dynamics model (:mod:`perturbax.inference.dynamics_recipe`):
        ELBO, program order read from ``W`` and refitted, then searched by the held-out energy score
        under the sole-target mask read from ``W``, an energy stage whose length (possibly 0)
        is chosen on held-out *training* contexts, then the final stages on all cells; interval
        calibration on the held-out contexts. ``steps`` is the length of the first stage.
        ``info["recipe"]`` says what was chosen and why. ``None`` (default): on for
        ``"latent_dynamics"`` when ``objective``, ``init_params`` and ``validation`` are not given
        (giving an objective fits that one stage by hand); ``False``: one plain stage.
    validation
        Cell indices of ``data`` to hold out for the held-out loss instead of the random split by
        ``validation_fraction`` (e.g. every cell of some (condition, time) contexts).
    """
    objective_given = objective is not None
    builtin = model if isinstance(model, str) else next((k for k, (f, _) in BUILTIN_MODELS.items() if f is model), None)
    if objective is None:
        objective = default_objective(builtin, getattr(config, "likelihood", "gaussian"))
    if learning_rate is None:
        learning_rate = default_learning_rate(builtin)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; choose one of {OBJECTIVES}.")
    if not isinstance(data, PerturbationData):
        raise TypeError("fit expects a PerturbationData; build one with perturbax.data.from_anndata(adata, ...).")
    length_chosen = steps is None
    if steps is None:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    name, model_fn, config = _resolve_model(model, config, data)
    config = _with_time_scale(config, data)
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
    if select and not eligible:
        raise ValueError(
            f"select=True needs the additive_shift model with a gaussian or implicit likelihood (got model "
            f"{name!r}, likelihood {likelihood!r}); pass select=False."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    from functools import partial

    if recipe is None:
        recipe = name == "latent_dynamics" and not objective_given and init_params is None and validation is None
    if recipe:  # the staged recipe: its stages are this function with recipe=False
        if objective_given or init_params is not None or validation is not None:
            raise ValueError("recipe=True chooses each stage's objective, start and held-out cells itself; drop "
                             "objective=, init_params= and validation=, or pass recipe=False to fit one stage.")
        from perturbax.inference.dynamics_recipe import fit_dynamics_recipe, stage_batch_size

        if uses_time(config) and data.times is not None:  # (fit checks the times in the stages)
            final = _validation_split(data, validation_fraction, seed, timed=True)[0].size
            batch_size = stage_batch_size(data, batch_size, final_cells=final)
        settings = dict(batch_size=batch_size, learning_rate=learning_rate, guide=guide, global_guide=global_guide,
                        eval_every=eval_every, progress=progress, data_init=data_init,
                        validation_fraction=validation_fraction, devices=devices)
        plain = partial(fit, model, recipe=False, **settings)

        def stage_trainer(d, *, config, **kw):  # a compiled stage that several runs share (_trainer)
            return _trainer(name, model_fn, config, d, **{**settings, "energy": None, "init_params": None, **kw})

        return fit_dynamics_recipe(plain, data, config=config, steps=steps, seed=seed, energy=energy,
                                   patience=patience, trainer_fn=stage_trainer)
    trainer = partial(
        _trainer, name, model_fn, config, data, objective=objective, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, guide=guide, global_guide=global_guide, energy=energy,
        validation_fraction=validation_fraction, eval_every=eval_every, patience=patience, progress=progress,
        init_params=init_params, data_init=data_init, devices=devices, validation=validation,
    )
    if select:  # the nested estimator: the CV fits and the final fit share one compiled trainer
        from perturbax.inference.selection import MAX_CYCLES, fit_with_selection

        return fit_with_selection(trainer, data, seed=seed, max_cycles=MAX_CYCLES if length_chosen else 1)
    return trainer()()


def _trainer(
    name: str, model_fn: Callable, config: Any, data: PerturbationData, holdouts=(), *, objective: str, steps: int,
    batch_size: int, learning_rate: float, seed: int, guide, global_guide: str, energy: EnergyOptions | None,
    validation_fraction: float, eval_every: int, patience: int | None, progress: bool, init_params, data_init,
    devices=None, validation=None,
) -> Callable[..., FitResult]:
    """Compile the fitting loop of ``fit`` once for ``data``; returns ``run(exclude=())``, which fits
    with the cells of the conditions named in ``exclude`` left out (neither drawn nor held out).

    ``holdouts``: the sets of conditions ``run`` will be asked to leave out (the in-span CV folds
    of the nested estimator), so that every run draws as many conditions per energy step. The runs
    share the compiled step and held-out loss (same shapes: the cells of left-out conditions stay on
    the device but are never drawn); the objective's cell count (the ELBO's scale and the
    generalised-Bayes weight of the energy score) is the training cells of ``data`` in every run.
    """
    config = _with_time_scale(config, data)
    trainer_config = config
    timed = uses_time(config)
    likelihood = getattr(config, "likelihood", "gaussian")
    time_info: dict[str, Any] = {}
    if timed:
        uniq = training_times(data, name)
        time_info = {
            "times": [float(v) for v in uniq],
            "time_key": data.time_key,
            "contexts": _context_check(data, config),
        }

    if validation is not None:
        val_idx = np.unique(np.asarray(validation, dtype=np.int64).reshape(-1))
        if val_idx.size and (val_idx[0] < 0 or val_idx[-1] >= data.n_cells):
            raise ValueError(f"validation holds cell indices outside 0..{data.n_cells - 1}; give rows of data.")
        train_idx = np.setdiff1d(np.arange(data.n_cells), val_idx)
    else:
        train_idx, val_idx = _validation_split(data, validation_fraction if patience is not None else 0.0, seed,
                                               timed)
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
    train_group_cond = _group_conditions(data, train_idx, timed)
    val_group_cond = None if val is None else _group_conditions(data, val_idx, timed)
    held_sets = [_condition_ids(data, labels) for labels in holdouts]

    if objective == "energy":
        opts = energy or EnergyOptions()
        m = int(opts.cells_per_condition)
        n_groups = opts.conditions_per_step or max(1, batch_size // m)
        if opts.source == "control":
            n_groups = max(n_groups, 2)  # the control block and at least one other
        fewest = min([n_cond] + [int((~np.isin(train_group_cond, h)).sum()) for h in held_sets])
        n_groups = max(1, min(n_groups, fewest))
        step_size = n_groups * m
    else:
        opts, m, n_groups, step_size = None, None, None, batch_size

    # --- data parallelism (inference/sharding.py): a step's cells split over the mesh
    # (the cell tables stay process-local: the steps take them as arguments, replicated by the partitioner;
    # an array spanning several hosts would not be readable on the host, where runs choose their cells)
    mesh = make_mesh(devices, units=n_groups if objective == "energy" else batch_size)
    # --- cells on disk (data/stream.py): each step's rows drawn ahead on the host and read from disk
    disk = on_disk(data)

    def group_cells(dev: DeviceData, groups, key) -> jax.Array:
        """The rows of ``m`` random cells of each group (the energy score pairs distinct rows only)."""
        pos = jax.random.randint(key, (groups.shape[0], m), 0, dev.counts[groups][:, None])
        return dev.table[groups[:, None], pos].reshape(-1)

    def draw_rows(dev: DeviceData, key, allowed: _Allowed) -> jax.Array:
        """The rows of one step's cells among the ``allowed`` ones (also drawn ahead on the host for
        cells on disk)."""
        if objective == "elbo":  # cells at random among the allowed ones (the first n_cells of the pool)
            return allowed.pool[jax.random.randint(key, (batch_size,), 0, allowed.n_cells)]
        k1, k2 = jax.random.split(key)
        return group_cells(dev, _draw_groups(k1, dev, n_groups, opts.source, allowed.groups), k2)

    def batch_of(dev: DeviceData, idx, x=None) -> tuple[Batch, dict[str, jax.Array]]:
        """The batch of rows ``idx`` (expression ``x`` when read from disk) laid out over the mesh,
        and the loss's keyword arguments (energy: ``cell_ids``, the rows)."""
        b = dev.batch(idx) if x is None else dev.batch(idx)._replace(x=x)
        return shard_cells((b, {} if objective == "elbo" else {"cell_ids": idx}), mesh)

    def draw_batch(dev: DeviceData, key, allowed: _Allowed, x=None) -> tuple[Batch, dict[str, jax.Array]]:
        return batch_of(dev, draw_rows(dev, key, allowed), x)

    # (the plate must hold a step's cells: an energy step can draw more cells than there are, with
    # replacement; the energy score does not use the plate size, the ELBO scales by it)
    model_kwargs = {"config": config, "n_cells": max(n_train, step_size)}
    key = jax.random.PRNGKey(seed)
    k_init, k_data, k_val = jax.random.split(key, 3)
    everything = _allowed(train, train_group_cond, ())
    rows_ahead = jax.jit(jax.vmap(lambda k, a: draw_rows(train, k, a), in_axes=(0, None)))

    def read_steps(keys, allowed: _Allowed) -> jax.Array | None:
        """Cells on disk: the expression of the steps of ``keys``, ``(n, cells, G)`` over the mesh."""
        if not disk:
            return None
        idx = np.asarray(rows_ahead(keys, allowed))
        return put_cells(data.dense(train_idx[idx.reshape(-1)]).reshape(*idx.shape, -1), mesh, axis=1)

    init_batch = draw_batch(train, k_data, everything, None if not disk else read_steps(k_data[None], everything)[0])[0]
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
    optim = optax_to_numpyro(optax.chain(optax.clip_by_global_norm(10.0), optax.scale_by_adam(),
                                         _cosine_step(learning_rate)))
    # The energy objective uses the model only as a simulator (cells drawn, never scored), so SVI
    # sees it with the cells hidden: models without a density (the implicit likelihood) fit too.
    svi_model = hide_cells(model_fn) if objective == "energy" else model_fn
    svi = SVI(svi_model, guide, optim, loss, **model_kwargs)
    init_state = jax.jit(svi.init)(k_init, init_batch)
    start = svi.get_params(init_state)
    if data_init is None:
        data_init = objective == "energy"
    per_cell = 1.0 / n_train if objective == "elbo" else 1.0
    # The linear latent dynamics take the support of B as an argument (shapes do not depend on it), so
    # one compiled step serves every causal mask of the same size (run(config=...), the order refits).
    varies_mask = name == "latent_dynamics" and getattr(config, "drift", None) == "linear"

    def mask_kw(mask) -> dict[str, Any]:
        return {"causal_mask": mask} if varies_mask else {}

    @jax.jit
    def run_chunk(state, keys, dev, allowed, xs=None, mask=None):
        def body(st, a):
            b, loss_kw = draw_batch(dev, a[0], allowed, a[1])
            st, value = svi.update(st, b, **loss_kw, **mask_kw(mask))
            return st, value * per_cell

        return jax.lax.scan(body, state, (keys, xs))

    # Held-out loss: the ELBO on 4 random batches of held-out cells; the energy score on every
    # held-out group (condition or context), in blocks of a step's layout, so that evaluations (and
    # fits from different seeds) score the same groups. Paired: the keys (cells drawn and the
    # loss's own draws) are the same at every evaluation. Blocks are padded to the number of the
    # run that leaves nothing out, with weight 0, so every run shares the compiled function.
    n_blocks = 4
    if objective == "energy" and val is not None:
        n_blocks = len(_val_blocks(np.asarray(val.is_control), n_groups, opts.source))
    val_keys = jax.random.split(k_val, n_blocks)

    def held_out(params, batch_and_kw, key, mask):
        b, loss_kw = batch_and_kw
        return loss.loss(key, params, svi_model, guide, b, **loss_kw, **model_kwargs, **mask_kw(mask))

    def val_rows(dev, block, key, allowed):
        k_cells = jax.random.split(key)[0]
        return draw_rows(dev, k_cells, allowed) if objective == "elbo" else group_cells(dev, block, k_cells)

    @jax.jit
    def val_loss(state, dev, allowed, blocks, weights, xs=None, mask=None):
        params = svi.get_params(state)

        def one(a):
            block, key, x = a
            return held_out(params, batch_of(dev, val_rows(dev, block, key, allowed), x), jax.random.split(key)[1],
                            mask)

        return jnp.sum(weights * jax.lax.map(one, (blocks, val_keys, xs))) / jnp.sum(weights) * per_cell

    def run(exclude=(), *, config=config, steps=steps, init_params=init_params, cycle: int = 0,
            stop_early: bool = True) -> FitResult:
        """A fit leaving out the conditions ``exclude``; ``steps`` and ``init_params`` as in ``fit``
        (default: the trainer's); ``config``: the trainer's, or for the linear latent dynamics one
        that differs from it only in ``causal_mask`` (as many free entries, both acyclic or not).
        ``cycle > 0`` draws other cells and noise than cycle 0 (a warm restart continuing an earlier
        fit passed as ``init_params`` should not replay its draws). ``stop_early=False`` runs all
        ``steps`` and returns the last state (the held-out loss is still recorded): for a length
        that something else judges, such as the CV cycles of the nested estimator."""
        config = _with_time_scale(config, data)
        mask = None
        if varies_mask:
            why = mask_variant(config, trainer_config)
            if why:
                raise ValueError(why)
            mask = jnp.asarray(config.mask, jnp.float32)
        elif config is not trainer_config and config != trainer_config:
            raise ValueError("run(config=...) can change only the causal_mask of a linear latent dynamics config; "
                             "build another trainer for other settings.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        warm = _matching_params(init_params, start)
        held = _condition_ids(data, exclude)
        allowed = _allowed(train, train_group_cond, held)
        if objective == "energy" and int(allowed.groups.sum()) < n_groups:
            raise ValueError(
                f"leaving out {list(exclude)} leaves {int(allowed.groups.sum())} conditions to draw, fewer than "
                f"the {n_groups} of an energy step; name the left-out sets in holdouts= when building the trainer."
            )
        run_idx = train_idx[~np.isin(np.asarray(data.env)[train_idx], held)]
        state = init_state
        from_data = {}
        if data_init:  # (cells on disk: from up to 20000 of them, read once)
            rows = np.flatnonzero(~np.isin(np.asarray(data.env)[train_idx], held))
            if disk:
                if rows.size > 20000:
                    rows = np.sort(np.random.default_rng(seed).choice(rows, 20000, replace=False))
                x0 = jnp.asarray(data.dense(train_idx[rows]))
            else:
                x0 = train.x[jnp.asarray(rows)]
            from_data = data_start(start, train._replace(x=x0, library=train.library[jnp.asarray(rows)]),
                                   likelihood=likelihood, objective=objective)
        if from_data or warm:
            transforms = svi.constrain_fn.args[0]  # name -> bijection from unconstrained values
            raw = dict(svi.optim.get_params(state.optim_state))
            new = {**from_data, **warm}
            raw.update({k: transforms[k].inv(v) if k in transforms else v for k, v in new.items()})
            state = state._replace(optim_state=svi.optim.init(raw))
        if cycle:
            state = state._replace(rng_key=jax.random.fold_in(state.rng_key, cycle))
        state = replicate(state._replace(optim_state=_with_total(state.optim_state, steps)), mesh)
        tracking = val is not None and patience is not None
        if tracking:
            val_allowed = _allowed(val, val_group_cond, held)
            if objective == "energy":
                ok = np.asarray(val_allowed.groups)
                blocks = _val_blocks(np.asarray(val.is_control), n_groups, opts.source, ok)
                tracking = bool(blocks)
            else:
                blocks = [np.zeros(1, np.int64)] * n_blocks
                tracking = int(val_allowed.n_cells) > 0
        if tracking:
            weights = jnp.asarray(np.arange(n_blocks) < len(blocks), jnp.float32)
            blocks = jnp.asarray(np.stack([blocks[i % len(blocks)] for i in range(n_blocks)]), jnp.int32)
            val_xs = None
            if disk:  # the held-out cells are the same at every evaluation: read them once
                vi = np.asarray(jax.vmap(lambda b, k: val_rows(val, b, k, val_allowed))(blocks, val_keys))
                val_xs = put_cells(data.dense(val_idx[vi.reshape(-1)]).reshape(*vi.shape, -1), mesh, axis=1)

        def evaluate(st) -> float:
            return float(val_loss(st, val, val_allowed, blocks, weights, val_xs, mask))

        history_loss, val_steps, val_losses = [], [], []
        record = EarlyStopping()
        if tracking:  # the starting state is the first candidate (a warm start the fit makes worse is kept)
            v = evaluate(state)
            val_steps.append(0)
            val_losses.append(v)
            record = track_held_out(record, v, 0, state)
        stop_reason = "steps"
        step = 0
        t0 = time.perf_counter()
        keys_all = jax.random.split(jax.random.fold_in(k_data, cycle) if cycle else k_data, steps)
        feed = None
        if disk:  # pieces of each evaluation chunk, ~64 MB of cells each, read ahead by a background thread
            from perturbax.data.stream import Prefetch

            per = int(max(1, min(eval_every, (64 << 20) // (4 * step_size * data.n_genes))))
            pieces = [(a, min(a + per, s0 + eval_every, steps)) for s0 in range(0, steps, eval_every)
                      for a in range(s0, min(s0 + eval_every, steps), per)]
            feed = Prefetch(lambda p: read_steps(keys_all[p[0] : p[1]], allowed), pieces, depth=2)

        def advance(state, step: int, n: int):
            """``n`` SVI steps from ``step``: one scan in memory; for cells on disk one scan per piece
            read ahead (stopping after a piece with a non-finite loss)."""
            if feed is None:
                return run_chunk(state, keys_all[step : step + n], train, allowed, None, mask)
            parts = []
            while sum(map(len, parts)) < n:
                (a, b), xs = next(feed)
                state, part = run_chunk(state, keys_all[a:b], train, allowed, xs, mask)
                parts.append(np.asarray(part))
                if not np.all(np.isfinite(parts[-1])):
                    break
            return state, np.concatenate(parts)

        bar = tqdm(total=steps, disable=not progress, desc=f"fit {name} ({objective})", unit="step", leave=False)
        try:
            while step < steps:
                n = min(eval_every, steps - step)
                new_state, losses = advance(state, step, n)
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
                        stacklevel=3,
                    )
                    history_loss.extend(losses[:first].tolist())
                    break
                state = new_state
                step += n
                history_loss.extend(losses.tolist())
                bar.update(n)
                if tracking:
                    v = evaluate(state)
                    val_steps.append(step)
                    val_losses.append(v)
                    record = track_held_out(record, v, step, state)
                    bar.set_postfix(loss=f"{np.mean(losses[-max(1, n // 4):]):.4g}", val=f"{v:.4g}")
                    if stop_early and record.waited >= patience:
                        stop_reason = "early_stopping"
                        break
                else:
                    bar.set_postfix(loss=f"{np.mean(losses[-max(1, n // 4):]):.4g}")
        finally:
            bar.close()
            if feed is not None:
                feed.close()
        fit_seconds = time.perf_counter() - t0
        if not stop_early and stop_reason != "nan":  # the last state, whatever its held-out loss
            final_state, best_step = state, step
            best_val = val_losses[-1] if tracking and val_losses and math.isfinite(val_losses[-1]) else None
        elif record.state is not None and stop_reason != "nan":
            final_state, best_step, best_val = record.state, record.step, record.best
        else:  # no held-out evaluation (patience=None), none finite, or the NaN guard fired
            final_state, best_step, best_val = state, step, None
        params = {k: v for k, v in svi.get_params(final_state).items()}
        if mesh.size > 1:  # process-local copies of the replicated parameters (what FitResult and predict use)
            params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)) if isinstance(a, jax.Array) else a, params)

        return FitResult.build(
            model_name=name,
            model=model_fn,
            guide=guide,
            config=config,
            params=params,
            global_names=global_names,
            data=data,
            train_cells=run_idx,
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
                "devices": int(mesh.size),
                "streamed": disk,
                **({"left_out": [str(v) for v in exclude]} if len(exclude) else {}),
                **time_info,
            },
        )

    return run
