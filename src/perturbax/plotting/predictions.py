"""Predicted vs observed mean expression, with credible intervals (per gene, and over time)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_predicted_vs_observed", "plot_gene_intervals", "plot_reliability", "plot_trajectory"]


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


def plot_trajectory(
    times, mean, lower, upper, *, observed_times=None, observed=None, observed_sd=None, baseline_times=None,
    baseline=None, baseline_label: str = "baseline", train_times=None, ax=None, title: str | None = None,
    time_label: str = "time since perturbation", value_label: str = "mean expression", level: float = 0.9,
):
    """A predicted trajectory of one gene (or any scalar) over time with its credible band, against
    observed time points.

    ``times``, ``mean``, ``lower``, ``upper``: ``(T,)`` (e.g. one gene's column of
    :func:`perturbax.data.prediction_trajectory`). ``observed_times``/``observed``: measured means
    (crosses; ``observed_sd``: error bars, e.g. standard errors). ``baseline_times``/``baseline``: a
    reference curve (dashed; e.g. the control, interpolation of measured means, or a static
    additive shift) labelled ``baseline_label``. ``train_times``: times beyond the last of them are
    shaded (extrapolation). ``level`` only labels the band.
    """
    times = np.asarray(times, dtype=float).ravel()
    mean, lower, upper, _ = _check(mean, lower, upper)
    if times.shape != mean.shape:
        raise ValueError(f"times has {times.size} entries but mean has {mean.size}; give one value per time.")
    order = np.argsort(times)
    ax = ax or plt.subplots(figsize=(4.2, 3.0))[1]
    if train_times is not None and len(np.atleast_1d(train_times)) and times.max() > np.max(train_times):
        ax.axvspan(float(np.max(train_times)), float(times.max()), color="0.92", zorder=0,
                   label="beyond the training times")
    ax.fill_between(times[order], lower[order], upper[order], color="tab:blue", alpha=0.25,
                    label=f"{level:.0%} interval of the mean")
    ax.plot(times[order], mean[order], color="tab:blue", lw=1.5, label="predicted mean")
    if baseline is not None:
        bt = times if baseline_times is None else np.asarray(baseline_times, dtype=float).ravel()
        b = np.asarray(baseline, dtype=float).ravel()
        if b.shape != bt.shape:
            raise ValueError(f"baseline has {b.size} values for {bt.size} times.")
        bo = np.argsort(bt)
        ax.plot(bt[bo], b[bo], color="0.4", ls="--", lw=1.0, label=baseline_label)
    if observed is not None:
        if observed_times is None:
            raise ValueError("observed needs observed_times (one time per observed value).")
        ot = np.asarray(observed_times, dtype=float).ravel()
        ov = np.asarray(observed, dtype=float).ravel()
        if ot.shape != ov.shape:
            raise ValueError(f"observed has {ov.size} values for {ot.size} observed_times.")
        err = None if observed_sd is None else np.asarray(observed_sd, dtype=float).ravel()
        ax.errorbar(ot, ov, yerr=err, fmt="x", color="k", ms=6, lw=0.8, label="observed mean")
    ax.set_xlabel(time_label)
    ax.set_ylabel(value_label)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return ax
