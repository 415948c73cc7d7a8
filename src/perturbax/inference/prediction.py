"""``predict``: cells and credible intervals for (possibly unseen) perturbations.

For each posterior draw of the global sites and each requested label ``l*``, the fitted model is
run with ``z_base`` fixed to the basal states of the source cells (training control cells by
default) and the label ``l*``: it shifts them by ``W l*``, decodes, and samples the likelihood.
Models of time are run the same way with ``batch.t = t*`` for each requested time: the latent
dynamics model evolves ``z(0)`` to ``z(t*)`` under ``l*`` and decodes; by default (relaxing
heterogeneity) each posterior draw samples ``z(0)`` from its own ``N(mu, Sigma_0)`` instead of
using encoded control cells.

With contexts (``from_anndata(..., context_keys=...)``), the default source of a label is the
training control cells of its context (``fit.basal["l"]``), and a label without ``@`` is predicted
in every context (one column per context).

``source=`` observed cells (a :class:`~perturbax.data.PerturbationData`, e.g. the cells of one
perturbation at a measured time) moves those cells instead of generating new ones: each source
cell ``x_i`` with its own label ``l_i`` (and time ``t_i``) is encoded to its basal state ``z_i``,
and its prediction under ``l*`` (at ``t*``) is ``x_i + m(z_i, l*, t*) - m(z_i, l_i, t_i)``, with
``m`` the model's mean expression (the decoder output before the likelihood's noise; for the
implicit likelihood, a decode with the same noise draw). The model supplies only the change; the
cell-to-cell variation the decoder does not capture is kept from the real cells. Expression must
be additive in the likelihood's space (gaussian or implicit; not negative_binomial counts).
The per-gene mean expression of a perturbation is averaged over the source cells for each draw,
with Bayesian-bootstrap weights (the source cells are a finite sample of the basal population);
its posterior mean and equal-tailed credible interval come from the draws. The intervals thus
carry the posterior uncertainty of the global sites (W, ...) and of the basal population; they
do not carry the error of the decoder, which is a point estimate.

Fits with the nested estimator (the default of ``fit("additive_shift", ...)``; ``fit.nested``
non-empty): the per-draw means become ``control mean + l W_ridge + lambda * (model remainder)``,
the cells are re-centred on that mean (generated cells or training control cells, as selected),
and the intervals are ``mean +- q sigma`` with the conformal factor ``q`` calibrated on held-out
training conditions; they aim to cover the observed mean of ``n_ref`` cells of the condition
(:mod:`perturbax.inference.selection`; ``uns["perturbax"]["nested"]`` says what was applied).
Labels partly outside the span of the training labels (``allow_unseen=True``) get intervals widened
by the spread of the measured effects along the part the design does not identify
(:func:`perturbax.inference.nested.unidentified_spread`; ``nested["unidentified"]`` per label): an
exchangeability assumption, not a calibration. Not applied to ``source=<observed cells>`` or models
of time.

Output AnnData (same genes and expression space as the training ``X``):

- ``X``: predicted cells; ``obs[perturbation_key]``: label; ``obs["draw"]``: posterior draw used;
  with contexts (``registry.contexts``), ``obs[perturbation_key]`` holds the perturbation and one
  ``obs`` column per context key its context (as the training data were read), and
  ``uns["perturbax"]["labels"]`` the pair labels ``"stimulated @ cell_type=CD4T"``
  (:func:`perturbax.data.prediction_cells` splits the cells by pair);
- ``varm["pred_mean"]``, ``varm["pred_lower"]``, ``varm["pred_upper"]``: ``(n_genes, n_columns)``
  posterior mean and interval bounds of the mean expression, columns in the order of
  ``uns["perturbax"]["labels"]``;
- ``uns["perturbax"]``: labels, interval level, number of draws, source, model, objective, and
  identifiability notes from the training design (``coverage``: arrays ``covered``,
  ``in_convex_hull``, ``residual``, ``message`` aligned with ``labels``);
- ``uns["mean_draws"]``: ``(n_columns, num_samples, n_genes)`` per-draw mean expression;
- ``uns["latent_mean_draws"]``: ``(n_columns, num_samples, d)`` per-draw mean latent state, for
  models with a deterministic latent site ``"z"`` (the latent dynamics model: ``z(t)``).

Models without time (the additive shift model): one column per requested perturbation and
``uns["perturbax"]["labels"]`` holds the canonical labels (this layout is unchanged).

Models of time (``predict(..., times=[...])``): one column per (perturbation, time) pair,
perturbation-major (all times of the first perturbation first). Then

- ``obs["time"]``: the time of each predicted cell (``obs[perturbation_key]`` the plain label);
- ``uns["perturbax"]["labels"]``: the column keys ``"A+B @ t=4"`` (:func:`pair_key`), so
  :func:`perturbax.data.prediction_intervals` and :func:`perturbax.data.prediction_summary` work
  per pair; ``uns["perturbax"]["perturbations"]`` and ``["times"]``: the plain label and the time
  of each column; ``["train_times"]``: the distinct training times; ``["time_key"]``;
- ``uns["perturbax"]["coverage"]`` is aligned with the columns and adds ``time_in_range`` and
  ``time_message`` (measured time, interpolation, or extrapolation beyond the measured times).

Latent dynamics fits made by the default recipe (:mod:`perturbax.inference.dynamics_recipe`)
carry a calibration from held-out training contexts: their intervals are ``mean +- q sigma``
(``sigma^2`` = posterior variance of the mean + pooled cell variance / ``n_ref``, ``q`` the
conformal factor at ``interval`` of the column's kind of prediction: a measured perturbation
between or beyond its measured times, or an unmeasured combination), aimed at the observed mean of
``n_ref`` cells of a context; ``uns["perturbax"]["calibration"]`` says so (``kinds`` and
``interval_factors`` per column). Not applied to ``source=<observed cells>``.

Use :func:`perturbax.data.prediction_summary` for a tidy table and :func:`to_arviz` for ArviZ.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from numpyro import handlers

from perturbax.data.core import PerturbationData
from perturbax.data.io import predictions_to_anndata, write_predictions
from perturbax.data.labels import LabelLike, close_matches
from perturbax.inference.result import FitResult, _dummy_batch
from perturbax.models.batch import Batch

__all__ = ["predict", "pair_key", "posterior_globals", "to_arviz", "UnseenPerturbationError", "prediction_plan",
           "prediction_bytes", "output_chunk_cells"]


class UnseenPerturbationError(ValueError):
    """A requested perturbation contains an elementary perturbation the model never saw."""


def posterior_globals(fit: FitResult, num_samples: int, *, seed: int = 0) -> dict[str, jax.Array]:
    """``num_samples`` joint draws of the global sites from the fitted posterior (leading axis)."""
    dummy = _dummy_batch(fit.config)
    guide = handlers.substitute(fit.guide, data=fit.params)

    def one(key):
        tr = handlers.trace(handlers.seed(guide, key)).get_trace(dummy, **fit.model_kwargs)
        return {n: tr[n]["value"] for n in fit.global_names}

    keys = jax.random.split(jax.random.PRNGKey(seed), num_samples)
    return jax.jit(jax.vmap(one))(keys)


def posterior_draws(fit: FitResult, num_samples: int, *, seed: int = 0) -> dict[str, jax.Array]:
    """:func:`posterior_globals` plus the deterministic global sites derived from them: ``W`` of
    reparametrised priors (e.g. the horseshoe), and for latent dynamics the causal weights ``B``,
    the targets ``S`` and the equilibrium shift ``W = (I - B)^{-1} S`` (the additive-shift ``W``
    the dynamics reach at long times). Leading axis: draws."""
    draws = posterior_globals(fit, num_samples, seed=seed)
    if "W" in draws and "B" in draws:
        return draws
    dummy = _dummy_batch(fit.config)

    def dets(g):
        cond = handlers.condition(handlers.substitute(fit.model, data=fit.params), data=g)
        tr = handlers.trace(handlers.seed(cond, 0)).get_trace(dummy._replace(x=None), **fit.model_kwargs)
        out = {}
        if "W" in tr:
            out["W"] = tr["W"]["value"]
        if "B" in tr and "S" in tr:
            from perturbax.models.dynamics import equilibrium_shift

            out.update(B=tr["B"]["value"], S=tr["S"]["value"])
            out.setdefault("W", equilibrium_shift(tr["B"]["value"], tr["S"]["value"]))
        return out

    extra = jax.vmap(dets)(draws)
    return {**extra, **draws}


def _parse(fit: FitResult, perturbations, allow_unseen: bool) -> tuple[list[str], np.ndarray]:
    if isinstance(perturbations, (str, dict)) or (
        isinstance(perturbations, np.ndarray) and perturbations.ndim == 1
    ):
        perturbations = [perturbations]
    if len(perturbations) == 0:
        raise ValueError("perturbations is empty; give at least one label such as 'A+B' or {'A': 0.5}.")
    reg = fit.registry
    if reg.contexts:  # a plain perturbation label (no "@"): one column per context
        from perturbax.data.labels import CONTEXT_JOIN, CONTEXT_SEP

        every = [f" {CONTEXT_JOIN} ".join(f"{k}={v}" for k, v in c.items()) for c in reg.all_contexts()]
        perturbations = [f"{p} {CONTEXT_SEP} {c}" if isinstance(p, str) and CONTEXT_SEP not in p else p
                         for p in perturbations for c in (every if isinstance(p, str) and CONTEXT_SEP not in p else [None])]
    labels, vecs = [], []
    for p in perturbations:
        unknown = reg.unknown(p)
        if unknown:
            # suggest only names that would be accepted: seen in training, unless unseen ones are allowed
            accepted = reg.names if allow_unseen else tuple(fit.seen_elementary)
            hints = {u: close_matches(u, accepted) for u in unknown}
            text = "; ".join(f"{u!r}" + (f" (did you mean {h}?)" if h else "") for u, h in hints.items())
            raise ValueError(
                f"Perturbation {p!r} names elementary perturbation(s) unknown to the model: {text}. "
                f"The model knows {reg.K}: {', '.join(reg.names[:30])}{' ...' if reg.K > 30 else ''}."
            )
        v = reg.encode(p)
        labels.append(reg.decode(v))
        vecs.append(v)
    vecs = np.stack(vecs)
    seen = set(fit.seen_elementary)
    for lab, v in zip(labels, vecs):
        never = [reg.names[k] for k in np.flatnonzero(v) if reg.names[k] not in seen]
        if never and not allow_unseen:
            raise UnseenPerturbationError(
                f"{lab!r} contains {never}, never seen in training: the model cannot know its effect "
                f"(its latent shift is only the prior). Pass allow_unseen=True to predict anyway."
            )
    return labels, vecs


def _coverage_notes(fit: FitResult, labels: list[str], vecs: np.ndarray) -> dict[str, np.ndarray]:
    """Identifiability of each label from the training design (:func:`perturbax.theory.check_design`);
    warns for labels outside the span of the training labels."""
    from perturbax.theory.design import check_design

    report = check_design(fit.train_design, vecs, registry=fit.registry)
    notes = {"covered": [], "in_convex_hull": [], "residual": [], "message": []}
    for lab, t in zip(labels, report.tests):
        notes["covered"].append(bool(t.covered))
        notes["in_convex_hull"].append("unknown" if t.in_convex_hull is None else str(bool(t.in_convex_hull)))
        notes["residual"].append(float(t.residual))
        notes["message"].append(t.message)
        if not t.covered:
            warnings.warn(
                f"{lab!r} is not identified by the training design: {t.message} Its prediction rests on "
                f"the prior and the decoder's extrapolation, not on data.",
                stacklevel=3,
            )
    return {k: np.asarray(v) for k, v in notes.items()}


def _source_cells(fit: FitResult, cells: PerturbationData) -> dict[str, np.ndarray]:
    """Encoded basal states, labels, times, covariates and expression of observed source cells."""
    if cells.n_cells == 0:
        raise ValueError("source has no cells; pass the observed cells to move (a non-empty PerturbationData).")
    lik = getattr(fit.config, "likelihood", None)
    if lik == "negative_binomial":
        raise ValueError(
            "source=<observed cells> adds the model's change of the mean expression to each cell, which "
            "needs an additive expression space; this fit models raw counts (likelihood "
            "'negative_binomial'). Use source='control', or fit the gaussian likelihood on log-normalised "
            "expression."
        )
    L = np.asarray(cells.L)
    unseen = [n for k, n in enumerate(cells.registry.names) if np.any(L[:, k] != 0) and n not in fit.seen_elementary]
    if unseen:
        raise UnseenPerturbationError(
            f"The source cells carry {unseen}, never seen in training: the model cannot know its effect, "
            f"so it cannot take it out of these cells. Pass cells whose labels use only "
            f"{list(fit.seen_elementary)}."
        )
    z = fit.encode(cells)  # (contexts: the cells' labels carry their context columns)  # checks the genes and, for models of time, the times
    data = cells.with_registry(fit.registry)
    timed = fit.uses_time
    return {
        "z": z,
        "library": data.library_size,
        "c": np.zeros((cells.n_cells, 0), np.float32),
        "l": np.asarray(data.L, np.float32),
        "t": np.asarray(data.times, np.float32) if timed else np.zeros(cells.n_cells, np.float32),
        "x": data.dense(),
    }



def _source_groups(fit: FitResult, vecs: np.ndarray, shared: bool, n: int) -> list[tuple[np.ndarray, set[int]]]:
    """``[(source rows, label indices)]``: with contexts and the training control cells as source
    (``shared=False``), the control cells of each label's context (``fit.basal["l"]``); else all
    ``n`` source rows for every label."""
    reg = fit.registry
    if shared or not reg.contexts:
        return [(np.arange(n), set(range(len(vecs))))]
    P = reg.n_perturbations
    src_ctx = np.asarray(fit.basal["l"])[:, P:]
    out: dict[bytes, tuple[np.ndarray, set[int]]] = {}
    for i, v in enumerate(vecs):
        ctx = np.asarray(v[P:], dtype=np.float32)
        if reg.context_of(v) is None:
            raise ValueError(
                f"{reg.decode(v)!r} is not in one context (its context columns are not an indicator); give "
                f"labels such as 'A @ {reg.contexts[0][0]}={reg.contexts[0][1][0]}'."
            )
        rows = np.flatnonzero(np.all(src_ctx == ctx, axis=1))
        if rows.size == 0:
            name = " & ".join(f"{k}={c}" for k, c in reg.context_of(v).items())
            raise ValueError(
                f"The fit has no control cells of context {name!r} to start {reg.decode(v)!r} from; train with "
                f"control cells of that context, or pass source='prior' or observed cells of it (source=...)."
            )
        out.setdefault(ctx.tobytes(), (rows, set()))[1].add(i)
    return list(out.values())


def _context_obs(fit: FitResult, vecs: np.ndarray, sizes: list[int], col_label: list[int]) -> dict[str, np.ndarray]:
    """``{context key: category of each predicted cell}`` (empty without contexts)."""
    reg = fit.registry
    if not reg.contexts:
        return {}
    out = {}
    for key, _ in reg.contexts:
        values = [reg.context_of(vecs[i])[key] for i in col_label]
        out[key] = np.repeat(np.asarray(values, dtype=object), sizes)
    return out


def _column_sampler(fit, model, kwargs, draws, z_src, lib_src, c_src, src_cells, *, timed, moved, source, n_cells,
                    num_samples, bootstrap, k_src):
    """``(column_means, column_cells, per_draw, n_cells)``: the samplers of one (label, time) column
    from the given source cells (module docstring) -- its per-draw means, and its cells in blocks of
    whole posterior draws -- cells per posterior draw and cells per column."""
    n_ctrl = int(lib_src.shape[0])
    # Models of time with source="prior": every posterior draw samples its own basal states
    # z(0) ~ N(mu, Sigma_0) inside the model (z_src is None); library sizes and covariates come
    # from randomly chosen training control cells.
    fresh_prior = timed and not moved and source == "prior"
    if not moved and source == "prior" and not fresh_prior:
        n_prior = max(1000, n_cells or 0)
        base = fit.model  # sample z_base from the model's own base distribution
        tr = handlers.trace(handlers.seed(handlers.block(base), 1)).get_trace(
            _dummy_batch(fit.config, n_prior)._replace(x=None), **fit.model_kwargs
        )
        z_src = tr["z_base"]["value"]
        idx = jax.random.randint(k_src, (n_prior,), 0, lib_src.shape[0])
        lib_src, c_src = lib_src[idx], c_src[idx]
    elif fresh_prior:
        n_mean = min(4096, max(512, n_ctrl))
        idx = jax.random.randint(k_src, (n_mean,), 0, n_ctrl)
        lib_src, c_src, z_src = lib_src[idx], c_src[idx], None
    n_src = int(lib_src.shape[0])
    n_cells = (n_ctrl if fresh_prior else n_src) if n_cells is None else int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}.")
    per_draw = math.ceil(n_cells / num_samples)
    has_c = c_src.shape[1] > 0

    def run(globals_s, z, lib, c, lvec, t, key):
        """One model run on n source states; ``lvec`` (K,) or (n, K), ``t`` scalar or (n,)."""
        n = lib.shape[0]
        batch = Batch(
            x=None, l=jnp.broadcast_to(lvec, (n, lvec.shape[-1])), c=c if has_c else None, library=lib,
            t=jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,)) if timed else None,
        )
        data = dict(globals_s) if z is None else {**globals_s, "z_base": z}
        cond = handlers.condition(model, data=data)
        kw = kwargs if n <= kwargs["n_cells"] else {**kwargs, "n_cells": n}  # the plate must hold n cells
        tr = handlers.trace(handlers.seed(cond, key)).get_trace(batch, **kw)
        mean = tr["x_mean"]["value"] if "x_mean" in tr else tr["x"]["value"]
        latent = tr["z"]["value"] if "z" in tr else None
        return tr["x"]["value"], mean, latent

    def generate(globals_s, idx, lvec, t, key):
        """Cells (and their means and latent states) of the source cells ``idx`` under ``lvec``, ``t``."""
        z = None if z_src is None else z_src[idx]
        x, mean, latent = run(globals_s, z, lib_src[idx], c_src[idx], lvec, t, key)
        if moved:  # move the observed cells by the model's change of the mean (same key: same noise)
            start = run(globals_s, z, lib_src[idx], c_src[idx], src_cells["l"][idx], src_cells["t"][idx], key)[1]
            x = mean = src_cells["x"][idx] + mean - start
        return x, mean, latent

    @jax.jit
    def column_means(lvec, t, key):
        """Per-draw population means ``(S, G)`` (and mean latent states) of the column."""
        mkeys = jax.random.split(jax.random.split(key, 3)[0], num_samples)

        # Per-draw population mean over the source cells, weighted by a Bayesian bootstrap
        # (Dirichlet(1, ..., 1) weights): the source cells are a finite sample of basal states.
        def draw_mean(a):
            k_run, k_w = jax.random.split(a[1])
            if bootstrap and not fresh_prior:
                w = jax.random.dirichlet(k_w, jnp.ones(n_src))
            else:
                w = jnp.full(n_src, 1.0 / n_src)
            _, mean, latent = generate(a[0], jnp.arange(n_src), lvec, t, k_run)
            return w @ mean, (None if latent is None else w @ latent)

        return jax.lax.map(draw_mean, (draws, mkeys))

    def cell_plan(key):
        """Source cells ``(S, per_draw)`` and keys ``(S,)`` of every draw's cells: each draw decodes its
        own subset of the source cells, taken from back-to-back random permutations of them, so every
        source cell is used before any is used again."""
        _, k2, k3 = jax.random.split(key, 3)
        n_rep = math.ceil(num_samples * per_draw / n_src)
        perms = jax.vmap(lambda k: jax.random.permutation(k, n_src))(jax.random.split(k2, n_rep))
        pick = perms.reshape(-1)[: num_samples * per_draw].reshape(num_samples, per_draw)
        return pick, jax.random.split(k3, num_samples)

    @jax.jit
    def draw_cells(sub_draws, pick, ckeys, lvec, t):
        return jax.lax.map(lambda a: generate(a[0], a[1], lvec, t, a[2])[0], (sub_draws, pick, ckeys))

    def column_cells(lvec, t, key, block_draws=None):
        """The column's cells (float32, rows in order) in blocks of ``block_draws`` whole posterior
        draws (default: all in one block); a block's cells do not depend on the blocking."""
        pick, ckeys = cell_plan(key)
        step = num_samples if block_draws is None else max(1, min(int(block_draws), num_samples))
        left = n_cells
        for d0 in range(0, num_samples, step):
            idx = np.minimum(np.arange(d0, d0 + step), num_samples - 1)  # the last block padded: one compile
            sub = jax.tree_util.tree_map(lambda v: v[idx], draws)
            x = draw_cells(sub, pick[idx], ckeys[idx], lvec, t)[: min(step, num_samples - d0)]
            x = np.asarray(x).reshape(-1, x.shape[-1])[:left]
            left -= x.shape[0]
            yield x
            if left <= 0:
                return

    return column_means, column_cells, per_draw, n_cells

