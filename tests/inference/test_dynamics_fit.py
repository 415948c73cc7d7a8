"""fit / predict / save / load / CLI of the latent dynamics model on tiny simulated time courses."""

import dataclasses

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from numpyro import handlers

from perturbax.cli import main
from perturbax.data import from_anndata, prediction_intervals, simulate_latent_dynamics
from perturbax.inference import (
    EnergyOptions,
    FitResult,
    fit,
    fitted_causal_order,
    make_guide,
    pair_key,
    posterior_draws,
    predict,
    refit_in_causal_order,
    to_arviz,
)
from perturbax.metrics import energy_distance
from perturbax.models import (
    AdditiveShiftConfig,
    Batch,
    LatentDynamicsConfig,
    additive_shift_model,
    equilibrium_shift,
    latent_dynamics_model,
    order_mask,
)

TIMES = (0.5, 1.0, 2.0, 4.0)
SMALL = dict(latent_dim=2, decoder_hidden=(16,), encoder_hidden=(16,))


@pytest.fixture(scope="module")
def sim():
    adata, truth = simulate_latent_dynamics(
        n_programs=2, n_perturbations=2, times=TIMES, n_cells=30, n_genes=8, seed=0
    )
    return adata, truth, from_anndata(adata, "perturbation", "control", time_key="time")


def _config(data, **kw):
    return LatentDynamicsConfig(n_genes=data.n_genes, n_perturbations=data.K, **SMALL, **kw)


@pytest.fixture(scope="module")
def dyn_fit(sim):
    _, _, data = sim
    return fit("latent_dynamics", data, config=_config(data), objective="elbo", steps=300, batch_size=128,
               eval_every=100, progress=False, seed=1)


# ------------------------------------------------------------------------------------------ fit
def test_fit_records_times_contexts_and_learns(dyn_fit):
    assert dyn_fit.model_name == "latent_dynamics" and dyn_fit.uses_time
    np.testing.assert_array_equal(dyn_fit.train_times, TIMES)
    assert dyn_fit.info["time_key"] == "time"
    # 4 conditions x 4 times = 16 (condition, time) contexts >= 2l + 1 = 5
    assert dyn_fit.info["contexts"]["n_contexts"] == 16 and dyn_fit.info["contexts"]["status"] == "ok"
    # S under the default horseshoe prior: raw entries, global and local scales
    assert set(dyn_fit.global_names) >= {"B_free", "S_raw", "S_tau", "S_lambda", "mu", "basal_sd"}
    loss = dyn_fit.history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-50:].mean() < loss[:50].mean() - 0.1 * abs(loss[:50].mean())
    assert dyn_fit.basal["z"].shape == (dyn_fit.basal["library"].shape[0], 2)


def test_fit_time_errors(sim):
    adata, _, data = sim
    cfg = _config(data)
    no_times = from_anndata(adata, "perturbation", "control")
    with pytest.raises(ValueError, match="time_key= to from_anndata"):
        fit("latent_dynamics", no_times, config=cfg, steps=2, progress=False)
    one = adata[adata.obs["time"] == 2.0].copy()
    single = from_anndata(one, "perturbation", "control", time_key="time")
    with pytest.raises(ValueError, match=r"single time point.*W = \(I - B\)\^\{-1\} S.*additive_shift"):
        fit("latent_dynamics", single, config=cfg, steps=2, progress=False)
    neg = adata.copy()
    neg.obs["time"] = neg.obs["time"] - 1.0
    with pytest.raises(ValueError, match="negative"):
        fit("latent_dynamics", from_anndata(neg, "perturbation", "control", time_key="time"), config=cfg, steps=2,
            progress=False)
    # perturbed cells at one time only (controls at two): allowed, with a warning
    late = adata[(adata.obs["time"] == 4.0) | (adata.obs["perturbation"] == "control")].copy()
    late = late[(late.obs["time"] >= 2.0)].copy()
    with pytest.warns(UserWarning, match="Every perturbed cell is at the single time"):
        from perturbax.inference import training_times

        training_times(from_anndata(late, "perturbation", "control", time_key="time"))


