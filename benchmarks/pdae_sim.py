"""pdae-sim benchmark (issue: additive latent shift models): accuracy and calibration.

Simulates the pdae-sim protocol (K = 5 perturbations, latent dim 5, 20 genes, nonlinear decoder
with noise fed into the network; control + singles + half of the doubles train; the other doubles
and dose vectors inside and outside the convex hull of the training labels test, plus one
perturbation outside the span), fits the additive-shift model with the energy and the ELBO
objectives, and scores the held-out in-span perturbations next to the control, additive and
linear baselines and the split-half noise floor. Calibration: coverage of the 90% credible
intervals of the per-gene means against the true population means (20,000 simulated cells).

Usage (repository root): .venv/bin/python benchmarks/pdae_sim.py [--steps 5000] [--seeds 0,1,2]
Keeps the results (CSV tables, the run's settings, the first seed's plot) under ``--results`` and
writes the section between <!-- pdae-sim:start --> / <!-- pdae-sim:end --> of docs/benchmarks.md
and docs/pdae_sim_predicted_vs_true.png from them; ``--doc-only`` rebuilds both from the kept results.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOC, provenance, write_section  # noqa: E402

from perturbax.inference import EnergyOptions  # noqa: E402
from perturbax.models.blocks import (  # noqa: E402
    CELL_PLATE,
    base_distribution,
    gaussian_likelihood,
    network,
    perturbation_effects,
)
from perturbax.protocols import run_pdae_sim, write_pdae_sim_report  # noqa: E402
from perturbax.protocols.pdae_sim import DEFAULT_SIMULATION  # noqa: E402


#: Runs made on seed 2, 10000 steps, energy objective, generalised-Bayes weight 0.3, 2026-11-21/22.
SEED2_NOTE = (
    "What was tried on seed 2, which missed both the accuracy and the coverage target when it was one of "
    "three seeds and the generalised-Bayes weight was 0.3 (energy objective, 10000 steps; ratio = median "
    "energy distance / additive baseline's, target <= 0.125; at weight 0.3: ratio 0.295, coverage 0.71): "
    "other fit seeds with the same data (fit seeds 0 and 1: ratio 0.309 and 0.249, coverage 0.72 and 0.73); "
    "the implicit likelihood (ratio 0.428, coverage 0.73); `mean_weight=1` (median 0.049, coverage 0.53); "
    "pooling the cells and posterior draws of "
    "three fits with different seeds, as an ensemble over decoders (ratio 0.394, coverage 0.76). In each of "
    "these whose conditions were listed (the gaussian and implicit fits at weight 0.3 and the ensemble) the "
    "dose outside the hull P1:2 is the worst condition (energy 0.17-0.19, coverage 0.40-0.45) and P1+P4 among the three worst, so "
    "the miss looks like a bias the fits share rather than fit-to-fit noise. A posterior over the decoder "
    "(`last_layer_model` in the script: a correction of the decoder's last layer with prior scale S / sqrt(H), "
    "fitted with W under the generalised-Bayes posterior; `--seeds 2 --objectives energy --last-layer-scale S "
    "--steps 10000 --no-doc`, 3.5 min each) widened the intervals but moved the predictions further off: "
    "S = 0.5 ratio 0.383, coverage 0.78 (P1:2 energy 0.170, coverage 0.55); S = 1.5 ratio 0.682, coverage 0.74 "
    "(P1:2 0.214, 0.65). It is not used. Simulating every condition from the control cells (`--source "
    "control`): ratio 0.353, coverage 0.72. All cells of a step from one full batch (all 11 training "
    "conditions x 200 cells per step instead of 4 x 64, `EnergyOptions(cells_per_condition=200, "
    "conditions_per_step=11)`, 2026-11-22): ratio 0.356, coverage 0.70, P1:2 still the worst (0.144), so the "
    "miss is not gradient noise. Moving measured cells instead of generating new ones (`predict(fit, [label], "
    "source=cells of the label's singles)`, 2026-11-22): median energy 0.0253 against 0.0249 for the generated "
    "cells of the same fit (additive 0.084); it helps the doubles a little (P2+P4 0.0095 vs 0.0249) and not "
    "P1:2 (0.179 vs 0.176), so the error is in the predicted mean change, not in the noise. The fitted latent "
    "shifts point the right way on seed 2 as on seed 0 (after the best linear map from fitted to true latents, "
    "the cosine between fitted and true columns of W is >= 0.97 for every training perturbation on both seeds; "
    "linear R^2 of the latents 0.83 vs 0.86), and the true latent states of the held-out conditions lie as "
    "close to training states as on the other seeds (median nearest-neighbour distance 1.0-1.4x that among "
    "training states): the miss is in the decoder, on latent states the training data do cover."
)

#: Runs of the energy objective with generalised-Bayes weights 0.3 and 0.2 on seeds 0-19, 10000 steps,
#: 2026-12-03 (`--objectives energy --gb-weight W --seeds ... --steps 10000 --no-doc`).
GB_NOTE = (
    "How the default generalised-Bayes weight was chosen (energy objective, 10000 steps; accuracy = ratio "
    "to the additive baseline <= 0.125 and below linear, coverage = 0.80-0.97; `--objectives energy "
    "--gb-weight W --seeds ... --no-doc`, 2026-12-03). On seeds 0-9, W = 0.3 (the default until then) met "
    "the accuracy target on 5 seeds and the coverage target on 4; W = 0.2 on 4 and 9. Confirmed on ten "
    "fresh seeds (10-19) before changing the default: W = 0.3 accuracy on 2, coverage on 8; W = 0.2 on 1 "
    "and 9. Over the 20 seeds: coverage target on 12 (W = 0.3) against 18 (W = 0.2), mean coverage 0.82 "
    "against 0.87; accuracy target on 7 against 5, median ratio to the additive baseline 0.207 against "
    "0.212. The smaller weight buys coverage at about the same accuracy, so `EnergyOptions.gb_weight` is 0.2 "
    "now. Earlier, on seeds 0-2 only (before `predict` picked "
    "source cells without repeats), W = 0.1 covered 0.94, 0.98 and 0.91 with ratios 0.125, 0.113 and 0.336."
)


#: The plain additive-shift model at 10000 steps without early stopping (818e593, 2026-12-03, before the
#: nested-estimator default of fit); quoted, labelled exploratory, next to the defaults' headline.
PLAIN_NOTE = (
    "Exploratory, not the package defaults: the last run of this section before the defaults became its headline "
    "(818e593, 2026-12-03, `--steps 10000 --seeds 0,...,19 --implicit`) fitted the plain additive-shift model "
    "(before `fit` defaulted to the nested estimator and before issue 16's fixes to fitting) for 10000 steps "
    "without early stopping. Energy objective: median ratio to the additive baseline 0.212 over the seeds, the "
    "accuracy target on 5 of 20 seeds, coverage 0.80-0.97 on 18 of 20; implicit likelihood: 0.219, 4 and 18; "
    "ELBO: 0.466, 1 and 0. Pooled medians for held-out doubles: 0.0157 (energy) against linear 0.0791 and "
    "additive 0.0928. These settings were chosen before any CV over training conditions and are not reproduced "
    "by the current defaults; they are quoted as what a 5x longer fit reached, for comparison."
)


#: A default length of 4000 steps for the additive shift model, tried with full reruns on 2026-12-04
#: (library of 3a2f097, `--defaults`, results /work/runs/pdae_4k) and not kept.
LENGTH_NOTE = (
    "A longer default, tried and not kept (2026-12-04, the library of 3a2f097: `fit`'s most steps 4000 "
    "for the additive shift model instead of 2000, everything else the package defaults; the same command). "
    "It was chosen from training data only: on seeds 0-2 the best CV energy of held-out training conditions "
    "fell from 2000 to 4000 steps on all three (0.024 to 0.012, 0.055 to 0.041, 0.040 to 0.032). On the 20 "
    "seeds it lowered the median ratio to the additive baseline from 0.42 to 0.28 (the 1/8 target on 0 of "
    "20 either way; below linear on 20), the pooled median energy of held-out doubles from 0.039 to 0.027 "
    "and of doses outside the hull from 0.091 to 0.067; coverage in 0.85-0.95 on 10 seeds instead of 12. "
    "On Norman it changed nothing that was scored (lambda 0 with control cells on every fold, the same five "
    "energies and Pearson deltas to the last digit), and it took a fold with its selection from 99 s to "
    "165 s, past the 2-minute target (`benchmarks/norman_fold_time.py --fold 0`, machine otherwise idle). "
    "The length default stayed 2000 and the length now follows the data instead: `fit` runs up to 3 cycles "
    "(5 since the change in the next paragraph) "
    "of 2000 steps, one more while the CV on training conditions chooses a setting that uses the model and "
    "its energy falls (what it chose per seed is in the table above)."
)

#: Later cycles run to their end, at most 5 (stop 31, 2026-12-04); compared on development seeds 20-24
#: (/work/runs/dev_old at 3c99c44 against /work/runs/dev_c5, both `--defaults --seeds 20,21,22,23,24 --no-doc`).
CYCLES_NOTE = (
    "Later cycles run to their end (2026-12-04). Until then every cycle stopped early on the held-out *cells* "
    "and kept its best state, so a cycle that the CV on held-out conditions kept could end after 1000 steps "
    "with the previous cycle's parameters (seeds with 3 cycles ran 5000 steps, best step 4000): the final fit "
    "did not get the length the CV chose. Now only the first cycle stops early; a later one runs all 2000 "
    "steps and keeps its last state, and `fit` allows up to 5 cycles. Compared before the change on five "
    "development seeds that are not this section's (20-24, exploratory): the median ratio to the additive "
    "baseline per seed went from 0.120, 0.320, 0.230, 0.712, 0.816 to 0.115, 0.321, 0.155, 0.357, 0.816 "
    "(cycles kept 3, 3, 2, 3, 1 before; 2, 2, 5, 4, 1 after; the last seed chose the ridge mean with control "
    "cells after one cycle both times), the mean coverage of the 90% intervals from 0.944, 0.944, 0.944, "
    "0.922, 0.983 to 0.950, 0.922, 0.967, 0.939, 0.983. The table above is the 20 benchmark seeds with it."
)

FOLDS_NOTE = (
    "Two held-out conditions a CV fold (2026-12-05, d6f3eb4). On this design (5 singles, 5 doubles) "
    "`in_span_folds` held out one double a fold, so lambda, the number of cycles and the interval factor "
    "rested on two held-out doubles; in the run at 990ba1c the 90% factor ranged from 1.0 to 7.0 over the "
    "seeds. It now holds out two a fold when every fold can have two. Compared on eight development seeds "
    "that are not this section's (20-27, exploratory; `explore_folds.py` patching the function): the "
    "median over seeds of the ratio to the additive baseline went from 0.285 to 0.185 (per seed 0.115, "
    "0.321, 0.155, 0.357, 0.816, 0.365, 0.166, 0.249 to 0.078, 0.242, 0.204, 0.322, 0.152, 0.157, 0.166, "
    "0.286), the mean coverage from 0.933 to 0.943, coverage in 0.85-0.95 on 6 and then 4 of the 8. On this "
    "section's 20 seeds, against the run at 990ba1c (reported after the change, not used to make it): median "
    "ratio 0.215 to 0.211, the 1/8 target on 3 and 3 seeds, held-out doubles 0.0213 to 0.0190; 11 seeds "
    "chose the same setting and length as before (the same predictions), 4 improved and 5 worsened (seed 9, "
    "one cycle before, 0.458 to 0.138; seed 12, the ridge mean before, 0.310 to 0.213; seed 2 0.395 to "
    "0.454). The 90% factor now ranges from 1.45 to 2.99, and the seeds' coverage scatters less (SD 0.054 "
    "to 0.044 for the true means, 0.081 to 0.050 for the observed means), but it is higher: in 0.85-0.95 on 8 "
    "seeds instead of 10 for the true means, 14 instead of 8 for the observed means, which the intervals "
    "state they cover. The fold fits miss two of the five training doubles, so their errors on them "
    "overstate the final fit's on new doubles; the intervals are conservative by that much."
)


def last_layer_model(prior_scale: float):
    """The additive-shift model (Gaussian likelihood) with a posterior over a correction of the
    decoder's last layer: ``x_mean = decoder(z) + Delta h(z)``, ``h`` the last hidden layer (width
    H), ``Delta ~ N(0, prior_scale^2 / H)`` a global sample site (``"decoder_delta"``, G x H) that
    the guide and the generalised-Bayes posterior treat like W. Written from the package's blocks as
    a user would; tried on seed 2 for decoder uncertainty where the decoder extrapolates."""

    def additive_shift_last_layer(batch, *, config, n_cells):
        d, H = config.latent_dim, config.decoder_hidden[-1]
        W = perturbation_effects("W", d, config.n_perturbations, prior=config.w_prior, scale=config.w_scale)
        dec = network("decoder", d, config.n_genes, config.decoder_hidden, seed=config.seed)
        delta = numpyro.sample(
            "decoder_delta", dist.Normal(0.0, prior_scale / np.sqrt(H)).expand((config.n_genes, H)).to_event(2)
        )

        def corrected_decoder(v):
            for layer in dec.layers[:-1]:
                v = dec.activation(layer(v))
            return dec.layers[-1](v) + delta @ v

        with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
            z = numpyro.sample("z_base", base_distribution(config.base, d)) + batch.l @ W.T
            gaussian_likelihood(corrected_decoder, z, batch.x, n_genes=config.n_genes)

    return additive_shift_last_layer


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(out)


def run(args, seeds: list[int], folder: Path, command: str) -> None:
    """Fit and score every seed; keep the tables, the settings and the first seed's plot in ``folder``."""
    objectives = tuple(args.objectives.split(","))
    rows, per_cond, chosen, t0 = [], [], [], time.perf_counter()
    first, prov = None, provenance()
    for seed in seeds:
        t = time.perf_counter()
        res = run_pdae_sim(
            seed=seed, objectives=objectives, steps=args.steps, progress=False,
            fit_options={"energy": EnergyOptions(gb_weight=args.gb_weight, mean_weight=args.mean_weight,
                                                 source=args.source)},
        )
        s = res.summary()
        tab = res.table.copy()
        fit_s = {k: v.info["fit_seconds"] for k, v in res.fits.items()}
        extras = {}  # further energy fits: method name -> run_pdae_sim arguments
        if args.implicit:
            extras["model_energy_implicit"] = {"likelihood": "implicit"}
        if args.last_layer_scale is not None:
            extras["model_energy_lastlayer"] = {"model": last_layer_model(args.last_layer_scale)}
        for method, kw in extras.items():
            extra = run_pdae_sim(
                seed=seed, objectives=("energy",), steps=args.steps, progress=False,
                fit_options={"energy": EnergyOptions(gb_weight=args.gb_weight, mean_weight=args.mean_weight,
                                                     source=args.source)}, **kw,
            )
            rename = {"model_energy": method}
            s = pd.concat([s, extra.summary().query("method == 'model_energy'").replace({"method": rename})])
            tab = pd.concat([tab, extra.table.query("method == 'model_energy'").replace({"method": rename})])
            fit_s[method] = extra.fits["model_energy"].info["fit_seconds"]
        info = res.fits["model_energy"].info if "model_energy" in res.fits else None
        if info is not None:  # what fit chose on this seed (its selection and early stopping)
            sel = info.get("selection") or {}
            chosen.append({"seed": seed, "steps_run": info.get("steps_run"), "best_step": info.get("best_step"),
                           "cycles": sel.get("cycles", 1), "lambda": sel.get("lambda"), "cells": sel.get("cells"),
                           "factor_90": (sel.get("calibration") or {}).get("factor", {}).get("0.9"),
                           "fit_seconds": round(float(info["fit_seconds"]), 1)})
        s.insert(0, "seed", seed)
        rows.append(s)
        tab.insert(0, "seed", seed)
        per_cond.append(tab)
        print(f"seed {seed}: {time.perf_counter() - t:.0f} s (fits: {fit_s})", flush=True)
        print(s.to_string(index=False), flush=True)
        if first is None:
            first = res
            write_pdae_sim_report(first, folder / "report")
    folder.mkdir(parents=True, exist_ok=True)
    pd.concat(rows, ignore_index=True).to_csv(folder / "summary.csv", index=False)
    pd.concat(per_cond, ignore_index=True).to_csv(folder / "table.csv", index=False)
    pd.DataFrame(chosen).to_csv(folder / "chosen.csv", index=False)
    meta = dict(vars(args), seeds=seeds, command=command, minutes=(time.perf_counter() - t0) / 60,
                date=time.strftime("%Y-%m-%d"), provenance=prov)
    (folder / "run.json").write_text(json.dumps(meta, indent=1))


