"""``perturbax predict``: predicted cells and credible intervals from a saved fit."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
import pandas as pd

from perturbax.cli.fit import FiniteFloat, cli_message, read_h5ad, split_list, where_option
from perturbax.cli.paths import check_outputs

__all__ = ["predict", "predict_dir", "load_fit", "prediction_summary_table", "parse_times", "read_source_cells",
           "output_plan"]

SUMMARY_COLUMNS = ("perturbation", "gene", "mean", "lower", "upper")


def load_fit(model_dir):
    """``FitResult.load`` with every failure turned into a ``ValueError`` with one clear line."""
    from perturbax.inference.result import FitResult

    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"{model_dir} is not a folder; give the folder written by `perturbax fit --out`.")
    try:
        return FitResult.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(str(err.args[0]) if err.args else str(err)) from None
    except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as err:  # malformed meta.json
        if isinstance(err, KeyError) and err.args:
            what = f"missing entry {err.args[0]!r}"
        else:
            what = f"{type(err).__name__}: {err}"
        raise ValueError(
            f"{model_dir} is not a valid perturbax fit: its meta.json is malformed ({what}). "
            f"Re-save the fit or refit with `perturbax fit`."
        ) from None


def prediction_summary_table(adata) -> pd.DataFrame:
    """Tidy per-gene table of a prediction: one row per (perturbation, gene) with the posterior
    mean and interval bounds of the mean expression (``varm["pred_mean"/"pred_lower"/"pred_upper"]``,
    columns in the order of ``uns["perturbax"]["labels"]``). For a model of time one row per
    (perturbation, time, gene): columns perturbation, time, gene, mean, lower, upper."""
    meta = adata.uns["perturbax"]
    labels = [str(lab) for lab in np.asarray(meta["labels"]).reshape(-1)]
    times = meta.get("times")
    if times is not None:
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        plain = [str(lab) for lab in np.asarray(meta["perturbations"]).reshape(-1)]
    genes = [str(g) for g in adata.var_names]
    cols = {}
    for name, key in (("mean", "pred_mean"), ("lower", "pred_lower"), ("upper", "pred_upper")):
        arr = np.asarray(adata.varm[key])
        if arr.shape != (len(genes), len(labels)):
            raise ValueError(
                f"varm[{key!r}] has shape {arr.shape}; expected (n_genes, n_labels) = "
                f"({len(genes)}, {len(labels)})."
            )
        cols[name] = arr.T.reshape(-1)  # perturbation-major: all genes of the first label first
    if times is not None:
        return pd.DataFrame(
            {
                "perturbation": np.repeat(plain, len(genes)),
                "time": np.repeat(times, len(genes)),
                "gene": np.tile(genes, len(labels)),
                **cols,
            },
            columns=["perturbation", "time", *SUMMARY_COLUMNS[1:]],
        )
    return pd.DataFrame(
        {
            "perturbation": np.repeat(labels, len(genes)),
            "gene": np.tile(genes, len(labels)),
            **cols,
        },
        columns=list(SUMMARY_COLUMNS),
    )


def parse_times(text: str | None) -> list[float] | None:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]`` (``None`` stays ``None``)."""
    if text is None:
        return None
    out = []
    for item in split_list(text, "times", "--times"):
        try:
            out.append(float(item))
            if not math.isfinite(out[-1]):
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a number; give times like '2,4,8'.", param_hint="--times") from None
    return out


def read_source_cells(path, fit_result, where=()):
    """Observed cells to move (``predict(..., source=cells)``) from an h5ad, read as the training
    data were: the fit's perturbation key, control label, separator, dose and time keys, layer and
    contexts (their keys and categories from the fit's registry; from ``perturbax fit``; a fit saved from Python uses its perturbation key, its
    control label, ``X`` and its time key). The file need not contain control cells; ``where``
    (``KEY=VALUE`` items) keeps only the selected cells."""
    from perturbax.data.core import from_anndata

    rec = fit_result.info.get("cli") or {}
    return from_anndata(
        read_h5ad(path, where),
        fit_result.perturbation_key,
        rec.get("control", fit_result.registry.control),
        sep=rec.get("sep", "+"),
        dose_key=rec.get("dose_key"),
        time_key=rec.get("time_key", fit_result.info.get("time_key")),
        layer=rec.get("layer"),
        require_control=False,
        registry=fit_result.registry,
    )


