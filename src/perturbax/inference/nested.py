"""The nested estimator as a fitted model applies it: its saved arrays and how ``predict`` uses them.

How the estimator is defined, selected and calibrated on training conditions is in
:mod:`perturbax.inference.selection` (which builds these arrays inside ``fit``); this module holds
what a saved fit needs afterwards -- applying ``lambda`` and the cell mode to a raw model
prediction, the conformal interval factor, and the check of the saved arrays on load -- so that
``result`` and ``prediction`` depend on it and not on the selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.stats import norm

from perturbax.theory.rowspace import DEFAULT_RTOL, RowSpace

__all__ = [
    "NESTED_FILE",
    "NESTED_KEYS",
    "CELL_MODES",
    "REPORTED_LEVELS",
    "nested_columns",
    "nested_means",
    "recentred_column",
    "conformal_quantile",
    "interval_factor",
    "nested_prediction",
    "unidentified_spread",
    "check_nested_arrays",
]

NESTED_FILE = "nested.npz"  # saved only by fits with the nested estimator

CELL_MODES = ("generated", "control")
#: Interval levels whose factors a fit and a prediction report (reliability diagrams).
REPORTED_LEVELS = (0.5, 0.8, 0.9, 0.95)
NESTED_KEYS = ("control_mean", "ridge_effects", "model_control", "model_effects", "control_cells", "cell_var",
               "scores")
#: With contexts: the label vectors ``(n, K)`` of ``control_cells`` (the control cells of every context).
CONTEXT_KEY = "control_labels"


def nested_columns(arrays, lam: float, mode: str, vecs: np.ndarray, mean_draws: np.ndarray,
                   cells: list[np.ndarray], n_ref: float, rng: np.random.Generator, n_perturbations: int | None = None):
    """Apply the nested estimator to a raw model prediction.

    ``vecs`` ``(C, K)`` labels, ``mean_draws`` ``(C, S, G)`` the model's per-draw means, ``cells``
    its cells per column. The cells of each column are re-centred on its nested mean: the model's
    generated cells (``"generated"``) or training control cells drawn at random (``"control"``).
    With contexts (``arrays["control_labels"]`` and ``n_perturbations``, the label columns before
    the context columns), the control cells of a column are those of its context.
    Returns ``(draws (C, S, G), cells, sigma (C, G))``; ``sigma`` is the
    interval scale of :mod:`perturbax.inference.selection` (Calibration).
    """
    draws, sigma = nested_means(arrays, lam, vecs, mean_draws, n_ref)
    mean = draws.mean(1)
    out = [np.concatenate(list(recentred_column(arrays, mode, vecs[i], mean[i], x.shape[0], rng,
                                                lambda x=x: iter([x]), n_perturbations)))
           for i, x in enumerate(cells)]
    return draws, out, sigma


def nested_means(arrays, lam: float, vecs: np.ndarray, mean_draws: np.ndarray, n_ref: float):
    """The nested per-draw means ``(C, S, G)`` (control mean + ``l W_ridge`` + ``lam`` x the model's
    remainder) and the interval scale ``sigma`` ``(C, G)`` of :func:`nested_columns`."""
    vecs = np.asarray(vecs, dtype=np.float64)
    ridge = arrays["control_mean"] + vecs @ arrays["ridge_effects"]  # (C, G)
    remainder = mean_draws - arrays["model_control"] - (vecs @ arrays["model_effects"])[:, None]
    draws = ridge[:, None] + lam * remainder
    return draws, np.sqrt(draws.var(1) + arrays["cell_var"] / n_ref)


def recentred_column(arrays, mode: str, vec: np.ndarray, mean: np.ndarray, n: int, rng: np.random.Generator,
                     generated: Callable[[], Iterator[np.ndarray]], n_perturbations: int | None = None,
                     block: int | None = None) -> Iterator[np.ndarray]:
    """The ``n`` cells of one column (label ``vec``) re-centred on its nested mean ``mean`` ``(G,)``,
    in blocks of rows (float32), for :func:`nested_columns` and a prediction written in chunks.

    ``"generated"``: ``generated()`` iterates over the model's generated cells of the column in
    blocks; with several blocks it is called twice (the first pass gives their mean). ``"control"``:
    training control cells of the column's context, every one used once before any is used again
    (``rng`` draws their order; columns must be taken in order), ``block`` rows at a time (default:
    all); ``generated`` is not called."""
    mean = np.asarray(mean, dtype=np.float64)
    if mode == "generated":
        total, first, count = np.zeros(mean.shape, np.float64), None, 0
        for x in generated():
            total += x.sum(0, dtype=np.float64)
            first, count = (x if count == 0 else None), count + 1
        centre = total / n
        for x in ([first] if count == 1 else generated()):
            yield (x.astype(np.float64) - centre + mean).astype(np.float32)
        return
    ctrl = arrays["control_cells"]
    labels = arrays.get(CONTEXT_KEY) if n_perturbations is not None else None
    if labels is not None and labels.shape[1] > n_perturbations:
        rows = np.all(labels[:, n_perturbations:] == np.asarray(vec, np.float64)[n_perturbations:], axis=1)
        ctrl = ctrl[rows] if rows.any() else ctrl
    n0 = ctrl.shape[0]  # every control cell once before any is used again (no duplicates)
    idx = np.concatenate([rng.permutation(n0) for _ in range(-(-n // n0))])[:n]
    centre = np.bincount(idx, minlength=n0).astype(np.float64) @ ctrl.astype(np.float64) / n
    step = n if block is None else max(1, int(block))
    for a in range(0, n, step):
        yield (ctrl[idx[a : a + step]].astype(np.float64) - centre + mean).astype(np.float32)


def conformal_quantile(scores: np.ndarray, level: float) -> float | None:
    """Split-conformal quantile of ``scores`` at ``level``: the ``ceil((m + 1) level)``-th smallest
    (the largest when that exceeds ``m``); ``None`` without scores."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        return None
    k = min(math.ceil((s.size + 1) * level), s.size)
    return float(s[k - 1])


