"""Baselines on the ``norman-doubles`` protocol (DESIGN section 6).

Norman et al. 2019 (PerturBench development subset: control + 18 singles + 15 doubles, ~100
cells each, 500 HVGs, log1p). Five folds over the doubles (sorted; fold k holds out index i with
i % 5 == k); train on control + singles + the other doubles. For every held-out double: energy
distance (U-statistic) in a 50-PC space fit on the fold's training cells, Pearson delta (all
genes, top-20 DE), R^2 and MSE on the top-20 DE genes, for the control, pooled-mean, additive
and linear baselines and the split-half noise floor. Doubles with both singles measured
(``combo_seen2``, 5 of them) are reported apart from the other 10 (``combo_seen0/1``: a gene
never measured alone, outside the span of the training labels).

Prints the tables and replaces the section between ``<!-- baselines:start -->`` and
``<!-- baselines:end -->`` in docs/benchmarks.md (created if absent).

    .venv/bin/python benchmarks/baselines.py
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import write_section  # noqa: E402

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

from perturbax.baselines import (
    AdditiveBaseline,
    ControlBaseline,
    LinearBaseline,
    PooledMeanBaseline,
    split_half_noise_floor,
)
from perturbax.cli.evaluate import markdown_table, summary_table, text_table
from perturbax.data import from_anndata
from perturbax.data.datasets import NORMAN19_CONTROL, NORMAN19_PERTURBATION_KEY, load_norman19
from perturbax.data.splits import norman_doubles_folds
from perturbax.metrics import evaluate_conditions

REPO = Path(__file__).resolve().parents[1]
METHOD_ORDER = ["control", "pooled_mean", "additive", "linear", "noise_floor"]
SUBSET = {"combo_seen2": "both singles measured", "combo_seen1": "other", "combo_seen0": "other"}


def run(*, data_path=None, n_folds=5, n_pcs=50, top_k=20, alpha="cv", seed=0) -> pd.DataFrame:
    adata = load_norman19(data_path)
    data = from_anndata(adata, NORMAN19_PERTURBATION_KEY, NORMAN19_CONTROL)
    folds = norman_doubles_folds(data, n_folds)
    methods = [
        ControlBaseline(),
        PooledMeanBaseline(),
        AdditiveBaseline(unmeasured="zero"),
        LinearBaseline(alpha=alpha, unmeasured="zero"),
    ]
    tables, linear_alpha = [], []
    for k, split in enumerate(folds):
        train = split.train
        control = train.dense(train.cells_of(train.control))
        reference = train.dense()
        test = split.test.cells_by_condition()
        truth = {c: test[c] for c in split.test_labels}
        kw = dict(reference=reference, n_pcs=n_pcs, top_k=top_k, energy_form="U")
        fold_tables = []
        for m in methods:
            fitted = m.fit(train)
            if isinstance(fitted, LinearBaseline):
                linear_alpha.append(fitted.fitted.info["alpha"])
            pred = fitted.predict(split.test_labels)
            with warnings.catch_warnings():
                # A zero predicted delta (control; additive/linear when no gene of the double is
                # known) makes Pearson delta undefined: NaN, counted in the n_pearson column.
                warnings.filterwarnings("ignore", message="Pearson correlation", category=RuntimeWarning)
                fold_tables.append(evaluate_conditions(pred, truth, control, method=m.name, **kw))
        halves = {c: split_half_noise_floor(x, seed=seed) for c, x in truth.items()}
        fold_tables.append(
            evaluate_conditions(
                {c: h[0] for c, h in halves.items()}, {c: h[1] for c, h in halves.items()}, control,
                method="noise_floor", **kw,
            )
        )
        for t in fold_tables:
            tables.append(t.assign(fold=k, group=[split.test_groups[c] for c in t["condition"]]))
    table = pd.concat(tables, ignore_index=True)
    table["subset"] = table["group"].map(SUBSET)
    table["method"] = pd.Categorical(table["method"], categories=METHOD_ORDER, ordered=True)
    cols = ["method", "fold", "subset", "group", "condition", "n_pred", "n_true"]
    table = table[cols + [c for c in table.columns if c not in cols]]
    table = table.sort_values(["method", "fold", "condition"], kind="stable").reset_index(drop=True)
    table.attrs["linear_alpha"] = linear_alpha
    return table


def _with_counts(summary: pd.DataFrame, table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Insert ``n_pearson``: how many doubles of each group have a defined Pearson delta."""
    counts = table.groupby(by, sort=False)["pearson_delta"].count().rename("n_pearson").reset_index()
    out = summary.merge(counts, on=by, how="left")
    cols = list(summary.columns)
    cols.insert(cols.index("n") + 1, "n_pearson")
    return out[cols]


def _metrics_view(df: pd.DataFrame, top_k: int) -> pd.DataFrame:
    keep = [c for c in df.columns if c in ("method", "fold", "subset", "n", "n_pearson")] + [
        "energy_pca", "pearson_delta", f"pearson_delta_top{top_k}", f"r2_top{top_k}", f"mse_top{top_k}",
    ]
    out = df[keep].copy()
    if "method" in out:
        out["method"] = out["method"].astype(str)
    return out


