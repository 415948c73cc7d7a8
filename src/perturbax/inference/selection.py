"""The nested estimator of the additive-shift model, chosen and calibrated on training conditions.

**Nested mean.** With ``W_ridge`` the ridge effects of the linear baseline (condition means on
labels, penalty chosen by in-span leave-one-condition-out CV; :class:`LinearBaseline`), ``m(l)``
the fitted model's mean expression under label ``l`` (averaged over the control basal states),
``m_0 = m(0)`` and ``W_model`` the ridge effects (same penalty) of the model's own training
condition changes ``m(l_c) - m_0``, the predicted mean of a label ``l`` is

    mean(l) = control_mean + l W_ridge + lambda * [m(l) - m_0 - l W_model]

``lambda = 0`` is exactly the ridge baseline's mean; ``lambda = 1`` is the model's mean with its
residual on the training condition means ridge-corrected (``m(l) + R_0 + l R``, ``R`` the ridge
fit of the observed-minus-model training means). The bracket is the model's nonlinear
remainder: what its decoder predicts beyond its own linear part (interactions of combined
perturbations carried by the shared decoder). The prediction depends on ``l`` only through
additive terms -- ``l W_ridge`` and ``l W_model`` in gene space, ``W l`` in the latent space of
``m`` -- so the span checks of :mod:`perturbax.theory` hold for it: what is identified is the
linear path on the row space of the training labels, and the remainder through the latent shifts
``W l`` (identified on the same span).

**Cells.** Predicted cells carry the nested mean; their spread and shape come either from the
model's generated cells, re-centred (``"generated"``), or from the training control cells
(``"control"``, the baselines' way).

**Selection** (:func:`fit_with_selection`, the default of ``fit("additive_shift", ...)`` for
gaussian/implicit likelihoods): two in-span cross-validation folds over the *training*
conditions (:func:`in_span_folds`), one model fit per fold, and ``lambda`` (``LAMBDA_GRID``) and
the cell mode chosen by the energy distance (U-statistic, 50 PCs of the fold's training cells)
between predicted and held-out training cells, with the one-standard-error rule towards the
ridge baseline (:func:`one_standard_error_choice`: a few held-out conditions make the CV noisy,
and a larger ``lambda`` must earn its place). Energy distance, not the squared error of the
means, because the cell mode changes the distribution and not the mean; the energy distance is
dominated by the mean shift, so it also judges ``lambda``.

**Length.** Given no ``steps``, ``fit`` lets the same CV choose how long to fit: up to
``MAX_CYCLES`` cycles of its default steps, each a warm restart of the cosine schedule from the
last cycle's parameters. A cycle is added while the chosen setting uses the model and the
CV score falls (:func:`fit_with_selection`). Only the first cycle stops early on held-out cells
(and keeps its best state); a later one runs all its steps and keeps its last state, so that the
final fit has the length the CV judged. The held-out *cells* of the training conditions
cannot tell where a longer fit helps (on pdae-sim and Norman their loss changes by 1-2% after
2000 steps while the held-out *conditions'* energy halves on some designs), so the length is
judged on held-out conditions, as ``lambda`` is.

**Calibration.** Intervals of per-gene means are ``mean +- q * sigma`` with
``sigma^2 = (posterior variance of the nested mean) + (pooled within-condition variance) / n_ref``
(``n_ref``: median cells of a perturbed training condition), so they aim to cover the *observed
mean of n_ref cells* of the condition. ``q`` is the conformal quantile of
``|observed - predicted| / sigma`` over the top-``CALIBRATION_GENES`` DE genes of the held-out
training conditions of the CV folds; without held-out conditions ``q`` is the normal quantile
(not calibrated, said so in the prediction).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from perturbax.baselines.base import summarize_training
from perturbax.baselines.linear import LinearBaseline, ridge_solve
from perturbax.data.core import PerturbationData
from perturbax.data.io import prediction_cells
from perturbax.inference.nested import CELL_MODES, REPORTED_LEVELS, interval_factor, nested_columns
from perturbax.inference.result import FitResult
from perturbax.theory.holdouts import in_span_holdouts, label_leverage

__all__ = [
    "LAMBDA_GRID",
    "MAX_CYCLES",
    "CALIBRATION_GENES",
    "in_span_folds",
    "continue_fit",
    "nested_path",
    "fit_with_selection",
    "one_standard_error_choice",
]

LAMBDA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Most cycles of fitting (each ``fit``'s default steps) when the length is chosen by the CV.
MAX_CYCLES = 5
#: DE genes per held-out condition whose errors calibrate the intervals.
CALIBRATION_GENES = 50
#: Without held-out training conditions (no in-span CV possible): the ridge mean with control cells.
FALLBACK = {"lambda": 0.0, "cells": "control"}
#: Control cells kept in a fit for the ``"control"`` cell mode (a random subset beyond this).
MAX_CONTROL_CELLS = 2000
#: Decimals of the leverages that order the candidates of :func:`in_span_folds` (ties in row order).
LEVERAGE_DECIMALS = 9
#: Posterior draws and predicted cells per condition used inside the selection.
CV_DRAWS, CV_CELLS, CV_PCS = 30, 300, 50


def in_span_folds(design: np.ndarray, n_folds: int = 2, max_fraction: float = 1 / 6,
                  min_per_fold: int = 2) -> list[np.ndarray]:
    """Disjoint sets of training conditions (row indices of ``design``) to hold out, one per fold.

    Each set stays in the span of the rows left in training when it is held out, so a fold tests
    in-span prediction as the use case does. Candidates are the rows of
    :func:`~perturbax.theory.holdouts.in_span_holdouts`, combinations (two or more nonzero
    entries) only when there are any; they are taken greedily, lowest
    :func:`~perturbax.theory.holdouts.label_leverage` first (the best supported; equal leverages to
    ``LEVERAGE_DECIMALS`` decimals in row order), while the held-out
    set stays in the span of the rest; at most ``max(max_fraction * perturbed rows, m)`` per fold
    (and no more than an equal share of the candidates), with ``m = min(min_per_fold, candidates //
    n_folds)``: in a small design ``max_fraction`` alone would hold out one condition a fold, and the
    CV's choices and the interval calibration would rest on two conditions, whose genes share their
    errors. Returns fewer (possibly no) folds when there are not enough candidates.
    """
    D = np.asarray(design, dtype=np.float64)
    cand = in_span_holdouts(D)
    combos = cand[np.count_nonzero(D[cand], axis=1) >= 2]
    if combos.size:
        cand = combos
    if cand.size == 0:
        return []
    # rounded: rows of equal leverage (common: a design's doubles) are ordered by their index, not by
    # the last bits of the SVD, which differ between BLAS builds and runs
    lev = np.round(label_leverage(D), LEVERAGE_DECIMALS)
    order = cand[np.argsort(lev[cand], kind="stable")]
    n_pert = int(np.count_nonzero(np.any(D != 0, axis=1)))
    floor = min(min_per_fold, order.size // n_folds)
    cap = max(1, floor, min(int(max_fraction * n_pert), math.ceil(order.size / n_folds)))
    used: set[int] = set()
    folds = []
    for _ in range(n_folds):
        held: list[int] = []
        for j in order:
            if j in used or len(held) >= cap:
                continue
            trial = held + [int(j)]
            rest = np.setdiff1d(np.arange(D.shape[0]), trial)
            if np.linalg.matrix_rank(D[rest]) == np.linalg.matrix_rank(np.vstack([D[rest], D[trial]])):
                held = trial
        if not held:
            break
        used.update(held)
        folds.append(np.asarray(sorted(held)))
    return folds


def _model_prediction(fit_result, labels: list[str], n_cells: int, seed: int):
    """The fitted model's prediction (no nested path) for ``labels``: ``n_cells`` cells each and the
    posterior draws of the mean expression (``uns["mean_draws"]``, ``varm["pred_mean"]``)."""
    from perturbax.inference.prediction import predict

    return predict(fit_result, labels, n_cells=n_cells, num_samples=CV_DRAWS, seed=seed, bootstrap=False)


def nested_path(fit_result, data: PerturbationData, *, seed: int = 0, extra=(), n_cells: int = 1):
    """The arrays of the nested mean (module docstring) for a model fitted to ``data`` (its
    training cells): ``(arrays, facts, prediction)`` with the ridge penalty and ``n_ref`` in
    ``facts``. ``prediction`` is the model's own prediction for the training conditions and the
    labels ``extra`` (``n_cells`` cells each), made once for both uses."""
    summary = summarize_training(data)
    lin = LinearBaseline(alpha="cv", unmeasured="zero").fit(data)
    alpha = float(lin.fitted.info["alpha"])
    conds = list(summary.conditions)
    ci = conds.index(data.control)
    pr = _model_prediction(fit_result, conds + [lab for lab in extra if lab not in conds], n_cells, seed)
    pred_labels = list(pr.uns["perturbax"]["labels"])
    M = np.asarray(pr.varm["pred_mean"], dtype=np.float64).T[[pred_labels.index(lab) for lab in conds]]
    rows = summary.perturbed
    L = summary.design[rows]
    W_model = ridge_solve(L, M[rows] - M[ci], alpha)
    W_model[~summary.in_training] = 0.0
    # pooled within-condition variance of each gene (sampling noise of a condition mean)
    ss, dof = np.zeros(data.n_genes), 0
    for cells in data.cells_by_condition().values():
        if cells.shape[0] > 1:
            ss += cells.astype(np.float64).var(0, ddof=1) * (cells.shape[0] - 1)
            dof += cells.shape[0] - 1
    P = data.registry.n_perturbations
    rows_c = np.flatnonzero(~np.any(np.asarray(data.L)[:, :P] != 0, axis=1))  # control cells of every context
    if rows_c.size > MAX_CONTROL_CELLS:
        rows_c = np.sort(np.random.default_rng(seed).choice(rows_c, MAX_CONTROL_CELLS, replace=False))
    ctrl = data.dense(rows_c)
    arrays = {
        "control_mean": summary.control_mean,
        "ridge_effects": np.asarray(lin.fitted.effects, dtype=np.float64),
        "model_control": M[ci],
        "model_effects": W_model,
        "control_cells": np.asarray(ctrl, dtype=np.float32),
        "cell_var": ss / max(dof, 1),
        "scores": np.zeros(0),
    }
    if data.context_keys:
        arrays["control_labels"] = np.asarray(data.L, dtype=np.float32)[rows_c]
    n_ref = float(np.median(summary.n_cells[rows])) if rows.size else float(summary.n_cells[ci])
    return arrays, {"alpha": alpha, "n_ref": n_ref}, pr


def one_standard_error_choice(scores: dict[tuple[float, str], list[float]]) -> tuple[float, str]:
    """The setting ``(lambda, cell mode)`` chosen from per-condition CV scores (lower is better;
    the lists aligned: entry ``i`` of every list scores the same held-out condition).

    The one-standard-error rule, paired: with ``best`` the setting of the lowest mean score and
    ``d_i`` a setting's score minus ``best``'s on condition ``i``, the settings whose mean ``d``
    is at most its standard error (``sd(d) / sqrt(n)``) fit as well as ``best`` within the CV's
    noise; of those the smallest ``lambda`` is chosen (the one closest to the ridge baseline,
    ``lambda = 0``), and of its cell modes the lower mean score. With fewer than two conditions
    this is the lowest mean score.
    """
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    best = min(means, key=means.get)
    ref = np.asarray(scores[best], dtype=np.float64)
    ok = []
    for k, v in scores.items():
        d = np.asarray(v, dtype=np.float64) - ref
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        if float(d.mean()) <= se:
            ok.append(k)
    return min(ok, key=lambda k: (k[0], means[k]))


def _energy_pcs(train: PerturbationData, seed: int):
    from perturbax.metrics.evaluate import PCAProjector

    n = train.n_cells
    idx = np.arange(n) if n <= 5000 else np.sort(np.random.default_rng(seed).choice(n, 5000, replace=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PCAProjector.fit(train.dense(idx), n_components=min(CV_PCS, train.n_genes))


def _cv_scores(fits: list, held_names: list[list[str]], data: PerturbationData, seed: int):
    """Per-condition CV scores of every setting ``(lambda, cell mode)`` and the calibration scores
    per ``lambda`` for the fold fits ``fits`` (``None``: a fold skipped)."""
    from perturbax.metrics.distances import energy_distance
    from perturbax.metrics.expression import top_de_genes

    scores = {(lam, mode): [] for lam in LAMBDA_GRID for mode in CELL_MODES}
    calib = {lam: [] for lam in LAMBDA_GRID}
    for f, (res, labels) in enumerate(zip(fits, held_names)):
        if res is None:
            continue
        train = data.select(labels, exclude=True)
        # one prediction for the training conditions (the nested path's model means) and the
        # held-out ones (cells to score): as many cells as control cells (of every context), at most
        # CV_CELLS (the control mode then repeats none, which would bias the U-statistic energy
        # distance upwards)
        P = data.registry.n_perturbations
        n_ctrl = int(np.count_nonzero(~np.any(np.asarray(train.L)[:, :P] != 0, axis=1)))
        n_cells = min(CV_CELLS, n_ctrl, MAX_CONTROL_CELLS)
        arrays, facts, pr = nested_path(res, train, seed=seed, extra=labels, n_cells=n_cells)
        meta_labels = list(labels)
        by_label = prediction_cells(pr)  # (with contexts: per (perturbation, context) pair)
        cells = [by_label[lab] for lab in meta_labels]
        vecs = np.stack([data.registry.encode(lab) for lab in meta_labels])
        pred_labels = list(pr.uns["perturbax"]["labels"])
        mean_draws = np.asarray(pr.uns["mean_draws"], dtype=np.float64)[[pred_labels.index(lab) for lab in meta_labels]]
        pcs = _energy_pcs(train, seed)
        truth = {lab: data.dense(np.flatnonzero(data.env == data.condition_index(lab))) for lab in meta_labels}
        truth_pc = {lab: pcs.transform(v) for lab, v in truth.items()}
        for lam in LAMBDA_GRID:
            for mode in CELL_MODES:
                draws, new, sigma = nested_columns(arrays, lam, mode, vecs, mean_draws, cells, facts["n_ref"],
                                                   np.random.default_rng(seed + f), data.registry.n_perturbations)
                for i, lab in enumerate(meta_labels):
                    scores[(lam, mode)].append(energy_distance(pcs.transform(new[i]), truth_pc[lab]))
                if mode == CELL_MODES[0]:
                    for i, lab in enumerate(meta_labels):
                        obs = truth[lab].astype(np.float64).mean(0)
                        genes = top_de_genes(obs, arrays["control_mean"], min(CALIBRATION_GENES, data.n_genes))
                        sig = np.sqrt(draws[i].var(0) + arrays["cell_var"] / truth[lab].shape[0])
                        calib[lam].extend((np.abs(obs - draws[i].mean(0)) / np.maximum(sig, 1e-12))[genes].tolist())
    return scores, calib


def continue_fit(run: Callable[..., FitResult], previous: FitResult, cycle: int, exclude=()) -> FitResult:
    """One more cycle of ``run`` (a compiled fit, ``perturbax.inference.fitting._trainer``; what
    :func:`fit_with_selection` is given) warm-started from ``previous``:
    its parameters, a fresh optimiser state and cosine schedule, other draws (``cycle``), run to the
    end of its steps (no early stopping on held-out cells: the CV on held-out conditions judges
    whether the cycle is kept). The result carries both cycles' histories (held-out steps counted
    from the first cycle's start) and ``info["cycles"]``; ``info["best_step"]`` and
    ``info["steps_run"]`` count all cycles' steps."""
    nxt = run(exclude, init_params=previous, cycle=cycle, stop_early=False)
    done = int(previous.info["steps_run"])
    h0, h1 = previous.history, nxt.history
    history = {
        "loss": np.concatenate([h0["loss"], h1["loss"]]),
        # the second cycle's step 0 is the first's kept state, already scored
        "val_step": np.concatenate([h0["val_step"], h1["val_step"][1:] + done]),
        "val_loss": np.concatenate([h0["val_loss"], h1["val_loss"][1:]]),
    }
    info = {
        **nxt.info,
        "steps_run": done + int(nxt.info["steps_run"]),
        "best_step": None if nxt.info["best_step"] is None else done + int(nxt.info["best_step"]),
        "fit_seconds": float(previous.info["fit_seconds"]) + float(nxt.info["fit_seconds"]),
        "cycles": int(previous.info.get("cycles", 1)) + 1,
        "warm_started": previous.info.get("warm_started", []),
        "data_init": previous.info.get("data_init", []),
    }
    return dataclasses.replace(nxt, history=history, info=info)


