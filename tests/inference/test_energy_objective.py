"""The energy score used for fitting agrees with the evaluation metric and has finite gradients."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
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
from perturbax.models import Batch


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


# ------------------------------------------------------------------ EnergyScore.terms as a whole
# A toy model with the site conventions: x = z_base + W l + noise, optional factors; its guide
# takes z_base from the cells (``memorise``: the exact basal state of each cell, an encoder that
# reproduces the very cells it encoded) or from fresh draws of the basal distribution.
class _Toy(NamedTuple):
    n_genes: int = 4
    n_perturbations: int = 2
    latent_dim: int = 4
    noise: float = 1e-3
    penalty: float = 0.0  # global factor -penalty * |W|^2
    cell_penalty: float = 0.0  # per-cell factor -cell_penalty * |z_base|^2


def _toy_model(batch, *, config, n_cells):
    G, K = config.n_genes, config.n_perturbations
    W = numpyro.sample("W", dist.Normal(0.0, 1.0).expand((G, K)).to_event(2))
    if config.penalty:
        numpyro.factor("penalty", -config.penalty * jnp.sum(W**2))
    with numpyro.plate("cells", n_cells, subsample_size=batch.l.shape[0]):
        z = numpyro.sample("z_base", dist.Normal(0.0, 1.0).expand((G,)).to_event(1))
        if config.cell_penalty:
            numpyro.factor("cell_penalty", -config.cell_penalty * jnp.sum(z**2, -1))
        numpyro.sample("x", dist.Normal(z + batch.l @ W.T, config.noise).to_event(1), obs=batch.x)


def _toy_guide(memorise: bool):
    def guide(batch, *, config, n_cells):
        loc = numpyro.param("W_loc", jnp.zeros((config.n_genes, config.n_perturbations)))
        W = numpyro.sample("W", dist.Normal(loc, 0.1).to_event(2))
        if memorise:
            z = batch.x - batch.l @ W.T
        else:
            z = jax.random.normal(numpyro.prng_key(), batch.x.shape)
        numpyro.sample("z_base", dist.Delta(z, event_dim=1))

    return guide


def _toy_batch(E, m, shifts, seed=0, G=4, K=2):
    """``E`` blocks of ``m`` cells: basal N(0, 1) + the block's shift (block e has label e - 1,
    block 0 the control)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((E, K), np.float32)
    for e in range(1, E):
        lab[e, e - 1] = 1.0
    l = np.repeat(lab, m, 0)
    x = rng.normal(size=(E * m, G)) + l @ np.asarray(shifts, np.float64).T
    return Batch(x=jnp.asarray(x, jnp.float32), l=jnp.asarray(l))


def _terms(batch, *, E, m, memorise=True, key=0, source="control", config=_Toy(), W=None, gb_weight=0.2,
           cell_ids=None, n_cells=100, model=_toy_model):
    score = EnergyScore(n_groups=E, cells_per_group=m, global_names=("W",), n_cells=n_cells,
                        options=EnergyOptions(source=source, gb_weight=gb_weight, prior_cells=E * m))
    W = jnp.zeros((config.n_genes, config.n_perturbations)) if W is None else jnp.asarray(W, jnp.float32)

    ids = {} if cell_ids is None else {"cell_ids": cell_ids}

    def one(k):
        return score.terms(jax.random.PRNGKey(k), {"W_loc": W}, model, _toy_guide(memorise), batch, **ids,
                           config=config, n_cells=n_cells)

    # (several keys: one compiled run, vmapped over the keys)
    out = jax.jit(one)(key) if np.ndim(key) == 0 else jax.jit(jax.vmap(one))(jnp.asarray(key))
    return {k: np.asarray(v) for k, v in out.items()}