def tables(table: pd.DataFrame, top_k: int) -> dict[str, pd.DataFrame]:
    t = table.copy()
    t["method"] = t["method"].astype(str)
    t_subset = t.sort_values(["subset", "method"], key=_sorter, kind="stable")
    by_subset = _with_counts(summary_table(t_subset, by=("subset", "method")), t_subset, ["subset", "method"])
    t_all = t.assign(subset=f"all {t['condition'].nunique()} doubles")
    overall = _with_counts(summary_table(t_all, by=("subset", "method")), t_all, ["subset", "method"])
    t_fold = t.sort_values(["fold", "method"], key=_sorter, kind="stable")
    per_fold = _with_counts(summary_table(t_fold, by=("fold", "method")), t_fold, ["fold", "method"])
    per_double = t[["method", "fold", "group", "condition", "energy_pca", "pearson_delta",
                    f"pearson_delta_top{top_k}", f"r2_top{top_k}", f"mse_top{top_k}"]]
    return {
        "mean": _metrics_view(pd.concat([by_subset, overall], ignore_index=True), top_k),
        "per_fold": _metrics_view(per_fold, top_k),
        "per_double": per_double.sort_values(["condition", "method"], key=_sorter, kind="stable"),
    }


def _sorter(col: pd.Series) -> pd.Series:
    if col.name == "method":
        return col.map({m: i for i, m in enumerate(METHOD_ORDER)})
    if col.name == "subset":
        return col.map({"both singles measured": 0, "other": 1}).fillna(2)
    return col



def _alpha(text: str):
    return "cv" if text == "cv" else float(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="path of perturbench_devel_norman19_mcfaline23.h5ad")
    ap.add_argument("--n-pcs", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--alpha", type=_alpha, default="cv",
                    help="ridge penalty of the linear baseline, or 'cv' (chosen on each fold's training conditions)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split-half noise floor")
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--csv", default=None, help="also write the per-double table as CSV")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    table = run(data_path=args.data, n_pcs=args.n_pcs, top_k=args.top_k, alpha=args.alpha, seed=args.seed)
    elapsed = time.perf_counter() - t0
    tabs = tables(table, args.top_k)
    print("Mean over held-out doubles:\n" + text_table(tabs["mean"]))
    print("\nPer fold (mean over the fold's held-out doubles):\n" + text_table(tabs["per_fold"]))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.no_doc:
        return 0

    cmd = ".venv/bin/python benchmarks/baselines.py" + "".join(
        f" {flag} {val}" for flag, val, default in [
            ("--n-pcs", args.n_pcs, 50), ("--top-k", args.top_k, 20), ("--alpha", args.alpha, "cv"),
            ("--seed", args.seed, 0),
        ] if val != default
    )
    if args.alpha == "cv":
        chosen = ", ".join(f"{a:g}" for a in table.attrs["linear_alpha"])
        alpha_text = (f"Its penalty is chosen per fold by leave-one-condition-out cross-validation over the fold's "
                      f"training conditions that lie in the span of the others (`LinearBaseline()`, the "
                      f"default `alpha=\"cv\"`); chosen per fold: {chosen}.")
    else:
        alpha_text = f"Penalty alpha = {args.alpha} (set by hand)."
    seen2 = sorted(table.loc[table["group"] == "combo_seen2", "condition"].unique())
    other = sorted(table.loc[table["group"] != "combo_seen2", "condition"].unique())
    k = args.top_k
    section = f"""## Baselines on norman-doubles

Command (from the repository root, in the project venv): `{cmd}` (took {elapsed:.0f} s on a shared
2-core CPU machine).

Data: `../shared/data/perturbench_devel_norman19_mcfaline23.h5ad`, cells with
`obs["dataset"] == "norman19"` (control + 18 singles + 15 doubles, ~100 cells each, 500 HVGs,
log1p-normalised). Five folds over the 15 doubles sorted by label (fold k holds out index i with
i % 5 == k); training = control + singles + the other 12 doubles. Per held-out double: energy
distance (unbiased U-statistic, can be < 0) in a {args.n_pcs}-PC space fit on the fold's training cells,
Pearson correlation of the predicted and true mean change from control (all genes, and the top-{k}
DE genes of the true cells), R^2 and MSE of the means on the top-{k} DE genes.

Methods (all predict cells: control cells + a predicted mean shift):
- `control`: the training control cells (no effect; its Pearson delta is undefined, shown as nan).
- `pooled_mean`: the mean of all perturbed training cells + control residuals.
- `additive`: control + sum of the single-gene deltas `mean(single) - mean(control)`.
  **A gene never measured alone contributes zero** (`AdditiveBaseline(unmeasured="zero")`): for the
  "other" doubles the prediction is the one measured single's effect, or the control if neither
  single was measured.
- `linear`: ridge regression of the training condition means (singles and doubles) on their 0/1
  label vectors, control residuals added; a gene in no training condition gets zero effect
  (`unmeasured="zero"`). {alpha_text}
- `noise_floor`: half of the true cells (random, seed {args.seed}) scored against the other half.
  Its energy distance is ~0 (unbiased); its Pearson delta / R^2 / MSE compare two means of ~50
  cells each, so they are noisier than a method's mean (which is compared with the mean of all
  ~100 true cells) and a good method can beat them on those columns.

Means skip undefined values: Pearson delta is undefined (NaN) when the predicted change from control
is zero, i.e. always for `control`, and for `additive`/`linear` on a double none of whose genes is
known from training; `n_pearson` counts the doubles where it is defined. Compare Pearson columns
within the "both singles measured" group, where every non-control method is defined.

Groups: **both singles measured** (`combo_seen2`, {len(seen2)} doubles: {", ".join(seen2)}) inside the
span of the training labels; **other** ({len(other)} doubles: {", ".join(other)}) contain a gene never
measured alone, outside the span (the theory module should flag them as not identifiable).

### Mean over held-out doubles

{markdown_table(tabs["mean"])}

### Per fold (mean over the fold's 3 held-out doubles, both groups)

{markdown_table(tabs["per_fold"])}

<details><summary>Per held-out double</summary>

{markdown_table(tabs["per_double"])}

</details>
"""
    write_section("baselines", section, Path(args.doc), sources=[__file__])
    print(f"\nWrote the baselines section of {args.doc} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
