"""``predict``: cells and credible intervals for (possibly unseen) perturbations.

For each posterior draw of the global sites and each requested label ``l*``, the fitted model is
run with ``z_base`` fixed to the basal states of the source cells (training control cells by
default) and the label ``l*``: it shifts them by ``W l*``, decodes, and samples the likelihood.
The per-gene mean expression of a perturbation is averaged over the source cells for each draw,
with Bayesian-bootstrap weights (the source cells are a finite sample of the basal population);
its posterior mean and equal-tailed credible interval come from the draws. The intervals thus
carry the posterior uncertainty of the global sites (W, ...) and of the basal population; they
do not carry the error of the decoder, which is a point estimate.

Output AnnData (same genes and expression space as the training ``X``):

- ``X``: predicted cells; ``obs[perturbation_key]``: label; ``obs["draw"]``: posterior draw used;
- ``varm["pred_mean"]``, ``varm["pred_lower"]``, ``varm["pred_upper"]``: ``(n_genes, n_labels)``
  posterior mean and interval bounds of the mean expression, columns in the order of
  ``uns["perturbax"]["labels"]``;
- ``uns["perturbax"]``: labels, interval level, number of draws, source, model, objective, and
  identifiability notes from the training design (``coverage``: arrays ``covered``,
  ``in_convex_hull``, ``residual``, ``message`` aligned with ``labels``);
- ``uns["mean_draws"]``: ``(n_labels, num_samples, n_genes)`` per-draw mean expression.

Use :func:`perturbax.data.prediction_summary` for a tidy table and :func:`to_arviz` for ArviZ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from perturbax.data.io import predictions_to_anndata
from perturbax.data.labels import LabelLike, close_matches
from perturbax.inference.result import FitResult, _dummy_batch
from perturbax.models.batch import Batch

__all__ = ["predict", "posterior_globals", "to_arviz", "UnseenPerturbationError"]


class UnseenPerturbationError(ValueError):
    """A requested perturbation contains an elementary perturbation the model never saw."""


def posterior_globals(fit: FitResult, num_samples: int, *, seed: int = 0) -> dict[str, jax.Array]:
    """``num_samples`` joint draws of the global sites from the fitted posterior (leading axis)."""
    dummy = _dummy_batch(fit.config)
    guide = handlers.substitute(fit.guide, data=fit.params)

    def one(key):
        tr = handlers.trace(handlers.seed(guide, key)).get_trace(dummy, **fit.model_kwargs)
        return {n: tr[n]["value"] for n in fit.global_names}

    keys = jax.random.split(jax.random.PRNGKey(seed), num_samples)
    return jax.jit(jax.vmap(one))(keys)


def _parse(fit: FitResult, perturbations, allow_unseen: bool) -> tuple[list[str], np.ndarray]:
    if isinstance(perturbations, (str, dict)) or (
        isinstance(perturbations, np.ndarray) and perturbations.ndim == 1
    ):
        perturbations = [perturbations]
    if len(perturbations) == 0:
        raise ValueError("perturbations is empty; give at least one label such as 'A+B' or {'A': 0.5}.")
    reg = fit.registry
    labels, vecs = [], []
    for p in perturbations:
        unknown = reg.unknown(p)
        if unknown:
            hints = {u: close_matches(u, reg.names) for u in unknown}
            text = "; ".join(f"{u!r}" + (f" (did you mean {h}?)" if h else "") for u, h in hints.items())
            raise ValueError(
                f"Perturbation {p!r} names elementary perturbation(s) unknown to the model: {text}. "
                f"The model knows {reg.K}: {', '.join(reg.names[:30])}{' ...' if reg.K > 30 else ''}."
            )
        v = reg.encode(p)
        labels.append(reg.decode(v))
        vecs.append(v)
    vecs = np.stack(vecs)
    seen = set(fit.seen_elementary)
    for lab, v in zip(labels, vecs):
        never = [reg.names[k] for k in np.flatnonzero(v) if reg.names[k] not in seen]
        if never and not allow_unseen:
            raise UnseenPerturbationError(
                f"{lab!r} contains {never}, never seen in training: the model cannot know its effect "
                f"(its latent shift is only the prior). Pass allow_unseen=True to predict anyway."
            )
    return labels, vecs


def _coverage_notes(fit: FitResult, labels: list[str], vecs: np.ndarray) -> dict[str, np.ndarray]:
    """Identifiability of each label from the training design (:func:`perturbax.theory.check_design`);
    warns for labels outside the span of the training labels."""
    from perturbax.theory.design import check_design

    report = check_design(fit.train_design, vecs, registry=fit.registry)
    notes = {"covered": [], "in_convex_hull": [], "residual": [], "message": []}
    for lab, t in zip(labels, report.tests):
        notes["covered"].append(bool(t.covered))
        notes["in_convex_hull"].append("unknown" if t.in_convex_hull is None else str(bool(t.in_convex_hull)))
        notes["residual"].append(float(t.residual))
        notes["message"].append(t.message)
        if not t.covered:
            warnings.warn(
                f"{lab!r} is not identified by the training design: {t.message} Its prediction rests on "
                f"the prior and the decoder's extrapolation, not on data.",
                stacklevel=3,
            )
    return {k: np.asarray(v) for k, v in notes.items()}


def predict(
    fit: FitResult,
    perturbations: Sequence[LabelLike] | LabelLike,
    *,
    n_cells: int | None = None,
    num_samples: int = 100,
    source: str = "control",
    interval: float = 0.9,
    seed: int = 0,
    allow_unseen: bool = False,
    bootstrap: bool = True,
):
    """Predict cells of each perturbation, with posterior credible intervals of the mean.

    Parameters
    ----------
    fit
        A :class:`FitResult`.
    perturbations
        Labels in any spelling: ``"A+B"``, ``"A:0.5+C:2"``, ``{"A": 0.5, "C": 2.0}``, or vectors.
    n_cells
        Predicted cells per perturbation (default: the number of source cells).
    num_samples
        Posterior draws of the global sites.
    source
        ``"control"``: basal states of the training control cells; ``"prior"``: draws from the base
        distribution.
    interval
        Credible level of the equal-tailed intervals.
    allow_unseen
        Predict perturbations with an elementary perturbation never seen in training (its shift is
        then a prior draw) instead of refusing.
    bootstrap
        Weight the source cells of each draw by a Bayesian bootstrap, so the intervals also carry
        the uncertainty of estimating a population from finitely many source cells.

    Returns
    -------
    AnnData of predicted cells; see the module docstring for where the intervals are.
    """
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1), got {interval}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    labels, vecs = _parse(fit, perturbations, allow_unseen)
    notes = _coverage_notes(fit, labels, vecs)

    key = jax.random.PRNGKey(seed)
    k_glob, k_src, k_cells, k_means = jax.random.split(key, 4)
    draws = posterior_globals(fit, num_samples, seed=int(jax.random.randint(k_glob, (), 0, 2**31 - 1)))
    z_src, lib_src, c_src = (jnp.asarray(fit.basal[k]) for k in ("z", "library", "c"))
    if source == "prior":
        n_prior = max(1000, n_cells or 0)
        base = fit.model  # sample z_base from the model's own base distribution
        tr = handlers.trace(handlers.seed(handlers.block(base), 1)).get_trace(
            _dummy_batch(fit.config, n_prior)._replace(x=None), **fit.model_kwargs
        )
        z_src = tr["z_base"]["value"]
        idx = jax.random.randint(k_src, (n_prior,), 0, lib_src.shape[0])
        lib_src, c_src = lib_src[idx], c_src[idx]
    elif source != "control":
        raise ValueError(f"source={source!r} is not supported; use 'control' or 'prior'.")
    n_src = z_src.shape[0]
    if n_src == 0:
        raise ValueError("The fit has no source cells (no control cells in training).")
    n_cells = n_src if n_cells is None else int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}.")
    per_draw = math.ceil(n_cells / num_samples)
    has_c = c_src.shape[1] > 0
    model = handlers.substitute(fit.model, data=fit.params)
    kwargs = fit.model_kwargs

    def run(globals_s, z, lib, c, lvec, key):
        batch = Batch(x=None, l=jnp.broadcast_to(lvec, (z.shape[0], lvec.shape[0])), c=c if has_c else None, library=lib)
        cond = handlers.condition(model, data={**globals_s, "z_base": z})
        tr = handlers.trace(handlers.seed(cond, key)).get_trace(batch, **kwargs)
        mean = tr["x_mean"]["value"] if "x_mean" in tr else tr["x"]["value"]
        return tr["x"]["value"], mean

    @jax.jit
    def one_label(lvec, key):
        k1, k2, k3 = jax.random.split(key, 3)
        mkeys = jax.random.split(k1, num_samples)
        # Per-draw population mean over the source cells, weighted by a Bayesian bootstrap
        # (Dirichlet(1, ..., 1) weights): the source cells are a finite sample of basal states.
        def draw_mean(a):
            k_run, k_w = jax.random.split(a[1])
            w = jax.random.dirichlet(k_w, jnp.ones(n_src)) if bootstrap else jnp.full(n_src, 1.0 / n_src)
            return w @ run(a[0], z_src, lib_src, c_src, lvec, k_run)[1]

        means = jax.lax.map(draw_mean, (draws, mkeys))
        # Cells: each draw decodes its own subset of the source cells.
        pick = jax.random.permutation(k2, jnp.arange(num_samples * per_draw) % n_src).reshape(num_samples, per_draw)
        ckeys = jax.random.split(k3, num_samples)
        cells = jax.lax.map(
            lambda a: run(a[0], z_src[a[1]], lib_src[a[1]], c_src[a[1]], lvec, a[2])[0], (draws, pick, ckeys)
        )
        return means, cells.reshape(num_samples * per_draw, -1)[:n_cells]

    all_cells, all_means = [], []
    for i, v in enumerate(vecs):
        means, cells = one_label(jnp.asarray(v, jnp.float32), jax.random.fold_in(k_cells, i))
        all_means.append(np.asarray(means))
        all_cells.append(np.asarray(cells))
    mean_draws = np.stack(all_means).astype(np.float64)  # (P, S, G)
    lo_q, hi_q = (1 - interval) / 2, (1 + interval) / 2
    draw_idx = np.repeat(np.arange(num_samples), per_draw)[:n_cells]
    adata = predictions_to_anndata(
        {lab: c for lab, c in zip(labels, all_cells)},
        gene_names=fit.gene_names,
        perturbation_key=fit.perturbation_key,
        obs={"draw": np.tile(draw_idx, len(labels))},
        uns={
            "perturbax": {
                "labels": list(labels),
                "interval": float(interval),
                "num_samples": int(num_samples),
                "source": source,
                "model": fit.model_name,
                "objective": fit.objective,
                "coverage": notes,  # lists aligned with "labels"
            },
            "mean_draws": mean_draws.astype(np.float32),
        },
        varm={
            "pred_mean": mean_draws.mean(1).T,
            "pred_lower": np.quantile(mean_draws, lo_q, axis=1).T,
            "pred_upper": np.quantile(mean_draws, hi_q, axis=1).T,
        },
    )
    return adata


def to_arviz(fit: FitResult, prediction=None, *, num_samples: int = 200, seed: int = 0):
    """ArviZ (1.x) DataTree of the posterior over the global sites (and, given a prediction from
    :func:`predict`, the per-draw mean expression of each predicted perturbation as
    ``posterior_predictive``)."""
    import arviz as az

    draws = posterior_globals(fit, num_samples, seed=seed)
    posterior = {n: np.asarray(v)[None] for n, v in draws.items()}
    dims, coords = {}, {"perturbation": list(fit.registry.names), "gene": list(fit.gene_names)}
    # Deterministic W of reparametrised priors (e.g. horseshoe) is recomputed from the draws.
    if "W" not in posterior:
        dummy = _dummy_batch(fit.config)

        def w_of(g):
            cond = handlers.condition(handlers.substitute(fit.model, data=fit.params), data=g)
            tr = handlers.trace(handlers.seed(cond, 0)).get_trace(dummy._replace(x=None), **fit.model_kwargs)
            return tr["W"]["value"]

        try:
            posterior["W"] = np.asarray(jax.vmap(w_of)(draws))[None]
        except KeyError:
            pass
    if "W" in posterior and posterior["W"].shape[-1] == fit.registry.K:
        dims["W"] = ["latent", "perturbation"]
    groups = {"posterior": posterior}
    if prediction is not None:
        meta = prediction.uns["perturbax"]
        groups["posterior_predictive"] = {"mean_expression": np.asarray(prediction.uns["mean_draws"]).transpose(1, 0, 2)[None]}
        dims["mean_expression"] = ["condition", "gene"]
        coords["condition"] = list(meta["labels"])
    return az.from_dict(groups, dims=dims, coords=coords)
