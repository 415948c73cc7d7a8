"""``perturbax evaluate``: score predicted cells (h5ad) against measured cells (h5ad)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
import pandas as pd

from perturbax.cli.fit import check_sep, read_h5ad, split_list, where_option
from perturbax.cli.paths import check_outputs

__all__ = ["evaluate", "evaluate_files", "markdown_table", "summary_table", "text_table"]

_ID_COLUMNS = ("method", "fold", "group", "condition", "n_pred", "n_true")


# ------------------------------------------------------------------------------- formatting
def _fmt(value, floatfmt: str = ".4g") -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        return format(float(value), floatfmt)
    if value is None:
        return ""
    return str(value)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns of an evaluation table (not ids or cell counts)."""
    return [c for c in df.columns if c not in _ID_COLUMNS and pd.api.types.is_numeric_dtype(df[c])]


def summary_table(df: pd.DataFrame, by: Sequence[str] = ("method",), stat: str = "mean") -> pd.DataFrame:
    """One row per group of ``by``: ``n`` (conditions) and the ``stat`` ("mean" or "median") of
    every metric (NaNs skipped), groups in order of first appearance."""
    by = [b for b in by if b in df.columns]
    metrics = metric_columns(df)
    if not by:
        agg = getattr(df[metrics], stat)().to_frame().T
        agg.insert(0, "n", len(df))
        return agg.reset_index(drop=True)
    grouped = df.groupby(list(by), sort=False)
    agg = getattr(grouped[metrics], stat)()
    agg.insert(0, "n", grouped.size())
    return agg.reset_index()


