"""The additive-shift model on the ``norman-doubles`` protocol (DESIGN section 6, issue 3).

Five folds over the 15 Norman et al. 2019 doubles (sorted; fold k holds out index i with
i % 5 == k); train on control + singles + the other 12 doubles. For every fold the
additive-shift model (Gaussian likelihood on the log1p expression) is fitted with the energy
objective and with the ELBO, every held-out double is predicted (as cells, from the basal states of
the training control cells) and scored with ``evaluate_conditions`` (energy distance in a 50-PC
space fit on the fold's training cells, Pearson delta on all genes and on the top-20 DE genes,
R^2 / MSE on the top-20 DE genes) next to the control, additive and linear baselines and the
split-half noise floor, recomputed here exactly as in ``benchmarks/baselines.py``. Also per
double: the spread of the predicted cells (per-gene standard deviation, predicted / observed).

Held-out doubles come in two groups:

- ``both singles measured`` (``combo_seen2``, 5 doubles): inside the span of the training labels.
- ``other`` (10 doubles): a gene never measured alone. A gene that occurs in no training condition
  is *refused* by ``predict`` (``UnseenPerturbationError``); the script records the refusal and then
  predicts with ``allow_unseen=True`` (the gene's shift is a prior draw). A gene seen only inside
  training doubles is predicted, and ``predict`` warns that the double is not identified; the
  warning is recorded.

Prints the tables and replaces the section between ``<!-- norman-models:start -->`` and
``<!-- norman-models:end -->`` in docs/benchmarks.md (other sections are kept).

    .venv/bin/python benchmarks/norman_doubles_models.py            # 5 folds x 2 objectives, ~11 min
    .venv/bin/python benchmarks/norman_doubles_models.py --quick    # fold 0, energy, fewer steps; no doc

Tuning runs: ``--folds 0 2 3 4 --objectives energy --set latent_dim=16 --set init=scale+centre+skip
--no-doc --log FILE`` (``--set`` overrides any key of ``SETTINGS[objective]``; ``--log FILE``
appends a JSON line with the settings and the summary of every run; runs with ``--folds`` or
``--set`` never write the doc). What was tried, with numbers: ``WHAT_WAS_TRIED`` below and the
docs section. Final settings: energy latent 32 with the built-in model (whose energy fits start
from the data, ``fit(data_init=None)``: what ``scale+centre`` of ``data_initialised_model`` did
before it moved into the package) and ``EnergyOptions(mean_weight=1)``; ELBO latent 32 with the
built-in ``additive_shift`` model.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import write_section  # noqa: E402

import argparse
import ast
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from perturbax.baselines import AdditiveBaseline, ControlBaseline, LinearBaseline, split_half_noise_floor
from perturbax.cli.evaluate import markdown_table, text_table
from perturbax.data import from_anndata
from perturbax.data.datasets import NORMAN19_CONTROL, NORMAN19_PERTURBATION_KEY, load_norman19
from perturbax.data.splits import norman_doubles_folds
from perturbax.inference import EnergyOptions, fit, predict
from perturbax.inference.prediction import UnseenPerturbationError
from perturbax.metrics import evaluate_conditions
from perturbax.models import (
    CELL_PLATE,
    AdditiveShiftConfig,
    base_distribution,
    gaussian_likelihood,
    network,
    perturbation_effects,
)

REPO = Path(__file__).resolve().parents[1]
SECTION = "norman-models"
SUBSET = {"combo_seen2": "both singles measured", "combo_seen1": "other", "combo_seen0": "other"}
BASELINES = ["control", "additive", "linear", "noise_floor"]

# Final settings: per objective, among the runs in WHAT_WAS_TRIED (folds 0, 2, 3, 4, which hold the 5
# doubles with both singles measured), the best mean energy distance; for the energy objective
# mean_weight=1 was then added because it fits the *training* conditions better (fold-0 diagnostic in
# READING), with held-out energy within the run-to-run noise of the best run.
SETTINGS: dict[str, dict] = {
    "energy": dict(
        likelihood="gaussian",
        latent_dim=32,
        decoder_hidden=(128, 128),
        encoder_hidden=(128, 128),
        w_scale=1.0,
        steps=2000,
        batch_size=256,
        learning_rate=5e-3,
        cells_per_condition=64,
        conditions_per_step=None,
        reconstruction_weight=1.0,
        prior_weight=1.0,
        gb_weight=0.3,
        beta=1.0,
        global_guide="lowrank",
        patience=None,
        validation_fraction=0.1,
        eval_every=100,
        init="default",
        moved="control,singles",
        source="other",
        mean_weight=1.0,
    ),
    "elbo": dict(
        likelihood="gaussian",
        latent_dim=32,
        decoder_hidden=(128, 128),
        encoder_hidden=(128, 128),
        w_scale=1.0,
        steps=2000,
        batch_size=256,
        learning_rate=5e-3,
        global_guide="lowrank",
        patience=None,
        validation_fraction=0.1,
        eval_every=100,
        init="default",
        moved="",
    ),
}
QUICK = dict(steps=300, eval_every=100)

# Tuning runs, measured with this script (``--log``): means over the 5 doubles with both singles
# measured (folds 0, 2, 3, 4 unless noted), fit wall seconds per fold (min-max) on the shared 2-core
# machine. Settings not named are those of SETTINGS at the time (steps 2000, lr 5e-3, decoder and
# encoder (128, 128), 64 cells x 4 conditions per energy step, gb_weight 0.3).
WHAT_WAS_TRIED: list[dict] = [
    dict(objective="energy", run="latent 10, init default (fold 0 only)", energy=0.2279, pearson_top20=0.958, sd_ratio=0.56,
         fit_wall_s="116"),
    dict(objective="elbo", run="latent 10, init default (fold 0 only)", energy=0.1766, pearson_top20=0.959, sd_ratio=1.01,
         fit_wall_s="55"),
    dict(objective="energy", run="latent 10, init default", energy=0.1213, pearson_top20=0.863, sd_ratio=0.56,
         fit_wall_s="62-128"),
    dict(objective="energy", run="latent 10, init scale+centre", energy=0.0463, pearson_top20=0.892, sd_ratio=0.99,
         fit_wall_s="77-152"),
    dict(objective="energy", run="latent 10, scale+centre, control-residual prediction", energy=0.0957, pearson_top20=0.850, sd_ratio=0.99,
         fit_wall_s="77-131"),
    dict(objective="elbo", run="latent 10, init default", energy=0.0912, pearson_top20=0.861, sd_ratio=1.08,
         fit_wall_s="38-54"),
    dict(objective="elbo", run="latent 10, init scale+centre", energy=0.5433, pearson_top20=0.136, sd_ratio=1.15,
         fit_wall_s="19-44"),
    dict(objective="energy", run="latent 32, init scale+centre (final setting of the previous stop)", energy=0.0271, pearson_top20=0.927, sd_ratio=0.99,
         fit_wall_s="94-109"),
    dict(objective="energy", run="latent 32, scale+centre, control-residual prediction", energy=0.0633, pearson_top20=0.875, sd_ratio=0.99,
         fit_wall_s="94-109"),
    dict(objective="elbo", run="latent 32, init default (final)", energy=0.0428, pearson_top20=0.912, sd_ratio=1.08,
         fit_wall_s="34-42"),
    dict(objective="elbo", run="latent 32, default, control-residual prediction", energy=0.0735, pearson_top20=0.846, sd_ratio=0.99,
         fit_wall_s="34-42"),
    dict(objective="energy", run="latent 64, init scale+centre", energy=0.0558, pearson_top20=0.906, sd_ratio=1.00,
         fit_wall_s="133-159"),
    dict(objective="energy", run="latent 32, scale+centre, 32 cells x 8 conditions per step", energy=0.0322, pearson_top20=0.897, sd_ratio=0.99,
         fit_wall_s="60-67"),
    dict(objective="energy", run="latent 32, init scale+centre+skip (linear skip path in the decoder)", energy=0.0302, pearson_top20=0.936, sd_ratio=0.98,
         fit_wall_s="60-71"),
    dict(objective="energy", run="latent 32, scale+centre+skip, learning_rate 0.01", energy=0.0374, pearson_top20=0.907, sd_ratio=0.99,
         fit_wall_s="69-79"),
    dict(objective="energy", run="latent 32, scale+centre+skip, decoder_hidden (256, 256)", energy=0.0306, pearson_top20=0.933, sd_ratio=0.97,
         fit_wall_s="76-87"),
    dict(objective="energy", run="latent 32, init scale+centre, gb_weight 3.0", energy=0.0294, pearson_top20=0.897,
         sd_ratio=0.94, fit_wall_s="57-78"),
    dict(objective="energy", run="latent 32, init scale+centre, 5000 steps", energy=0.031, pearson_top20=0.903,
         sd_ratio=1.02, fit_wall_s="107-123"),
    dict(objective="elbo", run="latent 32, init centre+skip, 4000 steps", energy=0.1191, pearson_top20=0.821, sd_ratio=1.07,
         fit_wall_s="38-41"),
    dict(objective="elbo", run="latent 32, init default, 6000 steps", energy=0.0819, pearson_top20=0.734, sd_ratio=1.09,
         fit_wall_s="31-48"),
    # (runs below on an idle machine, so their wall times are ~2x shorter than the ones above)
    dict(objective="energy", run="latent 32, scale+centre, source='control' (simulate from control cells)",
         energy=0.0346, pearson_top20=0.941, sd_ratio=1.01, fit_wall_s="33-38"),
    dict(objective="energy", run="latent 32, scale+centre, beta 1.5", energy=0.0269, pearson_top20=0.922, sd_ratio=0.96,
         fit_wall_s="38-42"),
    dict(objective="energy", run="latent 32, scale+centre, beta 1.5, source='control'", energy=0.0295,
         pearson_top20=0.931, sd_ratio=0.99, fit_wall_s="33-41"),
    dict(objective="energy", run="latent 32, scale+centre, mean_weight 1 (final; scale+centre is now the built-in start)",
         energy=0.0288, pearson_top20=0.947,
         sd_ratio=0.96, fit_wall_s="42-52"),
    dict(objective="energy", run="latent 32, scale+centre, mean_weight 5", energy=0.0430, pearson_top20=0.929,
         sd_ratio=0.97, fit_wall_s="39-49"),
    dict(objective="energy", run="latent 32, scale+centre, mean_weight 1, source='control'", energy=0.0322,
         pearson_top20=0.916, sd_ratio=0.95, fit_wall_s="36-39"),
    # (fold 0 alone, where the gap to the baselines is largest; the final settings score 0.0422 / 0.990 / 0.90 there)
    dict(objective="energy", run="final settings, gb_weight 100 (narrow posterior over W) (fold 0 only)",
         energy=0.0369, pearson_top20=0.989, sd_ratio=0.88, fit_wall_s="47"),
    dict(objective="energy", run="final settings, 4000 steps (fold 0 only)", energy=0.0506, pearson_top20=0.984,
         sd_ratio=0.90, fit_wall_s="76"),
    dict(objective="energy", run="final settings, likelihood implicit (noise fed into the decoder) (fold 0 only)",
         energy=0.0390, pearson_top20=0.986, sd_ratio=0.67, fit_wall_s="36"),
    # (linear decoder, decoder_hidden=(): with the counterfactual prediction it is the linear baseline's
    # form, control cells + a fitted shift, so it tests whether the model's shifts are the problem)
    dict(objective="energy", run="final settings, linear decoder (decoder_hidden=())", energy=0.0288,
         pearson_top20=0.924, sd_ratio=0.95, fit_wall_s="40-65"),
    dict(objective="energy", run="final settings, linear decoder, control-residual prediction", energy=0.0724,
         pearson_top20=0.861, sd_ratio=1.00, fit_wall_s="40-65"),
    dict(objective="elbo", run="final settings, linear decoder (decoder_hidden=())", energy=2.532,
         pearson_top20=0.219, sd_ratio=1.11, fit_wall_s="13-18"),
]


# --------------------------------------------------------------------------- helpers
def sd_ratio(pred: np.ndarray, true: np.ndarray, control: np.ndarray, top_k: int = 20) -> dict[str, float]:
    """Spread of predicted vs observed cells: per-gene SD ratio pred / true, averaged over genes.

    ``sd_ratio``: genes detected (> 0) in at least 10% of the observed cells of the condition
    (genes that are ~always zero have an SD near 0 and an unstable ratio);
    ``sd_ratio_top20``: the top-k DE genes of the observed cells (same ranking as the metrics).
    """
    from perturbax.metrics import top_de_genes

    sp, st = pred.std(0, ddof=1), true.std(0, ddof=1)
    expressed = ((true > 0).mean(0) >= 0.10) & (st > 0)
    top = np.asarray(top_de_genes(true, control, top_k))
    top = top[st[top] > 0]
    return {
        "sd_ratio": float(np.mean(sp[expressed] / st[expressed])) if expressed.any() else np.nan,
        f"sd_ratio_top{top_k}": float(np.mean(sp[top] / st[top])) if top.size else np.nan,
        "n_sd_genes": int(expressed.sum()),
    }


def _score(pred: dict, truth: dict, control: np.ndarray, reference: np.ndarray, method: str, *, n_pcs, top_k):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Pearson correlation", category=RuntimeWarning)
        t = evaluate_conditions(pred, truth, control, reference=reference, n_pcs=n_pcs, top_k=top_k,
                                energy_form="U", method=method)
    extra = pd.DataFrame([sd_ratio(pred[c], truth[c], control, top_k) for c in t["condition"]])
    return pd.concat([t.reset_index(drop=True), extra], axis=1)


def model_config(data, s: dict) -> AdditiveShiftConfig:
    return AdditiveShiftConfig(
        n_genes=data.n_genes,
        n_perturbations=data.K,
        latent_dim=int(s["latent_dim"]),
        likelihood=str(s.get("likelihood", "gaussian")),
        w_scale=float(s["w_scale"]),
        decoder_hidden=tuple(s["decoder_hidden"]),
        encoder_hidden=tuple(s["encoder_hidden"]),
        seed=int(s.get("seed", 0)),
    )


def data_initialised_model(x_train: np.ndarray, *, scale_init: bool, centre: bool, skip: bool = False,
                           floor: float = 0.01):
    """The additive-shift model (same sites and priors as ``additive_shift_model`` with the Gaussian
    likelihood) with two data-driven initialisations the built-in model lacks:

    - ``scale_init``: the per-gene noise scale ``x_scale`` starts at the per-gene SD of the training
      cells (floored at ``floor``) instead of 0.5 everywhere (most of the 500 genes are ~always 0);
    - ``centre``: the decoder output is ``mlp(z) + mean_g`` with ``mean_g`` the training mean of gene
      g (a constant), so the network starts at the average cell and learns deviations;
    - ``skip``: a linear map of z (param ``decoder_skip``) is added to the decoder output.

    Passed to ``fit`` as a model function (``SETTINGS[objective]["init"]``, e.g. ``"scale+centre"``).
    """
    import numpyro

    sd = np.maximum(x_train.std(0), floor).astype(np.float32)
    mean = x_train.mean(0).astype(np.float32)

    def additive_shift_datainit(batch, *, config, n_cells):
        import jax.numpy as jnp

        d = config.latent_dim
        W = perturbation_effects("W", d, config.n_perturbations, prior=config.w_prior, scale=config.w_scale)
        mlp = network("decoder", d, config.n_genes, config.decoder_hidden, seed=config.seed)
        offset = jnp.asarray(mean) if centre else 0.0
        lin = network("decoder_skip", d, config.n_genes, (), seed=config.seed) if skip else None
        decode = (lambda v: mlp(v) + lin(v) + offset) if skip else (lambda v: mlp(v) + offset)
        with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
            z_base = numpyro.sample("z_base", base_distribution(config.base, d))
            z = z_base + batch.l @ W.T
            gaussian_likelihood(decode, z, batch.x, n_genes=config.n_genes,
                                scale_init=jnp.asarray(sd) if scale_init else 0.5)

    return additive_shift_datainit


def fit_model(train, objective: str, s: dict, seed: int):
    cfg = model_config(train, s)
    init = s.get("init", "default")
    if init == "default":
        model = "additive_shift"
    else:
        model = data_initialised_model(train.dense(), scale_init="scale" in init, centre="centre" in init,
                                       skip="skip" in init)
    energy = None
    if objective == "energy":
        energy = EnergyOptions(
            beta=float(s["beta"]),
            cells_per_condition=int(s["cells_per_condition"]),
            conditions_per_step=s["conditions_per_step"],
            reconstruction_weight=float(s["reconstruction_weight"]),
            prior_weight=float(s["prior_weight"]),
            gb_weight=float(s["gb_weight"]),
            source=str(s.get("source", "other")),
            mean_weight=float(s.get("mean_weight", 0.0)),
        )
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(
        model, train, config=cfg, objective=objective, steps=int(s["steps"]),
        batch_size=int(s["batch_size"]), learning_rate=float(s["learning_rate"]), seed=seed,
        global_guide=s["global_guide"], energy=energy, validation_fraction=float(s["validation_fraction"]),
        eval_every=int(s["eval_every"]), patience=s["patience"], progress=False,
        data_init=None if init == "default" else False,
        select=False,  # the model itself, not fit's nested estimator (ridge + lambda x the model's remainder)
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result, wall, cpu


def predict_doubles(result, labels, *, n_cells: int, num_samples: int, seed: int):
    """Predict the held-out doubles in one ``predict`` call; record refusals (a gene in no training
    condition: ``UnseenPerturbationError`` unless ``allow_unseen=True``) and the identifiability
    warnings ``predict`` gives for labels outside the span of the training labels."""
    seen = set(result.seen_elementary)
    never = {lab: [g for g in lab.split("+") if g not in seen] for lab in labels}
    refusal = {}
    for lab in labels:
        if never[lab]:
            try:
                predict(result, [lab], n_cells=2, num_samples=1, seed=seed)
                refusal[lab] = ""
            except UnseenPerturbationError as err:
                refusal[lab] = str(err)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pa = predict(result, list(labels), n_cells=n_cells, num_samples=num_samples, seed=seed,
                     allow_unseen=any(never.values()))
    messages = [str(w.message) for w in caught]
    meta = pa.uns["perturbax"]
    key = result.perturbation_key
    cov = meta["coverage"]
    cells, notes = {}, []
    for i, (lab, canon) in enumerate(zip(labels, meta["labels"])):
        # coverage notes: {label: {field: value}} or columnar {field: array over labels}
        c = cov[canon] if canon in cov else {f: np.asarray(v)[i] for f, v in cov.items()}
        cells[lab] = np.asarray(pa.X[(pa.obs[key].astype(str) == canon).to_numpy()], dtype=np.float32)
        warned = [m for m in messages if m.startswith(repr(canon)) and "not identified" in m]
        notes.append({
            "condition": lab,
            "never_in_training": "+".join(never[lab]),
            "refused_without_allow_unseen": bool(refusal.get(lab)),
            "covered": bool(c["covered"]),
            "theory": str(c.get("message", "")),
            "warned_not_identified": bool(warned),
            "refusal": refusal.get(lab, ""),
            "warning": warned[0] if warned else "",
        })
    return cells, notes


MOVED_STARTS = ("control", "singles")


def predict_moved(result, train, labels, start: str, *, n_cells: int, num_samples: int, seed: int) -> dict:
    """Measured cells moved by the model (``predict(..., source=cells)``: each cell plus the model's
    change of its mean from its own label to the double): ``start="control"``, the training control
    cells; ``"singles"``, the training cells of the double's genes measured alone (a double with
    neither single measured gets no prediction). Up to ``n_cells`` cells per double, each source
    cell used once. A gene never seen in training gets its prior shift (``allow_unseen``), as in
    :func:`predict_doubles`."""
    if start not in MOVED_STARTS:
        raise ValueError(f"moved start {start!r} is not one of {MOVED_STARTS}")
    conditions = set(train.conditions)
    out = {}
    for lab in labels:
        names = [train.control] if start == "control" else [g for g in lab.split("+") if g in conditions]
        if not names:
            continue
        src = train.select(names)
        with warnings.catch_warnings():  # the not-identified warnings are recorded by predict_doubles
            warnings.simplefilter("ignore")
            pred = predict(result, [lab], source=src, n_cells=min(n_cells, src.n_cells), num_samples=num_samples,
                           seed=seed, allow_unseen=True)
        out[lab] = np.asarray(pred.X, dtype=np.float32)
    return out


# --------------------------------------------------------------------------- run
def run(*, folds, objectives, settings, data_path=None, n_pcs=50, top_k=20, alpha=0.1, seed=0,
        n_pred_cells=500, num_samples=100, verbose=True):
    adata = load_norman19(data_path)
    data = from_anndata(adata, NORMAN19_PERTURBATION_KEY, NORMAN19_CONTROL)
    splits = norman_doubles_folds(data, 5)
    rows, notes, timing = [], [], []
    for k in folds:
        split = splits[k]
        train = split.train
        control = train.dense(train.cells_of(train.control))
        reference = train.dense()
        test = split.test.cells_by_condition()
        truth = {c: test[c] for c in split.test_labels}
        groups = dict(split.test_groups)
        kw = dict(n_pcs=n_pcs, top_k=top_k)
        tabs = []
        for m in (ControlBaseline(), AdditiveBaseline(unmeasured="zero"), LinearBaseline(alpha=alpha, unmeasured="zero")):
            tabs.append(_score(m.fit(train).predict(split.test_labels), truth, control, reference, m.name, **kw))
        halves = {c: split_half_noise_floor(x, seed=seed) for c, x in truth.items()}
        tabs.append(_score({c: h[0] for c, h in halves.items()}, {c: h[1] for c, h in halves.items()},
                           control, reference, "noise_floor", **kw))
        for obj in objectives:
            s = settings[obj]
            result, wall, cpu = fit_model(train, obj, s, seed)
            t1 = time.perf_counter()
            cells, fold_notes = predict_doubles(result, split.test_labels, n_cells=n_pred_cells,
                                                num_samples=num_samples, seed=seed)
            pred_s = time.perf_counter() - t1
            name = f"model_{obj}"
            tabs.append(_score(cells, truth, control, reference, name, **kw))
            for start in [v for v in s.get("moved", "").split(",") if v]:
                cf = predict_moved(result, train, split.test_labels, start, n_cells=n_pred_cells,
                                   num_samples=num_samples, seed=seed)
                cf_truth = {c: truth[c] for c in cf}
                tabs.append(_score(cf, cf_truth, control, reference, f"{name}_moved_{start}", **kw))
            notes += [dict(n, fold=k, method=name, group=groups[n["condition"]]) for n in fold_notes]
            info = result.info
            timing.append({
                "fold": k, "method": name, "fit_wall_s": wall, "fit_cpu_s": cpu, "fit_loop_s": info["fit_seconds"],
                "steps_run": info["steps_run"], "best_step": info["best_step"],
                "stop": info["stop_reason"], "predict_s": pred_s,
            })
            if verbose:
                print(f"  fold {k} {name}: fit {wall:.1f} s wall, {cpu:.1f} s CPU ({info['steps_run']} steps, best "
                      f"{info['best_step']}, {info['stop_reason']}), predict {pred_s:.1f} s", flush=True)
        for t in tabs:
            rows.append(t.assign(fold=k, group=[groups[c] for c in t["condition"]]))
    table = pd.concat(rows, ignore_index=True)
    table["subset"] = table["group"].map(SUBSET)
    order = BASELINES + [m for o in objectives
                         for m in (f"model_{o}", *(f"model_{o}_moved_{v}" for v in MOVED_STARTS))]
    table["method"] = pd.Categorical(table["method"], categories=order, ordered=True)
    table = table.sort_values(["method", "fold", "condition"], kind="stable").reset_index(drop=True)
    table["method"] = table["method"].astype(str)
    return table, pd.DataFrame(notes), pd.DataFrame(timing)


METRICS = ["energy_pca", "pearson_delta", "pearson_delta_top20", "r2_top20", "mse_top20",
           "sd_ratio", "sd_ratio_top20"]


def _order(df: pd.DataFrame, methods) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(methods)}
    key = df["method"].map(rank)
    return df.assign(_k=key).sort_values([c for c in ("subset_rank", "fold") if c in df] + ["_k"], kind="stable").drop(columns="_k")


def summaries(table: pd.DataFrame, top_k: int = 20) -> dict[str, pd.DataFrame]:
    metrics = [m.replace("20", str(top_k)) for m in METRICS]
    methods = list(dict.fromkeys(table["method"]))
    t = table.copy()
    out = {}
    mean = t.groupby(["subset", "method"], sort=False)[metrics].mean()
    n = t.groupby(["subset", "method"], sort=False).size().rename("n")
    npear = t.groupby(["subset", "method"], sort=False)["pearson_delta"].count().rename("n_pearson")
    m = pd.concat([n, npear, mean], axis=1).reset_index()
    m["subset_rank"] = m["subset"].map({"both singles measured": 0, "other": 1})
    out["mean"] = _order(m, methods).drop(columns="subset_rank").reset_index(drop=True)
    s2 = t[t["subset"] == "both singles measured"]
    pf = s2.groupby(["fold", "method"], sort=False)[metrics].mean()
    pf.insert(0, "doubles", s2.groupby(["fold", "method"], sort=False)["condition"].agg(", ".join))
    pf = pf.reset_index()
    out["per_fold_seen2"] = _order(pf, methods).reset_index(drop=True)
    out["per_double"] = _order(t[["method", "fold", "group", "condition"] + metrics], methods).sort_values(
        ["group", "condition"], ascending=[False, True], kind="stable").reset_index(drop=True)
    return out


def headline(table: pd.DataFrame) -> dict:
    """Numbers the issue asks about, per method, on the 5 'both singles measured' doubles."""
    s2 = table[table["subset"] == "both singles measured"].groupby("method")
    return {m: {"energy": float(g["energy_pca"].mean()), "pearson_top20": float(g["pearson_delta_top20"].mean()),
                "pearson": float(g["pearson_delta"].mean()), "sd_ratio": float(g["sd_ratio"].mean()),
                "sd_ratio_top20": float(g["sd_ratio_top20"].mean())} for m, g in s2}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, val = item.partition("=")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fold 0, energy only, few steps, no doc")
    ap.add_argument("--folds", type=int, nargs="+", default=None, help="folds to run (default all 5)")
    ap.add_argument("--objectives", nargs="+", default=None, choices=["energy", "elbo"],
                    help="default: energy elbo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of every objective run (e.g. latent_dim=16)")
    ap.add_argument("--data", default=None, help="path of perturbench_devel_norman19_mcfaline23.h5ad")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-pred-cells", type=int, default=500)
    ap.add_argument("--num-samples", type=int, default=100, help="posterior draws per prediction")
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--csv", default=None, help="also write the per-double table as CSV")
    ap.add_argument("--log", default=None, help="append a JSON line with settings + summary")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args(argv)

    objectives = args.objectives or (["energy"] if args.quick else ["energy", "elbo"])
    folds = args.folds or ([0] if args.quick else list(range(5)))
    overrides = _parse_set(args.set)
    settings = {o: {**SETTINGS[o], **(QUICK if args.quick else {}), **overrides} for o in objectives}
    for o in objectives:
        unknown = set(overrides) - set(SETTINGS[o]) - {"seed"}
        if unknown:
            ap.error(f"unknown setting(s) for {o}: {sorted(unknown)}; known: {sorted(SETTINGS[o])}")

    t0 = time.perf_counter()
    args.load_start = os.getloadavg()[0]
    table, notes, timing = run(folds=folds, objectives=objectives, settings=settings, data_path=args.data,
                               seed=args.seed, n_pred_cells=args.n_pred_cells, num_samples=args.num_samples)
    elapsed = time.perf_counter() - t0
    tabs = summaries(table)
    print("\nMean over held-out doubles:\n" + text_table(tabs["mean"]))
    print("\nPer fold, 'both singles measured' doubles:\n" + text_table(tabs["per_fold_seen2"]))
    print("\nFit time:\n" + text_table(timing))
    if len(notes):
        print("\nPrediction notes (other doubles):\n" + text_table(
            notes[notes["group"] != "combo_seen2"][["fold", "method", "condition", "never_in_training",
                                                     "refused_without_allow_unseen", "warned_not_identified"]]))
    print(f"\n{elapsed:.0f} s in all")
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.log:
        with open(args.log, "a") as fh:
            fh.write(json.dumps({"folds": folds, "settings": settings, "headline": headline(table),
                                 "timing": timing.to_dict("records"),
                                 "other_mean": table[table["subset"] == "other"].groupby("method")[
                                     ["energy_pca", "pearson_delta_top20"]].mean().to_dict()},
                                default=str) + "\n")
    if args.no_doc or args.quick or args.folds is not None or overrides:
        return 0
    text = render(args, settings, tabs, notes, timing, elapsed, table)
    write_section(SECTION, text, Path(args.doc), sources=[__file__])
    print(f"Wrote the norman-models section of {args.doc}")
    return 0


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def target_lines(table: pd.DataFrame, objectives, timing: pd.DataFrame) -> list[str]:
    """The issue's targets on the 5 'both singles measured' doubles, checked against this run."""
    h = headline(table)
    lines = []
    for o in objectives:
        m = h[f"model_{o}"]
        add, lin = h["additive"]["energy"], h["linear"]["energy"]
        sd_off = abs(m["sd_ratio"] - 1)
        t = timing[timing["method"] == f"model_{o}"]
        lines.append(
            f"- `model_{o}`: energy {m['energy']:.4f} (additive {add:.4f}, linear {lin:.4f}, "
            f"noise floor {h['noise_floor']['energy']:.4f}): below both baselines "
            f"{_check(m['energy'] < min(add, lin))}; Pearson delta top-20 {m['pearson_top20']:.3f} "
            f"(target >= 0.94; linear {h['linear']['pearson_top20']:.3f}): {_check(m['pearson_top20'] >= 0.94)}; "
            f"per-gene SD ratio {m['sd_ratio']:.2f} (top-20 DE genes {m['sd_ratio_top20']:.2f}; target within "
            f"20% of 1): {_check(sd_off <= 0.2)}; fit {t['fit_wall_s'].max():.0f} s wall at most per fold "
            f"({t['fit_cpu_s'].max():.0f} s CPU; target < 120 s on 2 cores): {_check(t['fit_wall_s'].max() < 120)}."
        )
    return lines