def test_guide_amortises_state_and_keeps_diffusion_noise_at_prior(sim):
    _, _, data = sim
    cfg = _config(data, state_dim=3, diffusion=True)
    batch = Batch(x=jnp.zeros((5, data.n_genes)), l=jnp.zeros((5, data.K)), library=jnp.ones(5),
                  t=jnp.linspace(0.0, 4.0, 5))
    kwargs = {"config": cfg, "n_cells": 100}
    guide, globals_ = make_guide(latent_dynamics_model, batch, kwargs)
    assert "diffusion" in globals_
    kinds = {}

    def sites(b):  # abstract evaluation: shapes and distributions, nothing computed
        tr = handlers.trace(handlers.seed(guide, 0)).get_trace(b, **kwargs)
        kinds.update({k: type(v["fn"].base_dist).__name__ for k, v in tr.items() if k in ("z_base", "s", "z_noise")})
        return {k: v["value"] for k, v in tr.items() if k in ("z_base", "s", "z_noise")}

    shapes = jax.eval_shape(sites, batch)
    assert shapes["z_base"].shape == (5, 2) and shapes["s"].shape == (5, 3) and shapes["z_noise"].shape == (5, 2)
    assert kinds["z_base"] == kinds["s"] == "Normal"  # amortised Normal(enc(x, l, t)) per cell
    assert kinds["z_noise"] == "ExpandedDistribution"  # Normal(0, 1).expand(...): kept at its prior
    with pytest.raises(ValueError, match="batch.t"):
        jax.eval_shape(sites, batch._replace(t=None))


# -------------------------------------------------------------------------------------- predict
LAYOUT = dict(times=[1.0, 3.0, 40.0], n_cells=10, num_samples=12, seed=0)


def test_time_scale_is_set_from_the_training_times_whatever_their_unit(sim, dyn_fit):
    """``time_scale=None`` (the default): ``fit`` sets it to the median of the distinct positive
    training times, so the same cells timed in hours or in days give the same fit."""
    from perturbax.inference import default_time_scale

    _, _, data = sim
    assert dyn_fit.config.time_scale == default_time_scale(TIMES) == float(np.median(TIMES))
    assert default_time_scale([0.0, 0.0]) == 1.0
    kw = dict(objective="elbo", steps=30, batch_size=128, eval_every=10, progress=False, seed=1)
    hours = fit("latent_dynamics", data, config=_config(data), **kw)
    days = dataclasses.replace(data, times=np.asarray(data.times) / 24.0)
    in_days = fit("latent_dynamics", days, config=_config(days), **kw)
    assert in_days.config.time_scale == pytest.approx(hours.config.time_scale / 24.0)
    np.testing.assert_allclose(in_days.history["loss"], hours.history["loss"], rtol=1e-4)
    # a time scale given by the user is kept
    assert fit("latent_dynamics", data, config=_config(data, time_scale=2.0), **{**kw, "steps": 2}).config.time_scale == 2.0


@pytest.fixture(scope="module")
def layout_pred(dyn_fit):
    return predict(dyn_fit, ["P0", "P0+P1"], **LAYOUT)


def test_prediction_layout_over_time(dyn_fit, layout_pred):
    labels, times = ["P0", "P0+P1"], LAYOUT["times"]
    pred = layout_pred
    meta = pred.uns["perturbax"]
    keys = [pair_key(lab, t) for lab in labels for t in times]
    assert meta["labels"] == keys and keys[1] == "P0 @ t=3"
    assert meta["perturbations"] == ["P0"] * 3 + ["P0+P1"] * 3 and meta["times"] == times * 2
    # the default (persistent) dynamics keep the control population stationary, so the control cells'
    # basal states are a sample of it at any time
    assert meta["source"] == "control"
    assert pred.n_obs == 60 and list(pred.obs.columns) == ["perturbation", "time", "draw"]
    counts = pred.obs.groupby(["perturbation", "time"], observed=True).size()
    assert (counts == 10).all() and len(counts) == 6
    lo, mid, hi = (pred.varm[k] for k in ("pred_lower", "pred_mean", "pred_upper"))
    assert lo.shape == (dyn_fit.config.n_genes, 6) and np.all(lo <= mid + 1e-6) and np.all(mid <= hi + 1e-6)
    assert np.all(hi - lo > 0)
    assert pred.uns["mean_draws"].shape == (6, 12, 8) and pred.uns["latent_mean_draws"].shape == (6, 12, 2)
    np.testing.assert_allclose(prediction_intervals(pred, "P0+P1 @ t=40")[0], mid[:, 5])
    cov = meta["coverage"]
    assert list(cov["time_in_range"]) == [True, True, False] * 2 and all(cov["covered"])
    assert "extrapolation" in cov["time_message"][2] and "between measured" in cov["time_message"][1]


