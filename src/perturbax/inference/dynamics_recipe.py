"""The default fitting recipe of the latent dynamics model, with its settings chosen on training data.

``fit(..., "latent_dynamics")`` and ``perturbax fit --model dynamics`` run these stages
(:func:`fit_dynamics_recipe`; ``fit(..., recipe=False)`` or an explicit ``objective=`` fits one
stage by hand):

0. **Design check before the fit** (:func:`perturbax.theory.check_order_design`): whether the
   training design can identify the causal order of the programs from the total effects ``W``
   (a UserWarning when it cannot).
1. **Held-out training contexts** (:func:`held_out_contexts`): (perturbation, time) pairs of the
   training data held out as a whole, of each kind of prediction a user makes
   (:mod:`perturbax.inference.context_kinds`): a measured perturbation at an unmeasured time
   between its measured ones (``"interior"``) or after them (``"beyond"``), and a combination
   never measured (``"unseen"``: every time of one training combination whose perturbations are
   measured otherwise) -- the use cases inside the training data. No test pair and no ground
   truth is looked at.
2. **Selection run** on the other contexts, every stage early-stopped on the held-out contexts:
   (a) ELBO on the default causal mask; (b) the program order read from ``W`` and refitted on its
   mask (:func:`~perturbax.inference.refit_in_causal_order`), the orders the posterior of ``W``
   supports refitted too; (b') the **order searched by the energy score**
   (:func:`_energy_order_search`): the ELBO fits every order about as well, so under the
   sole-target mask read from ``W`` the candidate orders (all of them for up to
   ``SEARCH_ALL_UP_TO`` programs, else a local search from (b)'s) are each fitted briefly by the
   energy objective from (b), the one whose generated cells best match the held-out contexts is
   kept, and those within noise of it are reported as fitting equally well; (c) the energy
   objective warm-started from (b') (or from (b) when no search runs): the **length of the energy
   stage** is the search's steps plus this stage's best step on the held-out contexts (0 when it
   does not improve on where it started).
   The generated predictions of the held-out contexts then **calibrate the intervals**, one
   conformal factor of ``|observed mean - predicted mean| / sigma`` per kind of prediction
   (:func:`~perturbax.inference.context_kinds.calibration_factors`): extrapolation in time and
   unmeasured combinations err more than interpolation, and a prediction gets the factor of its
   own kind.
3. **Final fit on all training cells**, the selected path again from the ELBO state of (b): after
   an order search, the energy objective in the chosen order for the search's steps and then the
   energy stage's (what the held-out contexts scored); without one, ELBO on the chosen order's
   mask (``FINAL_ELBO_FRACTION`` of ``steps``, early stopping on held-out cells), then the energy
   stage for the chosen length. Never an ELBO stage after an energy one: the ELBO moved from an
   energy optimum can collapse the spread of the generated cells.

What was chosen and why is in ``FitResult.info["recipe"]`` (printed by ``perturbax fit``);
:func:`recipe_lines` renders it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.inference.energy import EnergyOptions
from perturbax.inference.context_kinds import (
    CONTEXT_KINDS,
    calibration_factors,
    condition_times,
    context_kind,
    measured_times,
)
from perturbax.inference.nested import REPORTED_LEVELS

__all__ = [
    "MAX_HELD_CONTEXTS",
    "ENERGY_FRACTION",
    "FINAL_ELBO_FRACTION",
    "held_out_contexts",
    "stage_batch_size",
    "order_candidates",
    "fit_dynamics_recipe",
    "recipe_lines",
]

#: Most interior (perturbation, time) contexts held out for the selection run (at most 1 in 8 contexts).
MAX_HELD_CONTEXTS = 4
#: Steps of each order refit, as a fraction of ``steps``; most refits of the order read.
ORDER_FRACTION, MAX_ORDER_ROUNDS = 0.5, 2
#: Longest energy stage of the selection run, as a fraction of ``steps``.
ENERGY_FRACTION = 4 / 3
#: ELBO steps of the final fit without an order search (warm-started), as a fraction of ``steps``.
FINAL_ELBO_FRACTION = 0.5
#: Evaluations of the held-out loss per stage, and how many in a row without improvement stop it.
EVALS_PER_STAGE, RECIPE_PATIENCE = 20, 8
#: Cells per context per step of the energy stage.
CELLS_PER_CONTEXT = 64
#: Posterior share an order read from draws of ``W`` needs to be refitted as an alternative.
ALTERNATIVE_SHARE = 0.1
#: The order search by the energy score (:func:`_energy_order_search`): on/off, steps of each
#: candidate as a fraction of ``steps``, held-out evaluations averaged into its score, every order
#: scored up to this many programs, else at most this many moves of the local search.
ORDER_SEARCH, SEARCH_FRACTION, SEARCH_TAIL, SEARCH_ALL_UP_TO, SEARCH_ROUNDS = True, 0.5, 5, 4, 6
#: Posterior draws used to read orders and to calibrate the intervals.
ORDER_DRAWS, CALIBRATION_DRAWS = 200, 50


def held_out_contexts(data: PerturbationData, max_contexts: int = MAX_HELD_CONTEXTS) -> list[tuple[str, float]]:
    """(perturbation, time) contexts of ``data`` to hold out for the selection run, one or more of
    each kind of prediction (:data:`~perturbax.inference.context_kinds.CONTEXT_KINDS`) the data can
    stand in for.

    - ``"unseen"``: every time of one *combination* (two or more perturbations), when at least two
      are measured and its label stays in the span of the other conditions' -- an unmeasured
      combination of measured perturbations; the one of lowest
      :func:`~perturbax.theory.holdouts.label_leverage` (best supported; ties in label order).
    - ``"interior"``: an interior time of each of the other conditions measured at three or more
      times (measured before and after it: an unmeasured time point), conditions in label order,
      the time rotating over each condition's interior times; at most
      ``min(max_contexts, n_contexts // 8)`` (at least 1 when there is a candidate).
    - ``"beyond"``: the last time of one further condition measured at four or more times (the
      dynamics extrapolated past the measured times), the first in label order.

    Empty when no condition has three times (the recipe then early-stops on held-out cells).
    """
    from perturbax.theory.holdouts import in_span_holdouts, label_leverage

    if data.times is None or data.control_index is None:
        return []
    times = condition_times(data)
    if not any(ts.size >= 3 for ts in times.values()):
        return []
    env = np.asarray(data.env)
    n_contexts = np.unique(np.stack([env.astype(np.float64), np.asarray(data.times, dtype=np.float64)], 1),
                           axis=0).shape[0]
    first = np.unique(env, return_index=True)[1]
    labels = [data.conditions[e] for e in env[first]]
    design = np.asarray(data.L, dtype=np.float64)[first]
    combos = [j for j in range(len(labels)) if np.count_nonzero(design[j]) >= 2]
    unseen = None
    if len(combos) >= 2:
        in_span = set(in_span_holdouts(design).tolist())
        lev = np.round(label_leverage(design), 9)
        ok = sorted((lev[j], labels[j]) for j in combos if j in in_span)
        unseen = ok[0][1] if ok else None
    out = [] if unseen is None else [(unseen, float(t)) for t in times[unseen]]
    cap = max(1, min(max_contexts, n_contexts // 8))
    used = {unseen}
    interior = [lab for lab in sorted(times) if lab not in used and times[lab].size >= 3]
    for i, lab in enumerate(interior[:cap]):
        inner = times[lab][1:-1]
        out.append((lab, float(inner[i % inner.size])))
        used.add(lab)
    beyond = next((lab for lab in sorted(times) if lab not in used and times[lab].size >= 4), None)
    if beyond is not None:
        out.append((beyond, float(times[beyond][-1])))
    return out


def _context_cells(data: PerturbationData, contexts: list[tuple[str, float]]) -> np.ndarray:
    env, t = np.asarray(data.env), np.asarray(data.times, dtype=np.float64)
    mask = np.zeros(data.n_cells, dtype=bool)
    for lab, tt in contexts:
        mask |= (env == data.condition_index(lab)) & np.isclose(t, tt)
    return np.flatnonzero(mask)


def stage_batch_size(data: PerturbationData, batch_size: int, *, final_cells: int) -> int:
    """Cells per ELBO step of the recipe's stages: ``batch_size``, at most the training cells of its
    smallest stage (the selection run leaves out the held-out contexts, the final fit its held-out
    cells: ``final_cells`` are its training cells), so that small data sets (a few hundred cells)
    fit with the default ``batch_size``."""
    held = _context_cells(data, held_out_contexts(data)) if data.times is not None else np.zeros(0)
    return max(1, min(int(batch_size), data.n_cells - int(held.size), int(final_cells)))


def order_candidates(result, *, num_samples: int = ORDER_DRAWS, seed: int = 0) -> list[tuple[list[int], float]]:
    """The program orders read from posterior draws of ``W`` (:func:`~perturbax.models.order_from_effects`
    on each draw, with the fit's ``target_mask``), most frequent first, with their posterior share."""
    from perturbax.inference.prediction import posterior_draws
    from perturbax.models.dynamics import order_from_effects

    W = np.asarray(posterior_draws(result, num_samples, seed=seed)["W"], dtype=np.float64)
    counts: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for w in W:
            try:
                counts[tuple(order_from_effects(w, targets=result.config.target_mask)[0])] += 1
            except (ValueError, np.linalg.LinAlgError):
                continue
    total = max(sum(counts.values()), 1)
    return [(list(o), c / total) for o, c in counts.most_common()]


def _held_losses(res) -> np.ndarray:
    """The finite held-out losses of a stage, in the order they were evaluated."""
    v = np.asarray(res.history.get("val_loss", ()), dtype=np.float64)
    return v[np.isfinite(v)]


def _tail_loss(res, last: int = SEARCH_TAIL) -> float:
    v = _held_losses(res)
    return float(v[-last:].mean()) if v.size else math.inf


def _energy_order_search(trainer_fn, data: PerturbationData, start_fit, start: list[int], *, steps: int,
                         energy: EnergyOptions, sel_kw: dict, seed: int) -> dict[str, Any]:
    """Search the program order by the energy score under the sole-target mask read from ``W``.

    The ELBO fits every order about as well (the encoder and decoder absorb the transients), so
    the orders are compared by how well the cells they generate match held-out training contexts.
    The perturbation matched to each program when the order is read from ``W``
    (:func:`~perturbax.models.order_from_effects`) is taken to target it alone
    (:func:`~perturbax.models.sole_target_mask`): that fixes the programs' labels, so that orders
    differ. Each candidate order is an energy fit of ``SEARCH_FRACTION * steps`` steps from the
    same start (``start_fit``), all runs of one compiled trainer; its score is the mean held-out
    energy of its last ``SEARCH_TAIL`` evaluations. Candidates: every order for
    ``l <= SEARCH_ALL_UP_TO`` programs, else a local search over swaps of adjacent programs from
    ``start`` (at most ``SEARCH_ROUNDS`` moves)."""
    import itertools

    from perturbax.inference.order_refit import fitted_causal_order
    from perturbax.models.dynamics import order_mask, sole_target_mask

    cfg = start_fit.config
    targets = fitted_causal_order(start_fit, num_samples=ORDER_DRAWS, seed=seed, return_targets=True)[2]
    tm = sole_target_mask(targets, cfg.n_perturbations) if cfg.target_mask is None else np.asarray(cfg.target_mask)
    base = dataclasses.replace(cfg, target_mask=tm, causal_mask=order_mask(start), allow_cycles=False, acyclicity=0.0)
    n = max(1, int(SEARCH_FRACTION * steps))
    run = trainer_fn(data, config=base, objective="energy", steps=n, energy=energy, **sel_kw)
    fits: dict[tuple[int, ...], Any] = {}

    def score(order) -> float:
        o = tuple(int(i) for i in order)
        if o not in fits:
            fits[o] = run(config=dataclasses.replace(base, causal_mask=order_mask(o)), steps=n, init_params=start_fit,
                          stop_early=False)
        return _tail_loss(fits[o])

    ell = len(start)
    if ell <= SEARCH_ALL_UP_TO:
        for o in itertools.permutations(range(ell)):
            score(o)
    else:
        best = tuple(start)
        for _ in range(SEARCH_ROUNDS):
            nbrs = [best[:i] + (best[i + 1], best[i]) + best[i + 2:] for i in range(ell - 1)]
            cand = min(nbrs, key=score)
            if score(cand) >= score(best):
                break
            best = cand
    scores = {o: _tail_loss(f) for o, f in fits.items()}
    best = min(scores, key=scores.get)
    noise = max(_loss_noise(f) for f in fits.values())
    tol = max(noise, 1e-3 * abs(scores[best]))
    equal = [list(o) for o, v in sorted(scores.items(), key=lambda kv: kv[1]) if v - scores[best] <= tol]
    chosen = fits[best]
    return {"fit": dataclasses.replace(chosen, info={**chosen.info, "causal_order": list(best)}),
            "chosen": list(best), "start": list(start), "targets": targets, "steps_each": n,
            "scores": {str(list(o)): round(v, 5) for o, v in sorted(scores.items(), key=lambda kv: kv[1])},
            "tolerance": tol, "equally_well": equal}


def _held_loss(res) -> float:
    v = _held_losses(res)
    return float(v.min()) if v.size else math.inf


def _loss_noise(res, last: int = 6) -> float:
    """How much a stage's held-out loss moves from one evaluation to the next at the end of the fit:
    the SD of the differences of its last evaluations over sqrt(2) (differences remove a trend)."""
    d = np.diff(_held_losses(res)[-last:])
    return float(d.std(ddof=1) / math.sqrt(2)) if d.size > 1 else 0.0


def _stage(name: str, res, seconds: float, data_note: str) -> dict[str, Any]:
    return {"stage": name, "objective": res.objective, "steps_run": int(res.info["steps_run"]),
            "best_step": int(res.info["best_step"]), "best_val_loss": res.info.get("best_val_loss"),
            "stop_reason": res.info["stop_reason"], "seconds": round(seconds, 2), "cells": data_note}


def _cell_variance(data: PerturbationData) -> tuple[np.ndarray, float]:
    """Pooled within-context variance of each gene, and the median cells of a perturbed context."""
    pairs = np.stack([np.asarray(data.env, dtype=np.float64), np.asarray(data.times, dtype=np.float64)], axis=1)
    groups = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
    X = data.dense().astype(np.float64)
    ss, dof, sizes = np.zeros(data.n_genes), 0, []
    env = np.asarray(data.env)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if idx.size > 1:
            ss += X[idx].var(0, ddof=1) * (idx.size - 1)
            dof += idx.size - 1
        if env[idx[0]] != data.control_index:
            sizes.append(idx.size)
    return ss / max(dof, 1), float(np.median(sizes)) if sizes else 1.0


def _calibration(res, data: PerturbationData, contexts, held: np.ndarray, seed: int) -> dict[str, Any]:
    """Conformal scores ``|observed - predicted mean| / sigma`` of every gene of the held-out
    contexts, by kind of prediction (:func:`~perturbax.inference.context_kinds.context_kind` against
    the selection run's data),
    ``sigma^2`` = posterior variance of the mean + pooled cell variance / ``n_ref``."""
    from perturbax.inference.prediction import pair_key, predict

    rest = data.subset(np.setdiff1d(np.arange(data.n_cells), held))
    cell_var, n_ref = _cell_variance(rest)
    seen = measured_times(rest)
    labels = list(dict.fromkeys(lab for lab, _ in contexts))
    times = sorted({t for _, t in contexts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pr = predict(res, labels, times=times, n_cells=1, num_samples=CALIBRATION_DRAWS, seed=seed + 7)
    keys = list(pr.uns["perturbax"]["labels"])
    draws = np.asarray(pr.uns["mean_draws"], dtype=np.float64)
    scores: dict[str, list[float]] = {}
    held_by_kind: dict[str, list[list]] = {}
    for lab, t in contexts:
        j = keys.index(pair_key(lab, t))
        kind = context_kind(seen, data.L[data.env == data.condition_index(lab)][0], t)
        obs = data.dense(_context_cells(data, [(lab, t)])).astype(np.float64).mean(0)
        sigma = np.sqrt(draws[j].var(0) + cell_var / n_ref)
        scores.setdefault(kind, []).extend((np.abs(obs - draws[j].mean(0)) / np.maximum(sigma, 1e-12)).tolist())
        held_by_kind.setdefault(kind, []).append([lab, t])
    by_kind = {k: np.sort(np.asarray(scores[k])) for k in CONTEXT_KINDS if k in scores}
    cal = {
        "scores": {k: v.round(5).tolist() for k, v in by_kind.items()},
        "contexts": {k: held_by_kind[k] for k in by_kind},
        "measured": [[list(v), [float(x) for x in ts]] for v, ts in measured_times(data).items()],
        "cell_var": cell_var.astype(np.float32).tolist(),
        "n_ref": n_ref,
        "covers": f"the observed mean of {n_ref:g} cells (median cells per perturbed training context)",
        "how": "conformal quantile of |observed - predicted mean| / sigma over the gene means of the held-out "
               "training contexts of the same kind (" + "; ".join(
                   f"{k}: {len(held_by_kind[k])} context(s)" for k in by_kind) + ")",
    }
    # the factors predict uses (calibration_factors: fallback and floor included), per reported level
    per_level = {a: calibration_factors(cal, a)[0] for a in REPORTED_LEVELS}
    cal["factor"] = {k: {str(a): f[k] for a, f in per_level.items()} for k in CONTEXT_KINDS}
    return cal


def fit_dynamics_recipe(
    fit_fn: Callable[..., Any],
    data: PerturbationData,
    *,
    config,
    steps: int,
    seed: int = 0,
    energy: EnergyOptions | None = None,
    patience: int | None = RECIPE_PATIENCE,
    trainer_fn: Callable[..., Any] | None = None,
):
    """Fit the latent dynamics model by the staged recipe of the module docstring.

    ``fit_fn(data, config=, objective=, steps=, seed=, init_params=, energy=, validation=,
    patience=, eval_every=)`` fits one stage (``fit`` with ``recipe=False`` and the caller's other
    settings). ``trainer_fn(data, config=, objective=, steps=, seed=, validation=, patience=,
    eval_every=)``, if given, compiles a stage once and returns its ``run(config=, steps=,
    init_params=)`` (``fit``'s ``_trainer``): the ELBO stages of the selection run (default mask,
    order refits, alternative order) then share one compilation, their causal masks passed as
    arguments (linear drift; the same fits as ``fit_fn`` stage by stage). ``steps`` is the length of
    the first ELBO stage; the others are fractions of it (module constants). ``energy``: options of
    the energy stage (default: 64 cells per context). Returns the final fit with ``info["recipe"]``.
    """
    from perturbax.inference.order_refit import refit_orders
    from perturbax.models.dynamics import LatentDynamicsConfig, causal_order, order_mask
    from perturbax.theory.dynamics import check_order_design

    if not isinstance(config, LatentDynamicsConfig):
        raise ValueError(f"recipe=True fits the latent dynamics model; got a {type(config).__name__}. Pass "
                         f"recipe=False.")
    if config.likelihood == "implicit":
        raise ValueError("The recipe's first stages use the ELBO, which the implicit likelihood cannot (no density); "
                         "pass recipe=False with objective='energy'.")
    t_start = time.perf_counter()
    eval_every = max(10, steps // EVALS_PER_STAGE)
    pat = RECIPE_PATIENCE if patience is None else patience
    opts = energy or EnergyOptions(cells_per_condition=CELLS_PER_CONTEXT)
    has_b = config.drift != "neural"

    # 0. what the design identifies about the order, before any fit
    first = np.unique(np.asarray(data.env), return_index=True)[1]
    design = np.asarray(data.L)[first]
    order_check = check_order_design(design, config.latent_dim, targets=config.target_mask,
                                     registry=data.registry) if has_b else None
    if order_check is not None and order_check.status != "ok":
        warnings.warn(f"Before the fit: {order_check.message}", UserWarning, stacklevel=3)

    # 1. held-out training contexts
    contexts = held_out_contexts(data)
    held = _context_cells(data, contexts) if contexts else np.zeros(0, dtype=np.int64)
    if contexts and len(np.unique(np.asarray(data.times)[np.setdiff1d(np.arange(data.n_cells), held)])) < 2:
        contexts, held = [], np.zeros(0, dtype=np.int64)
    stages: list[dict[str, Any]] = []
    sel_note = "training minus the held-out contexts"
    common = dict(seed=seed, eval_every=eval_every)
    sel_kw = dict(validation=held, patience=pat, **common) if contexts else dict(patience=pat, **common)

    shared: dict[str, Any] = {}

    def sel_fit(d, *, config, objective, steps, seed, init_params=None, **kw):
        """One ELBO stage of the selection run: runs of one compiled trainer where they can share it."""
        from perturbax.models.dynamics.config import mask_variant

        key = (objective, seed, tuple(sorted((k, id(v)) for k, v in kw.items())))
        base = shared.get("config")
        if trainer_fn is None or objective != "elbo" or config.drift != "linear" or d is not data or \
                (base is not None and (shared["key"] != key or mask_variant(config, base))):
            return fit_fn(d, config=config, objective=objective, steps=steps, seed=seed, init_params=init_params, **kw)
        if base is None:
            shared.update(config=config, key=key, run=trainer_fn(d, config=config, objective=objective, steps=steps,
                                                                  seed=seed, **kw))
        return shared["run"](config=config, steps=steps, init_params=init_params)

    # 2a. ELBO on the default mask
    t0 = time.perf_counter()
    s1 = sel_fit(data, config=config, objective="elbo", steps=steps, **sel_kw)
    stages.append(_stage("1 elbo, default mask", s1, time.perf_counter() - t0,
                         sel_note if contexts else "all training cells (no held-out contexts)"))
    current = elbo_state = s1
    elbo_name = stages[-1]["stage"]
    search = None
    order_info: dict[str, Any] = {"identified_by_design": None if order_check is None else order_check.identified,
                                  "design_check": None if order_check is None else order_check.message}
    # 2b. order from W, refits
    can_order = has_b and len(list(getattr(s1, "seen_elementary", []))) >= config.latent_dim and \
        s1.info.get("stop_reason") != "nan"
    if can_order:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (the design check above said it once)
            s2 = refit_orders(sel_fit, s1, data, steps=max(1, int(ORDER_FRACTION * steps)), max_rounds=MAX_ORDER_ROUNDS,
                              **sel_kw)
        stages.append(_stage("2 elbo, order read from W", s2, time.perf_counter() - t0, sel_note))
        tried = {tuple(s2.info["causal_order"]): (_held_loss(s2), _loss_noise(s2))}
        tried.setdefault(tuple(causal_order(s1.config.mask)), (_held_loss(s1), _loss_noise(s1)))
        cands = order_candidates(s2, seed=seed)
        best_fit, elbo_name = s2, stages[-1]["stage"]
        alt = next((o for o, share in cands if share >= ALTERNATIVE_SHARE and tuple(order_mask(o).ravel())
                    not in {tuple(order_mask(list(k)).ravel()) for k in tried}), None)
        if alt is not None:  # the posterior of W supports another order: fit it too, keep the better one
            t0 = time.perf_counter()
            cfg_alt = dataclasses.replace(s2.config, causal_mask=order_mask(alt), allow_cycles=False, acyclicity=0.0)
            warm = {k: v for k, v in s1.params.items() if not k.startswith("q_")}
            s_alt = sel_fit(data, config=cfg_alt, objective="elbo", steps=max(1, int(ORDER_FRACTION * steps)),
                            init_params=warm, **sel_kw)
            stages.append(_stage(f"2 elbo, alternative order {alt}", s_alt, time.perf_counter() - t0, sel_note))
            tried[tuple(alt)] = (_held_loss(s_alt), _loss_noise(s_alt))
            if _held_loss(s_alt) < _held_loss(s2):
                best_fit = dataclasses.replace(s_alt, info={**s_alt.info, "causal_order": list(alt)})
                elbo_name = stages[-1]["stage"]
        best_loss = min(v[0] for v in tried.values())
        tol = max(max(v[1] for v in tried.values()), 1e-3 * abs(best_loss))
        equal = [list(o) for o, v in sorted(tried.items(), key=lambda kv: kv[1][0]) if v[0] - best_loss <= tol]
        current = elbo_state = best_fit
        chosen = list(current.info.get("causal_order", s2.info["causal_order"]))
        if ORDER_SEARCH and contexts and trainer_fn is not None and config.drift == "linear" and \
                config.likelihood != "negative_binomial":
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                search = _energy_order_search(trainer_fn, data, current, chosen, steps=steps, energy=opts,
                                              sel_kw=sel_kw, seed=seed)
            stages.append(_stage(f"2 energy, order search ({len(search['scores'])} orders)", search["fit"],
                                 time.perf_counter() - t0, sel_note))
            current = search.pop("fit")
            chosen = list(search["chosen"])
        order_info.update(
            chosen=chosen, rounds=s2.info["order_rounds"],
            posterior_orders=[{"order": o, "share": round(s, 3)} for o, s in cands[:5]],
            held_out_loss={str(list(o)): v[0] for o, v in tried.items()}, tolerance=tol, equally_well=equal,
            reason=(f"order read from the posterior-mean W and refitted; {len(tried)} order(s) fitted, chosen by the "
                    f"held-out loss on {'held-out contexts' if contexts else 'held-out cells'}"
                    + (f"; {len(equal)} fit equally well (within {tol:.3g}): {equal}" if len(equal) > 1 else "")),
        )
        if search is not None:
            order_info.update(chosen=chosen, search=search, equally_well=search["equally_well"], reason=(
                f"searched by the held-out energy score under the sole-target mask read from W (perturbation "
                f"{search['targets']} alone on program 0..{config.latent_dim - 1}): {len(search['scores'])} order(s) "
                f"scored, starting from {search['start']} (the ELBO's choice)"
                + (f"; {len(search['equally_well'])} within noise ({search['tolerance']:.3g}): {search['equally_well']}"
                   if len(search["equally_well"]) > 1 else "")))
    else:
        order_info.update(chosen=None, equally_well=None, reason=(
            "no causal weights (neural drift)" if not has_b else
            f"not read: {len(list(s1.seen_elementary))} elementary perturbation(s) seen for {config.latent_dim} "
            f"programs (reading the order from W needs at least one per program); the default mask is kept and "
            f"every order fits W equally" if s1.info.get("stop_reason") != "nan" else
            "not read: the first stage diverged"))

    # 2c. energy stage: its length chosen on the held-out contexts (the search's steps, then this stage's)
    searched = 0 if search is None else int(search["steps_each"])
    energy_steps, energy_reason, best = 0, "", 0
    if config.likelihood == "negative_binomial":
        energy_reason = "none: the negative binomial cannot be sampled differentiably, so the energy objective is off"
        s3 = None
    elif not contexts:
        energy_steps = max(1, int(ENERGY_FRACTION * steps))
        energy_reason = (f"{energy_steps} steps (ENERGY_FRACTION x steps), early-stopped on held-out cells: no "
                         f"perturbation is measured at three or more times, so no context could be held out")
        s3 = None
    else:
        t0 = time.perf_counter()
        s3 = fit_fn(data, config=current.config, objective="energy", steps=max(1, int(ENERGY_FRACTION * steps)),
                    init_params=current, energy=opts, **sel_kw)
        stages.append(_stage("3 energy", s3, time.perf_counter() - t0, sel_note))
        best = int(s3.info["best_step"]) if s3.info.get("stop_reason") != "nan" else 0
        energy_steps = searched + best
        if searched:
            energy_reason = (f"{energy_steps} steps: the order search's {searched} from the ELBO state, then {best} "
                             f"more, the best held-out energy score of the energy stage on the held-out contexts of "
                             f"the selection run ({s3.info['steps_run']} steps tried; its step 0 is the search's "
                             f"end state)")
        elif energy_steps:
            energy_reason = (f"{energy_steps} steps: the best held-out energy score on the held-out contexts of the "
                             f"selection run (step 0 is the ELBO state; {s3.info['steps_run']} steps tried)")
        else:
            energy_reason = "none: the energy objective did not improve the held-out contexts over the ELBO stages"
    sel_fit = s3 if (s3 is not None and best > 0) else current
    calibration = None
    if contexts and sel_fit.info.get("stop_reason") != "nan":
        calibration = _calibration(sel_fit, data, contexts, held, seed)
    chosen_config = current.config

    # 3. final fit on every training cell: the selected path again from the ELBO state (never an ELBO
    # stage after an energy one)
    t0 = time.perf_counter()
    if search is not None:  # the search's energy steps in the chosen order, then the energy stage's
        final = fit_fn(data, config=chosen_config, objective="energy", steps=searched, init_params=elbo_state,
                       energy=opts, patience=None, **common)
        stages.append({**_stage("4 energy, all cells, chosen order (the search's steps)", final,
                                time.perf_counter() - t0, "all training cells"), "warm_start": elbo_name})
        more = best
    else:
        final = fit_fn(data, config=chosen_config, objective="elbo", steps=max(1, int(FINAL_ELBO_FRACTION * steps)),
                       init_params=elbo_state.params, patience=pat, **common)
        stages.append({**_stage("4 elbo, all cells, chosen order", final, time.perf_counter() - t0,
                                "all training cells"), "warm_start": elbo_name})
        more = energy_steps
    if more > 0 and final.info.get("stop_reason") != "nan":
        t0 = time.perf_counter()
        last = fit_fn(data, config=chosen_config, objective="energy", steps=more, init_params=final,
                      energy=opts, patience=None, **common)
        stages.append(_stage("5 energy, all cells", last, time.perf_counter() - t0, "all training cells"))
        if last.info.get("stop_reason") != "nan":
            final = last
    recipe = {
        "held_out_contexts": [[lab, t] for lab, t in contexts],
        "held_out_cells": int(held.size),
        "contexts_note": ("whole contexts held out by kind: every time of one measured combination (unseen), an "
                          "interior time of perturbations measured at >= 3 times (interior), the last time of one "
                          "measured at >= 4 (beyond); no test pair or ground truth used") if contexts else
                         "none: no perturbation measured at three or more times; stages early-stopped on held-out cells",
        "order": order_info,
        "energy_steps": energy_steps,
        "energy_reason": energy_reason,
        "calibration": calibration,
        "stages": stages,
        "steps": steps,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    info = {**final.info, "recipe": recipe}
    return dataclasses.replace(final, info=info)


def recipe_lines(recipe: dict | None) -> list[str]:
    """What the recipe chose and why, as lines for ``perturbax fit``."""
    if not recipe:
        return []
    ctx = recipe.get("held_out_contexts") or []
    out = ["Recipe (staged fit; choices made on held-out training contexts): held out "
           + (", ".join(f"{lab} @ t={t:g}" for lab, t in ctx) + f" ({recipe['held_out_cells']} cells)" if ctx
              else recipe.get("contexts_note", "nothing"))]
    order = recipe.get("order") or {}
    if order.get("design_check"):
        out.append(f"Order, design check: {order['design_check']}")
    if order.get("chosen") is not None:
        out.append(f"Order: {order['chosen']} (causes first; {order.get('reason')})")
        if order.get("equally_well") and len(order["equally_well"]) > 1:
            out.append(f"Orders that fit equally well: {order['equally_well']}")
    else:
        out.append(f"Order: {order.get('reason')}")
    out.append(f"Energy stage: {recipe.get('energy_reason')}")
    cal = recipe.get("calibration")
    if cal:
        factors, how = calibration_factors(cal, 0.9)
        out.append(f"Intervals calibrated ({cal['how']}); 90% factor by kind of prediction: "
                   + ", ".join(f"{k} {factors[k]:.3g}" + ("" if how[k].startswith("held-out") else f" ({how[k]})")
                               for k in CONTEXT_KINDS) + f"; they cover {cal['covers']}")
    else:
        out.append("Intervals not calibrated (no held-out training contexts)")
    out.append("Stages: " + "; ".join(f"{s['stage']}: {s['steps_run']} steps (best {s['best_step']}), "
                                      f"{s['seconds']:.0f} s" for s in recipe.get("stages", [])))
    return out
