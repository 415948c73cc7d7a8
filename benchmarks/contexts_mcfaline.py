"""Context transfer on McFaline-Figueroa 2023 (DESIGN section 6, issue 19): a kinase knock-down
predicted in a glioblastoma line where it was never measured, the gene measured in the other lines.

Data: the CRISPRi cells of the PerturBench development file (``obs["dataset"] == "mcfaline23"``): 9
kinase genes + control (``obs["condition"]``) in 3 lines (``obs["cell_type"]``: A172, T98G, U87MG),
46-100 cells per (gene, line), 500 genes, log-normalised. Read with
``from_anndata(..., context_keys=["cell_type"])``, so each (gene, line) pair is a condition.

Protocol: the 27 (gene, line) pairs in 9 fits. With the genes sorted ``g_0..g_8`` and the lines
sorted ``l_0..l_2``, fit ``k`` holds out ``(g_{(k + 3j) mod 9}, l_j)`` for ``j = 0, 1, 2``: three
pairs of three different genes in three different lines, so every held-out gene stays measured in
the other two lines and every line keeps its control cells and 8 of its 9 genes; over the 9 fits
each pair is held out exactly once. Per fit: ``fit("additive_shift", train)`` with the package
defaults (nothing tuned), then ``predict(fit, pairs)`` with its defaults (each pair from its line's
control cells). Nothing is chosen on the held-out pairs.

Scored per pair (the helpers of the Norman benchmarks, :func:`perturbax.metrics.evaluate_conditions`):
energy distance (U-statistic) in 50 PCs fit on the fold's training cells; Pearson delta on the
top-20 DE genes (deltas and DE genes against the pair's line's control cells); coverage of the 90%
intervals of the per-gene mean changes on the top-50 DE genes (the line's control mean being fixed,
the same as the coverage of the per-gene means). Next to:

- additive (``AdditiveBaseline``): the line's control cells + the gene's mean effect in the other
  lines (mean over them of gene mean - control mean in that line);
- ridge (``LinearBaseline``, ``alpha="cv"``): least squares on the training condition means with
  indicator features for the gene and the line, penalty by leave-one-condition-out CV on the
  training conditions, the line's control cells moved to the predicted mean;
- the split-half noise floor of the held-out cells (``split_half_noise_floor``).

    .venv/bin/python benchmarks/contexts_mcfaline.py --folds 0,1,2,3,4,5,6,7,8 --out mcf.json
    .venv/bin/python benchmarks/contexts_mcfaline.py --report mcf.json   # the docs section + plot
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

KEY, CONTROL, CONTEXT, DATASET = "condition", "control", "cell_type", "mcfaline23"
N_FOLDS, TOP_DE, TOP_COVER, N_PCS, LEVEL = 9, 20, 50, 50, 0.9
PLOT = ROOT / "docs" / "contexts_mcfaline.png"
METHODS = ("model", "additive", "ridge", "floor")


def load(data_path=None):
    """The mcfaline23 cells of the development file, contexts by cell line."""
    import anndata as ad

    from perturbax.data import from_anndata
    from perturbax.data.datasets import NORMAN19_FILE, find_data_file
    from perturbax.data.io import select_where

    adata = select_where(ad.read_h5ad(find_data_file(NORMAN19_FILE, data_path)), {"dataset": [DATASET]})
    return from_anndata(adata, KEY, CONTROL, context_keys=[CONTEXT])


def held_out_pairs(data, k: int) -> list[str]:
    """The three (gene, line) pairs fit ``k`` holds out (module docstring), canonical labels."""
    genes = sorted(data.registry.perturbation_names)
    lines = sorted(dict(data.registry.contexts)[CONTEXT])
    if len(genes) != N_FOLDS or len(lines) != 3:
        raise ValueError(f"expected 9 genes x 3 lines, got {genes} x {lines}")
    return [data.registry.canonical(f"{genes[(k + 3 * j) % N_FOLDS]} @ {CONTEXT}={line}")
            for j, line in enumerate(lines)]


def run_fold(k: int, data_path=None, seed: int = 0, prov: dict | None = None) -> list[dict]:
    """The rows of fit ``k`` (``prov``: the :func:`provenance` of the run, taken when it started)."""
    from perturbax.baselines import AdditiveBaseline, LinearBaseline, split_half_noise_floor
    from perturbax.data import prediction_intervals
    from perturbax.inference import fit, predict
    from perturbax.metrics import evaluate_conditions
    from perturbax.metrics.expression import top_de_genes

    data = load(data_path)
    pairs = held_out_pairs(data, k)
    train = data.select(pairs, exclude=True)
    t0 = time.perf_counter()
    res = fit("additive_shift", train, seed=seed, progress=False)  # the package defaults
    t_fit = time.perf_counter() - t0
    pr = predict(res, pairs, seed=seed)
    ridge = LinearBaseline(alpha="cv").fit(train)
    baselines = {"additive": AdditiveBaseline().fit(train).predict(pairs), "ridge": ridge.predict(pairs)}
    reference = train.dense()
    sel = res.info["selection"]
    obs = {c: pr.obs[c].astype(str).to_numpy() for c in (KEY, CONTEXT)}
    X = np.asarray(pr.X)
    rows = []
    for pair in pairs:
        ctx = data.registry.context_of(data.registry.encode(pair))[CONTEXT]
        gene = data.registry.perturbation_label(pair)
        control = train.dense(train.cells_of(f"{CONTROL} @ {CONTEXT}={ctx}"))
        truth = data.dense(data.cells_of(pair))
        half = split_half_noise_floor(truth, seed=seed)
        preds = {"model": X[(obs[KEY] == gene) & (obs[CONTEXT] == ctx)], **{m: b[pair] for m, b in baselines.items()}}
        row = {"fold": k, "pair": pair, "gene": gene, "line": ctx, "n_true": int(truth.shape[0]),
               "n_pred": int(preds["model"].shape[0])}
        kw = dict(reference=reference, n_pcs=N_PCS, top_k=TOP_DE, energy_form="U")
        for name, cells in [*preds.items(), ("floor", None)]:
            p, t = (half[0], half[1]) if cells is None else (cells, truth)
            r = evaluate_conditions({pair: p}, {pair: t}, control, **kw).iloc[0]
            row[f"energy_{name}"] = float(r["energy_pca"])
            row[f"pdelta{TOP_DE}_{name}"] = float(r[f"pearson_delta_top{TOP_DE}"])
        t_mean = truth.astype(np.float64).mean(0)
        genes = top_de_genes(t_mean, control, TOP_COVER)
        _, lo, hi = prediction_intervals(pr, pair, level=LEVEL)
        row["coverage90"] = float(np.mean((lo[genes] <= t_mean[genes]) & (t_mean[genes] <= hi[genes])))
        row.update({"lambda": float(sel["lambda"]), "cells": sel["cells"],
                    "calibrated": bool(sel["calibration"]["calibrated"]), "ridge_alpha": float(ridge.fitted.info["alpha"]),
                    "fit_seconds": t_fit, "coverage_note": str(pr.uns["perturbax"]["coverage"]["message"][0]),
                    "provenance": prov or provenance()})
        rows.append(row)
    return rows


TIE = 1e-6  # metrics of float32 cells: equal means give values equal to ~1e-8, not exactly


def _record(margin: np.ndarray) -> tuple[int, int, int]:
    """``(wins, ties, losses)`` of positive, zero (to :data:`TIE`) and negative margins."""
    return int(np.sum(margin > TIE)), int(np.sum(abs(margin) <= TIE)), int(np.sum(margin < -TIE))


def summary(rows: list[dict]) -> dict:
    """Wins of the model (energy lower, Pearson delta higher) against each baseline, means, coverage."""
    e = {m: np.array([r[f"energy_{m}"] for r in rows]) for m in METHODS}
    p = {m: np.array([r[f"pdelta{TOP_DE}_{m}"] for r in rows]) for m in METHODS}
    return {
        "n": len(rows),
        "energy_mean": {m: float(v.mean()) for m, v in e.items()},
        "pdelta_mean": {m: float(v.mean()) for m, v in p.items()},
        # (wins, ties, losses) of the model; a tie: the same value to TIE (with lambda = 0 the nested
        # estimator's mean is the ridge baseline's)
        "energy_wins": {m: _record(e[m] - e["model"]) for m in ("additive", "ridge")},
        "pdelta_wins": {m: _record(p["model"] - p[m]) for m in ("additive", "ridge")},
        "coverage_mean": float(np.mean([r["coverage90"] for r in rows])),
        "coverage_in_band": int(sum(0.8 <= r["coverage90"] <= 0.95 for r in rows)),
    }


HEADLINE = (("model", "perturbax (defaults)"), ("additive", "additive (line control + mean effect in the other lines)"),
            ("ridge", "ridge with gene and line terms (CV alpha)"), ("floor", "split-half noise floor"))


def _headline_row(s: dict, m: str, label: str) -> str:
    cells = [label, f"{s['energy_mean'][m]:.3f}", f"{s['pdelta_mean'][m]:.3f}"]
    cells += ["/".join(map(str, s[w][m])) if m in s[w] else "" for w in ("energy_wins", "pdelta_wins")]
    cells.append(f"{s['coverage_mean']:.2f}" if m == "model" else "")
    return "| " + " | ".join(cells) + " |"


def report(rows: list[dict], command: str, note: str = "", idle: bool = False) -> str:
    rows = sorted(rows, key=lambda r: (r["gene"], r["line"]))
    s = summary(rows)
    n, folds = s["n"], sorted({r["fold"] for r in rows})
    partial = "" if n == 27 else (f" -- **partial: {n} of the 27 pairs ({len(folds)} of the 9 fits: {folds})**; the "
                                  "others not run for lack of CPU time.")
    lines = [
        "## Context transfer: McFaline-Figueroa 2023, one (gene, line) pair held out (issue 19)",
        "",
        f"Command: `{command}`{partial}",
        "",
        "Data: the CRISPRi cells of the PerturBench development file (`obs['dataset'] == 'mcfaline23'`): 9 kinase "
        "genes + control in 3 glioblastoma lines (A172, T98G, U87MG), 46-100 cells per group, 500 genes, "
        "log-normalised; contexts read with `context_keys=['cell_type']`. To keep the CPU cost at 9 fits instead of "
        "27, **each fit holds out 3 pairs**: with the genes sorted g_0..g_8 and the lines sorted, fit k holds out "
        "(g_(k mod 9), A172), (g_(k+3 mod 9), T98G), (g_(k+6 mod 9), U87MG): three different genes, each still "
        "measured in the other two lines, and every line keeps its control cells and 8 of its 9 genes; over the 9 "
        "fits each of the 27 pairs is held out exactly once. Model: `fit('additive_shift', train)` with the package "
        "defaults (nothing tuned: nested estimator, lambda and cell mode by in-span CV over the training pairs, "
        "conformal intervals), `predict(fit, 'GENE @ cell_type=LINE')` defaults (the line's control cells). "
        "Nothing is chosen on the held-out pairs.",
        "",
        f"Metrics per pair: energy distance (U-statistic, can be < 0) in {N_PCS} PCs fit on the fold's training "
        f"cells; Pearson delta on the top-{TOP_DE} DE genes (deltas and DE genes against the line's control cells); "
        f"coverage: the fraction of the top-{TOP_COVER} DE genes whose 90% interval of the mean change holds the "
        "observed one. Additive: the line's control cells + the gene's mean effect in the other two lines "
        "(`AdditiveBaseline`, each line's effect against its own control). Ridge: `LinearBaseline(alpha='cv')`, "
        "least squares on the training condition means with indicator features for gene and line, penalty by "
        "leave-one-condition-out CV on training conditions, the line's control cells moved to its predicted mean. "
        "Floor: one half of the held-out cells against the other (split-half noise floor).",
        "",
        "### Headline: mean over the held-out pairs",
        "",
        "| method | energy (50 PCs) | Pearson delta top-20 | model wins/ties/losses on energy | on Pearson delta "
        "| 90% coverage top-50 |",
        "|---|---:|---:|---|---|---:|",
        *[_headline_row(s, m, label) for m, label in HEADLINE],
        "",
        "### Per pair",
        "",
        "| pair | fit | cells | energy model | additive | ridge | floor | Pearson delta top-20 model | additive | "
        "ridge | floor | 90% coverage top-50 | lambda | cells mode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        e = " | ".join(f"{r[f'energy_{m}']:.3f}" for m in METHODS)
        p = " | ".join(f"{r[f'pdelta{TOP_DE}_{m}']:.3f}" for m in METHODS)
        lines.append(f"| {r['pair']} | {r['fold']} | {r['n_true']} | {e} | {p} | {r['coverage90']:.2f} | "
                     f"{r['lambda']:g} | {r['cells']} |")
    em, pm = s["energy_mean"], s["pdelta_mean"]
    lines.append("| **mean** | | | " + " | ".join(f"{em[m]:.3f}" for m in METHODS) + " | "
                 + " | ".join(f"{pm[m]:.3f}" for m in METHODS) + f" | {s['coverage_mean']:.2f} | | |")
    fit_s = {r["fold"]: r["fit_seconds"] for r in rows}
    ew, pw = s["energy_wins"], s["pdelta_wins"]
    beats = {m: ew[m][0] > n / 2 for m in ("additive", "ridge")}
    verdict = (f"The model {'beats' if beats['additive'] else 'does **not** beat'} the additive baseline and "
               f"{'beats' if beats['ridge'] else 'does **not** beat'} the ridge baseline on energy on most pairs"
               + (f"; on {ew['ridge'][1]} pair(s) it ties the ridge baseline's energy (lambda = 0 chosen: the nested "
                  "estimator's mean is the ridge mean)" if ew["ridge"][1] else "")
               + (f"; it ties the ridge baseline's Pearson delta on {pw['ridge'][1]} pair(s) (lambda = 0: the same mean)"
                  if pw["ridge"][1] else "") + ".")
    lines += [
        "",
        f"**Summary ({n} pairs; wins/ties/losses of the model, a tie: equal to {TIE:g}):** energy distance vs additive "
        f"{'/'.join(map(str, ew['additive']))}, vs ridge {'/'.join(map(str, ew['ridge']))} (means model "
        f"{em['model']:.3f}, additive {em['additive']:.3f}, ridge {em['ridge']:.3f}, floor {em['floor']:.3f}); "
        f"Pearson delta top-20 vs additive {'/'.join(map(str, pw['additive']))}, vs ridge "
        f"{'/'.join(map(str, pw['ridge']))} (means {pm['model']:.3f} / {pm['additive']:.3f} / {pm['ridge']:.3f}); "
        f"mean 90% coverage {s['coverage_mean']:.2f} (in 0.80-0.95 on {s['coverage_in_band']} of {n}). " + verdict,
        "",
        f"Fit time with the defaults (CV fits + final fit): {np.mean(list(fit_s.values())):.0f} s per fit "
        f"(min {min(fit_s.values()):.0f}, max {max(fit_s.values()):.0f}) on the 2-core CPU machine, "
        + ("otherwise idle during the fits" if idle else "**shared** with other jobs during the run (wall times inflated)")
        + ". Ridge alpha chosen per fit: "
        + ", ".join(f"{k}: {a:g}" for k, a in sorted({r['fold']: r['ridge_alpha'] for r in rows}.items()))
        + f". Coverage note of a prediction: \"{_first_sentence(rows[0]['coverage_note'])}\"",
        "",
        f"![model against the baselines per pair]({PLOT.name})",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _first_sentence(text: str, limit: int = 300) -> str:
    cut = text.find(". ")
    return text[: cut + 1] if 0 < cut < limit else text[:limit] + ("..." if len(text) > limit else "")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (metric, title) in zip(axes, [("energy", "energy distance (50 PCs)"),
                                          (f"pdelta{TOP_DE}", f"Pearson delta top-{TOP_DE}")]):
        model = np.array([r[f"{metric}_model"] for r in rows])
        for base, mark in (("additive", "o"), ("ridge", "s")):
            ax.scatter([r[f"{metric}_{base}"] for r in rows], model, marker=mark, s=18, alpha=0.7, label=base)
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel(f"baseline {title}")
        ax.set_ylabel(f"perturbax {title}")
        ax.set_title(title + (" (lower is better)" if metric == "energy" else " (higher is better)"), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("McFaline-Figueroa 2023: held-out (gene, line) pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default=",".join(str(k) for k in range(N_FOLDS)), help="Comma-separated fits 0-8.")
    ap.add_argument("--data", default=None, help="Path of perturbench_devel_norman19_mcfaline23.h5ad.")
    ap.add_argument("--out", default=None, help="Write the per-pair rows as JSON (after every fit).")
    ap.add_argument("--report", nargs="*", default=None, help="JSON result files: write the docs section and plot.")
    ap.add_argument("--command", default=None, help="The command to quote in the section (with --report).")
    ap.add_argument("--note", default="", help="--report: a paragraph added to the section (what the run showed).")
    ap.add_argument("--idle", action="store_true", help="--report: the fits had the machine to themselves.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.report is not None:
        rows = [r for f in args.report for r in json.loads(_Path(f).read_text())]
        plot(rows)
        text = report(rows, args.command or "benchmarks/contexts_mcfaline.py", args.note, args.idle)
        write_section("contexts-mcfaline", text, sources=[_Path(__file__)], produced=common_provenance(rows))
        print(text)
        return 0
    rows, prov = [], provenance()  # the code as the run started (later commits do not change what runs)
    for k in [int(a) for a in args.folds.split(",")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fold = run_fold(k, args.data, seed=args.seed, prov=prov)
        rows += fold
        for r in fold:
            print(json.dumps({key: v for key, v in r.items() if key not in ("coverage_note", "provenance")}), flush=True)
        if args.out:
            _Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
