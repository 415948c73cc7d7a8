"""The split-half noise floor: how well the truth predicts itself."""

from __future__ import annotations

import numpy as np

__all__ = ["split_half_noise_floor"]


def split_half_noise_floor(true_cells, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Randomly split the measured cells of one condition into two halves ``(A, B)``.

    Scoring ``A`` as a prediction of ``B`` (e.g. ``evaluate_conditions({c: A}, {c: B}, control)``)
    gives the irreducible noise of the metric at half the sample size: an unbiased
    (U-statistic) energy distance is ~0 there, Pearson delta and R^2 are below 1 only because of
    sampling noise. With an odd number of cells ``B`` gets the extra cell. Deterministic by seed.
    """
    x = np.asarray(true_cells)
    if x.ndim != 2:
        raise ValueError(f"true_cells must be a 2-D array (cells x genes), got shape {x.shape}.")
    n = x.shape[0]
    if n < 4:
        raise ValueError(
            f"The split-half noise floor needs at least 4 cells (2 per half for U-statistics), got {n}."
        )
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return x[np.sort(perm[:half])], x[np.sort(perm[half:])]