def test_prediction_time_errors(dyn_fit):
    with pytest.raises(ValueError, match=r"pass times=\[\.\.\.\]"):
        predict(dyn_fit, ["P0"], num_samples=2)
    with pytest.raises(ValueError, match=">= 0"):
        predict(dyn_fit, ["P0"], times=[1.0, -2.0], num_samples=2)
    additive = dataclasses.replace(
        dyn_fit, model_name="additive_shift", model=additive_shift_model,
        config=AdditiveShiftConfig(n_genes=8, n_perturbations=2, latent_dim=2),
    )
    with pytest.raises(ValueError, match="times must be None"):
        predict(additive, ["P0"], times=[1.0], num_samples=2)


def test_predict_moves_observed_cells_to_another_time(sim, dyn_fit):
    """The cells of P0 measured at t = 1, moved by the model to t = 1 (unchanged) and t = 4."""
    adata, _, data = sim
    lab, t = adata.obs["perturbation"].to_numpy(), adata.obs["time"].to_numpy()
    src = data.subset((lab == "P0") & (t == 1.0))
    pred = predict(dyn_fit, ["P0"], times=[1.0, 4.0], source=src, num_samples=5, seed=0)
    assert pred.uns["perturbax"]["source"] == "cells" and pred.n_obs == 2 * src.n_cells
    at = pred.obs["time"].to_numpy()
    np.testing.assert_allclose(np.sort(pred.X[at == 1.0], 0), np.sort(src.dense(), 0), atol=1e-5)
    target = data.dense(np.flatnonzero((lab == "P0") & (t == 4.0)))
    moved, unmoved = energy_distance(pred.X[at == 4.0], target), energy_distance(src.dense(), target)
    assert moved < 0.6 * unmoved, (moved, unmoved)
    with pytest.raises(ValueError, match="time"):
        predict(dyn_fit, ["P0"], times=[2.0], source=dataclasses.replace(src, times=None), num_samples=2)


def test_long_time_limit_is_the_additive_shift_with_equilibrium_w(dyn_fit):
    """At t -> inf the relaxing dynamics reach z = mu + (I - B)^{-1} S l for every cell: the
    prediction equals the additive-shift prediction with W = equilibrium_shift(B, S) from z_base = mu.
    (The fitted parameters read under heterogeneity="relaxing"; the default, persistent dynamics
    move each cell by the same W l, checked at the end.)"""
    labels = ["P0", "P1", "P0+P1"]
    n_draws = 200
    persistent = dyn_fit
    assert persistent.config.heterogeneity == "persistent"
    dyn_fit = dataclasses.replace(dyn_fit, config=dataclasses.replace(dyn_fit.config, heterogeneity="relaxing"))
    pred = predict(dyn_fit, labels, times=[1e4, 0.0], n_cells=2, num_samples=n_draws, seed=2)
    lat = pred.uns["latent_mean_draws"][0::2]  # (labels, draws, d) at t = 1e4
    xm = pred.uns["mean_draws"][0::2]  # (labels, draws, G)
    # the same limit from the posterior over (B, S, mu), with many more draws
    g = posterior_draws(dyn_fit, 2000, seed=7)  # B and S are deterministic sites (B_free; S_raw, S_tau, S_lambda)
    assert np.all(np.triu(np.asarray(g["B"])) == 0)
    W = jax.vmap(equilibrium_shift)(g["B"], g["S"])  # (draws, d, K)
    L = np.stack([dyn_fit.registry.encode(lab) for lab in labels]).astype(np.float32)
    z_inf = np.asarray(g["mu"])[:, None, :] + np.einsum("sdk,pk->spd", np.asarray(W), L)  # (draws, P, d)
    # per draw, the dynamics' latent mean is exactly z_inf: compare the posterior distributions
    sd = z_inf.std(0) + 1e-3
    np.testing.assert_array_less(np.abs(lat.mean(1) - z_inf.mean(0)), 5 * sd / np.sqrt(n_draws) + 1e-3)
    np.testing.assert_allclose(lat.std(1), z_inf.std(0), rtol=0.3, atol=2e-3)
    # additive-shift model with the fitted decoder, W = (I - B)^{-1} S and z_base = mu
    add_cfg = AdditiveShiftConfig(n_genes=8, n_perturbations=2, latent_dim=2, decoder_hidden=(16,))
    dec = {"decoder$params": dyn_fit.params["decoder$params"]}

    def additive_mean(mu, w):
        batch = Batch(x=None, l=jnp.asarray(L))
        m = handlers.condition(handlers.substitute(additive_shift_model, data=dec),
                               data={"W": w, "z_base": jnp.broadcast_to(mu, (len(labels), 2))})
        tr = handlers.trace(handlers.seed(m, 0)).get_trace(batch, config=add_cfg, n_cells=len(labels))
        return tr["x_mean"]["value"]

    x_add = np.asarray(jax.jit(jax.vmap(additive_mean))(g["mu"], W))  # (draws, P, G)
    sdx = x_add.std(0) + 1e-3
    np.testing.assert_array_less(np.abs(xm.mean(1) - x_add.mean(0)), 5 * sdx / np.sqrt(n_draws) + 1e-3)
    # the limit is the equilibrium, far from the t = 0 prediction (no effect yet)
    gap = np.abs(pred.varm["pred_mean"][:, 0] - pred.varm["pred_mean"][:, 1]).max()
    assert gap > 10 * np.abs(xm.mean(1)[0] - x_add.mean(0)[0]).max()
    # persistent (the default): every control cell's basal state moves by exactly W l (same draws and
    # cells at both times without the bootstrap), so the latent shift's posterior is that of W l
    p = predict(persistent, labels, times=[1e4, 0.0], n_cells=2, num_samples=n_draws, seed=2, bootstrap=False)
    shift = p.uns["latent_mean_draws"][0::2] - p.uns["latent_mean_draws"][1::2]  # (labels, draws, d)
    wl = np.einsum("sdk,pk->spd", np.asarray(W), L)
    sd = wl.std(0) + 1e-3
    np.testing.assert_array_less(np.abs(shift.mean(1) - wl.mean(0)), 5 * sd / np.sqrt(n_draws) + 1e-3)
    np.testing.assert_allclose(shift.std(1), wl.std(0), rtol=0.3, atol=2e-3)


