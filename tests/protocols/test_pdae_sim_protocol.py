"""The pdae-sim protocol scores a user-written model variant exactly like the built-in model."""

import numpy as np

from perturbax.models import additive_shift_model
from perturbax.protocols import run_pdae_sim

TINY = dict(simulation={"n_cells": 40}, num_samples=5, population_cells=1000, progress=False)


def test_run_pdae_sim_fits_a_user_model_on_the_same_protocol():
    calls = []

    def my_variant(batch, *, config, n_cells):
        calls.append(config.latent_dim)
        additive_shift_model(batch, config=config, n_cells=n_cells)

    res = run_pdae_sim(seed=0, model=my_variant, objectives=("energy",), steps=30, **TINY)
    assert calls and set(calls) == {5}  # traced with the protocol's config (latent dim 5)
    assert res.settings["model"] == "my_variant"
    model = res.table[res.table.method == "model_energy"]
    baseline = res.table[res.table.method == "additive"]
    # scored on the same in-span held-out conditions as the baselines; the out-of-span one refused
    assert set(model.condition) == set(baseline.condition) and len(model) >= 5
    assert res.refused and not set(res.refused) & set(model.condition)
    assert model.coverage.between(0, 1).all() and np.isfinite(model.energy_pca).all()
