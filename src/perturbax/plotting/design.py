"""Design diagrams: which test perturbations a design covers, and the spectrum of the design."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_design_coverage", "plot_design_spectrum", "plot_jacobian_spectrum"]


def plot_design_coverage(report, *, ax=None, title: str | None = "which tests the design covers"):
    """Relative residual of each test of a :class:`perturbax.theory.DesignReport` (0 = covered),
    coloured by status: covered inside the convex hull, covered by extrapolation, not covered."""
    tests = list(report.tests)
    if not tests:
        raise ValueError("The report has no test perturbations; pass tests to check_design.")
    res = np.array([t.relative_residual for t in tests])
    status = [
        ("covered, inside hull", "tab:green") if t.covered and t.in_convex_hull
        else ("covered, extrapolation", "tab:orange") if t.covered
        else ("not covered", "tab:red")
        for t in tests
    ]
    ax = ax or plt.subplots(figsize=(5, 0.3 * len(tests) + 1.2))[1]
    y = np.arange(len(res))
    colors = [c for _, c in status]
    ax.hlines(y, 0, res, colors=colors, lw=3)
    ax.scatter(res, y, c=colors, s=40, zorder=3)
    for yi, (text, color) in zip(y, status):
        ax.text(1.08, yi, text, va="center", fontsize=7, color=color)
    ax.set_yticks(y, [t.label for t in tests], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-0.05, 1.6)
    ax.set_xticks([0, 0.5, 1.0])
    ax.set_xlabel("relative residual (0 = covered)")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _spectrum(ax, values, size: int, tolerance: float, *, label: str | None, color, floor: float):
    """Draw ``values`` padded with zeros to ``size`` on a log axis; values below ``tolerance``
    (the null directions, zeros included) are drawn at ``max(value, floor)`` as crosses."""
    v = np.zeros(size)
    s = np.asarray(values, dtype=float)[:size]
    v[: s.size] = s
    x = np.arange(1, size + 1)
    shown = np.maximum(v, floor)
    null = v <= tolerance
    ax.plot(x, shown, "-", color=color, lw=1, label=label)
    ax.scatter(x[~null], shown[~null], s=22, color=color, zorder=3)
    ax.scatter(x[null], shown[null], s=40, marker="x", color=color, zorder=3)
    return int(null.sum())


def _tolerance_line(ax, tolerance: float, floor: float, text: str):
    ax.set_yscale("log")
    ax.axhline(tolerance, color="tab:red", ls="--", lw=1.2, label=text)
    ax.set_ylim(bottom=floor / 3)
    ax.set_xlabel("index")


def plot_design_spectrum(report, *, ax=None, title: str | None = None):
    """Singular values of the design differences ``D`` on a log axis, padded with zeros to the
    number of elementary perturbations ``K`` (a design with fewer measured directions than ``K``
    has zero singular values), with the rank tolerance as a dashed line. Values at or below it
    (crosses, zeros drawn at the bottom of the axis) are directions the design does not measure."""
    ax = ax or plt.subplots(figsize=(4, 3))[1]
    tol = float(report.tolerance)
    floor = tol / 100
    n_null = _spectrum(ax, report.singular_values, int(report.K), tol, label=None, color="tab:blue", floor=floor)
    _tolerance_line(ax, tol, floor, f"rank tolerance {tol:.0e}")
    ax.set_ylabel("singular value of D")
    ax.set_title(title or f"rank {report.rank} of K = {report.K} ({n_null} unmeasured)", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def plot_jacobian_spectrum(reports, *, ax=None, title: str | None = "Jacobian singular values"):
    """Singular values of the Jacobians of :func:`perturbax.theory.local_identifiability`, relative
    to the largest and padded with zeros to the number of parameters (a Jacobian with fewer
    summaries than parameters has that many null directions), one curve per report of
    ``reports = {label: report}``, with the rank tolerance ``rtol`` as a dashed line. Crosses on or
    below the line are null directions; the legend counts them (declared symmetries, unexpected)."""
    reports = dict(reports)
    if not reports:
        raise ValueError("reports is empty; pass {label: LocalIdentifiabilityReport}.")
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    rtol = max(float(r.rtol) for r in reports.values())
    floor = rtol / 100
    for i, (label, rep) in enumerate(reports.items()):
        s = np.asarray(rep.singular_values, dtype=float)
        rel = s / s.max() if s.size and s.max() > 0 else s
        _spectrum(ax, rel, int(rep.n_params), float(rep.rtol), color=plt.get_cmap("tab10")(i % 10), floor=floor,
                  label=f"{label}: {rep.n_null} null ({rep.n_symmetries} symmetry, {rep.n_unexpected} unexpected)")
    _tolerance_line(ax, rtol, floor, f"rank tolerance {rtol:.0e} (crosses: null directions)")
    ax.set_ylabel("singular value / largest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return ax