def test_arviz_export_has_b_s_and_equilibrium_w(dyn_fit):
    tree = to_arviz(dyn_fit, num_samples=4)
    post = tree["posterior"]
    B, S, W = (np.asarray(post[k]).reshape(4, *np.shape(post[k])[-2:]) for k in ("B", "S", "W"))
    np.testing.assert_allclose(W, np.linalg.solve(np.eye(2) - B, S), rtol=1e-4, atol=1e-5)
    assert np.all(np.triu(B) == 0)


def test_save_load_round_trip(dyn_fit, layout_pred, tmp_path):
    dyn_fit.save(tmp_path / "m")
    loaded = FitResult.load(tmp_path / "m")
    assert isinstance(loaded.config, LatentDynamicsConfig) and loaded.config == dyn_fit.config
    np.testing.assert_array_equal(loaded.train_times, dyn_fit.train_times)
    a = layout_pred
    b = predict(loaded, ["P0", "P0+P1"], **LAYOUT)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.varm["pred_mean"], b.varm["pred_mean"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- energy
def test_energy_objective_groups_by_condition_and_time(sim):
    _, _, data = sim
    res = fit("latent_dynamics", data, config=_config(data), objective="energy", steps=20, eval_every=20,
              energy=EnergyOptions(cells_per_condition=16, conditions_per_step=8), patience=None, progress=False)
    loss = res.history["loss"]
    assert loss.size == 20 and np.all(np.isfinite(loss))
    assert res.info["cells_per_step"] == 8 * 16 and res.objective == "energy"


# ------------------------------------------------------------------------------------------- CLI
def test_cli_fit_dynamics_and_predict_times(sim, tmp_path):
    adata, _, _ = sim
    path = tmp_path / "tc.h5ad"
    adata.obs = adata.obs.rename(columns={"time": "time_h"})
    adata.write_h5ad(path)
    run = lambda args: CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)  # noqa: E731
    base = ["fit", path, "-k", "perturbation", "--control", "control", "--latent-dim", "2", "--steps", "20",
            "--batch-size", "64", "--no-progress", "--objective", "elbo", "--model", "dynamics"]
    res = run([*base, "--out", tmp_path / "m0"])
    assert res.exit_code != 0 and "--time-key" in res.output
    res = run([*base, "--time-key", "time_h", "--out", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    assert "Times (time_h): 0.5, 1, 2, 4" in res.output
    assert "Time scale: 1.5 time_h units" in res.output and "median of the distinct positive" in res.output
    out, summary = tmp_path / "p.h5ad", tmp_path / "s.csv"
    res = run(["predict", tmp_path / "m", "-p", "P0,P0+P1", "--times", "2,8", "--n-cells", "5", "--num-samples",
               "4", "--out", out, "--summary", summary])
    assert res.exit_code == 0, res.output
    pred = ad.read_h5ad(out)
    assert sorted(set(pred.obs["time"])) == [2.0, 8.0] and pred.n_obs == 20
    assert [str(v) for v in pred.uns["perturbax"]["labels"]] == ["P0 @ t=2", "P0 @ t=8", "P0+P1 @ t=2",
                                                                  "P0+P1 @ t=8"]
    table = pd.read_csv(summary)
    assert list(table.columns) == ["perturbation", "time", "gene", "mean", "lower", "upper"]
    assert len(table) == 4 * 8
    res = run(["predict", tmp_path / "m", "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "times" in res.output
    res = run(["predict", tmp_path / "m", "-p", "P0", "--times", "2,x", "--out", out])
    assert res.exit_code != 0 and "not a number" in res.output
    # --source-cells: the P0 cells measured at 1 h (no control cells in the file), moved to 1 h and 2 h
    src = tmp_path / "p0_1h.h5ad"
    sub = adata[(adata.obs["perturbation"] == "P0").to_numpy() & (adata.obs["time_h"] == 1.0).to_numpy()].copy()
    sub.write_h5ad(src)
    res = run(["predict", tmp_path / "m", "-p", "P0", "--times", "1,2", "--num-samples", "4", "--source-cells", src,
               "--out", out])
    assert res.exit_code == 0, res.output
    assert "source cells" in res.output
    pred = ad.read_h5ad(out)
    assert pred.n_obs == 2 * sub.n_obs
    np.testing.assert_allclose(np.sort(pred.X[pred.obs["time"].to_numpy() == 1.0], 0), np.sort(sub.X, 0), atol=1e-5)
    res = run(["predict", tmp_path / "m", "-p", "P0", "--times", "2", "--source", "control", "--source-cells", src,
               "--out", out])
    assert res.exit_code != 0 and "pass only one" in res.output


# --------------------------------------------------------------------- warm start, causal order
def test_init_params_warm_start_uses_matching_sites(sim, dyn_fit):
    _, _, data = sim
    warm = {k: v for k, v in dyn_fit.params.items() if "$params" in k}
    res = fit("latent_dynamics", data, config=_config(data), objective="elbo", steps=1, batch_size=128,
              progress=False, seed=3, patience=None, init_params={**warm, "not_a_site": np.zeros(3)})
    assert res.info["warm_started"] == sorted(warm)
    # one step of Adam moves each weight by at most ~ the learning rate: the networks start where
    # the earlier fit ended, not at a fresh initialisation
    for name in warm:
        a = jax.tree.leaves(res.params[name])
        b = jax.tree.leaves(dyn_fit.params[name])
        assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True)) < 0.02
    fresh = fit("latent_dynamics", data, config=_config(data), objective="elbo", steps=1, batch_size=128,
                progress=False, seed=3, patience=None)
    assert fresh.info["warm_started"] == []
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree.leaves(fresh.params["decoder$params"]), jax.tree.leaves(dyn_fit.params["decoder$params"]),
        strict=True)) > 0.05
    with pytest.raises(ValueError, match="matches none"):
        fit("latent_dynamics", data, config=_config(data), steps=1, batch_size=128, progress=False,
            init_params={"decoder$params": np.zeros(2)})


