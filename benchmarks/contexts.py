"""Context transfer on Kang 2018 (DESIGN section 6, issue 19): predict IFN-beta stimulation in a
cell type where it was never measured.

For each of the 7 cell types T: train on every cell but the stimulated cells of T (its control
cells kept), read with ``from_anndata(..., context_keys=["cell_type"])`` so each (condition, cell
type) pair is a condition; ``fit("additive_shift", train)`` with the package defaults (nested
estimator, selection by in-span CV over the training pairs, conformal intervals); then
``predict(fit, "stimulated @ cell_type=T")`` with its defaults (source: T's control cells).
Scored on T's top-100 DE genes (``|mean(stimulated T) - mean(control T)|``):

- R^2 of the mean change (``1 - SS(pred change - true change) / SS(true change - its mean)``,
  changes from T's control mean) next to the naive baseline: T's control mean + the mean
  stimulation shift of the other 6 types;
- the scGen-style number: squared Pearson correlation of predicted and observed mean expression;
- coverage of the 90% intervals of the per-gene means (equivalently of the mean changes, T's control
  mean being fixed): the fraction of the 100 genes whose interval holds the observed mean;
- the fit time.

    .venv/bin/python benchmarks/contexts.py --types CD4T --out kang_CD4T.json
    .venv/bin/python benchmarks/contexts.py --report kang_*.json   # writes docs/benchmarks.md + the plot

Nothing is chosen on the held-out pair.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import ROOT, common_provenance, provenance, write_section  # noqa: E402

import argparse
import json
import time
import warnings

import numpy as np

DATA = ROOT.parent / "shared" / "data" / "kang2018_pbmc_ifnb_scgen_valid.h5ad"
KEY, CONTROL, STIM, CONTEXT = "condition", "control", "stimulated", "cell_type"
TOP = 100
PLOT = ROOT / "docs" / "contexts_kang.png"


def r2(pred: np.ndarray, true: np.ndarray) -> float:
    """``1 - SS(pred - true) / SS(true - mean(true))``."""
    return float(1.0 - np.sum((pred - true) ** 2) / np.sum((true - true.mean()) ** 2))


def run_type(cell_type: str, data_path=DATA, seed: int = 0) -> dict:
    import anndata as ad

    from perturbax.data import from_anndata
    from perturbax.inference import fit, predict
    from perturbax.metrics.expression import top_de_genes

    data = from_anndata(ad.read_h5ad(data_path), KEY, CONTROL, context_keys=[CONTEXT])
    label = data.registry.canonical(f"{STIM} @ {CONTEXT}={cell_type}")
    train = data.select([label], exclude=True)
    t0 = time.perf_counter()
    res = fit("additive_shift", train, seed=seed, progress=False)  # the package defaults
    t_fit = time.perf_counter() - t0
    pr = predict(res, label, seed=seed)
    mean = np.asarray(pr.varm["pred_mean"], dtype=np.float64)[:, 0]
    lower = np.asarray(pr.varm["pred_lower"], dtype=np.float64)[:, 0]
    upper = np.asarray(pr.varm["pred_upper"], dtype=np.float64)[:, 0]

    def mean_of(lab: str) -> np.ndarray:
        return data.dense(data.cells_of(lab)).astype(np.float64).mean(0)

    types = [c for c in dict(data.registry.contexts)[CONTEXT]]
    ctrl = mean_of(f"{CONTROL} @ {CONTEXT}={cell_type}")
    truth = mean_of(label)
    shifts = [mean_of(f"{STIM} @ {CONTEXT}={t}") - mean_of(f"{CONTROL} @ {CONTEXT}={t}") for t in types if t != cell_type]
    naive = ctrl + np.mean(shifts, axis=0)
    genes = top_de_genes(truth, ctrl, TOP)
    true_change = (truth - ctrl)[genes]
    sel = res.info["selection"]
    return {
        "cell_type": cell_type,
        "n_stimulated": int(data.cells_of(label).size),
        "r2_change": r2((mean - ctrl)[genes], true_change),
        "r2_change_naive": r2((naive - ctrl)[genes], true_change),
        "r2_means": float(np.corrcoef(mean[genes], truth[genes])[0, 1] ** 2),
        "r2_means_naive": float(np.corrcoef(naive[genes], truth[genes])[0, 1] ** 2),
        "coverage90": float(np.mean((lower[genes] <= truth[genes]) & (truth[genes] <= upper[genes]))),
        "lambda": float(sel["lambda"]),
        "cells": sel["cells"],
        "calibrated": bool(sel["calibration"]["calibrated"]),
        "held_out_cv": sel["held_out"],
        "coverage_note": str(pr.uns["perturbax"]["coverage"]["message"][0]),
        "fit_seconds": t_fit,
        "provenance": provenance(),
    }


def report(records: list[dict], command: str, note: str = "") -> str:
    records = sorted(records, key=lambda r: r["cell_type"])
    n = len(records)
    wins = sum(r["r2_change"] > r["r2_change_naive"] for r in records)
    lines = [
        "## Context transfer: Kang 2018, one cell type's stimulation held out (issue 19)",
        "",
        f"Command: `{command}`" + ("" if n == 7 else f" -- **partial: {n} of the 7 cell types** (the others not run "
                                                     f"for lack of CPU time)."),
        "",
        *([note, ""] if note else []),
        "Each row: trained on all cells but the stimulated cells of that type (its control cells kept), contexts "
        "read with `context_keys=['cell_type']`, `fit('additive_shift', train)` with the package defaults (nested "
        "estimator, CV over training (condition, cell type) pairs, conformal intervals), `predict(fit, "
        "'stimulated @ cell_type=T')` from T's control cells. Top-100 DE genes of T. Naive: T's control mean + the "
        "mean stimulation shift of the other types. R^2 change: of the mean change from T's control; R^2 means: "
        "squared Pearson of the mean expression (scGen-style); coverage: 90% intervals of the per-gene means "
        "holding the observed mean.",
        "",
        "| cell type | stimulated cells | R^2 change (model) | R^2 change (naive) | R^2 means (model) | R^2 means (naive) "
        "| 90% coverage | lambda | cells | fit time (s) | code (commit) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['cell_type']} | {r['n_stimulated']} | {r['r2_change']:.3f} | {r['r2_change_naive']:.3f} | "
            f"{r['r2_means']:.3f} | {r['r2_means_naive']:.3f} | {r['coverage90']:.2f} | {r['lambda']:g} | "
            f"{r['cells']} | {r['fit_seconds']:.0f} | {(r.get('provenance') or {}).get('commit', 'unknown')} |"
        )
    mean = {k: float(np.mean([r[k] for r in records])) for k in ("r2_change", "r2_change_naive", "r2_means",
                                                                   "r2_means_naive", "coverage90")}
    lines += [
        f"| **mean** | | {mean['r2_change']:.3f} | {mean['r2_change_naive']:.3f} | {mean['r2_means']:.3f} | "
        f"{mean['r2_means_naive']:.3f} | {mean['coverage90']:.2f} | | | | |",
        "",
        f"### Headline: mean over the {n} held-out cell type(s) run" + ("" if n == 7 else " (partial)"),
        "",
        "| method | R^2 of the mean change (top-100 DE) | R^2 of the means (scGen-style) | 90% coverage | "
        "above naive (R^2 change) |",
        "|---|---:|---:|---:|---:|",
        f"| perturbax (defaults) | {mean['r2_change']:.3f} | {mean['r2_means']:.3f} | {mean['coverage90']:.2f} | "
        f"{wins} of {n} |",
        f"| naive (control + other types' shift) | {mean['r2_change_naive']:.3f} | {mean['r2_means_naive']:.3f} | | |",
        "",
        f"Model above the naive baseline (R^2 of the mean change) on {wins} of {n} type(s) run; target: >= 5 of 7, "
        f"coverage 0.80-0.95. Plot: `docs/{PLOT.name}`. Coverage note of the prediction: "
        f"\"{records[0]['coverage_note'][:160]}...\"",
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["cell_type"])
    x = np.arange(len(records))
    fig, ax = plt.subplots(figsize=(1.2 * len(records) + 2, 3.2))
    ax.bar(x - 0.2, [r["r2_change"] for r in records], 0.4, label="perturbax (defaults)")
    ax.bar(x + 0.2, [r["r2_change_naive"] for r in records], 0.4, label="naive (control + other types' shift)")
    ax.set_xticks(x, [r["cell_type"] for r in records])
    ax.set_ylabel("R^2 of mean change, top-100 DE")
    ax.set_title("Kang 2018: stimulation of a held-out cell type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=None, help="Comma-separated cell types (default: all 7).")
    ap.add_argument("--out", default=None, help="Write the per-type results as JSON.")
    ap.add_argument("--report", nargs="*", default=None, help="JSON result files: write the docs section and plot.")
    ap.add_argument("--command", default=None, help="The command to quote in the section (with --report).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="A paragraph on how the run went (with --report).")
    args = ap.parse_args()
    if args.report is not None:
        records = [r for f in args.report for r in json.loads(_Path(f).read_text())]
        plot(records)
        text = report(records, args.command or "benchmarks/contexts.py", args.note)
        produced = common_provenance(records)
        if "unknown" in (produced["commit"], produced["library"]):  # rows of several runs: stamp the newest
            produced = records[-1].get("provenance") or produced  # (the note and the commit column say which)
        write_section("contexts-kang", text, sources=[_Path(__file__)], produced=produced)
        print(text)
        return
    import anndata as ad

    types = args.types.split(",") if args.types else sorted(ad.read_h5ad(DATA).obs[CONTEXT].astype(str).unique())
    records = []
    for t in types:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = run_type(t, seed=args.seed)
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("held_out_cv", "coverage_note", "provenance")}),
              flush=True)
        if args.out:
            _Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
