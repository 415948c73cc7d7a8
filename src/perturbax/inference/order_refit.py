"""Reading the program order of a latent dynamics fit and refitting on it, given any one-stage fit
function (what :func:`perturbax.inference.refit_in_causal_order` and the default recipe of
:mod:`perturbax.inference.dynamics_recipe` share; the module docstring of
:mod:`perturbax.inference.causal_order` explains the order)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.inference.prediction import posterior_draws
from perturbax.inference.result import FitResult
from perturbax.models.dynamics import LatentDynamicsConfig, causal_order, order_from_effects, order_mask

__all__ = ["fitted_causal_order", "refit_orders"]

def fitted_causal_order(result: FitResult, *, num_samples: int = 200, seed: int = 0,
                        return_targets: bool = False) -> tuple:
    """``(order, B_hat)`` from the posterior-mean total effects ``W`` of a linear or mechanism
    latent dynamics fit (:func:`~perturbax.models.order_from_effects`, with the config's
    ``target_mask`` as the targets' support when it has one; needs at least as many elementary
    perturbations as programs), and with ``return_targets=True`` the perturbation matched to each
    program too. Warns when the order is not identified (module docstring)."""
    cfg = result.config
    if not isinstance(cfg, LatentDynamicsConfig) or cfg.drift == "neural":
        raise ValueError(
            "fitted_causal_order needs a latent dynamics fit with causal weights B (drift='linear' or "
            f"'mechanism'); got {type(cfg).__name__}"
            + (f" with drift={cfg.drift!r}." if isinstance(cfg, LatentDynamicsConfig) else ".")
        )
    draws = posterior_draws(result, num_samples, seed=seed)
    W = np.asarray(draws["W"], dtype=np.float64).mean(0)
    return order_from_effects(W, targets=cfg.target_mask, return_targets=return_targets)


def refit_orders(
    fit_fn: Callable[..., FitResult],
    result: FitResult,
    data: PerturbationData,
    *,
    steps: int = 2000,
    max_rounds: int = 3,
    seed: int | None = None,
    num_samples: int = 200,
    **fit_kwargs: Any,
) -> FitResult:
    """:func:`~perturbax.inference.refit_in_causal_order` with the one-stage fit function ``fit_fn(data,
    config=, objective=, steps=, seed=, init_params=, **fit_kwargs)`` (e.g. ``partial(fit, model)``).

    Each round reads the order from the current fit (:func:`fitted_causal_order`); if the fit's
    mask already is that order's mask the loop stops, else the model is refitted with
    ``causal_mask=order_mask(order)`` (everything else of the config unchanged), starting from
    the current encoder, decoder and likelihood parameters (``init_params``) with the global
    sites initialised afresh, for ``steps`` steps on ``data`` with the same objective
    (``fit_kwargs`` go to :func:`~perturbax.inference.fit`). At most ``max_rounds`` refits: the
    better latents of a refit can reveal a better order, but a refit can also drift to a worse
    one, so the refit with the lowest held-out loss is returned (ties and no held-out split: the
    later one). ``info["causal_order"]`` of the result holds the order of its mask (causes
    first), ``info["order_rounds"]`` the orders read in each round, ``info["order_round_losses"]``
    the held-out loss of each refit, ``info["order_from"]`` the last ``B_hat`` and
    ``info["order_identified"]`` whether the targets' support makes the order identifiable from ``W``
    (:func:`~perturbax.theory.check_order_from_effects` on the config's ``target_mask``; ``None``
    without one: not checkable from ``W``). If the first
    order read matches the input fit's mask, the input fit is returned unchanged (apart from those
    ``info`` entries).
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}.")
    objective = fit_kwargs.pop("objective", result.objective)
    seed = result.info.get("seed", 0) if seed is None else seed
    current, rounds, refits = result, [], []
    for _ in range(max_rounds + 1):
        order, b_hat = fitted_causal_order(current, num_samples=num_samples)
        rounds.append(list(order))
        if np.array_equal(current.config.mask, order_mask(order)) or len(rounds) > max_rounds:
            break
        cfg = dataclasses.replace(current.config, causal_mask=order_mask(order), allow_cycles=False, acyclicity=0.0)
        warm = {k: v for k, v in current.params.items() if not k.startswith("q_")}
        current = fit_fn(
            data,
            config=cfg,
            objective=objective,
            steps=steps,
            seed=seed,
            init_params=warm,
            **fit_kwargs,
        )
        refits.append(current)
    # the refit with the lowest held-out loss (the last one when there is no held-out split)
    best = min(reversed(refits), key=_held_out_loss) if refits else result
    info = {**best.info, "causal_order": causal_order(best.config.mask), "order_rounds": rounds,
            "order_round_losses": [_held_out_loss(r) for r in refits], "order_from": b_hat.tolist(),
            "order_identified": _order_identified(result.config)}
    return dataclasses.replace(best, info=info)  # (the input fit is never modified)


def _order_identified(cfg: LatentDynamicsConfig) -> bool | None:
    if cfg.target_mask is None:
        return None
    from perturbax.theory.dynamics import check_order_from_effects

    return check_order_from_effects(np.asarray(cfg.target_mask)).identified


def _held_out_loss(res: FitResult) -> float:
    v = np.asarray(res.history.get("val_loss", ()), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.min()) if v.size else float("inf")
