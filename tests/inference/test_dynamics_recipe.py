"""The default fitting recipe of the latent dynamics model (perturbax.inference.dynamics_recipe),
on tiny simulated time courses."""

import dataclasses
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from perturbax.cli import main
from perturbax.data import from_anndata, prediction_intervals, prediction_trajectory, simulate_latent_dynamics
from perturbax.inference import FitResult, fit, held_out_contexts, pair_key, predict
from perturbax.inference.dynamics_recipe import _context_cells, recipe_lines
from perturbax.models import LatentDynamicsConfig, sole_target_mask

TIMES = (0.5, 1.0, 2.0, 4.0)
TINY = dict(latent_dim=2, decoder_hidden=(8,), encoder_hidden=(8,))


@pytest.fixture(scope="module")
def sim():
    adata, truth = simulate_latent_dynamics(n_programs=2, n_perturbations=2, times=TIMES, n_cells=20, n_genes=6,
                                            seed=0)
    return adata, truth, from_anndata(adata, "perturbation", "control", time_key="time")


def _config(data, **kw):
    return LatentDynamicsConfig(n_genes=data.n_genes, n_perturbations=data.K, **TINY, **kw)


# (the recipe compiles each of its ~6 stages: a few minutes of CPU on the 2-core machine, so slow)
@pytest.fixture(scope="module")
def recipe_fit(sim):
    _, _, data = sim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fit("latent_dynamics", data, config=_config(data), steps=20, batch_size=64, progress=False, seed=0)


def test_held_out_contexts_are_interior_times_of_training_perturbations(sim):
    _, _, data = sim
    ctx = held_out_contexts(data)
    # 4 conditions x 4 times = 16 contexts -> at most 16 // 8 = 2 interior ones, one per perturbed condition
    # (labels in order: P0, P0+P1), never their first or last time; one combination only, so none is
    # held out whole; the last time of the remaining condition (P1, 4 times) stands for extrapolation
    assert ctx == [("P0", 1.0), ("P0+P1", 2.0), ("P1", 4.0)]
    # a perturbation measured at two times only cannot be held out at one of them
    two = data.subset(np.flatnonzero(np.isin(np.asarray(data.times), (0.5, 4.0))))
    assert held_out_contexts(two) == []


def test_held_out_contexts_stand_in_for_each_kind_of_prediction():
    """With two or more measured combinations, every time of one of them is held out (an unmeasured
    combination), and each held-out context is of the kind it stands in for."""
    from perturbax.inference.context_kinds import context_kind, measured_times

    adata, _ = simulate_latent_dynamics(n_programs=3, n_perturbations=3, times=(0.5, 1.0, 2.0, 4.0), n_cells=5,
                                        n_genes=4, doubles="all", seed=0)
    data = from_anndata(adata, "perturbation", "control", time_key="time")
    ctx = held_out_contexts(data)
    combos = [lab for lab in data.conditions if lab.count("+") == 1]
    assert len(combos) == 3
    whole = [lab for lab in combos if {t for lab2, t in ctx if lab2 == lab} == {0.5, 1.0, 2.0, 4.0}]
    assert len(whole) == 1  # one combination, at all its times
    rest = data.subset(np.setdiff1d(np.arange(data.n_cells), _context_cells(data, ctx)))
    seen = measured_times(rest)
    kinds = [context_kind(seen, data.L[data.env == data.condition_index(lab)][0], t) for lab, t in ctx]
    assert kinds.count("unseen") == 4 and kinds.count("beyond") == 1 and kinds.count("interior") >= 1
    assert all(k == "unseen" for (lab, _), k in zip(ctx, kinds) if lab == whole[0])
    # context_kind: measured label within / outside its times, a label never measured
    full = measured_times(data)
    e0 = data.L[data.env == data.condition_index("P0")][0]
    assert [context_kind(full, e0, t) for t in (0.75, 4.0, 8.0)] == ["interior", "interior", "beyond"]
    assert context_kind({k: v for k, v in full.items() if k != tuple(np.round(e0, 9).tolist())}, e0, 1.0) == "unseen"