def interval_factor(arrays, level: float) -> tuple[float, bool]:
    """``(q, calibrated)``: the conformal factor at ``level``, or the normal quantile if there are no
    calibration scores."""
    q = conformal_quantile(arrays["scores"], level)
    return (q, True) if q is not None else (float(norm.ppf(0.5 + level / 2)), False)


def unidentified_spread(arrays, train_design: np.ndarray, vecs: np.ndarray, tol: float = DEFAULT_RTOL):
    """The part of each label the training design does not identify, and the variance it adds.

    ``residual`` ``(C,)``: the norm of the component of each label vector ``vecs`` ``(C, K)`` outside
    the row space of ``train_design`` (0 for labels in the span, which the data identify). The ridge
    linear path sets the effect of that component to its prior mean, 0, so a label with
    ``residual > 0`` gets a point prediction with no data behind that part. Its variance ``(C, G)``:
    ``sum_k r_k^2 tau_g^2``, ``r`` the out-of-span component and ``tau_g^2`` the mean square of the
    ridge effects of the measured perturbations on gene ``g`` -- the unknown effect treated as a
    draw exchangeable with the measured ones (an assumption the data cannot check). Zero for
    labels in the span.
    """
    vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float64))
    design = np.asarray(train_design, dtype=np.float64)
    effects = np.asarray(arrays["ridge_effects"], dtype=np.float64)  # (K, G)
    G = effects.shape[1]
    out = RowSpace.from_rows(design.reshape(-1, vecs.shape[1]), rtol=tol).residuals(vecs)  # (tol: relative)
    out[np.abs(out) < 1e-9] = 0.0
    residual = np.linalg.norm(out, axis=1)
    measured = np.any(design != 0, axis=0) if design.size else np.zeros(effects.shape[0], bool)
    if not np.any(residual > 0) or not measured.any():
        return residual, np.zeros((vecs.shape[0], G))
    tau2 = np.mean(effects[measured] ** 2, axis=0)  # (G,)
    return residual, (residual**2)[:, None] * tau2[None, :]