def with_summary_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The per-condition table followed by ``mean`` and ``median`` rows over all conditions."""
    metrics = metric_columns(df)
    rows = []
    for stat in ("mean", "median"):
        row = {c: "" for c in df.columns}
        row["condition"] = stat.upper()
        for c in metrics:
            row[c] = getattr(df[c], stat)()
        rows.append(row)
    out = df.astype(object).copy()
    return pd.concat([out, pd.DataFrame(rows, columns=df.columns)], ignore_index=True)


def _is_numeric_column(col: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(col):
        return True
    vals = [v for v in col if not (isinstance(v, str) and v == "")]
    return bool(vals) and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals)


def text_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A plain-text table with aligned columns."""
    cols = [str(c) for c in df.columns]
    body = [[_fmt(v, floatfmt) for v in row] for row in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    numeric = [_is_numeric_column(df[c]) for c in df.columns]

    def line(cells):
        return "  ".join(
            (s.rjust(w) if num else s.ljust(w)) for s, w, num in zip(cells, widths, numeric)
        ).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in body)])


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table."""
    cols = [str(c) for c in df.columns]
    numeric = [_is_numeric_column(df[c]) for c in df.columns]
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = [
        "| " + " | ".join(_fmt(v, floatfmt).replace("|", "\\|") for v in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *body])


# ------------------------------------------------------------------------------------- API
def evaluate_files(
    pred_path,
    truth_path,
    *,
    perturbation_key: str,
    control: str,
    reference_path=None,
    n_pcs: int = 50,
    top_k: int = 20,
    energy_form: str = "U",
    layer: str | None = None,
    pred_layer: str | None = None,
    pred_perturbation_key: str | None = None,
    sep: str = "+",
    method: str | None = None,
    where: Sequence[str] = (),
    baselines: Sequence[str] = (),
    context_keys: Sequence[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    """Score the conditions of a predictions file against a truth file.

    Every perturbed condition of the predictions must be measured in the truth (labels are
    compared in canonical form, so ``"B+A"`` matches ``"A+B"``). The control cells come from
    the truth (or, if it has none, from the reference); the PCA is fit on the reference cells
    (the training cells) or, without a reference, on the control cells only: never on the
    evaluated cells, so the space does not adapt to the held-out conditions. Genes are matched
    by name. ``where`` (``KEY=VALUE`` items) keeps only the selected cells of the truth and the
    reference (not of the predictions).

    ``baselines`` (names of :func:`perturbax.baselines.standard_baselines`: ``control``,
    ``pooled_mean``, ``additive``, ``linear``) are fitted on the reference (the training cells,
    required then; evaluated conditions found there are left out of the baselines' training) and
    scored on the same conditions, one block of rows per method (``method`` column): the model's
    rows first.

    ``context_keys`` (``obs`` columns of the contexts in both files, as ``perturbax predict`` writes
    them): conditions are (perturbation, context) pairs, ``"stimulated @ cell_type=CD4T"``, and each
    is scored against the control cells of its own context (deltas, DE genes).

    Returns the per-condition table and a list of notes (e.g. truth conditions not predicted).
    """
    from perturbax.data.io import cells_by_condition
    from perturbax.metrics import evaluate_conditions

    notes: list[str] = []
    chosen = _baselines(baselines, reference_path)
    truth_ad = read_h5ad(truth_path, where)
    pred_ad = read_h5ad(pred_path)
    genes = [str(g) for g in truth_ad.var_names]
    ctx = tuple(context_keys)
    truth = cells_by_condition(truth_ad, perturbation_key, control, layer, sep=sep, context_keys=ctx)
    try:
        pred = cells_by_condition(
            pred_ad, pred_perturbation_key or perturbation_key, control, pred_layer, sep=sep, genes=genes,
            context_keys=ctx,
        )
    except KeyError as err:
        raise ValueError(f"Predictions {pred_path}: {err.args[0] if err.args else err}") from None

    reference = None
    ref_cells: dict[str, np.ndarray] = {}
    if reference_path is not None:
        ref_ad = read_h5ad(reference_path, where)
        try:
            ref_cells = cells_by_condition(ref_ad, perturbation_key, control, layer, sep=sep, genes=genes,
                                           context_keys=ctx)
        except KeyError as err:
            raise ValueError(f"Reference {reference_path}: {err.args[0] if err.args else err}") from None
        reference = np.concatenate(list(ref_cells.values()), axis=0)

    def control_of(label: str) -> str:
        """The control condition of a condition's context (``control`` without contexts)."""
        return f"{control} @ {label.partition(' @ ')[2]}" if ctx else control

    def control_cells_of(label: str) -> np.ndarray:
        name = control_of(label)
        if name in truth:
            return truth[name]
        if name in ref_cells:
            note = f"TRUTH has no {name!r} cells; using the {name!r} cells of the reference."
            if note not in notes:
                notes.append(note)
            return ref_cells[name]
        raise ValueError(
            f"No control cells ({name!r} in obs[{perturbation_key!r}]"
            + (f" and {', '.join(ctx)}" if ctx else "") + ") in TRUTH"
            + (" or the reference" if reference_path is not None else "")
            + ". Metrics are deltas from control: add control cells to TRUTH or pass --reference "
            "TRAIN.h5ad with control cells (or fix --control" + (" / --context-keys" if ctx else "") + ")."
        )

    is_control = (lambda c: c.partition(" @ ")[0] == control) if ctx else (lambda c: c == control)
    pred_conditions = [c for c in pred if not is_control(c)]
    if not pred_conditions:
        raise ValueError(
            f"The predictions contain no perturbed condition (only {list(pred)}); check "
            f"--perturbation-key and --control."
        )
    unknown = [c for c in pred_conditions if c not in truth]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted condition(s) are not measured in TRUTH: {unknown[:10]}. "
            f"Measured: {[c for c in truth if not is_control(c)][:10]}. Remove them from the predictions, "
            f"or check --sep / the label spelling" + (" / --context-keys" if ctx else "") + "."
        )
    not_predicted = [c for c in truth if not is_control(c) and c not in pred]
    if not_predicted:
        notes.append(f"{len(not_predicted)} TRUTH condition(s) not predicted, skipped: {not_predicted[:10]}")
    truth_eval = {c: truth[c] for c in truth if c in pred and not is_control(c)}
    groups: dict[str, list[str]] = {}  # conditions by the control of their context
    for c in truth_eval:
        groups.setdefault(control_of(c), []).append(c)
    controls = {name: control_cells_of(cs[0]) for name, cs in groups.items()}

    def scored(pred_cells, truth_cells, method_name):
        """``evaluate_conditions`` per context (each against its own control cells), rows in order."""
        parts = []
        for name, cs in groups.items():
            keep = [c for c in cs if c in truth_cells]
            if keep:
                parts.append(evaluate_conditions(
                    {c: pred_cells[c] for c in keep}, {c: truth_cells[c] for c in keep}, controls[name],
                    reference=reference, n_pcs=n_pcs, top_k=top_k, energy_form=energy_form, method=method_name,
                ))
        return pd.concat(parts, ignore_index=True)
    pred_eval = {c: pred[c] for c in truth_eval}

    G = len(genes)
    if n_pcs > G:
        notes.append(f"--n-pcs {n_pcs} is more than the {G} genes; using {G}.")
        n_pcs = G
    if top_k > G:
        notes.append(f"--top-k {top_k} is more than the {G} genes; using all {G}.")
        top_k = G
    table = scored(pred_eval, truth_eval, method or Path(pred_path).stem)
    if chosen:
        tables = [table]
        baselines_fitted = _fit_baselines(chosen, ref_ad, genes, perturbation_key, control, layer, sep, reference_path,
                                          list(truth_eval), notes, ctx)
        for base in baselines_fitted:
            ok = {c: base.why_not(c) for c in truth_eval}
            skipped = [c for c, why in ok.items() if why is not None]
            if skipped:
                notes.append(f"baseline {base.name} cannot predict {len(skipped)} condition(s), left out of its "
                             f"rows: {skipped[:5]} ({ok[skipped[0]]})")
            keep = {c: truth_eval[c] for c in truth_eval if ok[c] is None}
            if not keep:
                continue
            with warnings.catch_warnings():
                if base.name == "control":  # it predicts no change: the Pearson delta is undefined (NaN)
                    warnings.filterwarnings("ignore", message="Pearson correlation", category=RuntimeWarning)
                    notes.append("pearson_delta is undefined (nan) for the control baseline: it predicts no change.")
                tables.append(scored(base.predict(list(keep)), keep, base.name))
        table = pd.concat(tables, ignore_index=True)
    return table, notes