def pair_key(label: str, time: float) -> str:
    """Column key of a (perturbation, time) pair in a prediction of a model of time:
    ``"A+B @ t=4"`` (what ``uns["perturbax"]["labels"]`` holds, and what
    :func:`perturbax.data.prediction_intervals` takes)."""
    return f"{label} @ t={float(time):g}"


def _prediction_times(fit: FitResult, times) -> list[float] | None:
    """Validate ``times`` against the fit: required for models of time, refused otherwise."""
    if not fit.uses_time:
        if times is not None:
            raise ValueError(
                f"The fitted model {fit.model_name!r} has no notion of time, so times must be None (got "
                f"{times!r}). To predict perturbations over time, fit model='latent_dynamics' to data with "
                f"times (from_anndata(..., time_key=...))."
            )
        return None
    train = fit.train_times
    seen = "" if train is None else f" The training cells were at t = {', '.join(f'{v:g}' for v in train)}."
    if times is None:
        raise ValueError(
            f"The fitted model {fit.model_name!r} describes cells over time: pass times=[...] (time since the "
            f"perturbation was switched on, in the units of the training data), e.g. times=[2, 4, 8].{seen}"
        )
    arr = np.atleast_1d(np.asarray(times, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"times must be a non-empty list of numbers, got {times!r}.")
    bad = arr[~np.isfinite(arr) | (arr < 0)]
    if bad.size:
        raise ValueError(
            f"times must be finite and >= 0 (time since the perturbation was switched on at t = 0); got "
            f"{bad[0]:g}.{seen}"
        )
    return list(dict.fromkeys(float(v) for v in arr))


def _time_notes(fit: FitResult, times: list[float]) -> tuple[list[bool], list[str]]:
    train = fit.train_times
    in_range, messages = [], []
    for t in times:
        if train is None or train.size == 0:
            in_range.append(False)
            messages.append("training times unknown")
            continue
        lo, hi = float(train.min()), float(train.max())
        inside = lo <= t <= hi
        in_range.append(bool(inside))
        if t in set(train.tolist()):
            messages.append(f"t={t:g} is a measured time")
        elif inside:
            messages.append(f"t={t:g} lies between measured times ({lo:g}-{hi:g}): interpolation by the dynamics")
        else:
            messages.append(
                f"t={t:g} lies outside the measured times ({lo:g}-{hi:g}): extrapolation by the dynamics "
                f"(at long times the prediction tends to the equilibrium mu + (I - B)^-1 S l)"
            )
    return in_range, messages


def _calibrated_bounds(calibration: dict, mean_draws: np.ndarray, interval: float, vecs: np.ndarray, columns):
    """Intervals ``mean +- q sigma`` of a dynamics fit calibrated by its recipe: ``sigma^2`` = the
    posterior variance of each column's mean + the pooled cell variance / ``n_ref``, ``q`` the
    conformal factor at ``interval`` of the column's kind of prediction
    (:func:`~perturbax.inference.context_kinds.context_kind` against the training data: interior
    time, beyond the measured times, unseen combination). Returns ``(lower (C, G), upper (C, G), notes)``."""
    from perturbax.inference.context_kinds import CONTEXT_KINDS, calibration_factors, context_kind
    from perturbax.inference.nested import REPORTED_LEVELS

    measured = {tuple(v): np.asarray(ts, dtype=np.float64) for v, ts in calibration.get("measured", [])}
    # (a calibration saved before the kinds: every column is calibrated by the one set of scores)
    kinds = [context_kind(measured, vecs[i], t) if measured else "interior" for i, _lab, t in columns]
    levels = sorted(set(REPORTED_LEVELS) | {interval})
    per_level = {a: calibration_factors(calibration, a) for a in levels}  # (factors, how) at each level
    factors, how = per_level[interval]
    q = np.array([factors[k] for k in kinds])[:, None]
    sigma = np.sqrt(mean_draws.var(1) + np.asarray(calibration["cell_var"], dtype=np.float64) / float(calibration["n_ref"]))
    mean = mean_draws.mean(1)
    notes = {
        "calibrated": True,
        "kinds": kinds,
        "interval_factors": [float(v) for v in q[:, 0]],
        "factors_by_kind": {k: {str(a): per_level[a][0][k] for a in levels} for k in CONTEXT_KINDS},
        "factor_source": how,
        "covers": calibration["covers"],
        "how": calibration["how"],
    }
    return mean - q * sigma, mean + q * sigma, notes


def predict(
    fit: FitResult,
    perturbations: Sequence[LabelLike] | LabelLike,
    *,
    times: Sequence[float] | float | None = None,
    n_cells: int | None = None,
    num_samples: int = 100,
    source: str | PerturbationData | None = None,
    interval: float = 0.9,
    seed: int = 0,
    allow_unseen: bool = False,
    bootstrap: bool = True,
    out=None,
    stream_output: bool | None = None,
):
    """Predict cells of each perturbation, with posterior credible intervals of the mean.

    Parameters
    ----------
    fit
        A :class:`FitResult`.
    perturbations
        Labels in any spelling: ``"A+B"``, ``"A:0.5+C:2"``, ``{"A": 0.5, "C": 2.0}``, or vectors.
    times
        Models of time (the latent dynamics model) only, and required there: the times (since
        the perturbation was switched on, in the units of the training times) at which to predict
        every perturbation; any ``t >= 0``, measured or not. Must be ``None`` for models without
        time.
    n_cells
        Predicted cells per perturbation (per (perturbation, time) pair for models of time;
        default: the number of source cells -- training control cells, or the observed cells passed
        as ``source``, each then used once; more cells repeat them under other posterior draws).
    num_samples
        Posterior draws of the global sites.
    source
        ``"control"``: basal states (encoder means) of the training control cells; ``"prior"``:
        draws from the model's base distribution. Default (``None``): ``"prior"`` for latent
        dynamics with relaxing heterogeneity -- control cells at ``t > 0`` have relaxed, so their
        encoded ``z(0)`` is poorly determined, and each posterior draw samples ``z(0)`` from its own
        ``N(mu, Sigma_0)`` -- else ``"control"``. Or observed cells (a
        :class:`~perturbax.data.PerturbationData` with the training genes, labels made of seen
        perturbations, and times for models of time): each is moved from its own label and time
        to the requested ones by the model's change of the mean (module docstring), e.g. the
        cells of a perturbation at its nearest measured time to predict it at another time.
    interval
        Credible level of the equal-tailed intervals.
    allow_unseen
        Predict perturbations with an elementary perturbation never seen in training (its shift is
        then a prior draw) instead of refusing.
    bootstrap
        Weight the source cells of each draw by a Bayesian bootstrap, so the intervals also carry
        the uncertainty of estimating a population from finitely many source cells (control
        source; prior draws are fresh for every posterior draw and weighted equally).
    out
        Write the prediction to this ``.h5ad`` file (and return it opened backed: ``X`` stays in the
        file). Default: return it in memory.
    stream_output
        With ``out``: write the cells in chunks of about :data:`OUTPUT_CHUNK_BYTES` of cells (whole
        posterior draws), so that memory is bounded by a chunk, not by the request; ``False``: build
        all cells in memory first; ``None`` (default): chunks when the prediction built in memory
        would take more than half the available memory (:func:`prediction_plan`). The file holds the
        same cells, ``obs``, ``var``, ``varm`` and ``uns`` either way (same seed: the same cells).

    Returns
    -------
    AnnData of predicted cells; see the module docstring for where the intervals are.
    """
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1), got {interval}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    tlist = _prediction_times(fit, times)
    timed = tlist is not None
    labels, vecs = _parse(fit, perturbations, allow_unseen)
    notes = _coverage_notes(fit, labels, vecs)
    moved = isinstance(source, PerturbationData)
    if source is None:
        relaxing = getattr(fit.config, "heterogeneity", None) == "relaxing"
        source = "prior" if timed and relaxing else "control"
    if not moved and source not in ("control", "prior"):
        raise ValueError(
            f"source={source!r} is not supported; use 'control', 'prior' or observed cells (a PerturbationData)."
        )

    key = jax.random.PRNGKey(seed)
    k_glob, k_src, k_cells, k_means = jax.random.split(key, 4)
    draws = posterior_globals(fit, num_samples, seed=int(jax.random.randint(k_glob, (), 0, 2**31 - 1)))
    src = None
    if moved:
        src = {k: jnp.asarray(v) for k, v in _source_cells(fit, source).items()}
        z_all, lib_all, c_all = src["z"], src["library"], src["c"]
    else:
        z_all, lib_all, c_all = (jnp.asarray(fit.basal[k]) for k in ("z", "library", "c"))
    if int(lib_all.shape[0]) == 0:
        raise ValueError("The fit has no source cells (no control cells in training).")
    # With contexts and training control cells as the source, each label starts from the control
    # cells of its own context; otherwise every label starts from the same source cells.
    groups = _source_groups(fit, vecs, moved or source != "control", int(lib_all.shape[0]))
    model = handlers.substitute(fit.model, data=fit.params)
    kwargs = fit.model_kwargs
    columns = [(i, lab, t) for i, lab in enumerate(labels) for t in (tlist if timed else [0.0])]
    samplers = [None] * len(columns)  # (column_means, column_cells, per_draw, n_cells) of each column
    for rows, label_ids in groups:
        z_src, lib_src, c_src = z_all[rows], lib_all[rows], c_all[rows]
        sub_src = None if src is None else {k: v[rows] for k, v in src.items()}
        sampler = _column_sampler(
            fit, model, kwargs, draws, z_src, lib_src, c_src, sub_src, timed=timed, moved=moved, source=source,
            n_cells=n_cells, num_samples=num_samples, bootstrap=bootstrap, k_src=k_src)
        for c, (i, _lab, _t) in enumerate(columns):
            if i in label_ids:
                samplers[c] = sampler
    sizes = [s[3] for s in samplers]
    G = len(fit.gene_names)
    streamed = False
    if out is not None:
        streamed, _ = prediction_plan(fit, len(columns), max(sizes), num_samples, int(lib_all.shape[0]),
                                      stream_output=stream_output, out=out)
    elif stream_output:
        raise ValueError("stream_output=True writes the cells to a file in chunks; pass out='predictions.h5ad'.")
    col_args = [(jnp.asarray(vecs[i], jnp.float32), jnp.float32(t), jax.random.fold_in(k_cells, c))
                for c, (i, _lab, t) in enumerate(columns)]
    all_means, all_latent = [], []
    for c, args in enumerate(col_args):
        means, latents = samplers[c][0](*args)
        all_means.append(np.asarray(means))
        if latents is not None:
            all_latent.append(np.asarray(latents))
    mean_draws = np.stack(all_means).astype(np.float64)  # (columns, S, G)
    lo_q, hi_q = (1 - interval) / 2, (1 + interval) / 2
    bounds, nested_notes, nested_column = None, None, None
    if fit.nested and not timed and not moved:  # the nested estimator (perturbax.inference.selection)
        from perturbax.inference.nested import nested_prediction

        mean_draws, lower, upper, nested_notes, nested_column = nested_prediction(fit, vecs, mean_draws, interval, seed)
        bounds = (lower.T, upper.T)
    calibration = (fit.info.get("recipe") or {}).get("calibration") if timed and not moved else None
    if calibration:  # intervals calibrated on held-out training contexts (perturbax.inference.dynamics_recipe)
        lower, upper, calibration_notes = _calibrated_bounds(calibration, mean_draws, interval, vecs, columns)
        bounds = (lower.T, upper.T)
    chunk = output_chunk_cells(G) if streamed else None

    def column_blocks(c):
        """The cells of column ``c``: one block, or blocks of about ``chunk`` cells (whole draws)."""
        column_means, column_cells, per_draw, n_out = samplers[c]
        block_draws = None if chunk is None else max(1, chunk // per_draw)
        generated = lambda: column_cells(*col_args[c], block_draws)  # noqa: E731
        return generated() if nested_column is None else nested_column(columns[c][0], n_out, generated, chunk)

    draw_idx = np.concatenate([np.repeat(np.arange(num_samples), s[2])[: s[3]] for s in samplers])
    meta = {
        "labels": list(labels),
        "interval": float(interval),
        "num_samples": int(num_samples),
        "source": "cells" if moved else source,
        "model": fit.model_name,
        "objective": fit.objective,
        "coverage": notes,  # lists aligned with "labels"
    }
    if moved:
        meta["source_cells"] = int(z_all.shape[0])
    if nested_notes is not None:
        meta["nested"] = nested_notes
    if calibration:
        meta["calibration"] = calibration_notes
    uns = {"perturbax": meta, "mean_draws": mean_draws.astype(np.float32)}
    if all_latent:
        uns["latent_mean_draws"] = np.stack(all_latent).astype(np.float32)  # (columns, S, d)
    varm = {
        "pred_mean": mean_draws.mean(1).T,
        "pred_lower": np.quantile(mean_draws, lo_q, axis=1).T if bounds is None else bounds[0],
        "pred_upper": np.quantile(mean_draws, hi_q, axis=1).T if bounds is None else bounds[1],
    }
    col_label = [i for i, _, _ in columns]
    ctx_obs = _context_obs(fit, vecs, sizes, col_label)
    if ctx_obs:
        meta["contexts"] = {k: [fit.registry.context_of(v)[k] for v in vecs] for k in fit.registry.context_keys}
    obs = {"draw": draw_idx, **ctx_obs}
    if not timed:  # obs[key]: the perturbation (with contexts: one obs column per context key)
        col_names = [fit.registry.perturbation_label(v) for v in vecs] if ctx_obs else list(labels)
        col_names = [col_names[i] for i in col_label]
    else:
        col_names = [lab for _, lab, _ in columns]
        col_times = [float(t) for _, _, t in columns]
        in_range, time_msgs = _time_notes(fit, tlist)
        T = len(tlist)
        meta.update(
            labels=[pair_key(lab, t) for lab, t in zip(col_names, col_times)],
            perturbations=col_names,
            times=col_times,
            train_times=[] if fit.train_times is None else [float(v) for v in fit.train_times],
            time_key=fit.info.get("time_key") or "time",
            coverage={
                **{k: np.repeat(v, T) for k, v in notes.items()},
                "time_in_range": np.tile(np.asarray(in_range), len(labels)),
                "time_message": np.tile(np.asarray(time_msgs), len(labels)),
            },
        )
        obs = {"time": np.repeat(np.asarray(col_times, dtype=np.float64), sizes), **obs}
    # one label per cell: categories in order of first appearance (the column order)
    order = list(dict.fromkeys(col_names))
    cell_labels = pd.Categorical.from_codes(np.repeat([order.index(n) for n in col_names], sizes), order)
    blocks = (x for c in range(len(columns)) for x in column_blocks(c))
    common = dict(gene_names=fit.gene_names, perturbation_key=fit.perturbation_key, obs=obs, uns=uns, varm=varm)
    if out is None:
        return predictions_to_anndata(np.concatenate(list(blocks), axis=0), labels=cell_labels, **common)
    return write_predictions(out, blocks, cell_labels, **common)


#: Bytes of predicted cells (float32) a prediction written in chunks holds at a time (about; a chunk
#: holds whole posterior draws, so one draw's cells when they are more).
OUTPUT_CHUNK_BYTES = 2**27


def output_chunk_cells(n_genes: int) -> int:
    """Cells per chunk of a prediction written in chunks (``OUTPUT_CHUNK_BYTES`` of float32 cells)."""
    return max(1, OUTPUT_CHUNK_BYTES // (4 * max(int(n_genes), 1)))


def prediction_bytes(n_genes: int, n_columns: int, n_cells: int, num_samples: int, n_source: int,
                     n_param_values: int = 0, chunk_cells: int | None = None) -> int:
    """A rough upper estimate of the memory of :func:`predict`: float32 cells (``num_samples *
    ceil(n_cells / num_samples)`` per column, held twice: per column and concatenated; written in
    chunks of ``chunk_cells``: one chunk of whole draws, held three times by the re-centring of the
    nested estimator), about 100 bytes of labels and bookkeeping per cell, the per-draw means
    (float32 and float64 copies, quantile work), one decoding of the source cells, and the posterior
    draws of the parameters."""
    per_draw = -(-n_cells // num_samples)
    total = n_columns * num_samples * per_draw
    cells = 2 * total * n_genes * 4 if chunk_cells is None else 3 * max(chunk_cells, per_draw) * n_genes * 4
    means = n_columns * num_samples * n_genes * (4 + 8 + 16)
    return cells + 100 * total + means + 3 * n_source * n_genes * 4 + num_samples * n_param_values * 4


def prediction_plan(fit: FitResult, n_columns: int, n_cells: int, num_samples: int, n_source: int, *,
                    stream_output: bool | None = None, out=None, available: int | None = None) -> tuple[bool, str]:
    """Whether :func:`predict` writes its cells to ``out`` in chunks (``stream_output=None``: when the
    prediction built in memory, :func:`prediction_bytes`, would take more than half the available
    memory, :func:`perturbax.data.stream.output_plan`), and the line that says which. Refuses
    (``ValueError``) a request whose chosen way needs more memory than available, or a file larger
    than the free disk space of ``out``'s folder."""
    from perturbax.data.stream import available_memory, output_plan

    G = len(fit.gene_names)
    n_values = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(fit.params))
    need = prediction_bytes(G, n_columns, n_cells, num_samples, n_source, n_values)
    have = available_memory() if available is None else int(available)
    chunk = output_chunk_cells(G)
    streamed, line = output_plan(n_columns * n_cells, G, need, stream_output, have, chunk)
    if streamed:
        need = prediction_bytes(G, n_columns, n_cells, num_samples, n_source, n_values, chunk)
    what = f"This prediction ({n_columns} column(s) x {n_cells} cells x {G} genes, {num_samples} posterior draws"
    if have is not None and need > have:
        raise ValueError(
            f"{what}, {'written in chunks' if streamed else 'built in memory'}) needs about {need / 2**30:.3g} GiB "
            f"of memory, more than the {have / 2**30:.3g} GiB available. Ask for fewer --n-cells, --num-samples or "
            f"perturbations, or split the request" + ("." if streamed else "; or write it in chunks (--stream-output).")
        )
    if out is not None:
        folder = Path(out).resolve().parent
        size = n_columns * -(-n_cells // num_samples) * num_samples * G * 4
        free = shutil.disk_usage(folder).free if folder.is_dir() else None
        if free is not None and size > free:
            raise ValueError(
                f"{what}) makes a file of about {size / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB free "
                f"in {folder}. Write it elsewhere (--out), or ask for fewer --n-cells or perturbations."
            )
    return streamed, line


def to_arviz(fit: FitResult, prediction=None, *, num_samples: int = 200, seed: int = 0):
    """ArviZ (1.x) DataTree of the posterior over the global sites (and, given a prediction from
    :func:`predict`, the per-draw mean expression of each predicted perturbation as
    ``posterior_predictive``)."""
    import arviz as az

    draws = posterior_draws(fit, num_samples, seed=seed)
    posterior = {n: np.asarray(v)[None] for n, v in draws.items()}
    dims, coords = {}, {"perturbation": list(fit.registry.names), "gene": list(fit.gene_names)}
    if "W" in posterior and posterior["W"].shape[-1] == fit.registry.K:
        dims["W"] = ["latent", "perturbation"]
    if "S" in posterior and posterior["S"].shape[-1] == fit.registry.K:
        dims["S"] = ["latent", "perturbation"]
    if "B" in posterior:
        dims["B"] = ["latent", "latent_parent"]
    groups = {"posterior": posterior}
    if prediction is not None:
        meta = prediction.uns["perturbax"]
        groups["posterior_predictive"] = {"mean_expression": np.asarray(prediction.uns["mean_draws"]).transpose(1, 0, 2)[None]}
        dims["mean_expression"] = ["condition", "gene"]
        coords["condition"] = list(meta["labels"])
    return az.from_dict(groups, dims=dims, coords=coords)
