"""Learning the program order of a latent dynamics fit.

The causal mask of :class:`~perturbax.models.LatentDynamicsConfig` fixes an order of the programs
(by default: program ``j`` may act on program ``i`` only if ``j < i``). The fit decides which
latent coordinate becomes which program, and nothing makes it pick a labelling consistent with
that order: the edges that go "backwards" cannot be represented, ``S`` absorbs them and the signs
of ``B`` come out wrong. :func:`refit_in_causal_order` reads the order from the fitted total
effects ``W = (I - B)^{-1} S`` -- which do not depend on the mask -- with
:func:`~perturbax.models.order_from_effects` and refits on the mask of that order, starting from
the fitted encoder and decoder so the latent coordinates stay where they are.

The order is identified by ``W`` only when every program is the sole direct target of some
perturbation (:func:`perturbax.theory.check_order_from_effects`). With a ``target_mask`` in the
fit's config that condition is checked (a ``UserWarning`` when it fails); without one it cannot
be checked from ``W`` and the order read is an assumption (a warning only when ``B_hat`` shows it
fails, see :func:`~perturbax.models.order_from_effects`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from perturbax.data.core import PerturbationData
from perturbax.inference.fitting import fit
from perturbax.inference.order_refit import fitted_causal_order, refit_orders
from perturbax.inference.result import FitResult

__all__ = ["fitted_causal_order", "refit_in_causal_order"]


def refit_in_causal_order(
    result: FitResult,
    data: PerturbationData,
    *,
    steps: int = 2000,
    max_rounds: int = 3,
    seed: int | None = None,
    num_samples: int = 200,
    **fit_kwargs: Any,
) -> FitResult:
    """Refit a latent dynamics fit on the causal mask of the order read from its total effects,
    until the order is a fixed point; return the best refit.

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
    model = result.model_name if result.model_name == "latent_dynamics" else result.model
    return refit_orders(partial(fit, model), result, data, steps=steps, max_rounds=max_rounds, seed=seed,
                        num_samples=num_samples, **fit_kwargs)
