"""The ``pdae-sim`` protocol (DESIGN section 6): simulated additive latent shifts with known truth.

Training: control, all singles and half of the doubles. Test: the other doubles, dose vectors
inside and outside the convex hull of the training labels (all in their span), and perturbations
with an elementary perturbation never seen in training (outside the span: models refuse them).
Scores per held-out perturbation: energy distance (unbiased U-statistic) and the other columns of
:func:`perturbax.metrics.evaluate_conditions`, the ratio of per-gene standard deviations of
predicted to observed cells, and for models the coverage of the credible intervals of the per-gene
means against the true population means (simulated with many cells) and against the observed means
of the held-out cells (what the nested estimator's calibrated intervals state they cover: the mean
of as many cells as a training condition has, here as many as a held-out one).
"""

from __future__ import annotations

import base64
import html
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturbax.baselines import AdditiveBaseline, ControlBaseline, LinearBaseline, split_half_noise_floor
from perturbax.data import prediction_intervals, simulate_additive_shift, split_from_column
from perturbax.inference import UnseenPerturbationError, fit, predict
from perturbax.metrics import evaluate_conditions, interval_coverage
from perturbax.models import AdditiveShiftConfig

__all__ = ["PDAESimResult", "reading_paragraph", "run_pdae_sim", "write_pdae_sim_report"]

DEFAULT_SIMULATION = dict(n_perturbations=5, latent_dim=5, n_genes=20, n_cells=200, n_out_of_span=1)