def _fmt_settings(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def render(args, settings, tabs, notes, timing, elapsed, table) -> str:
    objectives = list(settings)
    cmd = ".venv/bin/python benchmarks/norman_doubles_models.py"
    if args.seed != 0:
        cmd += f" --seed {args.seed}"
    other = notes[notes["group"] != "combo_seen2"]
    note_view = other[other["method"] == other["method"].iloc[0]][
        ["fold", "condition", "group", "never_in_training", "refused_without_allow_unseen", "covered",
         "warned_not_identified"]].reset_index(drop=True) if len(other) else other
    example_refusal = next((r for r in other["refusal"] if r), "")
    example_warning = next((w for w in other["warning"] if w), "")
    timing_view = timing[["fold", "method", "fit_wall_s", "fit_cpu_s", "steps_run", "predict_s"]]
    tried = pd.DataFrame(WHAT_WAS_TRIED) if WHAT_WAS_TRIED else None
    settings_text = "\n".join(f"- `{o}`: {_fmt_settings(settings[o])}" for o in objectives)
    return f"""## Additive-shift model on norman-doubles (issue 3)

Command (from the repository root, in the project venv): `{cmd}` ({elapsed / 60:.0f} min for
5 folds x {len(objectives)} objectives, predictions and baselines included, on the shared 2-core CPU
machine, 1-min load average {args.load_start:.1f} at the start: wall times vary with other jobs, CPU
seconds are the process's own). `--quick` runs fold 0, energy objective, 300 steps, as a smoke test.

Protocol as in the baselines section above (same folds, same 50-PC space fit on each fold's
training cells, same top-20 DE genes, same control / additive / linear baselines and split-half
noise floor, recomputed by this script). The model alone: `fit("additive_shift"-family, train, select=False, ...)` (not `fit`'s default nested
estimator, whose numbers are in the norman_defaults section) with
the Gaussian likelihood on the log1p expression, once with the energy objective and once with the
ELBO; `predict(fit, held_out_doubles, n_cells={args.n_pred_cells}, num_samples={args.num_samples})`
(cells decoded from the basal states of the training control cells, one posterior draw of W per
block of cells). `model_energy_moved_control` / `model_energy_moved_singles`: the same energy fit,
predicting by moving measured cells instead (`predict(fit, [double], source=cells)`, at most
{args.n_pred_cells} cells, each source cell once): the training control cells, or the training cells of
the double's genes measured alone (no row for a double with neither single measured). Extra columns: `sd_ratio` is the per-gene standard deviation of the predicted
cells over that of the observed cells, averaged over the genes detected in >= 10% of the observed
cells of the double (~40-60 of the 500 genes; the others are ~always 0); `sd_ratio_top20` the same
over the top-20 DE genes. For the baselines (control cells + a shift) it is the control cells' spread.

Settings (script defaults, chosen by the mean over folds, see "What was tried"):
{settings_text}

### Targets on the 5 doubles with both singles measured

{chr(10).join(target_lines(table, objectives, timing))}

{READING}

### Mean over held-out doubles

{markdown_table(tabs["mean"])}

### Per fold, doubles with both singles measured

{markdown_table(tabs["per_fold_seen2"])}

### Fit time per fold

`fit_wall_s`: the whole `fit` call (set-up, compile, all steps, encoding the control cells);
`fit_cpu_s`: CPU seconds of the process during it (all threads); `predict_s`: the fold's predictions.

{markdown_table(timing_view)}

### The other 10 doubles: what the model does

A gene that occurs in no training condition (e.g. BPGM in fold 0) makes `predict` refuse the
double with `UnseenPerturbationError` unless `allow_unseen=True`; the script records the refusal
and predicts with `allow_unseen=True`, so that gene's shift is a draw from the prior N(0, 1) and the
prediction is not informed by data. A gene seen only inside training doubles is predicted, and
`predict` warns that the double is not identified by the training design (the theory check). Every
one of the 10 is outside the span of the training labels; the numbers in the "other" rows are
reported anyway and should be read as extrapolation, not as predictions the design supports.
{("Example refusal: " + chr(96) + example_refusal + chr(96)) if example_refusal else ""}

{("Example warning: " + chr(96) + example_warning + chr(96)) if example_warning else ""}

{markdown_table(note_view) if len(note_view) else ""}

### What was tried

{TRIED_INTRO}

{markdown_table(tried) if tried is not None else "(no log)"}

<details><summary>Per held-out double</summary>

{markdown_table(tabs["per_double"])}

</details>
"""


READING = """Reading. `init` names the data-driven start of the model. `scale` starts the per-gene
noise SD at the training SD of each gene instead of 0.5, `centre` starts the decoder at the average
training cell, `skip` adds a linear map of z to the decoder output (the last one only in this
script's `data_initialised_model`). Without `scale+centre` the energy fit under-disperses (SD ratio
0.56), so both are now what `fit` does for the energy objective by default (`data_init=None`, see
`perturbax.inference.data_start`); the ELBO keeps the plain start (with `scale+centre` its
fits broke: 0.54 at latent 10). A diagnostic on fold 0 scored the fitted model on its own *training* conditions (16 largest,
energy distance in the same 50-PC space): with the settings of the previous stop, 0.0144 (Pearson
delta top-20 0.892), against -0.030 for the observed mean shift added to the control cells, while
the model's control cells matched the real ones (-0.012): the model missed the means of conditions
it was trained on, its noise was not the problem. The beta = 1 energy score constrains means only
weakly among 500 genes (its gradient in a mean shrinks with the typical cell-to-cell distance), so
`EnergyOptions(mean_weight=...)` adds the beta = 2 energy distance (twice the squared distance of
the means; the sum is still a proper score). With `mean_weight=1` the same diagnostic gave -0.0031
(Pearson 0.951). On the held-out doubles it raised Pearson delta top-20 (0.927 -> 0.947 in the
tuning runs) but not the energy distance, which stays above both baselines; `mean_weight=5` was
worse. It is not the package default: on pdae-sim (20 genes) it made seed 2 worse (median energy
0.049 vs 0.024, coverage 0.53 vs 0.71). Simulating every condition from the control cells
(`source='control'`, the path `predict` takes) did not help. Moving measured cells instead of
generating new ones (`predict(fit, [double], source=cells)`: each cell plus the model's change of its
mean from its own label to the double) does not close the gap either: `model_energy_moved_control`
moves the training control cells (the "control-residual prediction" of the tuning rows) and is worse
than the generated cells; `model_energy_moved_singles` moves the training cells of the double's two
singles, which carry each single's measured effect, and lands at the additive baseline, not below
it. What the model adds to a single is then the other single's latent shift as it decodes from that
single's cells, and on these doubles that is no closer to the measured double than the sum of the
measured single effects; the linear baseline's compromise between singles and training doubles
(its least-squares fit of all training means) is what wins here. The split-half noise floor
moves by +-0.02 between folds, so differences of ~0.005 between runs are within the noise of 5
doubles."""
TRIED_INTRO = """Each row is one run of this script on folds 0, 2, 3, 4 (the folds with the 5 doubles whose
singles are both measured) unless noted; numbers are means over those 5 doubles; `fit_wall_s` is
the range over folds on the shared 2-core machine. Baselines on the same doubles: additive 0.0213 /
0.896, linear 0.0046 / 0.937 (energy / Pearson delta top-20), noise floor -0.0096 / 0.929. The
final settings: the best mean energy distance per objective, plus `mean_weight=1` for the energy
objective (see Reading). These rows choose settings on the same 5 doubles they report, so the final
row is optimistic by the spread of the runs (~0.005 energy, ~0.02 Pearson)."""


if __name__ == "__main__":
    sys.exit(main())
