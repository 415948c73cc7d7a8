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

import perturbax.data as pxd  # noqa: E402
from perturbax import plotting, theory  # noqa: E402
from perturbax.inference import fit, predict  # noqa: E402
from perturbax.models import AdditiveShiftConfig  # noqa: E402

OUT = Path(__file__).resolve().parent
DPI = 100


def design_figure(path: Path) -> None:
    names = ["A", "B", "C", "D", "E", "F"]
    planned = ["control", "A", "B", "C", "A+D", "B+E"]
    targets = ["A+B", "A:2", "A:0.5+C:0.5", "D", "D+E", "C+D", "F", "A+F"]
    report = theory.check_design(planned, targets, names=names, latent_dim=3)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [1, 1.4]})
    plotting.plot_design_spectrum(report, ax=axes[0], title=f"design {', '.join(planned)}\nrank {report.rank} of K = {report.K}")
    plotting.plot_design_coverage(report, ax=axes[1])
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