@dataclass
class PDAESimResult:
    """Output of :func:`run_pdae_sim`.

    Attributes
    ----------
    table
        One row per (method, held-out condition): group, energy_pca, mmd_pca, mean_l2, Pearson
        delta, R^2/MSE top-k, ``sd_ratio``, and for models ``coverage`` (of the true population
        means), ``coverage_observed`` (of the held-out cells' observed means) and ``interval_width``.
    fits, predictions
        ``{method: FitResult}`` and ``{method: AnnData of predicted cells}``.
    refused
        ``{label: reason}`` for held-out conditions the models refused (outside the span).
    population_means
        ``{label: true population mean (G,)}``.
    settings
        What was run (simulation, fit options, seeds).
    """

    table: pd.DataFrame
    fits: dict[str, Any]
    predictions: dict[str, Any]
    refused: dict[str, str]
    population_means: dict[str, np.ndarray]
    split: Any
    truth: Any
    settings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Median energy distance, mean SD ratio and mean coverage per method (in-span tests)."""
        t = self.table
        cols = dict(
            n=("condition", "size"),
            energy_median=("energy_pca", "median"),
            energy_mean=("energy_pca", "mean"),
            pearson_delta_mean=("pearson_delta", "mean"),
            sd_ratio_mean=("sd_ratio", "mean"),
            coverage_mean=("coverage", "mean"),
        )
        if "coverage_observed" in t:  # (tables of runs before it was scored lack it)
            cols["coverage_observed_mean"] = ("coverage_observed", "mean")
        agg = t.groupby("method", sort=False).agg(**cols)
        return agg.reset_index()


def _sd_ratio(pred: np.ndarray, true: np.ndarray) -> float:
    sd_true = true.std(0)
    keep = sd_true > 1e-8
    return float(np.mean(pred.std(0)[keep] / sd_true[keep]))


def run_pdae_sim(
    *,
    seed: int = 0,
    model: str | Callable = "additive_shift",
    objectives: tuple[str, ...] = ("energy", "elbo"),
    steps: int | None = 5000,
    latent_dim: int | None = None,
    likelihood: str = "gaussian",
    fit_options: dict | None = None,
    simulation: dict | None = None,
    num_samples: int = 100,
    population_cells: int = 20000,
    interval: float = 0.9,
    progress: bool = True,
) -> PDAESimResult:
    """Simulate ``pdae-sim``, fit the additive-shift model with each objective and the baselines,
    predict the held-out perturbations and score them (see the module docstring).

    ``model`` is ``"additive_shift"`` or a model function of your own with its signature
    (``model(batch, *, config, n_cells)``, see :func:`~perturbax.inference.fit`); it is given an
    :class:`~perturbax.models.AdditiveShiftConfig` sized to the simulation, so a variant is scored
    on exactly the protocol of the built-in model. ``likelihood`` is the config's (``"gaussian"``,
    or ``"implicit"``: noise fed into the decoder as in the simulator, energy objective only).
    ``steps=None`` fits with ``fit``'s own length and early stopping (the package defaults); a
    number fits exactly that many steps without early stopping."""
    sim = {**DEFAULT_SIMULATION, **(simulation or {})}
    adata, truth = simulate_additive_shift(seed=seed, **sim)
    split = split_from_column(adata, "perturbation", "control", name=f"pdae-sim/seed{seed}")
    train, test = split.train, split.test
    groups = {train.registry.canonical(k): v for k, v in truth.groups.items()}
    test_cells = test.cells_by_condition()
    control = train.dense(train.cells_of("control"))
    G = train.n_genes
    eval_kw = dict(reference=train.dense(), n_pcs=min(50, G), top_k=min(20, G))

    fits, preds, refused, tables = {}, {}, {}, []
    in_span = [lab for lab in split.test_labels if groups.get(lab) != "out-of-span"]
    for lab in split.test_labels:
        if lab not in in_span:
            refused[lab] = "contains an elementary perturbation never seen in training (outside the span)"
    pop = {lab: truth.population_mean(lab, n_cells=population_cells) for lab in in_span}
    n_pred = int(np.median([test_cells[lab].shape[0] for lab in in_span]))

    for objective in objectives:
        config = AdditiveShiftConfig(
            n_genes=G, n_perturbations=train.K, latent_dim=latent_dim or sim["latent_dim"], likelihood=likelihood
        )
        # steps=None: fit's own length and early stopping (the package defaults)
        opts = {"seed": seed, "progress": progress, **({} if steps is None else {"steps": steps, "patience": None}),
                **(fit_options or {})}
        if objective == "elbo":
            opts = {"batch_size": 512, **opts}
        res = fit(model, train, config=config, objective=objective, **opts)
        name = f"model_{objective}"
        fits[name] = res
        for lab in split.test_labels:
            if lab in in_span:
                continue
            try:
                predict(res, [lab], num_samples=2, n_cells=2)
            except UnseenPerturbationError as err:
                refused[lab] = str(err)
        pred = predict(res, in_span, n_cells=n_pred, num_samples=num_samples, interval=interval, seed=seed)
        preds[name] = pred
        cells = {lab: pred.X[(pred.obs[train.perturbation_key] == lab).to_numpy()] for lab in in_span}
        tab = evaluate_conditions(cells, {lab: test_cells[lab] for lab in in_span}, control, method=name, **eval_kw)
        cov, cov_obs, width = [], [], []
        for lab in tab["condition"]:
            mean, lo, hi = prediction_intervals(pred, lab)
            cov.append(interval_coverage(lo, hi, pop[lab]))
            cov_obs.append(interval_coverage(lo, hi, test_cells[lab].astype(np.float64).mean(0)))
            width.append(float(np.mean(hi - lo)))
        tab["coverage"] = cov
        tab["coverage_observed"] = cov_obs
        tab["interval_width"] = width
        tab["sd_ratio"] = [_sd_ratio(cells[lab], test_cells[lab]) for lab in tab["condition"]]
        tables.append(tab)

    for base in (ControlBaseline(), AdditiveBaseline(), LinearBaseline()):
        b = base.fit(train)
        cells = b.predict(in_span, n_cells=n_pred, seed=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Pearson correlation", category=RuntimeWarning)
            tab = evaluate_conditions(cells, {lab: test_cells[lab] for lab in in_span}, control, method=b.name, **eval_kw)
        tab["sd_ratio"] = [_sd_ratio(cells[lab], test_cells[lab]) for lab in tab["condition"]]
        tables.append(tab)
    halves = {lab: split_half_noise_floor(test_cells[lab], seed=seed) for lab in in_span}
    tab = evaluate_conditions({k: h[0] for k, h in halves.items()}, {k: h[1] for k, h in halves.items()}, control,
                              method="noise_floor", **eval_kw)
    tab["sd_ratio"] = [_sd_ratio(h[0], h[1]) for h in halves.values()]
    tables.append(tab)

    table = pd.concat(tables, ignore_index=True)
    table.insert(2, "group", [groups.get(c, "") for c in table["condition"]])
    for col in ("coverage", "coverage_observed", "interval_width"):
        if col not in table:
            table[col] = np.nan
    return PDAESimResult(
        table=table, fits=fits, predictions=preds, refused=refused, population_means=pop, split=split, truth=truth,
        settings={"seed": seed, "model": model if isinstance(model, str) else getattr(model, "__name__", repr(model)),
                  "simulation": sim, "objectives": list(objectives), "steps": steps, "likelihood": likelihood,
                  "fit_options": fit_options or {}, "num_samples": num_samples, "interval": interval,
                  "n_pcs": eval_kw["n_pcs"], "top_k": eval_kw["top_k"]},
    )


# ------------------------------------------------------------------------------------------ report
# What the report's words mean; only the entries whose key appears in the run are printed.
_GLOSSARY_METHODS = {
    "control": "baseline that predicts no change: the control cells themselves.",
    "pooled_mean": "baseline that predicts the average change of all training perturbations.",
    "additive": "baseline that adds the measured mean changes of the components (A+B = change of A + "
                "change of B; doses scale them).",
    "linear": "baseline that fits one change per elementary perturbation by ridge regression on all "
              "training conditions (singles and combinations) and adds them.",
    "noise_floor": "not a method: two random halves of the real held-out cells scored against each other. "
                   "It is the best score any prediction can expect, given that the cells are a finite "
                   "sample.",
}
_GLOSSARY_GROUPS = {
    "double": "a combination of two perturbations not measured together in training (each measured "
              "alone or in other combinations).",
    "dose-in-hull": "a dose mixture inside the convex hull of the training conditions (a weighted "
                    "average of measured conditions): interpolation.",
    "dose-outside-hull": "a dose vector outside that hull (e.g. a dose of 2 when only 1 was measured, or a "
                         "negative dose): still predictable from the training conditions, but the model "
                         "extrapolates beyond the measured latent shifts.",
    "out-of-span": "contains a perturbation never measured in training: no design can tell its effect, so "
                   "the model refuses it.",
}


def _median(t: pd.DataFrame, method: str, col: str = "energy_pca") -> float:
    return float(t.loc[t["method"] == method, col].median())


def _per_condition(t: pd.DataFrame, col: str = "energy_pca") -> pd.DataFrame:
    """``condition x method`` table of one metric (conditions in the model's order)."""
    wide = t.pivot_table(index="condition", columns="method", values=col, aggfunc="first", sort=False)
    return wide[[m for m in dict.fromkeys(t["method"]) if m in wide.columns]]


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def reading_paragraph(result: PDAESimResult, model: str | None = None) -> str:
    """What the run means, in words, every number taken from ``result`` (the first model by default)."""
    t = result.table
    methods = list(dict.fromkeys(t["method"]))
    model = model or next((m for m in methods if m.startswith("model")), None)
    if model is None:
        return "No model was fitted in this run, so there is nothing to read beyond the baselines' table."
    wide = _per_condition(t)
    n = int(wide[model].notna().sum())
    level = int(round(100 * float(result.settings.get("interval", 0.9))))
    parts = [
        f"The model ({model}) predicted {_n(n, 'held-out perturbation')} that can be reached from the training "
        f"conditions."
    ]
    if "noise_floor" in wide:
        k = int((wide[model] <= wide["noise_floor"]).sum())
        parts.append(
            f"For {k} of {n} its predicted cells are as close to the real ones as two halves of the real cells "
            f"are to each other (energy distance at or below the noise floor)."
        )
    others = [m for m in ("noise_floor", "additive", "linear", "pooled_mean", "control") if m in wide]
    if others:
        named = {"noise_floor": "the noise floor", "control": "the control baseline, which predicts no change"}
        listed = [f"{_median(t, m):.3g} for {named.get(m, f'the {m} baseline')}" for m in others]
        listed = ", ".join(listed[:-1]) + (" and " if len(listed) > 1 else "") + listed[-1]
        parts.append(f"Its median energy distance is {_median(t, model):.3g}, against {listed}; lower is better.")
    wins = [f"the {m} baseline on {int((wide[model] < wide[m]).sum())} of {n}" for m in ("additive", "linear")
            if m in wide]
    if wins:
        parts.append("It is closer to the real cells than " + " and than ".join(wins) + ".")
    contenders = [m for m in methods if m != "noise_floor"]
    best = min(contenders, key=lambda m: _median(t, m))
    parts.append(
        f"The lowest median energy distance of all methods is {best}'s"
        + (" -- on these data the model does not improve on it." if best != model else ".")
    )
    groups = t.loc[t["method"] == model, ["condition", "group"]].set_index("condition")["group"]
    outside = groups[groups == "dose-outside-hull"].index.tolist()
    inside = groups[groups != "dose-outside-hull"].index.tolist()
    if outside and inside:
        parts.append(
            f"Outside the convex hull of the training conditions ({', '.join(outside)}: extrapolation) its median "
            f"energy distance is {float(wide.loc[outside, model].median()):.3g}, inside {float(wide.loc[inside, model].median()):.3g}."
        )
    cov = t.loc[t["method"] == model, "coverage"]
    if cov.notna().any():
        c = float(cov.mean())
        if abs(100 * c - level) <= 5:
            verdict = "about right"
        elif 100 * c < level:
            verdict = "too narrow: the model is over-confident"
        else:
            verdict = "wider than needed: the model is cautious"
        parts.append(
            f"Its {level}% credible intervals for the mean change of a gene contained the true value for "
            f"{100 * c:.0f}% of the genes on average; calibrated intervals would contain about {level}%, so they "
            f"are {verdict}."
        )
        obs = t.loc[t["method"] == model, "coverage_observed"] if "coverage_observed" in t else None
        if obs is not None and obs.notna().any():
            parts.append(
                f"Against the observed mean of the held-out cells (what intervals calibrated on held-out training "
                f"conditions aim at) they contained {100 * float(obs.mean()):.0f}%."
            )
    if result.refused:
        refused = list(result.refused)
        parts.append(
            f"It refused {', '.join(refused)}: {'it contains' if len(refused) == 1 else 'they contain'} a perturbation "
            f"never measured in training, whose effect no training data can tell -- refusing is the correct answer."
        )
    return " ".join(parts)


def _glossary(result: PDAESimResult) -> list[tuple[str, str]]:
    s = result.settings
    t = result.table
    level = int(round(100 * float(s.get("interval", 0.9))))
    entries = [
        ("energy distance (energy_pca)",
         "how far the predicted cells are from the real held-out cells as populations (means, spread and shape "
         "together): 2 E|X-Y| - E|X-X'| - E|Y-Y'| over cells X (predicted) and Y (real), in a PCA space fit on the "
         "training cells. 0 means indistinguishable; the unbiased estimate used here can dip slightly below 0 by "
         "chance."),
        ("pearson_delta",
         "correlation, over genes, between the predicted and the real change of the mean from the control "
         "(1 = the right direction for every gene; undefined for the control baseline, which predicts no change)."),
        ("sd_ratio", "per-gene standard deviation of the predicted cells divided by that of the real cells, averaged "
                     "over genes (1 = the right cell-to-cell spread)."),
        ("coverage", f"fraction of genes whose {level}% credible interval of the mean contains the true population "
                     f"mean (simulated with many cells); intervals of the population mean give about {level / 100:.2f}."),
        ("coverage_observed", f"the same against the observed mean of the held-out cells. The package's calibrated "
                              f"intervals aim at this one (the observed mean of as many cells as a training "
                              f"condition has), so they give about {level / 100:.2f} here and more against the "
                              f"population mean, which lacks the held-out cells' sampling noise."),
        ("interval_width", "average width of those intervals, in expression units."),
    ]
    entries += [(m, d) for m, d in _GLOSSARY_METHODS.items() if m in set(t["method"])]
    groups = set(t["group"]) | ({"out-of-span"} if result.refused else set())
    entries += [(f"group {g}", d) for g, d in _GLOSSARY_GROUPS.items() if g in groups]
    if "dose-in-hull" in groups or "dose-outside-hull" in groups:
        entries.append((
            "inside / outside the hull",
            "the convex hull of the training conditions is the set of weighted averages of their label vectors. "
            "A test inside it is an interpolation between measured conditions; outside it, the model must "
            "extrapolate (this is not the same as being unpredictable: everything here is in their span)."))
    return entries


def _units(result: PDAESimResult) -> str:
    s = result.settings
    n_pcs = s.get("n_pcs")
    space = f"a {n_pcs}-dimensional PCA space" if n_pcs else "a PCA space"
    return (
        f"Expression is the simulator's log-scale expression of {s['simulation'].get('n_genes', '?')} genes "
        f"(arbitrary units). Energy distances are measured in {space} of that expression fit on the training "
        f"cells, in the units of a Euclidean distance between cells there; mean changes and interval widths are "
        f"in expression units; pearson_delta, sd_ratio and coverage have no unit."
    )


def _report_blocks(result: PDAESimResult, figs: list[tuple[str, str]], command: str) -> list[tuple]:
    s = result.settings
    t = result.table
    level = int(round(100 * float(s.get("interval", 0.9))))
    n_test = len(result.split.test_labels) if result.split is not None else None
    blocks: list[tuple] = [("h1", "pdae-sim report")]
    if command:
        blocks.append(("p", f"Command: `{command}`"))
    blocks.append(("p", (
        f"Simulated single-cell data with known truth: {s['simulation'].get('n_perturbations', '?')} elementary "
        f"perturbations acting as additive shifts of a {s['simulation'].get('latent_dim', '?')}-dimensional "
        f"latent state, decoded non-linearly into {s['simulation'].get('n_genes', '?')} genes "
        f"({s['simulation'].get('n_cells', '?')} cells per condition, seed {s['seed']}). The model was trained on "
        f"the control, the singles and half of the combinations and asked to predict "
        + (f"the {n_test} held-out conditions" if n_test is not None else "the held-out conditions")
        + f" as cells, with {level}% credible intervals; its fits: objective(s) {', '.join(s['objectives'])}, "
        f"{s['likelihood']} likelihood, "
        + ("fit's default length and early stopping" if s["steps"] is None else f"{s['steps']} optimiser steps")
        + f", {s['num_samples']} posterior draws."
    )))
    blocks += [("h2", "What the result means"), ("p", reading_paragraph(result))]
    blocks += [("h2", "Units"), ("p", _units(result))]
    blocks += [("h2", "Glossary"), ("dl", _glossary(result))]
    summary = result.summary()
    blocks += [
        ("h2", "Summary over the held-out perturbations"),
        ("p", "One row per method: n held-out perturbations, median and mean energy distance, mean pearson_delta, "
              "sd_ratio and coverage (blank: not defined for that method)."),
        ("table", summary),
        ("h2", "Energy distance per held-out perturbation"),
        ("p", "Lower is better; compare each method with noise_floor in the same row. All metrics per method and "
              "perturbation are in evaluation.csv."),
        ("table", _per_condition(t).reset_index().merge(
            t[["condition", "group"]].drop_duplicates("condition"), on="condition").pipe(
            lambda d: d[["condition", "group", *[c for c in d.columns if c not in ("condition", "group")]]])),
    ]
    if result.refused:
        blocks += [("h2", "Refused (outside the span of the training conditions)"),
                   ("ul", [f"`{lab}`: {why}" for lab, why in result.refused.items()])]
    if figs:
        blocks.append(("h2", "Plots"))
        blocks += [("img", f, caption) for f, caption in figs]
    return blocks


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    return str(v)


def _to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for kind, *rest in blocks:
        if kind == "h1":
            lines += [f"# {rest[0]}", ""]
        elif kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in rest[0]] + [""]
        elif kind == "dl":
            lines += [f"- **{term}**: {text}" for term, text in rest[0]] + [""]
        elif kind == "table":
            df = rest[0]
            lines.append("| " + " | ".join(map(str, df.columns)) + " |")
            lines.append("|" + "---|" * len(df.columns))
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
            lines.append("")
        elif kind == "img":
            lines += [f"![{Path(rest[0]).stem}]({rest[0]})", "", f"*{rest[1]}*", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _to_html(blocks: list[tuple], folder: Path) -> str:
    body: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline_html(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in rest[0]) + "</ul>")
        elif kind == "dl":
            body.append("<dl>" + "".join(f"<dt>{_inline_html(a)}</dt><dd>{_inline_html(b)}</dd>" for a, b in rest[0])
                        + "</dl>")
        elif kind == "table":
            df = rest[0]
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                           for row in df.itertuples(index=False))
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / rest[0]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(Path(rest[0]).stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline_html(rest[1])}</figcaption></figure>")
    title = html.escape(next((b[1] for b in blocks if b[0] == "h1"), "report"))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "dt{font-weight:bold;margin-top:.5em}img{max-width:100%}figcaption{font-style:italic;color:#555}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_pdae_sim_report(result: PDAESimResult, out: str | Path, *, command: str = "") -> Path:
    """Write ``evaluation.csv``, ``summary.csv``, ``report.md``, ``report.html`` (the same report with the
    plots embedded, to open from a file browser), ``predicted_vs_true.png`` and ``loss.png`` to ``out``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from perturbax.plotting import plot_loss, plot_predicted_vs_observed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "evaluation.csv", index=False)
    result.summary().to_csv(out / "summary.csv", index=False)

    model = next(iter(result.predictions), None)
    figs: list[tuple[str, str]] = []
    if model is not None:
        pred = result.predictions[model]
        labels = pred.uns["perturbax"]["labels"]
        level = int(round(100 * float(pred.uns["perturbax"].get("interval", result.settings.get("interval", 0.9)))))
        n = len(labels)
        ncol = min(4, n)
        nrow = int(np.ceil(n / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.3 * nrow), squeeze=False)
        control = result.split.train.dense(result.split.train.cells_of("control")).mean(0)
        for ax, lab in zip(axes.ravel(), labels):
            mean, lo, hi = prediction_intervals(pred, lab)
            plot_predicted_vs_observed(mean, lo, hi, result.population_means[lab], control=control, ax=ax, title=lab)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.suptitle(f"{model}: predicted vs true population mean change ({level}% intervals)", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "predicted_vs_true.png", dpi=110)
        plt.close(fig)
        figs.append(("predicted_vs_true.png",
                     f"{model}: for each held-out perturbation, the predicted change of each gene's mean from the "
                     f"control (vertical, with its {level}% interval) against the true change (horizontal); points "
                     f"on the diagonal are exact; red points are genes whose interval misses the true change."))
        fig, axes = plt.subplots(1, len(result.fits), figsize=(5 * len(result.fits), 3), squeeze=False)
        for ax, (name, res) in zip(axes.ravel(), result.fits.items()):
            plot_loss(res.history, ax=ax, title=name)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=110)
        plt.close(fig)
        figs.append(("loss.png", "Training loss against optimiser step: it should level off by the end."))

    blocks = _report_blocks(result, figs, command)
    (out / "report.md").write_text(_to_markdown(blocks))
    (out / "report.html").write_text(_to_html(blocks, out))
    return out
