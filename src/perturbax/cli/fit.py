"""``perturbax fit``: fit the additive latent shift model (or, with ``--model dynamics``, the latent
dynamics model) to an h5ad file and save the fit."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

__all__ = ["fit", "fit_file", "cli_message", "split_list", "read_h5ad", "FiniteFloat",
           "check_sep", "where_option"]

# Python keyword spellings in library messages -> the flags of this CLI.
_FLAG_OF = {
    "layer": "--layer",
    "likelihood": "--likelihood",
    "objective": "--objective",
    "sep": "--sep",
    "latent_dim": "--latent-dim",
    "learning_rate": "--learning-rate",
    "batch_size": "--batch-size",
    "dose_key": "--dose-key",
    "covariate_keys": "--covariate-keys",
    "perturbation_key": "--perturbation-key",
    "time_key": "--time-key",
    "time_scale": "--time-scale",
    "devices": "--devices",
}

# --model choices of this CLI -> built-in model names of perturbax.inference.fit
MODELS = {"additive": "additive_shift", "dynamics": "latent_dynamics"}


def cli_message(err: BaseException) -> str:
    """The library's message of ``err`` with keyword spellings (``layer='counts'``,
    ``allow_unseen=True``) rewritten as this CLI's flags (``--layer counts``, ``--allow-unseen``)."""
    text = str(err.args[0]) if err.args else str(err) or type(err).__name__
    text = text.replace("allow_unseen=True", "--allow-unseen")

    def repl(m: re.Match) -> str:
        value = m.group(2) if m.group(2) is not None else m.group(3)
        return f"{_FLAG_OF[m.group(1)]} {shlex.quote(value)}"

    pattern = r"\b(" + "|".join(_FLAG_OF) + r")=(?:'([^']*)'|(-?[0-9][0-9.e+-]*))(?: \(CLI: --[\w-]+\))?"
    return re.sub(pattern, repl, text)


