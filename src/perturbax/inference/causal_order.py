"""Learning the program order of a latent dynamics fit.

The causal mask of :class:`~perturbax.models.LatentDynamicsConfig` fixes an order of the programs
(by default: program ``j`` may act on program ``i`` only if ``j < i``). The fit decides which
latent coordinate becomes which program, and nothing makes it pick a labelling consistent with
that order: the edges that go "backwards" cannot be represented, ``S`` absorbs them and the signs
of ``B`` come out wrong. :func:`refit_in_causal_order` reads the order from the fitted total
effects ``W = (I - B)^{-1} S`` -- which do not depend on the mask -- with
:func:`~perturbax.models.order_from_effects` and refits on the mask of that order, starting from
the fitted encoder and decoder so the latent coordinates stay where they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.inference.fitting import fit
from perturbax.inference.prediction import posterior_draws
from perturbax.inference.result import FitResult
from perturbax.models.dynamics import LatentDynamicsConfig, order_from_effects, order_mask

__all__ = ["fitted_causal_order", "refit_in_causal_order"]


def fitted_causal_order(result: FitResult, *, num_samples: int = 200, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """``(order, B_hat)`` from the posterior-mean total effects ``W`` of a linear or mechanism
    latent dynamics fit (:func:`~perturbax.models.order_from_effects`; needs at least as many
    elementary perturbations as programs)."""
    cfg = result.config
    if not isinstance(cfg, LatentDynamicsConfig) or cfg.drift == "neural":
        raise ValueError(
            "fitted_causal_order needs a latent dynamics fit with causal weights B (drift='linear' or "
            f"'mechanism'); got {type(cfg).__name__}"
            + (f" with drift={cfg.drift!r}." if isinstance(cfg, LatentDynamicsConfig) else ".")
        )
    draws = posterior_draws(result, num_samples, seed=seed)
    W = np.asarray(draws["W"], dtype=np.float64).mean(0)
    return order_from_effects(W)


def refit_in_causal_order(
    result: FitResult,
    data: PerturbationData,
    *,
    steps: int = 2000,
    seed: int | None = None,
    num_samples: int = 200,
    **fit_kwargs: Any,
) -> FitResult:
    """Refit a latent dynamics fit on the causal mask of the order read from its total effects.

    The new fit has ``causal_mask=order_mask(order)`` (everything else of the config unchanged),
    starts from the fitted encoder, decoder and likelihood parameters (``init_params``) with the
    global sites initialised afresh, and runs ``steps`` steps on ``data`` with the same objective;
    ``fit_kwargs`` go to :func:`~perturbax.inference.fit`. ``info["causal_order"]`` of the result
    holds the order (causes first) and ``info["order_from"]`` the ``B_hat`` it was read from.
    """
    order, b_hat = fitted_causal_order(result, num_samples=num_samples)
    cfg = dataclasses.replace(result.config, causal_mask=order_mask(order), allow_cycles=False, acyclicity=0.0)
    warm = {k: v for k, v in result.params.items() if not k.startswith("q_")}
    out = fit(
        result.model_name if result.model_name == "latent_dynamics" else result.model,
        data,
        config=cfg,
        objective=fit_kwargs.pop("objective", result.objective),
        steps=steps,
        seed=result.info.get("seed", 0) if seed is None else seed,
        init_params=warm,
        **fit_kwargs,
    )
    out.info["causal_order"] = list(order)
    out.info["order_from"] = b_hat.tolist()
    return out