def output_plan(fit_result, perturbations, times, n_cells, num_samples, source, stream_output=None,
                out=None) -> tuple[bool, str]:
    """Before predicting: whether the cells go to ``out`` in chunks, and the line that says which
    (:func:`perturbax.inference.prediction.prediction_plan`, from the number of columns and an
    estimate of the cells per column and of the source cells; ``source``: ``None``, ``"control"``,
    ``"prior"`` or the observed cells to move). Refuses a request too large either way."""
    from perturbax.data.labels import CONTEXT_SEP
    from perturbax.inference.prediction import prediction_plan

    n_ctrl = int(np.shape(fit_result.basal["library"])[0])
    timed = times is not None
    if source is not None and not isinstance(source, str):
        n_src = source.n_cells
    elif source == "prior" and not timed:
        n_src = max(1000, n_cells or 0)
    elif timed and (source == "prior" or (source is None and getattr(fit_result.config, "heterogeneity", None) == "relaxing")):
        n_src = min(4096, max(512, n_ctrl))
    else:
        n_src = n_ctrl
    cells = n_cells if n_cells is not None else n_src
    n_ctx = len(fit_result.registry.all_contexts()) if fit_result.registry.contexts else 1
    columns = sum(n_ctx if CONTEXT_SEP not in p else 1 for p in perturbations) * (len(times) if timed else 1)
    return prediction_plan(fit_result, columns, cells, num_samples, n_src, stream_output=stream_output, out=out)


def predict_dir(
    model_dir,
    perturbations: Sequence[str],
    *,
    n_cells: int | None = None,
    num_samples: int = 100,
    seed: int = 0,
    interval: float = 0.9,
    source: str | None = None,
    allow_unseen: bool = False,
    times: Sequence[float] | None = None,
    source_cells=None,
    where=(),
    out=None,
    stream_output: bool | None = None,
    report=None,
):
    """Load the fit in ``model_dir`` (or take an already loaded ``FitResult``) and predict
    ``perturbations`` (at ``times`` for a model of time); ``source_cells`` (an h5ad path, see :func:`read_source_cells`) moves those observed
    cells instead of generating new ones (only those selected by ``where``, ``KEY=VALUE`` items).
    With ``out``, the prediction is written there, in chunks or built in memory as :func:`output_plan`
    chooses (``stream_output`` overrides; ``report`` receives the line that says which).
    Returns ``(adata, fit)`` (with ``out``: the written file opened backed)."""
    from perturbax.inference.prediction import predict as predict_api
    from perturbax.inference.result import FitResult

    fit_result = model_dir if isinstance(model_dir, FitResult) else load_fit(model_dir)
    if source_cells is not None:
        if source is not None:
            raise ValueError(
                f"--source {source} and --source-cells both say where predictions start; pass only one."
            )
        source = read_source_cells(source_cells, fit_result, where)
    elif where:
        raise ValueError("--where selects cells of --source-cells; pass --source-cells too.")
    streamed, line = output_plan(fit_result, perturbations, times, n_cells, num_samples, source, stream_output, out)
    if out is not None and report is not None:
        report(line)
    adata = predict_api(
        fit_result,
        list(perturbations),
        n_cells=n_cells,
        num_samples=num_samples,
        source=source,
        interval=interval,
        seed=seed,
        allow_unseen=allow_unseen,
        times=times,
        out=out,
        stream_output=streamed if out is not None else None,
    )
    return adata, fit_result


