"""Design diagrams: which test perturbations a design covers, and the spectrum of the design."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_design_coverage", "plot_design_spectrum"]


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


def plot_design_spectrum(report, *, ax=None, title: str | None = None):
    """Singular values of the design differences ``D`` with the rank tolerance (the margin by
    which the design is, or is not, of full rank)."""
    s = np.asarray(report.singular_values, dtype=float)
    ax = ax or plt.subplots(figsize=(4, 3))[1]
    ax.bar(np.arange(1, s.size + 1), s, color="tab:blue")
    ax.axhline(report.tolerance, color="tab:red", ls="--", lw=1, label="rank tolerance")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of D")
    ax.set_title(title or f"rank {report.rank} of K = {report.K}", fontsize=9)
    ax.legend(fontsize=7)
    return ax
