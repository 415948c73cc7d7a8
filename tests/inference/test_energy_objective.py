"""The energy score used for fitting agrees with the evaluation metric and has finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perturbax.inference import (
    EnergyOptions,
    EnergyScore,
    data_start,
    energy_score_groups,
    mean_distance_groups,
    pairwise_distance,
)
from perturbax.metrics import energy_distance


def test_grouped_score_equals_u_statistic_energy_distance():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(3, 40, 6)).astype(np.float32)
    real = (rng.normal(size=(3, 40, 6)) + np.array([0.0, 0.5, 1.0])[:, None, None]).astype(np.float32)
    got = np.asarray(energy_score_groups(jnp.asarray(sim), jnp.asarray(real)))
    want = [energy_distance(sim[e], real[e], form="U") for e in range(3)]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert got[2] > got[1] > 0.05  # larger shift, larger distance


def test_pairwise_distance_matches_direct_and_has_finite_gradient_at_duplicates():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    d = pairwise_distance(a, a)
    direct = np.linalg.norm(np.asarray(a)[:, None] - np.asarray(a)[None], axis=-1)
    off = ~np.eye(5, dtype=bool)
    np.testing.assert_allclose(np.asarray(d)[off], direct[off], rtol=1e-4)
    assert np.all(np.diag(np.asarray(d)) < 2e-3)  # float32 cancellation on the diagonal, clamped
    g = jax.grad(lambda x: pairwise_distance(x, x).sum())(a)
    assert np.all(np.isfinite(np.asarray(g)))


def test_exponent_two_score_is_twice_the_squared_distance_of_means():
    # the mean-matching term of EnergyOptions(mean_weight=...): the U-statistic with beta = 2 is
    # 2 |mean_s - mean_r|^2 - 2 / (m - 1) (s_s + s_r), s = mean squared deviation from the group mean
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(2, 30, 5))
    real = rng.normal(size=(2, 30, 5)) + np.array([0.0, 0.7])[:, None, None]
    got = np.asarray(energy_score_groups(jnp.asarray(sim, jnp.float32), jnp.asarray(real, jnp.float32), 2.0))
    m = sim.shape[1]
    spread = lambda a: np.mean(np.sum((a - a.mean(0)) ** 2, -1))  # noqa: E731
    want = [2 * np.sum((sim[e].mean(0) - real[e].mean(0)) ** 2) - 2 / (m - 1) * (spread(sim[e]) + spread(real[e]))
            for e in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert got[1] > 0.8  # 2 * 5 * 0.7^2 = 4.9 in expectation


def test_energy_options_are_checked():
    with pytest.raises(ValueError, match="source='treated'"):
        EnergyScore(n_groups=2, cells_per_group=4, global_names=(), n_cells=10, options=EnergyOptions(source="treated"))
    with pytest.raises(ValueError, match="mean_weight must be >= 0"):
        EnergyScore(n_groups=2, cells_per_group=4, global_names=(), n_cells=10, options=EnergyOptions(mean_weight=-1.0))


def _device(n_per=(30, 12, 12, 12, 12), G=4, seed=0):
    import anndata as ad
    import pandas as pd

    from perturbax.data import from_anndata
    from perturbax.inference.fitting import _device_data

    labels = np.repeat(["control", "A", "B", "A+B", "C"], n_per)
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(rng.normal(size=(labels.size, G)).astype(np.float32) + 3.0,
                       obs=pd.DataFrame({"p": labels}, index=[f"c{i}" for i in range(labels.size)]))
    data = from_anndata(adata, "p", "control")
    return data, _device_data(data, np.arange(data.n_cells))


def test_control_source_puts_a_control_group_first():
    from perturbax.inference.fitting import _draw_groups

    data, dev = _device()
    ctrl = int(np.flatnonzero(np.asarray(dev.is_control))[0])
    assert np.asarray(dev.is_control).sum() == 1 and data.conditions[ctrl] == "control"
    seen = set()
    for i in range(40):
        g = np.asarray(_draw_groups(jax.random.PRNGKey(i), dev, 3, "control"))
        assert g[0] == ctrl and ctrl not in g[1:] and len(set(g.tolist())) == 3
        seen.update(g[1:].tolist())
        assert len(set(np.asarray(_draw_groups(jax.random.PRNGKey(i), dev, 3, "other")).tolist())) == 3
    assert seen == set(range(dev.counts.shape[0])) - {ctrl}  # every other group gets drawn


def test_data_start_centres_the_decoder_and_sets_the_noise_scale_for_energy_only():
    from perturbax.models.blocks import MLP

    data, dev = _device()
    x = np.asarray(dev.x, np.float64)
    mlp = MLP(2, 4, (8,), key=jax.random.PRNGKey(0))
    params = {"decoder$params": mlp, "x_scale": jnp.full((4,), 0.5), "W": jnp.zeros((2, 3))}
    got = data_start(params, dev, likelihood="gaussian", objective="energy")
    assert set(got) == {"decoder$params", "x_scale"}
    np.testing.assert_allclose(np.asarray(got["decoder$params"].layers[-1].bias),
                               np.asarray(mlp.layers[-1].bias) + x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["decoder$params"].layers[0].weight), np.asarray(mlp.layers[0].weight))
    np.testing.assert_allclose(np.asarray(got["x_scale"]), x.std(0), rtol=1e-5)
    assert set(data_start(params, dev, likelihood="gaussian", objective="elbo")) == {"decoder$params"}
    nb = data_start(params, dev, likelihood="negative_binomial", objective="elbo")["decoder$params"].layers[-1].bias
    share = np.mean(x / np.asarray(dev.library)[:, None], 0)
    want = np.log(share) - np.log(share).mean() + np.asarray(mlp.layers[-1].bias)
    np.testing.assert_allclose(np.asarray(nb), want, rtol=1e-4, atol=1e-5)
    # a decoder with another output size is left alone
    assert data_start({"decoder$params": MLP(2, 7, (), key=jax.random.PRNGKey(1))}, dev,
                      likelihood="gaussian", objective="energy") == {}


def test_held_out_blocks_cover_every_group_once_per_evaluation():
    from perturbax.inference.fitting import _val_blocks

    is_control = np.array([False, True, False, False, False, False, False])
    blocks = _val_blocks(is_control, 3)
    assert all(b.size == 3 for b in blocks) and len(blocks) == 3
    assert set(np.concatenate(blocks).tolist()) == set(range(7))
    blocks = _val_blocks(is_control, 3, "control")
    assert all(b[0] == 1 and b.size == 3 and 1 not in b[1:] for b in blocks)
    assert set(np.concatenate(blocks).tolist()) == set(range(7)) and len(blocks) == 3
    # fewer groups than a block holds: the block repeats groups
    assert _val_blocks(np.array([True, False]), 4)[0].tolist() == [0, 1, 0, 1]


def test_mean_term_shortcut_equals_the_exponent_two_score():
    rng = np.random.default_rng(3)
    sim = jnp.asarray(rng.normal(size=(3, 25, 6)), jnp.float32)
    real = jnp.asarray(rng.normal(size=(3, 25, 6)) + np.array([0.0, 0.3, 1.0])[:, None, None], jnp.float32)
    np.testing.assert_allclose(np.asarray(mean_distance_groups(sim, real)),
                               np.asarray(energy_score_groups(sim, real, 2.0)), rtol=1e-3, atol=1e-3)
    g = jax.grad(lambda s: mean_distance_groups(s, real).sum())(sim)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
