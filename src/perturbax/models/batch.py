"""The one argument every perturbax model takes: a minibatch of cells."""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Float

__all__ = ["Batch"]


class Batch(NamedTuple):
    """A minibatch of cells (a JAX pytree; ``None`` fields are absent).

    Every perturbax model has the signature ``model(batch, *, config, n_cells)``, where
    ``n_cells`` is the total number of training cells (the size of the ``"cells"`` plate) and
    ``batch`` is this tuple. Predictions call the same model with ``x=None``.

    Attributes
    ----------
    x
        Observed expression, shape ``(B, G)``; ``None`` to simulate.
    l
        Perturbation label vectors (doses as entries), shape ``(B, K)``.
    c
        Covariate one-hots (batch, cell line), shape ``(B, C)``, or ``None``.
    library
        Library size per cell (count likelihoods), shape ``(B,)``, or ``None``.
    t
        Time since the perturbation was switched on, shape ``(B,)``, or ``None``.
    """

    x: Float[Array, "B G"] | None
    l: Float[Array, "B K"]
    c: Float[Array, "B C"] | None = None
    library: Float[Array, " B"] | None = None
    t: Float[Array, " B"] | None = None

    @property
    def size(self) -> int:
        return self.l.shape[0]