def _baselines(names: Sequence[str], reference_path) -> list:
    """The unfitted baselines named by ``names`` (checked before any file is read)."""
    if not names:
        return []
    from perturbax.baselines import standard_baselines

    known = {b.name: b for b in standard_baselines()}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--baselines {','.join(bad)}: unknown baseline; choose from {', '.join(known)}.")
    if reference_path is None:
        raise ValueError(
            "--baselines are fitted on the training cells: pass --reference TRAIN.h5ad (the cells the model "
            "was trained on)."
        )
    return [known[n] for n in dict.fromkeys(names)]


def _fit_baselines(chosen, ref_ad, genes, perturbation_key, control, layer, sep, reference_path, evaluated, notes,
                   context_keys=()):
    """The ``chosen`` baselines fitted on the reference cells, without the evaluated conditions (a
    baseline that saw the cells it is scored on would be scored on its training data)."""
    from perturbax.data.core import from_anndata
    from perturbax.data.io import subset_copy

    have = set(ref_ad.var_names.astype(str))
    missing = [g for g in genes if g not in have]
    if missing:
        raise ValueError(
            f"Reference {reference_path}: {len(missing)} gene(s) of TRUTH are missing (e.g. {missing[:5]})."
        )
    train = from_anndata(
        subset_copy(ref_ad, var=genes), perturbation_key, control, sep=sep, layer=layer, require_control=True,
        context_keys=tuple(context_keys),
    )
    leaked = [c for c in evaluated if c in train.conditions]
    if leaked:
        train = train.select(leaked, exclude=True)
        notes.append(f"{len(leaked)} evaluated condition(s) are in --reference; the baselines are fitted without them: "
                     f"{leaked[:10]}")
    for base in chosen:
        try:
            yield base.fit(train)
        except ValueError as err:
            raise ValueError(f"Baseline {base.name} on {reference_path}: {err.args[0] if err.args else err}") from None