@click.command("predict")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--perturbations", "-p", required=True,
              help='Comma-separated labels, e.g. "A+B,A:0.5+C:2" (A:0.5 = A at dose 0.5; combinations '
                   "joined with the --sep used at fit time). A fit with --context-keys takes (perturbation, context) "
                   'pairs, e.g. "stimulated @ cell_type=CD4T" (several keys joined by &), each predicted from the '
                   "control cells of its context; a plain label is predicted in every context.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="h5ad file of predicted cells (its folder must exist).")
@click.option("--summary", default=None, type=click.Path(dir_okay=False),
              help="Also write a per-gene CSV: perturbation, gene, mean, lower, upper.")
@click.option("--n-cells", default=None, type=click.IntRange(min=1),
              help="Cells per perturbation [default: number of training control cells].")
@click.option("--num-samples", default=100, show_default=True, type=click.IntRange(min=1),
              help="Posterior draws of the global parameters.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prediction.")
@click.option("--interval", default=0.9, show_default=True,
              type=FiniteFloat(0, 1, min_open=True, max_open=True),
              help="Level of the intervals (for a default additive fit: calibrated on held-out training conditions).")
@click.option("--source", default=None, type=click.Choice(["control", "prior"]),
              help="Basal states: training control cells, or draws from the base distribution "
                   "[default: control; prior for the dynamics model with relaxing programs].")
@click.option("--source-cells", default=None, type=click.Path(exists=True, dir_okay=False),
              help="h5ad of observed cells to move instead of generating new ones (read like the training "
                   "data: same perturbation key, time key and genes; no control cells needed), e.g. the cells "
                   "of a perturbation at a measured time: each is moved to the requested perturbation and "
                   "time by the model's change of its mean expression.")
@click.option("--allow-unseen", is_flag=True,
              help="Predict perturbations whose components were never seen in training (prior-only effect).")
@click.option("--times", default=None,
              help='Comma-separated times to predict at, e.g. "2,4,8" (fits of --model dynamics only, and '
                   "required there).")
@click.option("--stream-output/--no-stream-output", default=None,
              help="Write the predicted cells to --out in chunks (memory bounded by a chunk) / build them all in "
                   "memory first (default: in chunks when they would not fit in memory; the output says which).")
@where_option("Use only the cells of --source-cells with obs[KEY] == VALUE (e.g. dataset=norman19); repeat for "
              "more: one key given twice keeps either value, different keys must all match.")