def _uses_model(setting: tuple[float, str]) -> bool:
    """Whether a setting's prediction depends on the fitted model (not the ridge mean with control
    cells)."""
    return setting[0] > 0 or setting[1] != "control"


def fit_with_selection(trainer: Callable[..., Callable[..., Any]], data: PerturbationData, *, seed: int = 0,
                       max_cycles: int = 1):
    """Fit with the nested estimator, ``lambda``, the cell mode and the fit's length chosen by in-span
    CV over the training conditions, intervals calibrated on the held-out ones (module docstring).

    ``trainer(holdouts)`` compiles the plain fit (no selection) for ``data`` and returns
    ``run(exclude)``, which fits with the conditions ``exclude`` left out (``fit`` passes its
    ``_trainer``); the CV fits and the final fit share that one compilation. Cost: one fit per
    fold (two folds) plus the final fit, each of the chosen number of cycles. The returned
    ``FitResult`` carries the nested arrays in ``nested`` and what was chosen, the CV scores and
    the calibration in ``info["selection"]``.

    **Length.** A cycle is one run of the trainer's steps; a further cycle warm-restarts the
    schedule from the last one's kept parameters (:func:`continue_fit`).
    While fewer than ``max_cycles`` cycles have run and the setting chosen after the last one uses
    the model (``lambda > 0`` or generated cells: otherwise more fitting cannot change the
    prediction), the fold fits run one more cycle, and it is kept when the CV score of its chosen
    setting (mean over the held-out conditions) is lower than the last cycle's; the final fit runs
    the kept number of cycles.
    """
    if max_cycles < 1:
        raise ValueError(f"max_cycles must be >= 1, got {max_cycles}.")
    t0 = time.perf_counter()
    summary = summarize_training(data)
    folds = in_span_folds(summary.design)
    held_names = [[summary.conditions[r] for r in rows] for rows in folds]
    run = trainer(held_names)
    fits = []
    skipped = []
    for labels in held_names:
        res = run(labels)
        if res.info.get("stop_reason") == "nan":  # a diverged CV fit says nothing about the settings
            skipped.append(labels)
            res = None
        fits.append(res)
    scores, calib = _cv_scores(fits, held_names, data, seed)
    all_held = held_names  # aligned with fits (a skipped fold's is None), so each fold keeps its seed
    folds = [f for f, labels in zip(folds, held_names) if labels not in skipped]
    held_names = [labels for labels in held_names if labels not in skipped]
    cycles, length_log = 1, []
    if folds:
        lam, mode = one_standard_error_choice(scores)
        length_log.append({"cycles": 1, "lambda": float(lam), "cells": mode,
                           "energy": float(np.mean(scores[(lam, mode)]))})
        while cycles < max_cycles and _uses_model((lam, mode)):
            more = [None if r is None else continue_fit(run, r, cycles, labels) for r, labels in zip(fits, all_held)]
            if any(r is not None and r.info.get("stop_reason") == "nan" for r in more):
                length_log.append({"cycles": cycles + 1, "diverged": True})
                break
            new_scores, new_calib = _cv_scores(more, all_held, data, seed)
            new_lam, new_mode = one_standard_error_choice(new_scores)
            energy = float(np.mean(new_scores[(new_lam, new_mode)]))
            length_log.append({"cycles": cycles + 1, "lambda": float(new_lam), "cells": new_mode, "energy": energy})
            if not energy < length_log[-2]["energy"]:
                break
            cycles, fits, scores, calib, lam, mode = cycles + 1, more, new_scores, new_calib, new_lam, new_mode
        mean_scores = {k: float(np.mean(v)) for k, v in scores.items()}
        note = (f"in-span CV over the training conditions: {len(folds)} fold(s) holding out "
                f"{sum(len(h) for h in held_names)} condition(s) inside the span of the rest"
                + (f"; fold(s) {skipped} skipped (the CV fit diverged)" if skipped else ""))
    else:
        mean_scores = {}
        lam, mode = FALLBACK["lambda"], FALLBACK["cells"]
        note = ("no training condition can be held out inside the span of the others (e.g. singles only), so "
                "nothing was cross-validated: used lambda=0 (the ridge baseline's mean) with control cells, "
                "and the intervals are not calibrated")
        if skipped:
            note = (f"the CV fits diverged (non-finite loss) on every fold ({skipped}), so nothing was "
                    f"cross-validated: used lambda=0 (the ridge baseline's mean) with control cells, and the "
                    f"intervals are not calibrated")
    cv_seconds = time.perf_counter() - t0
    res = run()
    for c in range(1, cycles):
        res = continue_fit(run, res, c)
    arrays, facts, _ = nested_path(res, data, seed=seed)
    arrays["scores"] = np.sort(np.asarray(calib.get(lam, []), dtype=np.float64))
    selection = {
        "lambda": float(lam),
        "cells": mode,
        "cycles": cycles,
        "alpha": facts["alpha"],
        "n_ref": facts["n_ref"],
        "criterion": "energy distance (U-statistic, 50 PCs of the fold's training cells) on held-out training "
                     "conditions; the smallest lambda within one (paired) standard error of the best mean; one "
                     "more cycle of fitting while the chosen setting uses the model and its CV score falls",
        "note": note,
        "held_out": held_names,
        "length": length_log,
        "cv_scores": [{"lambda": k[0], "cells": k[1], "energy": v, "per_condition": [float(x) for x in scores[k]]}
                      for k, v in mean_scores.items()],
        "calibration": {
            "n_scores": int(arrays["scores"].size),
            "genes_per_condition": CALIBRATION_GENES,
            "factor": {str(a): interval_factor(arrays, a)[0] for a in REPORTED_LEVELS},
            "calibrated": bool(arrays["scores"].size),
            "covers": f"the observed mean of {facts['n_ref']:g} cells (median cells per training condition)",
        },
        "cv_seconds": cv_seconds,
    }
    return dataclasses.replace(res, nested=arrays, info={**res.info, "selection": selection})
