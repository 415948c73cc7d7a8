"""Predicted vs observed mean expression, with credible intervals."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_predicted_vs_observed", "plot_gene_intervals", "plot_reliability", "plot_time_course"]


def _check(mean, lower, upper, observed=None):
    mean, lower, upper = (np.asarray(a, dtype=float).ravel() for a in (mean, lower, upper))
    if not (mean.shape == lower.shape == upper.shape):
        raise ValueError(f"mean, lower, upper must have the same length, got {mean.shape}, {lower.shape}, {upper.shape}.")
    if observed is not None:
        observed = np.asarray(observed, dtype=float).ravel()
        if observed.shape != mean.shape:
            raise ValueError(f"observed has {observed.size} genes but the prediction has {mean.size}.")
    return mean, lower, upper, observed


def plot_predicted_vs_observed(
    mean, lower, upper, observed, *, control=None, ax=None, title: str | None = None, max_genes: int | None = 2000
):
    """One point per gene: observed mean (x) against predicted mean (y) with its credible interval.

    With ``control`` (the control mean), both axes show the change from control, which is where
    perturbation effects are visible. Points whose interval misses the observed value are red;
    the legend gives the fraction covered.
    """
    mean, lower, upper, observed = _check(mean, lower, upper, observed)
    if control is not None:
        control = np.asarray(control, dtype=float).ravel()
        mean, lower, upper, observed = mean - control, lower - control, upper - control, observed - control
    idx = np.arange(mean.size)
    if max_genes is not None and mean.size > max_genes:
        idx = np.argsort(-np.abs(observed))[:max_genes]
    ax = ax or plt.subplots(figsize=(4.2, 4.2))[1]
    inside = (observed[idx] >= lower[idx]) & (observed[idx] <= upper[idx])
    for mask, color, lab in ((inside, "tab:blue", "interval covers observed"), (~inside, "tab:red", "interval misses")):
        if mask.any():
            j = idx[mask]
            ax.errorbar(
                observed[j], mean[j], yerr=[mean[j] - lower[j], upper[j] - mean[j]], fmt="o", ms=3, lw=0.8,
                color=color, alpha=0.8, label=f"{lab} ({mask.mean():.0%})",
            )
    lo = float(min(observed[idx].min(), lower[idx].min()))
    hi = float(max(observed[idx].max(), upper[idx].max()))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", zorder=0)
    what = "change from control" if control is not None else "mean expression"
    ax.set_xlabel(f"observed {what}")
    ax.set_ylabel(f"predicted {what}")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_gene_intervals(
    mean, lower, upper, gene_names: Sequence[str], *, observed=None, control=None, top: int = 25, ax=None,
    title: str | None = None,
):
    """Per-gene credible intervals of the mean for one perturbation (the ``top`` genes with the
    largest predicted change from ``control``, or the largest predicted means without it)."""
    mean, lower, upper, observed = _check(mean, lower, upper, observed)
    names = np.asarray(list(gene_names))
    if names.size != mean.size:
        raise ValueError(f"gene_names has {names.size} entries but the prediction has {mean.size} genes.")
    score = np.abs(mean - np.asarray(control, dtype=float).ravel()) if control is not None else np.abs(mean)
    idx = np.argsort(-score)[: min(top, mean.size)][::-1]
    ax = ax or plt.subplots(figsize=(4.5, 0.22 * idx.size + 1.0))[1]
    y = np.arange(idx.size)
    ax.hlines(y, lower[idx], upper[idx], color="tab:blue", lw=2, label="credible interval")
    ax.plot(mean[idx], y, "o", color="tab:blue", ms=3, label="posterior mean")
    if observed is not None:
        ax.plot(observed[idx], y, "x", color="k", ms=4, label="observed")
    if control is not None:
        ax.plot(np.asarray(control, dtype=float).ravel()[idx], y, "|", color="0.5", ms=6, label="control")
    ax.set_yticks(y, names[idx], fontsize=7)
    ax.set_xlabel("mean expression")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return ax


def plot_reliability(intervals, truth, *, ax=None, label: str | None = None, title: str | None = None):
    """Reliability diagram: nominal level (x) against the fraction of ``truth`` inside the
    intervals of that level (y), with the diagonal of perfect calibration.

    ``intervals``: ``{level: (lower, upper)}`` (e.g. from
    :func:`perturbax.data.prediction_intervals` with ``level=`` 0.5, 0.8, 0.9, 0.95), arrays shaped
    like ``truth`` (e.g. observed means of the top DE genes). The coverages are
    :func:`perturbax.metrics.reliability`; the curve's data (``ax.lines[-1].get_xydata()``) are
    exactly those numbers.
    """
    from perturbax.metrics.intervals import reliability

    cov = reliability(intervals, truth)
    ax = ax or plt.subplots(figsize=(3.6, 3.6))[1]
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--", zorder=0)
    levels = list(cov)
    ax.plot(levels, [cov[a] for a in levels], "o-", ms=4, label=label)
    for a in levels:
        ax.annotate(f"{cov[a]:.2f}", (a, cov[a]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    if title:
        ax.set_title(title, fontsize=10)
    if label:
        ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_time_course(times, mean, lower, upper, *, observed_times=None, observed=None, baseline=None, ax=None,
                     title: str | None = None, ylabel: str = "mean expression", xlabel: str = "time"):
    """Predicted mean over ``times`` with its credible band, the observed means at
    ``observed_times`` (crosses) and a baseline's prediction at those times (dashed), e.g. one
    gene of one perturbation. Times after the last observed time are shaded (extrapolation)."""
    times, mean, lower, upper = (np.asarray(a, dtype=float).ravel() for a in (times, mean, lower, upper))
    if not (times.shape == mean.shape == lower.shape == upper.shape):
        raise ValueError(f"times, mean, lower, upper must have the same length, got {times.shape}, {mean.shape}, "
                         f"{lower.shape}, {upper.shape}.")
    ax = ax or plt.subplots(figsize=(3.6, 3))[1]
    ax.fill_between(times, lower, upper, color="tab:blue", alpha=0.25, label="model: credible interval")
    ax.plot(times, mean, color="tab:blue", label="model: predicted mean")
    if observed_times is not None:
        t_obs = np.asarray(observed_times, dtype=float).ravel()
        for name, values, label, style in (
            ("baseline", baseline, "baseline", dict(color="tab:orange", ls="--", marker="s", ms=3)),
            ("observed", observed, "held-out cells (mean)", dict(color="k", ls="none", marker="x", ms=6)),
        ):
            if values is None:
                continue
            values = np.asarray(values, dtype=float).ravel()
            if values.shape != t_obs.shape:
                raise ValueError(f"{name} has {values.size} values but observed_times has {t_obs.size}; pass one per time.")
            ax.plot(t_obs, values, label=label, **style)
        if t_obs.size and times.max() > t_obs.max():
            ax.axvspan(t_obs.max(), times.max(), color="0.92", zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