def predict(model_dir, perturbations, out, summary, n_cells, num_samples, seed, interval, source, source_cells,
            allow_unseen, times, stream_output, where):
    """Predict cells of perturbations from the fit saved in MODEL_DIR (by `perturbax fit`).

    Writes --out (h5ad): X holds the predicted cells in the expression space of the training
    matrix, var names are the training genes, obs[KEY] (KEY: the --perturbation-key of the fit)
    the canonical label of each cell and obs["draw"] the posterior draw used;
    varm["pred_mean"/"pred_lower"/"pred_upper"] hold the posterior mean and credible bounds of
    each perturbation's mean expression (columns in the order of uns["perturbax"]["labels"]).

    For a dynamics fit, --times is required: every perturbation is predicted at every time,
    obs["time"] holds each cell's time, and the varm columns are (perturbation, time) pairs with
    keys "A+B @ t=4" in uns["perturbax"]["labels"] (plain labels and times of the columns in
    uns["perturbax"]["perturbations"] and ["times"]); the --summary CSV gets a time column.

    With --source-cells, each predicted cell is one of those observed cells moved by the model
    (--n-cells defaults to their number; more repeats them, each time under another posterior draw).
    """
    labels = split_list(perturbations, "perturbations", "--perturbations")
    time_list = parse_times(times)
    outputs = {"--out": out, "--summary": summary}
    check_outputs(outputs, inputs={"--source-cells": source_cells}, input_folders={"MODEL_DIR": model_dir})
    out_path, summary_path = Path(out), None if summary is None else Path(summary)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        try:
            fit_result = load_fit(model_dir)
            trained_on = (fit_result.info.get("cli") or {}).get("data")
            if isinstance(trained_on, str):  # the training data of the fit: an input too
                check_outputs(outputs, inputs={"the training data": trained_on, "--source-cells": source_cells},
                              input_folders={"MODEL_DIR": model_dir})
            adata, fit_result = predict_dir(
                fit_result, labels, n_cells=n_cells, num_samples=num_samples, seed=seed, interval=interval,
                source=source, allow_unseen=allow_unseen, times=time_list, source_cells=source_cells,
                where=where, out=out_path, stream_output=stream_output, report=click.echo,
            )
        except (ValueError, KeyError) as err:
            raise click.ClickException(cli_message(err)) from None
        except OSError as err:
            raise click.ClickException(
                f"Could not write the predictions to {out} ({type(err).__name__}: {err})."
            ) from None
    for w in caught:
        if issubclass(w.category, (UserWarning, RuntimeWarning)):
            click.echo(f"warning: {cli_message(w.message)}", err=True)
    meta = adata.uns["perturbax"]
    key = fit_result.perturbation_key
    counts = adata.obs[key].value_counts(sort=False)
    layer = (fit_result.info.get("cli") or {}).get("layer")
    space = f"layers[{layer!r}]" if layer else "X"
    click.echo(
        f"Predicted {adata.n_obs} cells x {adata.n_vars} genes for {len(counts)} perturbation(s) "
        f"({num_samples} posterior draws, source {meta['source']}, {interval:g} intervals)."
    )
    click.echo("Labels (obs[" + json.dumps(key) + "]): " + ", ".join(f"{lab} ({n})" for lab, n in counts.items()))
    if meta.get("contexts"):
        click.echo("Contexts (obs columns " + ", ".join(json.dumps(k) for k in meta["contexts"]) + "): "
                   + ", ".join(f"{lab}" for lab in np.asarray(meta["labels"]).reshape(-1))
                   + "; each from the control cells of its context.")
    if meta.get("times") is not None:
        ts = list(dict.fromkeys(float(t) for t in np.asarray(meta["times"]).reshape(-1)))
        click.echo('Times (obs["time"]): ' + ", ".join(f"{t:g}" for t in ts))
    nested = meta.get("nested")
    if nested is not None:
        click.echo(
            f"Nested estimator: lambda={float(nested['lambda']):g}, cells={nested['cells']}; intervals: "
            + (f"calibrated on held-out training conditions (factor {float(nested['interval_factor']):.3g}), they "
               f"cover {nested['covers']}" if bool(nested["calibrated"]) else str(nested["covers"]))
            + "."
        )
        widened = [lab for lab, r in zip(np.asarray(meta["labels"]).reshape(-1), nested.get("unidentified", []))
                   if float(r) > 0]
        if widened:
            click.echo(f"Not identified by the training design: {', '.join(map(str, widened))}; "
                       f"{nested['unidentified_note']}.")
    cal = meta.get("calibration")
    if cal is not None:  # (latent dynamics fitted by the recipe: a conformal factor per kind of prediction)
        kinds = list(np.asarray(cal["kinds"]).reshape(-1))
        factors = [float(q) for q in np.asarray(cal["interval_factors"]).reshape(-1)]
        per_kind = {k: factors[kinds.index(k)] for k in dict.fromkeys(kinds)}
        click.echo("Intervals: calibrated on held-out training contexts of the same kind of prediction ("
                   + ", ".join(f"{k}: {kinds.count(k)} column(s), factor {q:.3g}" for k, q in per_kind.items())
                   + f"); they cover {cal['covers']}.")
    if fit_result.info.get("cli"):
        click.echo(f"Expression space: {space} of the training data.")
    click.echo(f"Wrote {out}")
    if summary_path is not None:
        table = prediction_summary_table(adata)
        table.to_csv(summary_path, index=False)
        what = "(perturbation, time) pairs" if meta.get("times") is not None else "perturbations"
        click.echo(f"Wrote {len(table)} rows ({len(meta['labels'])} {what} x {adata.n_vars} genes) to {summary}")
    adata.file.close()