def test_refit_in_causal_order_uses_the_order_read_from_w(sim, dyn_fit):
    _, _, data = sim
    order, b_hat = fitted_causal_order(dyn_fit)
    assert sorted(order) == [0, 1] and b_hat.shape == (2, 2)
    res = refit_in_causal_order(dyn_fit, data, steps=20, max_rounds=1, batch_size=128, progress=False, patience=None)
    rounds = res.info["order_rounds"]
    assert rounds[0] == order and "causal_order" not in dyn_fit.info  # the input is not modified
    assert np.array_equal(res.config.mask, order_mask(res.info["causal_order"]))
    if np.array_equal(dyn_fit.config.mask, order_mask(order)):  # already in that order: nothing refitted
        assert res.params is dyn_fit.params and len(rounds) == 1
    else:  # one refit on the order's mask, warm-started, then the order read once more
        assert res.info["causal_order"] == order and len(rounds) == 2
        assert "decoder$params" in res.info["warm_started"] and "encoder$params" in res.info["warm_started"]
    with pytest.raises(ValueError, match="max_rounds"):
        refit_in_causal_order(dyn_fit, data, max_rounds=0)
    with pytest.raises(ValueError, match="latent dynamics fit with causal weights"):
        fitted_causal_order(dataclasses.replace(dyn_fit, config=AdditiveShiftConfig(n_genes=8, n_perturbations=2)))