def test_distinct_pair_energy_distance_leaves_out_pairs_of_one_cell():
    rng = np.random.default_rng(4)
    real = jnp.asarray(rng.normal(size=(2, 12, 3)), jnp.float32)
    ids = jnp.broadcast_to(jnp.arange(12), (2, 12))
    # the simulated cells are the real cells themselves (a perfect memoriser), in another order
    perm = jnp.asarray(rng.permutation(12))
    sim = real[:, perm]
    with_ids = np.asarray(energy_score_groups(sim, real, 1.0, ids[:, perm], ids))
    np.testing.assert_allclose(with_ids, 0.0, atol=1e-5)  # no pair of a cell with itself is scored
    without = np.asarray(energy_score_groups(sim, real))  # the plain U-statistic: rewards the copies
    assert np.all(without < -0.2)
    # copies of one cell (drawn twice) count once: repeating the block changes nothing
    rep = jnp.concatenate([real, real], 1)
    np.testing.assert_allclose(np.asarray(energy_score_groups(rep, rep, 1.0, jnp.tile(ids, 2), jnp.tile(ids, 2))),
                               0.0, atol=1e-5)


@pytest.mark.parametrize("E,source", [(2, "control"), (1, "other")])
def test_self_sourced_blocks_do_not_reward_memorising_cells(E, source):
    # With source="control" the control block (and with one block per step, every block) is
    # simulated from its own cells. An encoder/decoder that re-decodes the very cells it encoded
    # must score no better there than an independent sample of the same distribution.
    m = 16
    shifts = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    batch = _toy_batch(E, m, shifts, seed=1)
    W = shifts

    def first_block(t):  # the control block's energy distance (with one block: the energy term)
        return t["energy"] if E == 1 else t["energy_groups"][..., 0]

    mem = first_block(_terms(batch, E=E, m=m, memorise=True, source=source, W=W))
    indep = first_block(_terms(batch, E=E, m=m, memorise=False, source=source, W=W, key=np.arange(20)))
    # memorising gains nothing: exactly the independent-sample expectation 0 (up to the 1e-3 noise)
    assert abs(mem) < 0.02, mem
    assert mem > indep.mean() - 3 * indep.std(ddof=1) / np.sqrt(indep.size), (mem, indep.mean())
    # the same with cells drawn twice (with replacement), when the loss knows the cells' identities
    ids = jnp.tile(jnp.arange(m // 2), 2 * E)
    dup = batch._replace(x=batch.x.reshape(E, m, -1)[:, np.r_[: m // 2, : m // 2]].reshape(E * m, -1))
    mem_dup = first_block(_terms(dup, E=E, m=m, memorise=True, source=source, W=W, cell_ids=ids))
    assert abs(mem_dup) < 0.02, mem_dup


def test_simulated_blocks_are_scored_against_the_real_cells_of_their_own_condition():
    # three conditions, far apart: each simulated block matches its own real cells only
    m = 24
    shifts = np.array([[6.0, 0.0], [0.0, 6.0], [0.0, 0.0], [0.0, 0.0]])
    batch = _toy_batch(3, m, shifts, seed=2)
    for source in ("other", "control"):
        got = _terms(batch, E=3, m=m, memorise=True, source=source, W=shifts)["energy_groups"]
        assert np.all(np.abs(got) < 0.4), (source, got)
        # the same cells with the real blocks rotated (block e scored against condition e + 1's cells)
        x = batch.x.reshape(3, m, -1)
        rolled = batch._replace(x=jnp.roll(x, 1, axis=0).reshape(3 * m, -1))
        wrong = _terms(rolled._replace(l=batch.l), E=3, m=m, memorise=False, source=source, W=shifts)
        assert np.all(wrong["energy_groups"] > 3.0), (source, wrong["energy_groups"])


def test_kl_and_factor_terms_scale_like_the_generalised_bayes_prior():
    m, N = 8, 100
    shifts = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    batch = _toy_batch(3, m, shifts, seed=3)
    plain = _terms(batch, E=3, m=m, source="other", W=shifts, n_cells=N)
    score = plain["energy"] + plain["reconstruction"] + plain["prior"]  # the default weights are 1
    assert abs(float(plain["kl"])) > 1.0 and float(plain["factors"]) == 0.0
    np.testing.assert_allclose(plain["loss"] - score, plain["kl"] / (0.2 * N), rtol=1e-4)
    # halving w doubles the KL term and changes nothing else
    half = _terms(batch, E=3, m=m, source="other", W=shifts, n_cells=N, gb_weight=0.1)
    for k in ("energy", "reconstruction", "prior", "kl"):
        np.testing.assert_allclose(half[k], plain[k], rtol=1e-6)
    np.testing.assert_allclose(half["loss"] - score, 2 * (plain["loss"] - score), rtol=1e-4)
    # a global factor -c |W|^2 enters like the log prior: loss + c |W|^2 / (w N) (W drawn from the
    # guide with the same key, so the same W)
    pen = _terms(batch, E=3, m=m, source="other", W=shifts, n_cells=N, config=_Toy(penalty=5.0))
    w2 = -float(pen["factors"]) / 5.0
    assert w2 > 0.5 * np.sum(shifts**2)
    np.testing.assert_allclose(pen["loss"] - plain["loss"], 5.0 * w2 / (0.2 * N), rtol=1e-4)
    for k in ("energy", "reconstruction", "prior", "kl"):
        np.testing.assert_allclose(pen[k], plain[k], rtol=1e-6)
    # a per-cell factor counts N times its mean over the cells of the step (3 runs of each cell:
    # the simulated block from its own states when one block, and two reconstructions)
    one = _toy_batch(1, m, shifts, seed=3)
    cell = _terms(one, E=1, m=m, source="other", n_cells=N, config=_Toy(cell_penalty=0.5))
    z = np.asarray(one.x, np.float64)  # the memorising guide's basal states (label 0: no shift)
    np.testing.assert_allclose(cell["factors"], -0.5 * N * np.mean(np.sum(z**2, -1)), rtol=1e-4)


def test_acyclicity_penalty_enters_the_energy_objective():
    # the same parameters and draws: the NOTEARS factor -rho h(B) of the latent dynamics model
    # must change the energy loss by rho h(B) / (w N)
    from perturbax.models import LatentDynamicsConfig, acyclicity_measure, full_mask, latent_dynamics_model

    B = np.zeros((2, 2))
    B[0, 1], B[1, 0] = 0.5, 0.4
    free = jnp.asarray(B[np.nonzero(full_mask(2))], jnp.float32)

    def guide(batch, *, config, n_cells):
        numpyro.sample("B_free", dist.Delta(free, event_dim=1))
        numpyro.sample("z_base", dist.Delta(jnp.zeros((batch.l.shape[0], 2)), event_dim=1))

    E, m, N = 2, 4, 50
    rng = np.random.default_rng(0)
    batch = Batch(x=jnp.asarray(rng.normal(size=(E * m, 3)), jnp.float32), l=jnp.asarray(np.repeat(np.eye(2), m, 0)),
                  t=jnp.ones(E * m))
    score = EnergyScore(n_groups=E, cells_per_group=m, global_names=("B_free",), n_cells=N, options=EnergyOptions())
    loss = {}
    for rho in (0.0, 1000.0):
        cfg = LatentDynamicsConfig(n_genes=3, n_perturbations=2, latent_dim=2, causal_mask=full_mask(2),
                                   allow_cycles=True, acyclicity=rho, decoder_hidden=(4,), encoder_hidden=(4,))
        loss[rho] = float(score.loss(jax.random.PRNGKey(0), {}, latent_dynamics_model, guide, batch, config=cfg,
                                     n_cells=N))
    h = float(acyclicity_measure(jnp.asarray(B)))
    assert h > 0.03
    np.testing.assert_allclose(loss[1000.0] - loss[0.0], 1000.0 * h / (0.2 * N), rtol=1e-3)
