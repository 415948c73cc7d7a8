"""The times of training cells for models of time: checked once, with messages that say what one
time point can and cannot identify."""

from __future__ import annotations

import warnings

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.models.dynamics import check_times

__all__ = ["training_times", "default_time_scale"]


def training_times(data: PerturbationData, model_name: str = "latent_dynamics") -> np.ndarray:
    """Validate the times of training cells for a model of time; returns the distinct times.

    Raises ``ValueError`` if the data have no times, a time is negative or not finite, or all
    cells are at a single time point (what one time point can and cannot identify is in the
    message). Warns if the perturbed cells are all at one time.
    """
    if data.times is None:
        raise ValueError(
            f"Model {model_name!r} describes cells over time, but the data have no times. Pass time_key= to "
            f"from_anndata (the numeric obs column of time since the perturbation was switched on), e.g. "
            f"from_anndata(adata, 'perturbation', 'control', time_key='time')."
        )
    t = check_times(data.times)
    uniq = np.unique(t)
    if uniq.size < 2:
        raise ValueError(
            f"All {t.size} training cells are at a single time point (t = {uniq[0]:g}), so a dynamics fit "
            f"is not identifiable. From one snapshot time the causal weights B between programs and the "
            f"direct targets S cannot be separated: they enter the cells only through the transient "
            f"exp((B - I) t), which needs two or more times. What one time point does identify is the net "
            f"latent shift of each perturbation at that time -- at equilibrium the additive-shift "
            f"W = (I - B)^{{-1}} S, which is the same for every (B, S) with S = (I - B) W "
            f"(perturbax.theory.w_to_bs). Fit model='additive_shift' to these cells, or add cells from other "
            f"time points (time-matched controls and perturbed cells at two or more times)."
        )
    if data.control_index is not None:
        perturbed = np.asarray(data.env) != data.control_index
        pt = np.unique(t[perturbed])
        if pt.size == 1:
            warnings.warn(
                f"Every perturbed cell is at the single time t = {pt[0]:g} (controls at "
                f"{', '.join(f'{v:g}' for v in uniq)}): the transient of the perturbations is seen at one time "
                f"only, so B and S are separated only through the control time course; predictions at other "
                f"times rest on the model's dynamics, not on data. Measure perturbed cells at more times.",
                UserWarning,
                stacklevel=3,
            )
    return uniq


def default_time_scale(times) -> float:
    """The time scale a latent dynamics fit uses when none is given: the median of the distinct
    positive times of the training cells (1 if there are none). The programs then relax over the
    span of the measured times, whatever unit the times are given in (hours, days).

    >>> default_time_scale([0, 0, 24, 48, 72])
    48.0
    """
    t = np.unique(np.asarray(times, dtype=np.float64))
    t = t[t > 0]
    return float(np.median(t)) if t.size else 1.0
