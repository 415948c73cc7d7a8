"""Render the plots shown in the README into docs/plot_*.png.

    .venv/bin/python docs/render_plots.py            # about 2-3 minutes on 2 CPU cores
    .venv/bin/python docs/render_plots.py --steps 200  # quick look (worse fit)

Same simulation and fit as notebooks/01_quickstart.ipynb with its default settings (additive latent
shift model, energy objective, seed 0), plus the design example of notebooks/03.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import perturbax.data as pxd  # noqa: E402
from perturbax import plotting, theory  # noqa: E402
from perturbax.inference import fit, predict  # noqa: E402
from perturbax.models import AdditiveShiftConfig  # noqa: E402

OUT = Path(__file__).resolve().parent
DPI = 100


def coverage_panel(ax, report) -> None:
    """Relative residual of each test (0 = covered), coloured by status, with the status written out."""
    res = np.array([t.relative_residual for t in report.tests])
    status = [
        ("covered, inside hull", "tab:green") if t.covered and t.in_convex_hull
        else ("covered, extrapolation", "tab:orange") if t.covered
        else ("not covered", "tab:red")
        for t in report.tests
    ]
    y = np.arange(len(res))
    colors = [c for _, c in status]
    ax.hlines(y, 0, res, colors=colors, lw=3)
    ax.scatter(res, y, c=colors, s=40, zorder=3)
    for yi, (text, color) in zip(y, status):
        ax.text(1.08, yi, text, va="center", fontsize=7, color=color)
    ax.set_yticks(y, [t.label for t in report.tests], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-0.05, 1.6)
    ax.set_xticks([0, 0.5, 1.0])
    ax.set_xlabel("relative residual (0 = covered)")
    ax.set_title("which tests the design covers", fontsize=9)


def design_figure(path: Path) -> None:
    names = ["A", "B", "C", "D", "E", "F"]
    planned = ["control", "A", "B", "C", "A+D", "B+E"]
    targets = ["A+B", "A:2", "A:0.5+C:0.5", "D", "D+E", "C+D", "F", "A+F"]
    report = theory.check_design(planned, targets, names=names, latent_dim=3)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [1, 1.4]})
    s = report.singular_values
    axes[0].bar(np.arange(1, s.size + 1), s, color="tab:blue")
    axes[0].axhline(report.tolerance, color="tab:red", ls="--", lw=1, label="rank tolerance")
    axes[0].set_xlabel("index")
    axes[0].set_ylabel("singular value of D")
    axes[0].set_title(f"design {', '.join(planned)}\nrank {report.rank} of K = {report.K}", fontsize=9)
    axes[0].legend(fontsize=7)
    coverage_panel(axes[1], report)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    adata, truth = pxd.simulate_additive_shift(
        n_perturbations=4, latent_dim=3, n_genes=30, n_cells=200, n_out_of_span=1, seed=0
    )
    split = pxd.split_from_column(adata, "perturbation", "control")
    train = split.train
    config = AdditiveShiftConfig(n_genes=train.n_genes, n_perturbations=train.K, latent_dim=3)
    result = fit("additive_shift", train, config=config, objective="energy", steps=args.steps, seed=0, progress=False)
    labels = [lab for lab in split.test_labels if truth.groups.get(lab) != "out-of-span"]
    pred = predict(result, labels, n_cells=200, num_samples=100, seed=0)
    control = train.dense(train.cells_of("control")).mean(0)

    shown = [lab for lab in labels if truth.groups[lab] == "double"][:2]
    shown += [lab for lab in labels if truth.groups[lab] == "dose-in-hull"][:1]
    shown += [lab for lab in labels if truth.groups[lab] == "dose-outside-hull"][:1]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.3), squeeze=False)
    for ax, lab in zip(axes.ravel(), shown):
        mean, lower, upper = pxd.prediction_intervals(pred, lab)
        plotting.plot_predicted_vs_observed(
            mean, lower, upper, truth.population_mean(lab), control=control, ax=ax, title=f"{lab} ({truth.groups[lab]})"
        )
    fig.suptitle("Held-out perturbations: predicted vs true mean change from control (90% intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "plot_predicted_vs_observed.png", dpi=DPI)
    plt.close(fig)

    lab = shown[0]
    mean, lower, upper = pxd.prediction_intervals(pred, lab)
    ax = plotting.plot_gene_intervals(
        mean, lower, upper, pred.var_names, observed=truth.population_mean(lab), control=control, top=15,
        title=f"{lab}: per-gene 90% intervals (x: true mean)",
    )
    ax.figure.tight_layout()
    ax.figure.savefig(OUT / "plot_gene_intervals.png", dpi=DPI)
    plt.close(ax.figure)

    info = result.info
    stop = "early stopping" if info["stop_reason"] == "early_stopping" else info["stop_reason"]
    ax = plotting.plot_loss(result.history, title=f"energy objective: {info['steps_run']} of {args.steps} steps ({stop})")
    ax.figure.tight_layout()
    ax.figure.savefig(OUT / "plot_loss.png", dpi=DPI)
    plt.close(ax.figure)

    design_figure(OUT / "plot_design.png")
    print("wrote", ", ".join(sorted(p.name for p in OUT.glob("plot_*.png"))))


if __name__ == "__main__":
    main()
