"""Model-level local identifiability of a fitted model (:func:`fit_identifiability`): the check of
:func:`perturbax.theory.model_identifiability` at the posterior mean of a :class:`FitResult`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from perturbax.inference.prediction import posterior_globals
from perturbax.models.batch import Batch
from perturbax.theory.model_check import ModelIdentifiabilityReport, model_identifiability

__all__ = ["fit_identifiability"]


def fit_identifiability(
    fit,
    *,
    design=None,
    sites: Sequence[str] | None = None,
    symmetries: str | Sequence = "auto",
    n_samples: int = 1000,
    num_draws: int = 200,
    seed: int = 0,
    rtol: float | None = None,
    times=None,
    **kwargs,
) -> ModelIdentifiabilityReport:
    """:func:`~perturbax.theory.model_identifiability` of a fitted model at its posterior mean, on its
    training design.

    The global sites (``fit.global_names``) are set to the mean of ``num_draws`` draws from the
    fitted posterior (:func:`perturbax.inference.prediction.posterior_globals`), the model's param
    sites (decoder, scales) to their fitted values. ``design`` defaults to ``fit.train_design``;
    for models of time ``times`` defaults to the training times (the contexts are then every
    training condition at every training time). Other keyword arguments go to
    :func:`~perturbax.theory.model_identifiability`.
    """
    draws = posterior_globals(fit, num_draws, seed=seed)
    post = {n: np.asarray(v).mean(axis=0) for n, v in draws.items()}
    if times is None and getattr(fit, "uses_time", False):
        times = fit.train_times
    design = fit.train_design if design is None else design
    C = int(getattr(fit.config, "n_covariates", 0) or 0)
    dummy = Batch(
        x=None,
        l=jnp.zeros((2, np.shape(design)[1])),
        c=jnp.zeros((2, C)) if C else None,
        library=jnp.ones((2,)),
        t=jnp.ones((2,)) if times is not None else None,
    )
    model_params: set[str] = set()

    def names(b):  # the model's param sites (fit.params also holds the guide's)
        tr = handlers.trace(handlers.seed(fit.model, 0)).get_trace(b, **fit.model_kwargs)
        model_params.update(n for n, site in tr.items() if site["type"] == "param")
        return 0

    jax.eval_shape(names, dummy)
    params = {n: v for n, v in fit.params.items() if n in model_params}
    params.update(post)
    return model_identifiability(
        fit.model,
        design,
        params,
        config=fit.config,
        sites=sites,
        symmetries=symmetries,
        n_samples=n_samples,
        seed=seed,
        rtol=rtol,
        times=times,
        **kwargs,
    )