def test_calibration_factors_by_kind_and_the_conservative_fallback():
    from perturbax.inference.context_kinds import calibration_factors

    cal = {"scores": {"interior": list(np.linspace(0, 1, 99)), "unseen": list(np.linspace(0, 3, 99))}}
    f, how = calibration_factors(cal, 0.9)
    assert f["interior"] == pytest.approx(0.9, abs=0.02) and f["unseen"] == pytest.approx(2.7, abs=0.05)
    assert f["beyond"] == f["unseen"] and "largest" in how["beyond"] and how["interior"].startswith("held-out")
    # a calibration saved before the kinds (one list of interior scores) calibrates every kind
    old, _ = calibration_factors({"scores": list(np.linspace(0, 1, 99))}, 0.9)
    assert old["interior"] == old["beyond"] == old["unseen"] == f["interior"]
    with pytest.raises(ValueError, match="no scores"):
        calibration_factors({"scores": {}}, 0.9)
    # an extrapolating kind is never calibrated narrower than interpolation
    low = {"scores": {"interior": list(np.linspace(0, 2, 99)), "unseen": list(np.linspace(0, 1, 99)),
                      "beyond": list(np.linspace(0, 4, 99))}}
    f, how = calibration_factors(low, 0.9)
    assert f["unseen"] == f["interior"] == pytest.approx(1.8, abs=0.04) and "interior factor" in how["unseen"]
    assert f["beyond"] == pytest.approx(3.6, abs=0.08) and how["beyond"].startswith("held-out")


@pytest.mark.slow
def test_default_fit_runs_the_recipe_and_records_its_choices(sim, recipe_fit):
    _, _, data = sim
    r = recipe_fit.info["recipe"]
    held = {(lab, t) for lab, t in r["held_out_contexts"]}
    assert held == set(held_out_contexts(data)) and r["held_out_cells"] == 20 * len(held)
    names = [s["stage"] for s in r["stages"]]
    assert names[0].startswith("1 elbo") and any(n.startswith("3 energy") for n in names)
    # the selection stages never saw the held-out contexts; the final stages saw every cell
    assert [s["cells"] for s in r["stages"]][0] == "training minus the held-out contexts"
    assert r["stages"][-1]["cells"] == "all training cells"
    assert recipe_fit.n_train > data.n_cells - r["held_out_cells"]
    order = r["order"]
    assert sorted(order["chosen"]) == [0, 1] and order["identified_by_design"] is False
    assert order["chosen"] in order["equally_well"]
    assert np.array_equal(recipe_fit.config.mask[order["chosen"][1], order["chosen"][0]], 1)
    # the order searched by the held-out energy score, every order of the 2 programs, under the
    # sole-target mask read from W, which the final fit keeps
    search = order["search"]
    assert sorted(search["scores"]) == ["[0, 1]", "[1, 0]"] and sorted(search["targets"]) == [0, 1]
    assert search["chosen"] == order["chosen"] and str(order["chosen"]) == min(search["scores"],
                                                                               key=search["scores"].get)
    assert all(np.isfinite(v) for v in search["scores"].values()) and search["steps_each"] == 10
    assert np.array_equal(recipe_fit.config.target_mask, sole_target_mask(search["targets"], data.K))
    assert any(n.startswith("2 energy, order search (2 orders)") for n in names)
    # the final fit follows the selected path from the ELBO state the search started from: the search's
    # energy steps in the chosen order, then the energy stage's best step (no ELBO after an energy stage)
    final = [s for s in r["stages"] if s["cells"] == "all training cells"]
    assert final[0]["stage"].startswith("4 energy") and final[0]["warm_start"].startswith("2 elbo")
    assert all(s["objective"] == "energy" for s in final) and final[0]["steps_run"] == search["steps_each"]
    third = next(s for s in r["stages"] if s["stage"].startswith("3 energy"))
    assert r["energy_steps"] == search["steps_each"] + third["best_step"]
    assert names[-1].startswith("5 energy" if third["best_step"] > 0 else "4 energy")
    assert sum(s["steps_run"] for s in final) == r["energy_steps"] and "order search's 10" in r["energy_reason"]
    cal = r["calibration"]
    assert sum(len(v) for v in cal["scores"].values()) == len(held) * data.n_genes
    assert set(cal["scores"]) == {"interior", "beyond"} and all(f["0.9"] > 0 for f in cal["factor"].values())
    assert sorted(map(tuple, cal["contexts"]["beyond"])) == [("P1", 4.0)]
    text = "\n".join(recipe_lines(r))
    assert "held out" in text and "Energy stage:" in text and "Intervals calibrated" in text


