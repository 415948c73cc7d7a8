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

    :func:`~perturbax.inference.order_refit.refit_orders` with :func:`~perturbax.inference.fit` as
    the one-stage fit function: the rounds, what ``info`` records and which refit is returned are
    described there (``fit_kwargs`` go to :func:`~perturbax.inference.fit`).
    """
    model = result.model_name if result.model_name == "latent_dynamics" else result.model
    return refit_orders(partial(fit, model), result, data, steps=steps, max_rounds=max_rounds, seed=seed,
                        num_samples=num_samples, **fit_kwargs)
