"""The package defaults on ``norman-doubles`` (DESIGN section 6, issue 17): the headline.

For each of the 5 folds: ``fit("additive_shift", train)`` with no tuning argument (so the
nested estimator, its selection by in-span CV over the *training* conditions and its conformal
interval calibration are what ``fit`` does by default), then ``predict(fit, doubles)`` with its
defaults. Scored on the in-span doubles (both singles measured, ``combo_seen2``; one per fold):
energy distance (U-statistic, 50 PCs of the fold's training cells) next to the linear baseline
(ridge penalty chosen by leave-one-condition-out CV on training conditions) and the split-half
noise floor; Pearson delta on the top-20 DE genes; the per-gene SD ratio (median over the top-50 DE
genes of SD(predicted) / SD(observed)); coverage of the 90% intervals of the per-gene means on the top-50
DE genes, and the reliability at 50/80/90/95%; what the selection chose and the time per fold.
Nothing is chosen on the held-out doubles.

    .venv/bin/python benchmarks/norman_defaults.py --folds 0,1,2,3,4 --out results.json
    .venv/bin/python benchmarks/norman_defaults.py --report results.json   # writes docs/benchmarks.md

Several ``--out`` files (e.g. one per fold run in parallel) can be passed to ``--report``.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import common_provenance, provenance, write_section  # noqa: E402

import argparse
import json
import time
import warnings

import numpy as np

LEVELS = (0.5, 0.8, 0.9, 0.95)


def run_fold(k: int, data_path=None, seed: int = 0) -> list[dict]:
    from perturbax.baselines import LinearBaseline, split_half_noise_floor
    from perturbax.data import from_anndata
    from perturbax.data.datasets import NORMAN19_CONTROL, NORMAN19_PERTURBATION_KEY, load_norman19
    from perturbax.data.splits import norman_doubles_folds
    from perturbax.inference import fit, predict
    from perturbax.data import prediction_intervals
    from perturbax.metrics import evaluate_conditions
    from perturbax.metrics.expression import top_de_genes

    data = from_anndata(load_norman19(data_path), NORMAN19_PERTURBATION_KEY, NORMAN19_CONTROL)
    split = norman_doubles_folds(data, 5)[k]
    train = split.train
    tests = [c for c in split.test_labels if split.test_groups[c] == "combo_seen2"]
    if not tests:
        return []
    t0 = time.perf_counter()
    res = fit("additive_shift", train, progress=False)  # the package defaults
    t_fit = time.perf_counter() - t0
    pr = predict(res, tests)
    labels = list(pr.uns["perturbax"]["labels"])
    obs = pr.obs[res.perturbation_key].astype(str).to_numpy()
    X = np.asarray(pr.X)
    pred = {c: X[obs == c] for c in tests}
    test = split.test.cells_by_condition()
    truth = {c: test[c] for c in tests}
    control = train.dense(train.cells_of(train.control))
    kw = dict(reference=train.dense(), n_pcs=50, top_k=20, energy_form="U")
    lin = LinearBaseline(alpha="cv", unmeasured="zero").fit(train)
    halves = {c: split_half_noise_floor(x, seed=seed) for c, x in truth.items()}
    tables = {
        "model": evaluate_conditions(pred, truth, control, **kw),
        "linear": evaluate_conditions(lin.predict(tests), truth, control, **kw),
        "noise_floor": evaluate_conditions({c: h[0] for c, h in halves.items()}, {c: h[1] for c, h in halves.items()},
                                           control, **kw),
    }
    sel = res.info.get("selection", {})
    rows = []
    for c in tests:
        t_mean = truth[c].astype(np.float64).mean(0)
        genes = top_de_genes(t_mean, control, 50)
        bounds = {a: prediction_intervals(pr, c, level=a)[1:] for a in LEVELS}
        cover = {str(a): float(np.mean((t_mean[genes] >= lo[genes]) & (t_mean[genes] <= hi[genes])))
                 for a, (lo, hi) in bounds.items()}
        sd_t = truth[c].std(0)  # (most of the 500 genes are 0 in every cell of a condition: top-50 DE genes)
        sd_ratio = float(np.median(pred[c][:, genes].std(0) / np.maximum(sd_t[genes], 1e-8)))
        row = {"fold": k, "condition": c, "fit_seconds": t_fit, "cv_seconds": sel.get("cv_seconds"),
               "lambda": sel.get("lambda"), "cells": sel.get("cells"), "alpha": sel.get("alpha"),
               "held_out_cv": sel.get("held_out"), "cv_scores": sel.get("cv_scores"),
               "q": sel.get("calibration", {}).get("factor"), "coverage": cover, "sd_ratio": sd_ratio,
               "top50": {"truth": t_mean[genes].tolist(),
                         **{str(a): [lo[genes].tolist(), hi[genes].tolist()] for a, (lo, hi) in bounds.items()}}}
        for name, t in tables.items():
            r = t.loc[t["condition"] == c].iloc[0]
            row[f"energy_{name}"] = float(r["energy_pca"])
            row[f"pdelta20_{name}"] = float(r["pearson_delta_top20"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict], produced: dict, doc, note: str = "") -> str:
    import pandas as pd

    df = pd.DataFrame(rows).sort_values("fold")
    lines = [
        "## norman-doubles with the package defaults (issue 17)",
        "",
        "`fit(\"additive_shift\", train)` with no tuning argument, then `predict(fit, doubles)` (defaults): the "
        "nested estimator (ridge linear path + lambda x the model's nonlinear remainder), lambda and the cell "
        "mode chosen by in-span CV over the training conditions inside `fit` (the smallest lambda within one "
        "paired standard error of the best CV score), intervals calibrated on the "
        "held-out training conditions. Scored on the 5 in-span doubles (both singles measured; fold 0 holds "
        "two, fold 1 none); nothing is chosen on them. "
        "Command: `.venv/bin/python benchmarks/norman_defaults.py --folds 0,1,2,3,4 --out r.json` then "
        "`--report r.json`.",
        "",
        "| fold | double | energy model | energy linear (CV alpha) | energy floor | Pearson delta top-20 model "
        "| linear | SD ratio | 90% coverage top-50 | lambda | cells | fit s (incl. CV) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in df.iterrows():
        lines.append(
            f"| {r['fold']} | {r['condition']} | {r['energy_model']:.4f} | {r['energy_linear']:.4f} | "
            f"{r['energy_noise_floor']:.4f} | {r['pdelta20_model']:.3f} | {r['pdelta20_linear']:.3f} | "
            f"{r['sd_ratio']:.3f} | {r['coverage']['0.9']:.2f} | {r['lambda']:g} | {r['cells']} | "
            f"{r['fit_seconds']:.0f} |"
        )
    cov = pd.DataFrame([r["coverage"] for r in rows])
    lines += [
        "",
        f"Mean over the {len(df)} doubles: energy model {df['energy_model'].mean():.4f}, linear "
        f"{df['energy_linear'].mean():.4f}, floor {df['energy_noise_floor'].mean():.4f}; Pearson delta top-20 "
        f"model {df['pdelta20_model'].mean():.3f}, linear {df['pdelta20_linear'].mean():.3f}; SD ratio "
        f"{df['sd_ratio'].mean():.3f}; fit time per fold (3 fits: 2 CV folds + final) "
        f"{df.groupby('fold')['fit_seconds'].first().mean():.0f} s on the shared 2-core machine.",
        "",
        "Reliability of the intervals of per-gene means (top-50 DE genes, pooled over doubles; nominal -> "
        "empirical): " + ", ".join(f"{float(a):.0%} -> {cov[a].mean():.2f}" for a in sorted(cov.columns, key=float)),
        "",
        "CV energy on held-out training conditions (mean per (lambda, cells)), per fold:",
        "",
    ]
    for k, g in df.groupby("fold"):
        r = g.iloc[0]
        cv = ", ".join(f"{s['lambda']:g}/{s['cells'][:3]} {s['energy']:.4f}" for s in r["cv_scores"] or [])
        lines.append(f"- fold {k} (held out {r['held_out_cv']}, ridge alpha {r['alpha']:g}): {cv}")
    e_m, e_l = df["energy_model"], df["energy_linear"]
    lines += [
        "",
        f"Against the targets of issue 17: energy at or below linear on {int((e_m <= e_l + 1e-12).sum())} of "
        f"{len(df)} doubles (mean {e_m.mean():.4f} vs {e_l.mean():.4f}); Pearson delta top-20 >= 0.95 on "
        f"{int((df['pdelta20_model'] >= 0.95).sum())} of {len(df)} (linear: "
        f"{int((df['pdelta20_linear'] >= 0.95).sum())}); SD ratio within 10% of 1 on {int((abs(df['sd_ratio'] - 1) <= 0.1).sum())} of {len(df)}; 90% "
        f"coverage in 0.85-0.95 on {int(cov['0.9'].between(0.85, 0.95).sum())} of {len(df)}; lambda = 0 (the "
        f"ridge baseline's mean) chosen on {int((df.groupby('fold')['lambda'].first() == 0).sum())} of "
        f"{df['fold'].nunique()} folds.",
    ]
    if note:
        lines += ["", note]
    if all("top50" in r for r in rows):  # the reliability diagram, pooled over the doubles
        import matplotlib

        matplotlib.use("Agg")
        from perturbax.plotting import plot_reliability

        truth = np.concatenate([r["top50"]["truth"] for r in rows])
        intervals = {float(a): tuple(np.concatenate([r["top50"][a][j] for r in rows]) for j in (0, 1))
                     for a in rows[0]["top50"] if a != "truth"}
        ax = plot_reliability(intervals, truth, label="package defaults",
                              title="norman-doubles, in-span doubles: top-50 DE gene means")
        png = _Path(doc).parent / "plot_reliability_norman.png"
        ax.figure.savefig(png, dpi=110, bbox_inches="tight")
        lines += ["", f"![reliability of the intervals on the in-span Norman doubles]({png.name})"]
    section = "\n".join(lines) + "\n"
    write_section("norman_defaults", section, _Path(doc), sources=[__file__], produced=produced)
    return section


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="JSON file for the rows of this run")
    ap.add_argument("--report", nargs="+", default=None, help="JSON files of earlier runs: write the docs section")
    ap.add_argument("--note", default="", help="--report: a paragraph added to the section (e.g. how the run was timed)")
    ap.add_argument("--doc", default=str(_Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    if args.report:
        records = [json.loads(_Path(p).read_text()) for p in args.report]
        rows = [r for rec in records for r in rec["rows"]]
        print(report(rows, common_provenance(records), args.doc, args.note))
        return 0
    prov = provenance()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k in [int(a) for a in args.folds.split(",")]:
            rows += run_fold(k, args.data)
    if args.out:
        _Path(args.out).write_text(json.dumps({"provenance": prov, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
