"""Baselines that every model is compared with (DESIGN sections 4 and 6).

All are fitted on a training :class:`~perturbax.data.PerturbationData` and predict *cells*
(control cells plus a predicted shift of the mean), see :mod:`perturbax.baselines.base`::

    from perturbax.baselines import AdditiveBaseline
    model = AdditiveBaseline().fit(split.train)
    pred = model.predict(split.test_labels)     # {label: cells}

``split_half_noise_floor`` gives the irreducible noise of a metric on the measured cells.
"""

from perturbax.baselines.additive import AdditiveBaseline
from perturbax.baselines.base import Baseline, TrainingSummary, summarize_training
from perturbax.baselines.linear import LinearBaseline
from perturbax.baselines.noise_floor import split_half_noise_floor
from perturbax.baselines.simple import ControlBaseline, PooledMeanBaseline

__all__ = [
    "AdditiveBaseline",
    "Baseline",
    "ControlBaseline",
    "LinearBaseline",
    "PooledMeanBaseline",
    "TrainingSummary",
    "standard_baselines",
    "split_half_noise_floor",
    "summarize_training",
]


def standard_baselines(*, alpha: float | str = "cv", unmeasured: str = "error") -> list[Baseline]:
    """Unfitted control, pooled-mean, additive and linear baselines (in that order).

    ``unmeasured`` is passed to the additive and linear baselines (``"error"`` or ``"zero"``);
    ``alpha`` is the linear baseline's ridge penalty (``"cv"``: chosen on the training conditions).
    """
    return [
        ControlBaseline(),
        PooledMeanBaseline(),
        AdditiveBaseline(unmeasured=unmeasured),
        LinearBaseline(alpha=alpha, unmeasured=unmeasured),
    ]
