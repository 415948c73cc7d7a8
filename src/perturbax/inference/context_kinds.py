"""Kinds of prediction of a model of time, and the conformal factor of each.

A (perturbation, time) a user asks of a latent dynamics fit is one of three kinds
(:data:`CONTEXT_KINDS`), by what the training data measured (:func:`context_kind`): a measured
perturbation at a time within its measured times (``"interior"``), after or before them
(``"beyond"``: the dynamics extrapolated), or a combination never measured (``"unseen"``). They
err differently, so the default recipe (:mod:`perturbax.inference.dynamics_recipe`) holds out
training contexts of each kind and calibrates one conformal factor per kind
(:func:`calibration_factors`); :func:`perturbax.inference.predict` gives each column the factor of
its kind.
"""

from __future__ import annotations

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.inference.nested import conformal_quantile

__all__ = ["CONTEXT_KINDS", "EXTRAPOLATING_KINDS", "condition_times", "measured_times", "context_kind", "calibration_factors"]

#: Kinds of prediction, each calibrated on held-out training contexts of its kind (:func:`context_kind`).
CONTEXT_KINDS = ("interior", "beyond", "unseen")


def condition_times(data: PerturbationData) -> dict[str, np.ndarray]:
    """Distinct times of each perturbed condition of ``data`` (label -> ascending times)."""
    env, t = np.asarray(data.env), np.asarray(data.times, dtype=np.float64)
    return {data.conditions[e]: np.unique(t[env == e]) for e in np.unique(env) if e != data.control_index}


def measured_times(data: PerturbationData) -> dict[tuple[float, ...], np.ndarray]:
    """Times at which ``data`` measured each perturbed label vector (the keys of :func:`context_kind`)."""
    env = np.asarray(data.env)
    first = np.unique(env, return_index=True)[1]
    times = condition_times(data)
    L = np.asarray(data.L, dtype=np.float64)
    return {tuple(np.round(L[i], 9).tolist()): times[data.conditions[env[i]]] for i in first
            if env[i] != data.control_index}


def context_kind(measured: dict[tuple[float, ...], np.ndarray], vector, t: float) -> str:
    """The kind of prediction a (label vector, time) is for training data that measured each label
    vector ``measured`` at its times: ``"unseen"`` (the label was never measured), ``"beyond"`` (it
    was, but ``t`` lies outside its measured times) or ``"interior"`` (within them)."""
    key = tuple(np.round(np.asarray(vector, dtype=np.float64), 9).tolist())
    ts = measured.get(key)
    if ts is None or len(ts) == 0:
        return "unseen"
    return "interior" if float(np.min(ts)) - 1e-9 <= float(t) <= float(np.max(ts)) + 1e-9 else "beyond"


#: Kinds that extrapolate (in time, or to a combination never measured); never calibrated narrower
#: than ``"interior"`` (:func:`calibration_factors`).
EXTRAPOLATING_KINDS = ("beyond", "unseen")


def calibration_factors(calibration: dict, level: float) -> tuple[dict[str, float], dict[str, str]]:
    """The conformal factor at ``level`` of each kind of prediction (:data:`CONTEXT_KINDS`), and how
    each was obtained: from the held-out contexts of its kind, or -- for a kind none of them was --
    the largest factor of the kinds that were (the conservative choice).

    An extrapolating kind (:data:`EXTRAPOLATING_KINDS`) gets at least the ``"interior"`` factor:
    the recipe holds out one combination and one perturbation's last time for them, against up to
    four interior contexts, so their own factor is the noisier estimate, and a prediction farther
    from the data is not given a narrower interval than interpolation. A calibration saved before
    the kinds existed (one list of scores from interior contexts) calibrates every kind."""
    raw = calibration["scores"]
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in (raw.items() if isinstance(raw, dict)
                                                                 else [("interior", raw)])}
    own = {k: conformal_quantile(v, level) for k, v in scores.items() if v.size}
    if not own:
        raise ValueError("The calibration holds no scores; refit with the default recipe.")
    worst = max(own, key=own.get)
    factors, how = {}, {}
    for k in CONTEXT_KINDS:
        if k in own:
            factors[k], how[k] = own[k], "held-out training contexts of this kind"
        else:
            factors[k], how[k] = own[worst], f"none held out; the largest factor of the others ({worst})"
        if k in EXTRAPOLATING_KINDS and k in own and "interior" in own and own["interior"] > own[k]:
            factors[k] = own["interior"]
            how[k] = "the interior factor (larger than this kind's own, from fewer held-out contexts)"
    return factors, how