def split_list(text: str | None, what: str, option: str | None = None) -> list[str]:
    """Comma-separated items of an option (stripped); empty items are an error."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",")]
    if any(t == "" for t in items):
        raise click.BadParameter(
            f"{text!r} has an empty item; separate {what} with single commas, e.g. 'A+B,C'.",
            param_hint=option,
        )
    return items


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (which compare false to any bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def check_sep(ctx, param, value):
    """Callback of ``--sep``: a non-empty separator other than ``,`` (commas separate the items of
    list options such as ``predict --perturbations``) and ``:`` (dose marker, ``A:0.5``)."""
    if value is None:
        return value
    if value == "" or value.strip() != value or "," in value or ":" in value:
        raise click.BadParameter(
            f"{value!r} cannot separate combined perturbations: it must be non-empty, without spaces at its ends, "
            f"and without ',' (which separates list items, e.g. --perturbations 'A+B,C') or ':' (doses, 'A:0.5'); "
            f"use e.g. '+' or '_'.",
            ctx=ctx, param=param,
        )
    return value


def read_h5ad(path, where=None, backed: bool = False):
    """``anndata.read_h5ad`` with any failure turned into a ``ValueError`` that names the file;
    ``where`` (``--where KEY=VALUE`` items) keeps only the selected cells
    (:func:`perturbax.data.select_where`; its errors name the file). ``backed``: open it read-only
    with ``X`` left on disk (``where`` then gives a view)."""
    import anndata as ad

    from perturbax.data.io import select_where

    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py/anndata raise many types for a file that is not h5ad
        raise ValueError(f"Cannot read {path} as an h5ad file ({type(err).__name__}: {err}).") from None
    try:
        return select_where(adata, where)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{path}: {err.args[0] if err.args else err}") from None


# --- --where KEY=VALUE (fit, predict --source-cells, evaluate, check-design) ---
def _check_where(ctx, param, value):
    from perturbax.data.io import parse_where

    try:
        parse_where(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return tuple(value)


def where_option(help_text: str = "Use only the cells of DATA with obs[KEY] == VALUE (e.g. dataset=norman19); "
                                  "repeat for more: one key given twice keeps either value, different keys must "
                                  "all match."):
    """The ``--where KEY=VALUE`` option (repeatable), validated when parsed."""
    return click.option("--where", "where", multiple=True, metavar="KEY=VALUE", callback=_check_where,
                        help=help_text)
# --- end --where ---


def selection_lines(sel: dict | None) -> list[str]:
    """What the training-condition selection of the nested estimator chose, for the fit output."""
    if not sel:
        return []
    out = [f"Nested estimator: lambda={sel['lambda']:g}, cells={sel['cells']}, ridge alpha={sel['alpha']:g} "
           f"({sel['note']})"]
    if len(sel.get("length", [])) > 1:
        out.append("Length (cycles: CV energy at the chosen setting): " + ", ".join(
            f"{r['cycles']}: diverged" if r.get("diverged") else f"{r['cycles']}: {r['energy']:.4g}"
            for r in sel["length"]) + f"; kept {sel['cycles']}")
    if sel.get("cv_scores"):
        best = {(r["lambda"], r["cells"]): r["energy"] for r in sel["cv_scores"]}
        row = ", ".join(f"{lam:g}/{mode}={e:.4g}" for (lam, mode), e in best.items())
        out.append(f"CV energy (lambda/cells): {row}")
    cal = sel.get("calibration", {})
    if cal.get("calibrated"):
        out.append(f"Intervals calibrated on {cal['n_scores']} held-out gene means; 90% factor "
                   f"{cal['factor']['0.9']:.3g}; they cover {cal['covers']}")
    else:
        out.append("Intervals not calibrated (no held-out training conditions)")
    return out


def held_out_conditions(data, labels: Sequence[str], option: str) -> list[str]:
    """Canonical conditions of ``data`` named by ``labels`` (errors name the label and the fix). With
    contexts, a label without ``@`` names that perturbation in every context where it was measured."""
    from perturbax.data.labels import CONTEXT_SEP

    held: list[str] = []
    for lab in labels:
        if data.context_keys and CONTEXT_SEP not in lab:
            plain = data.registry.perturbation_label(lab)
            names = [c for c in data.conditions if data.registry.perturbation_label(c) == plain]
            if not names:
                data.condition_index(lab)  # the error with close matches
        else:
            names = [data.registry.canonical(lab)]
        for canon in names:
            if canon == data.control:
                raise ValueError(
                    f"{option} names the control {canon!r}; predictions start from control cells, so they cannot be "
                    f"held out."
                )
            data.condition_index(canon)  # error with close matches if it has no cells
            if canon not in held:
                held.append(canon)
    return held


def fit_file(
    data_path,
    *,
    perturbation_key: str,
    control: str,
    out,
    objective: str | None = None,
    likelihood: str = "gaussian",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    latent_dim: int | None = None,
    learning_rate: float | None = None,
    layer: str | None = None,
    dose_key: str | None = None,
    sep: str = "+",
    context_keys: Sequence[str] = (),
    holdout: Sequence[str] = (),
    progress: bool = True,
    model: str = "additive",
    time_key: str | None = None,
    time_scale: float | None = None,
    mean_weight: float = 0.0,
    overwrite: bool = False,
    where: Sequence[str] = (),
    select: bool | None = None,
    devices: int | None = None,
    stream: bool | None = None,
    recipe: bool | None = None,
):
    """Read ``data_path`` (h5ad), drop the ``holdout`` conditions, fit the additive shift model
    (``model="additive"``) or the latent dynamics model (``model="dynamics"``, which needs the
    ``time_key`` column of times since the perturbation; ``time_scale`` is the time over which the
    programs relax, in the units of that column, ``None``: the median of the distinct positive
    training times, as :func:`~perturbax.inference.fit` chooses) and save it to the folder ``out``.
    ``mean_weight`` is :class:`~perturbax.inference.EnergyOptions` ``mean_weight`` (energy
    objective only). ``objective``, ``learning_rate`` and ``select`` ``None``: the defaults of
    :func:`perturbax.inference.fit` (the CLI and Python share them; for the dynamics model
    ``objective=None`` runs the staged recipe of :mod:`perturbax.inference.dynamics_recipe` unless
    ``recipe=False``). ``latent_dim`` ``None``: the model config's default. ``where`` (``KEY=VALUE``
    items) keeps only the selected cells of the file. ``context_keys``: the ``obs`` columns of the
    contexts (cell type, cell line, ...; ``holdout`` may then name (perturbation, context) pairs,
    ``"stimulated @ cell_type=CD4T"``). An existing non-empty ``out`` holding a
    saved fit is replaced only with ``overwrite``; nothing is saved if the loss was not finite
    from the first steps. ``devices``: :func:`~perturbax.inference.fit` ``devices`` (``None``: all).
    ``stream``: read the cells from disk while fitting (``None``: when they would not fit in memory,
    :func:`perturbax.data.stream.stream_plan`); the line saying which is ``info["cli"]["data_plan"]``.

    Returns ``(fit_result, data_used, held_out_labels)``. Library errors (ValueError/KeyError)
    propagate with their messages.
    """
    from perturbax.data.core import from_anndata
    from perturbax.inference.energy import EnergyOptions
    from perturbax.inference.fitting import default_objective
    from perturbax.inference.fitting import fit as fit_model
    from perturbax.models.config import AdditiveShiftConfig
    from perturbax.models.dynamics import LatentDynamicsConfig

    if model not in MODELS:
        raise ValueError(f"--model {model!r} is not supported; choose one of {sorted(MODELS)}.")
    if model == "dynamics" and time_key is None:
        raise ValueError(
            "--model dynamics needs the time of every cell: pass --time-key with the numeric obs column of "
            "time since the perturbation was switched on (e.g. --time-key time_h)."
        )
    staged = model == "dynamics" and objective is None and recipe is not False
    if objective is None and not staged:
        objective = default_objective(MODELS[model], likelihood)
    if mean_weight and objective != "energy":
        raise ValueError(
            f"--mean-weight {mean_weight:g} weights a term of the energy objective, but the objective is {objective!r}; "
            f"pass --objective energy or drop --mean-weight."
        )
    from perturbax.data.stream import stream_plan

    adata = read_h5ad(data_path, where, backed=True)
    streamed, plan = stream_plan(adata.n_obs, adata.n_vars, stream)
    if streamed and layer is not None:
        raise ValueError(f"--layer {layer} cannot be streamed from disk (only X can); pass --no-stream.")
    if not streamed:
        adata = read_h5ad(data_path, where)
    data = from_anndata(
        adata,
        perturbation_key,
        control,
        sep=sep,
        dose_key=dose_key,
        time_key=time_key,
        layer=layer,
        context_keys=tuple(context_keys),
        counts=likelihood == "negative_binomial",
        on_disk=streamed,
    )
    held = held_out_conditions(data, holdout, "--holdout")
    if held:
        data = data.select(held, exclude=True)
    perturbed = [c for c in data.conditions if c != data.control]
    if not perturbed:
        raise ValueError(
            f"{data_path} holds only control cells ({control!r} in obs[{perturbation_key!r}])"
            + (" once --holdout is left out" if held else "")
            + "; the model learns perturbation effects from perturbed cells, so fit data with at least one "
            "perturbed condition (or check --perturbation-key and --control)."
        )
    sizes = dict(
        n_genes=data.n_genes,
        n_perturbations=data.K,
        likelihood=likelihood,
    )
    if latent_dim is not None:
        sizes["latent_dim"] = latent_dim
    if model == "dynamics":
        config = LatentDynamicsConfig(**sizes, time_scale=time_scale)
    else:
        config = AdditiveShiftConfig(**sizes)
    result = fit_model(
        MODELS[model],
        data,
        config=config,
        objective=objective,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
        energy=EnergyOptions(mean_weight=mean_weight) if objective == "energy" else None,
        select=select,
        devices=devices,
        recipe=staged if model == "dynamics" else None,
    )
    record = {
        "data": str(Path(data_path).resolve()),
        "control": control,
        "layer": layer,
        "dose_key": dose_key,
        "sep": sep,
        "context_keys": list(context_keys),
        "holdout": held,
        "likelihood": likelihood,
        "latent_dim": result.config.latent_dim,
        "model": model,
        "time_key": time_key,
        "time_scale": getattr(result.config, "time_scale", None),
        "mean_weight": mean_weight,
        "where": list(where),
        "data_plan": plan,
    }
    if result.info.get("stop_reason") == "nan" and not result.info.get("steps_run"):
        raise ValueError(
            f"The loss was not finite from the first steps (--learning-rate {result.info['learning_rate']:g}), so "
            f"nothing was "
            f"learned and nothing was saved. Try a smaller --learning-rate or a larger --batch-size, and check "
            f"the data for extreme values."
        )
    result = dataclasses.replace(result, info={**result.info, "cli": record})
    try:
        result.save(out, overwrite=overwrite)
    except (OSError, TypeError) as err:
        raise ValueError(f"Could not save the fit to {out} ({type(err).__name__}: {err}).") from None
    return result, data, held


@click.command("fit")
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--perturbation-key", "-k", required=True, help="obs column with perturbation labels.")
@click.option("--control", "-c", required=True, help="Label of control (unperturbed) cells.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=True, file_okay=False),
              help="Folder to save the fit in (created; its parent must exist; new or empty unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the fit saved in a non-empty --out folder.")
@click.option("--objective", type=click.Choice(["energy", "elbo"]), default=None,
              help="Training objective [default: energy for gaussian/implicit, elbo for negative_binomial; "
                   "for --model dynamics the staged recipe (ELBO, order, energy stage of a length chosen on "
                   "held-out training contexts); giving --objective fits that one stage].")
@click.option("--likelihood", type=click.Choice(["gaussian", "negative_binomial", "implicit"]),
              default="gaussian", show_default=True,
              help="gaussian: log-normalised data; negative_binomial: raw counts (use --layer); "
                   "implicit: noise fed to the decoder (energy only).")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Optimiser steps (--model dynamics recipe: of its first stage; the others are fractions of it) "
                   "[default: 2000; with the nested estimator of the additive model, up to 5 cycles of 2000 chosen "
                   "by CV over the training conditions; a number fixes the length].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the fit.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Cells per step.")
@click.option("--latent-dim", "-d", default=None, type=click.IntRange(min=1),
              help="Latent dimension d [default: as perturbax.inference.fit: 10 additive, 5 dynamics].")
@click.option("--learning-rate", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Initial Adam step size (cosine-decayed) [default: as perturbax.inference.fit: 0.002 additive, "
                   "0.005 dynamics].")
@click.option("--layer", default=None, help="Layer with the expression to fit (default X); e.g. counts.")
@click.option("--dose-key", default=None, help="obs column of doses aligned with the components ('0.5+2').")
@click.option("--sep", default="+", show_default=True, callback=check_sep,
              help="Separator of combined perturbations (not ',' or ':').")
@click.option("--context-keys", "--covariate-keys", "context_keys", default=None,
              help="Comma-separated categorical obs columns of the contexts (cell type, cell line, donor, batch), e.g. "
                   "cell_type; conditions are then (perturbation, context) pairs written 'A @ cell_type=CD4T' "
                   "(--covariate-keys: the former name, same option).")
@click.option("--holdout", default=None,
              help='Comma-separated conditions to leave out of training, e.g. "A+B,C"; with --context-keys also '
                   '(perturbation, context) pairs, e.g. "stimulated @ cell_type=CD4T" (a plain label: every context).')
@click.option("--model", "model", type=click.Choice(sorted(MODELS)), default="additive", show_default=True,
              help="additive: additive latent shift model; dynamics: latent dynamical causal programs over "
                   "time (needs --time-key).")
@click.option("--time-key", default=None, help="Numeric obs column of time since the perturbation (--model dynamics).")
@click.option("--time-scale", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Time over which the latent programs relax, in the units of --time-key (--model dynamics). "
                   "Default: the median of the distinct positive training times.")
@click.option("--mean-weight", default=0.0, show_default=True, type=FiniteFloat(min=0),
              help="Energy objective: weight of the squared distance between simulated and real condition means "
                   "added to the energy score (experts; no benchmark supports a value other than 0).")
@click.option("--no-select", is_flag=True,
              help="Additive model: skip the nested estimator and its selection on training conditions "
                   "(plain model fit: one fit instead of three, uncalibrated intervals).")
@click.option("--no-recipe", is_flag=True,
              help="--model dynamics: one plain ELBO fit instead of the staged recipe (experts; stage by hand "
                   "with --objective).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--devices", default=None, type=click.IntRange(min=1),
              help="Split each step's cells over the first N devices (default: all local devices).")
@click.option("--stream/--no-stream", default=None,
              help="Read the cells from disk while fitting / load them into memory (default: stream when they "
                   "would not fit in memory; the output says which).")
@where_option()
def fit(data, perturbation_key, control, out, overwrite, objective, likelihood, steps, seed, batch_size, latent_dim,
        learning_rate, layer, dose_key, sep, context_keys, holdout, model, time_key, time_scale, mean_weight,
        no_select, no_recipe, no_progress, devices, stream, where):
    """Fit the additive latent shift model to DATA (h5ad) and save it to --out.

    With --model dynamics (and --time-key) the latent dynamics model is fitted instead: latent
    programs that evolve after the perturbation is switched on at t = 0; predict it at any times
    with `perturbax predict MODEL_DIR --perturbations ... --times 2,4,8`.

    Every condition in DATA trains the model except those in --holdout. The objective defaults to
    energy for the gaussian and implicit likelihoods and to elbo for negative_binomial (to elbo
    for --model dynamics); implicit + elbo and negative_binomial + energy cannot work and are refused. negative_binomial
    needs raw integer counts (e.g. --layer counts). Predict from the saved fit with
    `perturbax predict MODEL_DIR --perturbations ...`; predictions are in the expression space of
    the fitted matrix (X or --layer).
    """
    from perturbax.cli.paths import check_outputs
    from perturbax.inference.result import FIT_FILES

    check_outputs(folders={"--out": out}, inputs={"DATA": data}, overwrite=overwrite,
                  replaceable=frozenset(FIT_FILES))
    covs = split_list(context_keys, "context keys", "--context-keys")
    held = split_list(holdout, "held-out conditions", "--holdout")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        warnings.simplefilter("always", UserWarning)
        try:
            result, used, held_out = fit_file(
                data, perturbation_key=perturbation_key, control=control, out=out, objective=objective,
                likelihood=likelihood, steps=steps, seed=seed, batch_size=batch_size, latent_dim=latent_dim,
                learning_rate=learning_rate, layer=layer, dose_key=dose_key, sep=sep, context_keys=covs,
                holdout=held, progress=not no_progress, model=model, time_key=time_key, time_scale=time_scale,
                mean_weight=mean_weight, overwrite=overwrite, where=where, select=False if no_select else None,
                devices=devices, stream=stream,
                recipe=False if no_recipe else None,
            )
        except (ValueError, KeyError) as err:
            raise click.ClickException(cli_message(err)) from None
    for w in caught:
        if issubclass(w.category, (RuntimeWarning, UserWarning)):
            click.echo(f"warning: {cli_message(w.message)}", err=True)

    info = result.info
    loss = np.asarray(result.history["loss"])
    final = f"{loss[-1]:.6g}" if loss.size else "n/a"
    lines = [
        f"Fitted {result.model_name} (objective {result.objective}"
        + (", staged recipe" if info.get("recipe") else "")
        + f", likelihood {likelihood}, latent_dim {result.config.latent_dim}) on {used.n_cells} cells x {used.n_genes} genes, {used.n_conditions} conditions, "
        f"K={used.K} elementary perturbations"
        + (f" ({len(result.seen_elementary)} seen in training)" if len(result.seen_elementary) != used.K else "")
        + ".",
    ]
    lines.append(info["cli"]["data_plan"] + f" Devices: {info.get('devices', 1)}.")
    if used.context_keys:
        lines.append("Contexts: " + "; ".join(f"{k} ({len(c)}: {', '.join(c)}; reference {c[0]})"
                                              for k, c in used.registry.contexts)
                     + f" -- {used.registry.n_perturbations} perturbation(s) + {used.K - used.registry.n_perturbations} "
                       f"context columns in the label vector.")
    if held_out:
        lines.append(f"Held out {len(held_out)} condition(s): {', '.join(held_out)}")
    if info.get("times") is not None:
        ctx = info.get("contexts") or {}
        lines.append(
            f"Times ({time_key}): {', '.join(f'{t:g}' for t in info['times'])}"
            + (f"; {ctx.get('n_contexts')} (condition, time) contexts, check {ctx.get('status')}" if ctx else "")
        )
        scale = getattr(result.config, "time_scale", None)
        if scale is not None:
            lines.append(f"Time scale: {scale:g} {time_key} units (the programs relax over about this long; "
                         + ("set by --time-scale)" if time_scale is not None else
                            "the median of the distinct positive training times; set it with --time-scale)"))
    from perturbax.inference.fitting import DEFAULT_STEPS

    cycles = int(info.get("cycles", 1))
    limit = steps if steps is not None else DEFAULT_STEPS * cycles
    chosen = f" ({cycles} cycles of {DEFAULT_STEPS}, chosen by the CV)" if cycles > 1 else ""
    lines.append(f"Steps run: {info.get('steps_run')} of {limit}{chosen}; stop reason: {info.get('stop_reason')}")
    lines.append(f"Final loss: {final}")
    val = np.asarray(result.history.get("val_loss", []))
    if val.size and info.get("best_val_loss") is not None:
        last_step = int(np.asarray(result.history["val_step"])[-1])
        lines.append(f"Held-out loss: best {info['best_val_loss']:.6g} at step {info['best_step']} (the parameters "
                     f"saved), last {val[-1]:.6g} at step {last_step}")
    lines.extend(selection_lines(info.get("selection")))
    if info.get("recipe"):
        from perturbax.inference.dynamics_recipe import recipe_lines

        lines.extend(recipe_lines(info["recipe"]))
    lines.append(f"Saved to {out}")
    click.echo("\n".join(lines))