def nested_prediction(fit_result, vecs: np.ndarray, mean_draws: np.ndarray, interval: float, seed: int):
    """What :func:`~perturbax.inference.predict` uses for a fit with the nested estimator:
    ``(draws (C, S, G), lower (C, G), upper (C, G), notes, column)``; ``column(i, n, generated,
    block)`` yields the cells of column ``i`` (:func:`recentred_column`; call it for the columns in
    order)."""
    sel = fit_result.info["selection"]
    arrays = fit_result.nested
    draws, sigma = nested_means(arrays, float(sel["lambda"]), vecs, mean_draws, float(sel["n_ref"]))
    q, calibrated = interval_factor(arrays, interval)
    residual, spread = unidentified_spread(arrays, fit_result.train_design, vecs)
    sigma = np.sqrt(sigma**2 + spread)
    mean = draws.mean(1)
    rng = np.random.default_rng([int(seed), 17])

    def column(i, n, generated, block=None):
        return recentred_column(arrays, sel["cells"], vecs[i], mean[i], n, rng, generated,
                                fit_result.registry.n_perturbations, block)

    notes = {
        "estimator": "nested: ridge linear path + lambda x the model's nonlinear remainder",
        "lambda": float(sel["lambda"]),
        "cells": sel["cells"],
        "interval_factor": q,
        "calibrated": calibrated,
        "factors": {str(a): interval_factor(arrays, a)[0] for a in REPORTED_LEVELS} | {str(interval): q},
        "covers": sel["calibration"]["covers"] if calibrated else
        "not calibrated (no held-out training conditions): normal quantile of the posterior and cell-sampling SD",
        "unidentified": [float(r) for r in residual],
    }
    if np.any(residual > 0):
        notes["unidentified_note"] = (
            "columns with unidentified > 0 lie partly outside the span of the training labels: their intervals "
            "are widened by the spread of the measured perturbations' effects along the unidentified part "
            "(treating the unknown effect as exchangeable with the measured ones), an assumption, not a calibration"
        )
    return draws, mean - q * sigma, mean + q * sigma, notes, column


def check_nested_arrays(shapes: dict[str, tuple[int, ...]], selection: Any, n_genes: int, K: int) -> str | None:
    """Why the saved nested arrays (``{name: shape}``) or ``info["selection"]`` do not fit a model
    of ``n_genes`` genes and ``K`` perturbations, or ``None`` if they do."""
    G = n_genes
    if set(shapes) - {CONTEXT_KEY} != set(NESTED_KEYS):
        return f"{NESTED_FILE} must hold {list(NESTED_KEYS)} (and {CONTEXT_KEY} with contexts), got {sorted(shapes)}"
    if CONTEXT_KEY in shapes and tuple(shapes[CONTEXT_KEY]) != (tuple(shapes["control_cells"])[0], K):
        return f"{NESTED_FILE}: {CONTEXT_KEY} has shape {tuple(shapes[CONTEXT_KEY])}, expected (n_control_cells, {K})"
    want = {"control_mean": (G,), "ridge_effects": (K, G), "model_control": (G,), "model_effects": (K, G),
            "cell_var": (G,)}
    for k, s in want.items():
        if tuple(shapes[k]) != s:
            return f"{NESTED_FILE}: {k} has shape {tuple(shapes[k])}, expected {s}"
    cs = tuple(shapes["control_cells"])
    if len(cs) != 2 or cs[1] != G or cs[0] < 1:
        return f"{NESTED_FILE}: control_cells has shape {cs}, expected (n >= 1, {G})"
    if len(shapes["scores"]) != 1:
        return f"{NESTED_FILE}: scores must be 1-D"
    if not isinstance(selection, dict):
        return "info.selection must be an object"
    lam, mode, n_ref = selection.get("lambda"), selection.get("cells"), selection.get("n_ref")
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam <= 1):
        return f"info.selection.lambda must be a number in [0, 1], got {lam!r}"
    if mode not in CELL_MODES:
        return f"info.selection.cells must be one of {CELL_MODES}, got {mode!r}"
    if not (isinstance(n_ref, (int, float)) and not isinstance(n_ref, bool) and math.isfinite(n_ref) and n_ref >= 1):
        return f"info.selection.n_ref must be a number >= 1, got {n_ref!r}"
    return None