def checks_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model and seed: the issue's targets (median energy vs additive and linear, coverage, SD ratio)."""
    add = summary[summary.method == "additive"].set_index("seed")["energy_median"]
    lin = summary[summary.method == "linear"].set_index("seed")["energy_median"]
    checks = []
    for method in [m for m in summary.method.unique() if m.startswith("model_")]:
        m = summary[summary.method == method].set_index("seed")
        checks.append(pd.DataFrame({
            "method": method,
            "seed": m.index,
            "median_energy": m["energy_median"].values,
            "ratio_to_additive": (m["energy_median"] / add).values,
            "below_linear": (m["energy_median"] < lin).values,
            "coverage_90": m["coverage_mean"].values,
            "coverage_obs_90": m["coverage_observed_mean"].values,
            "sd_ratio": m["sd_ratio_mean"].values,
        }))
    return pd.concat(checks, ignore_index=True)


def target_flags(checks: pd.DataFrame) -> pd.DataFrame:
    """``checks`` with one boolean column per target: accuracy (median energy <= 1/8 of additive and
    below linear), coverage (0.80-0.97), spread (sd_ratio within 20% of 1) and all three."""
    c = checks.assign(
        accuracy=(checks.ratio_to_additive <= 0.125) & checks.below_linear,
        coverage=checks.coverage_90.between(0.80, 0.97),
        spread=(checks.sd_ratio - 1).abs() <= 0.2,
    )
    c["all_three"] = c.accuracy & c.coverage & c.spread
    c["coverage_85_95"] = checks.coverage_90.between(0.85, 0.95)  # issue 17's band
    c["coverage_obs_85_95"] = checks.coverage_obs_90.between(0.85, 0.95)  # the same, of the observed means
    return c