@pytest.mark.slow
def test_recipe_intervals_are_calibrated_and_trajectories_unpack(recipe_fit, tmp_path):
    pred = predict(recipe_fit, ["P0"], times=[0.5, 2.0, 8.0], n_cells=4, num_samples=10, seed=0)
    meta = pred.uns["perturbax"]
    cal = recipe_fit.info["recipe"]["calibration"]
    # P0 is measured at 0.5-4: t = 0.5, 2 are interior, t = 8 beyond, each with its kind's factor
    assert meta["calibration"]["kinds"] == ["interior", "interior", "beyond"]
    q = np.asarray(meta["calibration"]["interval_factors"])
    # (the saved scores are rounded to 5 decimals)
    assert q[0] == q[1] and q[:2] == pytest.approx(cal["factor"]["interior"]["0.9"], rel=1e-5)
    assert q[2] == pytest.approx(cal["factor"]["beyond"]["0.9"], rel=1e-5)
    draws = np.asarray(pred.uns["mean_draws"], dtype=np.float64)
    sigma = np.sqrt(draws.var(1) + np.asarray(cal["cell_var"]) / cal["n_ref"])
    np.testing.assert_allclose(np.asarray(pred.varm["pred_upper"]).T, draws.mean(1) + q[:, None] * sigma, rtol=1e-5,
                               atol=1e-5)
    # another level rescales by the ratio of the conformal factors of the column's kind
    for j, t in ((1, 2.0), (2, 8.0)):
        mean, lo, hi = prediction_intervals(pred, pair_key("P0", t), level=0.5)
        q50 = meta["calibration"]["factors_by_kind"][meta["calibration"]["kinds"][j]]["0.5"]
        np.testing.assert_allclose(hi - mean, (np.asarray(pred.varm["pred_upper"])[:, j] - mean) * q50 / q[j], rtol=1e-5)
    times, m, lower, upper = prediction_trajectory(pred, "P0")
    np.testing.assert_array_equal(times, [0.5, 2.0, 8.0])
    assert m.shape == lower.shape == (3, pred.n_vars) and np.all(lower <= m) and np.all(m <= upper)
    with pytest.raises(KeyError, match="P1"):
        prediction_trajectory(pred, "P1")
    # the calibration travels with a saved fit
    recipe_fit.save(tmp_path / "fit")
    again = predict(FitResult.load(tmp_path / "fit"), ["P0"], times=[0.5, 2.0, 8.0], n_cells=4, num_samples=10, seed=0)
    np.testing.assert_allclose(again.varm["pred_upper"], pred.varm["pred_upper"], rtol=1e-5, atol=1e-5)
    # the CLI says which kind of prediction each column is and its factor, and writes the notes
    out = CliRunner().invoke(main, ["predict", str(tmp_path / "fit"), "-p", "P0", "--times", "2,8", "--n-cells", "4",
                                    "--num-samples", "10", "--out", str(tmp_path / "p.h5ad")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert f"interior: 1 column(s), factor {q[0]:.3g}" in out.output and f"beyond: 1 column(s), factor {q[2]:.3g}" in out.output
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(back.uns["perturbax"]["calibration"]["kinds"]) == ["interior", "beyond"]


def test_recipe_off_by_hand_and_refused_with_a_stage_setting(sim):
    _, _, data = sim
    with pytest.raises(ValueError, match="recipe=True chooses"):
        fit("latent_dynamics", data, config=_config(data), steps=2, recipe=True, objective="elbo", progress=False)
    with pytest.raises(ValueError, match="outside 0"):
        fit("latent_dynamics", data, config=_config(data), steps=2, objective="elbo", progress=False,
            validation=[data.n_cells + 3])


@pytest.mark.slow
def test_recipe_on_counts_with_the_negative_binomial(sim):
    adata, _ = simulate_latent_dynamics(n_programs=2, n_perturbations=2, times=TIMES, n_cells=20, n_genes=6, seed=1,
                                        counts=True)
    data = from_anndata(adata, "perturbation", "control", time_key="time", layer="counts", counts=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = fit("latent_dynamics", data, config=_config(data, likelihood="negative_binomial"), steps=20,
                  batch_size=64, progress=False)
    r = res.info["recipe"]
    assert r["energy_steps"] == 0 and "negative binomial" in r["energy_reason"]
    assert res.objective == "elbo" and r["calibration"] is not None
    pred = predict(res, ["P0+P1"], times=[1.0, 8.0], n_cells=5, num_samples=5)
    assert np.all(np.isfinite(pred.X)) and np.all(np.asarray(pred.X) >= 0)
    assert np.all(np.isfinite(pred.varm["pred_mean"]))


def _fake_recipe(calls):
    """A stand-in for fit_dynamics_recipe that records how it was called and fits one tiny stage."""

    def fake(fit_fn, data, **kw):
        calls.append(kw)
        res = fit_fn(data, config=kw["config"], objective="elbo", steps=2, patience=None)
        recipe = {"held_out_contexts": [["P0", 1.0]], "held_out_cells": 20, "order": {"chosen": None, "reason": "r"},
                  "energy_steps": 0, "energy_reason": "none: test", "calibration": None,
                  "stages": [{"stage": "1 elbo, default mask", "steps_run": 2, "best_step": 2, "seconds": 0.0}]}
        return dataclasses.replace(res, info={**res.info, "recipe": recipe})

    return fake


def test_default_path_of_fit_and_cli_is_the_recipe(sim, monkeypatch, tmp_path):
    from perturbax.inference import dynamics_recipe

    adata, _, data = sim
    calls = []
    monkeypatch.setattr(dynamics_recipe, "fit_dynamics_recipe", _fake_recipe(calls))
    res = fit("latent_dynamics", data, config=_config(data), steps=7, batch_size=64, progress=False)
    assert len(calls) == 1 and calls[0]["steps"] == 7 and "recipe" in res.info
    # an explicit objective (or recipe=False) fits one stage by hand
    fit("latent_dynamics", data, config=_config(data), objective="elbo", steps=1, batch_size=64, progress=False)
    assert len(calls) == 1
    # the CLI: same default, the model's default latent_dim (as fit()), and what the recipe chose is printed
    path = tmp_path / "tc.h5ad"
    adata.write_h5ad(path)
    base = ["fit", str(path), "-k", "perturbation", "--control", "control", "--model", "dynamics", "--time-key",
            "time", "--steps", "3", "--batch-size", "64", "--no-progress"]
    out = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "m")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert len(calls) == 2 and calls[1]["config"].latent_dim == LatentDynamicsConfig(n_genes=6, n_perturbations=2).latent_dim
    assert "staged recipe" in out.output and "held out P0 @ t=1 (20 cells)" in out.output
    assert "Energy stage: none: test" in out.output


def test_cli_dynamics_latent_dim_default_is_the_model_default(sim, tmp_path):
    """``perturbax fit --model dynamics`` without --latent-dim used 10 programs where fit() uses the
    config's default (5): CLI and Python must share defaults."""
    adata, _, _ = sim
    path = tmp_path / "tc.h5ad"
    adata.write_h5ad(path)
    out = CliRunner().invoke(main, ["fit", str(path), "-k", "perturbation", "--control", "control", "--model",
                                    "dynamics", "--time-key", "time", "--steps", "2", "--batch-size", "64",
                                    "--no-progress", "--objective", "elbo", "--out", str(tmp_path / "m")],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    saved = FitResult.load(tmp_path / "m")
    assert saved.config.latent_dim == LatentDynamicsConfig(n_genes=6, n_perturbations=2).latent_dim


def test_order_refits_share_one_compiled_stage(sim, monkeypatch, caplog):
    """The selection run's ELBO stages (default mask, order refits) are runs of one compiled trainer,
    the causal mask passed as an argument: a run on another order's mask compiles nothing new and
    is the fit a separate ``fit`` on that mask gives (issue 18, speed of the default dynamics fit)."""
    import logging

    import jax

    from perturbax.inference import dynamics_recipe
    from perturbax.models.dynamics import order_mask

    _, _, data = sim
    calls = []
    monkeypatch.setattr(dynamics_recipe, "fit_dynamics_recipe", _fake_recipe(calls))
    fit("latent_dynamics", data, config=_config(data), steps=3, batch_size=64, progress=False)
    trainer_fn = calls[0]["trainer_fn"]
    cfg = _config(data)
    other = dataclasses.replace(cfg, causal_mask=order_mask([1, 0]))
    held = np.flatnonzero((np.asarray(data.env) == data.condition_index("P0")) & np.isclose(data.times, 1.0))
    stage = dict(objective="elbo", seed=0, validation=held, patience=3, eval_every=2)
    run = trainer_fn(data, config=cfg, steps=6, **stage)
    warm = {k: v for k, v in run().params.items() if not k.startswith("q_")}  # (as an order refit starts)
    run(steps=4, init_params=warm)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        shared = run(config=other, steps=4, init_params=warm)
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not [c for c in compiled if "run_chunk" in c or "val_loss" in c], compiled
    alone = fit("latent_dynamics", data, config=other, steps=4, batch_size=64, progress=False, recipe=False,
                init_params=warm, **stage)
    np.testing.assert_array_equal(shared.config.mask, order_mask([1, 0]))
    assert shared.history["val_loss"].size == alone.history["val_loss"].size == 3
    np.testing.assert_allclose(shared.history["val_loss"], alone.history["val_loss"], rtol=1e-5)
    for k in ("q_loc", "q_scale"):
        np.testing.assert_allclose(shared.params[k], alone.params[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="causal_mask"):
        run(config=dataclasses.replace(cfg, b_scale=0.3))


def test_default_batch_size_fits_small_data_sets(sim, monkeypatch):
    """A few hundred cells (the real time courses of the dynamics benchmark: 271 and 390) fit with the
    default batch_size: the recipe's ELBO steps draw at most the training cells of its smallest
    stage (the selection run without its held-out contexts) instead of failing (issue 18)."""
    from perturbax.inference import dynamics_recipe

    data = sim[2].subset(np.arange(0, sim[2].n_cells, 2))  # every other cell: 10 per context
    held = _context_cells(data, held_out_contexts(data))
    assert held.size and data.n_cells - held.size < 256  # (the default batch_size)
    seen = []

    def fake(fit_fn, d, **kw):
        seen.append(fit_fn.keywords["batch_size"])
        return fit_fn(d, config=kw["config"], objective="elbo", steps=2, validation=held, patience=2, eval_every=1)

    monkeypatch.setattr(dynamics_recipe, "fit_dynamics_recipe", fake)
    res = fit("latent_dynamics", data, config=_config(data), steps=3, progress=False)
    assert seen == [data.n_cells - held.size] and res.info["batch_size"] == seen[0]


def test_energy_order_search_scores_every_order_or_searches_locally(monkeypatch):
    """The order search of the recipe (_energy_order_search), with a stand-in trainer whose held-out
    energy grows with the number of pairs an order puts against [2, 0, 1]: all 6 orders of 3 programs
    scored, or (above SEARCH_ALL_UP_TO) a local search over adjacent swaps that walks from [0, 1, 2]
    to [2, 0, 1]; the sole-target mask read from W (P2 on z0, P0 on z1, P1 on z2) is every run's."""
    import itertools

    from perturbax.inference import dynamics_recipe, order_refit
    from perturbax.models.dynamics import equilibrium_shift

    B = np.zeros((3, 3))
    B[0, 2], B[1, 0], B[1, 2] = 0.8, -0.6, 0.5  # order 2 -> 0 -> 1
    S = np.zeros((3, 3))
    S[1, 0], S[2, 1], S[0, 2] = 1.0, -1.5, 2.0
    W = equilibrium_shift(B, S)
    monkeypatch.setattr(order_refit, "posterior_draws", lambda res, n, seed=0: {"W": np.repeat(W[None], 4, 0)})
    cfg = LatentDynamicsConfig(n_genes=4, n_perturbations=3, latent_dim=3)

    @dataclasses.dataclass(frozen=True)
    class Run:
        config: LatentDynamicsConfig
        history: dict
        info: dict

    runs = []

    def trainer_fn(data, *, config, objective, steps, energy, **kw):
        assert objective == "energy" and steps == 5

        def run(*, config, steps, init_params, stop_early):
            order = [int(i) for i in np.argsort(config.mask.sum(1))]  # causes first: fewest parents
            pos = {p: i for i, p in enumerate([2, 0, 1])}
            bad = sum(pos[a] > pos[b] for a, b in itertools.combinations(order, 2))
            runs.append(config)
            return Run(config, {"val_loss": [1.0 + bad] * 6}, {})

        return run

    kw = dict(steps=10, energy=None, sel_kw={}, seed=0)
    start = Run(cfg, {}, {})
    full = dynamics_recipe._energy_order_search(trainer_fn, None, start, [0, 1, 2], **kw)
    assert len(full["scores"]) == 6 and full["chosen"] == [2, 0, 1] and full["targets"] == [2, 0, 1]
    assert full["equally_well"] == [[2, 0, 1]] and full["fit"].info["causal_order"] == [2, 0, 1]
    assert all(np.array_equal(c.target_mask, sole_target_mask([2, 0, 1], 3)) for c in runs)
    runs.clear()
    monkeypatch.setattr(dynamics_recipe, "SEARCH_ALL_UP_TO", 2)
    local = dynamics_recipe._energy_order_search(trainer_fn, None, start, [0, 1, 2], **kw)
    assert local["chosen"] == [2, 0, 1] and local["start"] == [0, 1, 2]
    # [0, 1, 2] -> [0, 2, 1] -> [2, 0, 1], whose untried neighbour [2, 1, 0] is worse
    assert set(local["scores"]) == {"[0, 1, 2]", "[1, 0, 2]", "[0, 2, 1]", "[2, 0, 1]", "[2, 1, 0]"}
    assert len(runs) == 5