# ------------------------------------------------------------------------------------- CLI
@click.command("evaluate")
@click.argument("pred", type=click.Path(exists=True, dir_okay=False))
@click.argument("truth", type=click.Path(exists=True, dir_okay=False))
@click.option("--perturbation-key", "-k", required=True, help="obs column with perturbation labels.")
@click.option("--control", "-c", required=True, help="Label of control (unperturbed) cells.")
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Training cells (h5ad): the PCA is fit on them (default: on TRUTH's control cells only, never on the "
    "evaluated cells); their control cells are used if TRUTH has none.",
)
@click.option("--n-pcs", default=50, show_default=True, type=click.IntRange(min=1), help="PCs for energy/MMD.")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(min=1), help="Top DE genes.")
@click.option(
    "--energy-form", default="U", show_default=True, type=click.Choice(["U", "V"]),
    help="U: unbiased (noise floor ~0); V: biased, always >= 0.",
)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the per-condition table as CSV (its folder must exist).")
@click.option("--layer", default=None, help="Layer of TRUTH/REFERENCE with expression (default X).")
@click.option("--pred-layer", default=None, help="Layer of PRED with expression (default X).")
@click.option("--pred-perturbation-key", default=None, help="obs column of PRED if it differs.")
@click.option("--sep", default="+", show_default=True, callback=check_sep,
              help="Separator of combined perturbations (not ',' or ':').")
@click.option("--method", default=None, help="Name in the method column (default: PRED's file stem).")
@click.option("--baselines", default=None,
              help="Comma-separated baselines scored next to PRED on the same conditions: control, pooled_mean, "
                   "additive, linear (fitted on --reference, the training cells, which is then required).")
@click.option("--context-keys", default=None,
              help="Comma-separated obs columns of the contexts in PRED, TRUTH and --reference (as `perturbax "
                   "predict` writes them), e.g. cell_type: conditions are (perturbation, context) pairs such as "
                   "'stimulated @ cell_type=CD4T', each scored against the control cells of its context.")
@where_option("Use only the cells of TRUTH and --reference with obs[KEY] == VALUE (e.g. dataset=norman19); "
              "repeat for more: one key given twice keeps either value, different keys must all match.")
def evaluate(pred, truth, perturbation_key, control, reference, n_pcs, top_k, energy_form, out, layer,
             pred_layer, pred_perturbation_key, sep, method, baselines, context_keys, where):
    """Score predicted cells PRED.h5ad against measured cells TRUTH.h5ad, per condition.

    Metrics: energy distance and RBF MMD in a PCA space, mean L2, Pearson delta (all genes and
    top-k DE genes), R^2 and MSE of the means on the top-k DE genes. The PCA space is fit on
    --reference (training cells) or, by default, on TRUTH's control cells only. Prints the table
    with mean/median rows (per method with --baselines); --out writes the per-condition rows as CSV.

    --baselines additive,linear scores those baselines, fitted on --reference, on the same
    conditions in the same table, so one sees whether the model adds anything on these data.
    """
    check_outputs({"--out": out}, inputs={"PRED": pred, "TRUTH": truth, "--reference": reference})
    base_names = split_list(baselines, "baselines", "--baselines")
    try:
        table, notes = evaluate_files(
            pred, truth, perturbation_key=perturbation_key, control=control, reference_path=reference,
            n_pcs=n_pcs, top_k=top_k, energy_form=energy_form, layer=layer, pred_layer=pred_layer,
            pred_perturbation_key=pred_perturbation_key, sep=sep, method=method, where=where,
            baselines=base_names, context_keys=split_list(context_keys, "context keys", "--context-keys"),
        )
    except (ValueError, KeyError) as err:
        raise click.ClickException(str(err.args[0]) if err.args else str(err)) from None
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if table["method"].nunique() > 1:
        click.echo(text_table(table))
        for stat in ("mean", "median"):
            click.echo(f"\n{stat.capitalize()} over conditions, per method:")
            click.echo(text_table(summary_table(table, ("method",), stat)))
    else:
        click.echo(text_table(with_summary_rows(table)))
    if out is not None:
        try:
            table.to_csv(out, index=False)
        except OSError as err:
            raise click.ClickException(f"Cannot write {out}: {err}") from None
        click.echo(f"\nWrote {len(table)} rows to {out}")