def targets_met(checks: pd.DataFrame) -> pd.DataFrame:
    """Per model: on how many seeds each target holds, and all of them together."""
    c = target_flags(checks)
    n = c.groupby("method", sort=False)["seed"].size()
    out = c.groupby("method", sort=False)[["accuracy", "below_linear", "coverage", "coverage_85_95",
                                             "coverage_obs_85_95", "spread", "all_three"]].sum()
    out = out.apply(lambda col: [f"{k} / {n[m]}" for m, k in col.items()])
    out.insert(0, "median_ratio_over_seeds", c.groupby("method", sort=False)["ratio_to_additive"].median())
    return out.reset_index()


def by_group(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and group of held-out perturbation (double, dose inside / outside the hull), over all
    seeds: median energy distance and mean coverage of the 90% intervals."""
    t = table[table.group.isin(["double", "dose-in-hull", "dose-outside-hull"])]
    out = t.groupby(["group", "method"], sort=False).agg(
        n=("condition", "size"), energy_median=("energy_pca", "median"), coverage_mean=("coverage", "mean"),
        coverage_observed_mean=("coverage_observed", "mean"))
    return out.reset_index().sort_values(["group", "method"], kind="stable")


def band_resolution(table: pd.DataFrame, method: str = "model_energy", level: float = 0.9,
                    band: tuple[float, float] = (0.85, 0.95)) -> dict:
    """How many seeds intervals of *exact* per-gene coverage ``level`` would put in ``band``: a seed's
    coverage is the mean over its held-out perturbations of each one's fraction of covered genes, and
    the genes of one perturbation share its error, so that fraction varies more than a binomial. The
    design effect (within-seed variance of the per-perturbation coverage, within each group of
    held-out perturbation, over the binomial variance at the group's mean, pooled) scales the
    binomial variance at ``level``; a normal approximation gives the chance that a seed lands in
    ``band``, the expected number of seeds in it and the chance that at least 90% of them do."""
    from scipy import stats

    t = table[(table.method == method) & table.group.isin(["double", "dose-in-hull", "dose-outside-hull"])]
    n_genes = DEFAULT_SIMULATION["n_genes"]
    num = den = 0.0
    for _, g in t.groupby(["seed", "group"]):
        if len(g) > 1:
            num += g.coverage.var(ddof=1) * (len(g) - 1)
    for _, g in t.groupby("group"):
        p = g.coverage.mean()
        dof = int((g.groupby("seed").size() - 1).clip(lower=0).sum())
        den += p * (1 - p) / n_genes * dof
    deff = num / den
    per_seed = int(round(t.groupby("seed").size().median()))
    se = math.sqrt(level * (1 - level) / n_genes * deff / per_seed)
    p_in = float(stats.norm.cdf((band[1] - level) / se) - stats.norm.cdf((band[0] - level) / se))
    n_seeds = int(t.seed.nunique())
    k = math.ceil(0.9 * n_seeds)
    return {"design_effect": deff, "genes": n_genes, "per_seed": per_seed, "se": se, "p_in": p_in,
            "expected": p_in * n_seeds, "seeds": n_seeds, "k": k,
            "p_at_least_k": float(1 - stats.binom.cdf(k - 1, n_seeds, p_in))}


def reading(checks: pd.DataFrame, groups: pd.DataFrame, defaults: bool = False,
            chosen: pd.DataFrame | None = None, table: pd.DataFrame | None = None) -> str:
    """What the tables say about the energy objective against the issue's targets (computed); ``chosen``:
    what fit chose per seed (its length); ``table``: the per-perturbation rows (the band's resolution,
    :func:`band_resolution`)."""
    length = None
    if chosen is not None and len(chosen):
        from perturbax.inference.fitting import DEFAULT_STEPS
        from perturbax.inference.selection import MAX_CYCLES

        cycles = chosen["cycles"] if "cycles" in chosen else pd.Series(1, index=chosen.index)
        counts = cycles.value_counts().sort_index()
        capped = int((cycles == MAX_CYCLES).sum())
        # only the first cycle stops early on held-out cells; later ones run to their end
        one = chosen[cycles == 1]
        stopped = int((one.steps_run < DEFAULT_STEPS).sum())
        length = (" The CV on training conditions chose "
                  + ", ".join(f"{int(k)} cycle{'s' if k > 1 else ''} of {DEFAULT_STEPS} steps on {int(v)}"
                              for k, v in counts.items())
                  + f" of {len(chosen)} seeds"
                  + (f"; on the {capped} with {MAX_CYCLES}, the most `fit` allows, every cycle lowered the CV energy, "
                     f"so their length was ended by the cap and not by the CV" if capped else "")
                  + (f"; early stopping on held-out cells ended {stopped} of the {len(one)} one-cycle fits before "
                     f"{DEFAULT_STEPS} steps" if len(one) else "")
                  + ".")
    c = target_flags(checks[checks.method == "model_energy"])
    resolution = None
    if table is not None:
        r = band_resolution(table)
        resolution = (
            f" What the band can show: a seed's coverage averages {r['per_seed']} held-out perturbations, and the "
            f"{r['genes']} genes of one perturbation share its error (coverage of a perturbation varies "
            f"{r['design_effect']:.1f} times the binomial variance within a seed and group). So even intervals "
            f"whose every gene is covered with probability exactly 0.90 would put a seed in 0.85-0.95 with "
            f"probability {r['p_in']:.2f} (standard error {r['se']:.3f}): {r['expected']:.1f} of {r['seeds']} "
            f"seeds on average, and {r['k']} or more with probability {r['p_at_least_k']:.2f}. The target of "
            f"{r['k']} seeds in the band is at the resolution of this protocol; "
            f"{int(c.coverage_85_95.sum())} in it is below what exact calibration would give.")
    n, acc, cov, spread = len(c), int(c.accuracy.sum()), int(c.coverage.sum()), int(c.spread.sum())
    g = groups[groups.method == "model_energy"].set_index("group")
    ratio = float(c.ratio_to_additive.median())
    return (
        f"Reading ({'package defaults: the nested estimator' if defaults else 'energy objective'}, gaussian "
        f"likelihood, against the issue's targets). Spread holds on {spread} "
        f"of {n} seeds and coverage on {cov} (0.80-0.97; issue 17's band 0.85-0.95 on "
        f"{int(c.coverage_85_95.sum())}; of the observed held-out means, which the intervals state they cover, "
        f"on {int(c.coverage_obs_85_95.sum())}); the accuracy target holds on {acc} of {n}: the median energy "
        f"distance is below the linear baseline's on {int(c.below_linear.sum())} seeds, but at a median of "
        f"{ratio:.2f} times the additive baseline's (about 1/{1 / ratio:.0f}), not 1/8. The intervals cover "
        f"{g.loc['dose-in-hull', 'coverage_mean']:.2f} of the true means for doses inside the convex hull of "
        f"the training labels, {g.loc['double', 'coverage_mean']:.2f} for the held-out doubles and "
        f"{g.loc['dose-outside-hull', 'coverage_mean']:.2f} for doses outside the hull, where the decoder "
        + ("extrapolates beyond the training conditions the intervals were calibrated on and its error is largest "
           if defaults else "extrapolates and its error, which the intervals do not carry, is largest ")
        + f"(median energy {g.loc['dose-outside-hull', 'energy_median']:.3f} against "
        f"{g.loc['double', 'energy_median']:.3f} for doubles)." + (length or "") + (resolution or "")
    )


def section(folder: Path) -> str:
    """The doc section, from the results kept in ``folder`` by :func:`run`."""
    meta = json.loads((folder / "run.json").read_text())
    summary = pd.read_csv(folder / "summary.csv")
    table = pd.read_csv(folder / "table.csv")
    chosen = pd.read_csv(folder / "chosen.csv") if (folder / "chosen.csv").exists() else None
    checks = checks_table(summary)
    groups = by_group(table)
    mean_by = summary.groupby("method", sort=False)[["energy_median", "pearson_delta_mean", "sd_ratio_mean",
                                                      "coverage_mean", "coverage_observed_mean"]].mean().reset_index()
    seeds = meta["seeds"]
    text = "\n".join([
        "## Additive-shift model on pdae-sim (accuracy and calibration)",
        "",
        f"Command (repository root, project venv): `.venv/bin/python {meta['command'].removeprefix('python ')}` "
        f"({meta['minutes']:.1f} min on the shared 2-core CPU machine, {meta['date']}).",
        "",
        "Protocol (DESIGN 6, `perturbax.protocols.run_pdae_sim`): K = 5 elementary perturbations, latent "
        "dim 5, 20 genes, a random nonlinear decoder with noise fed into the network; training = control + "
        "5 singles + 5 of the 10 doubles (200 cells each); test = the other 5 doubles, doses inside the "
        "convex hull of the training labels (seed 0: `P4:0.5`, `P3:0.5+P4:0.5`) and outside it but in the span "
        "(seed 0: `P2:2`, `P2+P3:-1`); the perturbation with a never-seen component (seed 0: `P2+P5`) is refused "
        "by the model and the baselines. Each seed draws a new decoder, new shifts and a new split. "
        "Model: latent dim 5, gaussian likelihood"
        f"{' (model_energy_implicit: the implicit likelihood, noise fed into the decoder as in the simulator)' if meta['implicit'] else ''}"
        + (", the package defaults (`fit` with its own length and early stopping, the nested estimator "
           "with its settings chosen by CV on the training conditions)" if meta.get("defaults") else
           f", {meta['steps']} steps")
        + "; energy objective "
        f"with generalised-Bayes weight {meta['gb_weight']}, mean_weight {meta['mean_weight']}, source "
        f"'{meta['source']}', started from the data (`fit`'s default `data_init` for the energy objective: the "
        "decoder at the average training cell, the noise at each gene's SD)"
        + ("; ELBO with a low-rank Gaussian posterior over W. " if "elbo" in meta["objectives"] else ". ")
        + "Energy = unbiased U-statistic energy distance between 200 predicted and 200 held-out cells "
        "(noise floor ~ 0). coverage_90 = fraction of (gene, perturbation) pairs whose 90% credible interval "
        "of the mean contains the true population mean (20,000 simulated cells); coverage_obs_90: the same "
        "against the observed mean of the 200 held-out cells, which is what the calibrated intervals state they "
        "cover (the observed mean of as many cells as a training condition has: 200), so against the population "
        "mean they are expected to cover more than 90%. sd_ratio = per-gene SD of "
        "predicted / observed cells.",
        "",
        f"### On how many of the {len(seeds)} seeds each target holds",
        "",
        "accuracy: median energy <= 1/8 of the additive baseline's and below the linear baseline's; below_linear: "
        "the second half of it alone; coverage: 0.80-0.97 (coverage_85_95: issue 17's band, 0.85-0.95; "
        "coverage_obs_85_95: that band for coverage_obs_90); spread: "
        "sd_ratio within 20% of 1; all_three: accuracy, coverage (0.80-0.97) and spread. "
        "`median_ratio_over_seeds`: the median over seeds of the ratio to the additive baseline.",
        "",
        _md(targets_met(checks)),
        "",
        "### Checks per seed",
        "",
        _md(checks),
        "",
        *(["### What `fit` chose per seed (model_energy)", "",
           "Optimiser steps run and the step whose held-out loss was best (the state kept), and, for the nested "
           "estimator, the weight lambda of the model's remainder and the cell mode chosen by CV on the training "
           "conditions, with the conformal factor of the 90% intervals.", "",
           _md(chosen), ""] if chosen is not None else []),
        "### By group of held-out perturbation (all seeds)",
        "",
        "Median energy distance and mean coverage over the held-out perturbations of each group, pooled over "
        "the seeds: where the intervals lose coverage.",
        "",
        _md(groups),
        "",
        reading(checks, groups, defaults=bool(meta.get("defaults")), chosen=chosen, table=table),
        "",
        "### Mean over seeds, per method",
        "",
        _md(mean_by),
        "",
        "<details><summary>Per held-out perturbation (all seeds)</summary>",
        "",
        _md(table[["seed", "method", "condition", "group", "energy_pca", "pearson_delta", "sd_ratio",
                   "coverage", "coverage_observed", "interval_width"]]),
        "",
        "</details>",
        "",
        "![predicted vs true mean change, first seed](pdae_sim_predicted_vs_true.png)",
    ])
    if meta["steps"] == 10000 and 2 in seeds and meta["gb_weight"] == EnergyOptions().gb_weight \
            and meta["mean_weight"] == 0.0:
        text += "\n\n" + SEED2_NOTE + "\n\n" + GB_NOTE
    elif meta.get("defaults"):
        text += ("\n\n" + PLAIN_NOTE + "\n\n" + LENGTH_NOTE + "\n\n" + CYCLES_NOTE + "\n\n" + FOLDS_NOTE
                 + "\n\n" + GB_NOTE)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--defaults", action="store_true",
                    help="the package defaults: energy objective, fit's own length and early stopping, "
                         "EnergyOptions' defaults (overrides --steps, --objectives and the energy options)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--gb-weight", type=float, default=EnergyOptions().gb_weight,
                    help="generalised-Bayes weight of the energy objective [default: EnergyOptions' default]")
    ap.add_argument("--mean-weight", type=float, default=0.0, help="EnergyOptions.mean_weight")
    ap.add_argument("--source", default="other", choices=["other", "control"], help="EnergyOptions.source")
    ap.add_argument("--objectives", default="energy,elbo")
    ap.add_argument("--implicit", action="store_true",
                    help="also fit the implicit likelihood (noise fed into the decoder) with the energy objective")
    ap.add_argument("--last-layer-scale", type=float, default=None, metavar="S",
                    help="also fit last_layer_model(S) (a posterior over a correction of the decoder's last "
                         "layer) with the energy objective")
    ap.add_argument("--results", default="/tmp/perturbax_bench_pdae_sim", help="folder of the kept results")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    ap.add_argument("--doc-only", action="store_true", help="rebuild the doc section from the kept results")
    args = ap.parse_args(argv)
    if args.defaults:  # (the energy options then equal EnergyOptions(), what fit uses when given none)
        args.steps, args.objectives = None, "energy"
        args.gb_weight, args.mean_weight, args.source = EnergyOptions().gb_weight, 0.0, "other"
    argv = argv if argv is not None else sys.argv[1:]
    folder = Path(args.results)
    if not args.doc_only:
        shown = [a for a in argv if a not in ("--no-doc",)]
        command = " ".join(["python benchmarks/pdae_sim.py", *shown]).strip()
        seeds = [int(x) for x in args.seeds.split(",")]
        run(args, seeds, folder, command)
        print(checks_table(pd.read_csv(folder / "summary.csv")).to_string(index=False))
    if args.no_doc:
        return 0
    text = section(folder)
    shutil.copy(folder / "report" / "predicted_vs_true.png", DOC.parent / "pdae_sim_predicted_vs_true.png")
    produced = json.loads((folder / "run.json").read_text()).get("provenance", {})
    write_section("pdae-sim", text, sources=[__file__], produced=produced)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
