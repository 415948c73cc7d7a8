"""fit / predict / save / load of the additive-shift model on small simulated data."""

import dataclasses
import json
import warnings

import numpy as np
import pytest

from perturbax.baselines import AdditiveBaseline
from perturbax.data import from_anndata, simulate_additive_shift, split_from_column
from perturbax.inference import EnergyOptions, FitResult, UnseenPerturbationError, fit, predict, to_arviz
from perturbax.metrics import energy_distance
from perturbax.models import AdditiveShiftConfig

STEPS = 400


@pytest.fixture(scope="module")
def sim():
    adata, truth = simulate_additive_shift(
        n_perturbations=3, latent_dim=2, n_genes=10, n_cells=80, n_out_of_span=1, seed=0
    )
    data = from_anndata(adata, "perturbation", "control")
    return adata, truth, data, split_from_column(adata, "perturbation", "control")


def _config(data, **kw):
    return AdditiveShiftConfig(
        n_genes=data.n_genes, n_perturbations=data.K, latent_dim=2, decoder_hidden=(32,), encoder_hidden=(32,), **kw
    )


@pytest.fixture(scope="module")
def energy_fit(sim):
    _, _, data, split = sim
    return fit(
        "additive_shift", split.train, config=_config(data), objective="energy", steps=STEPS,
        energy=EnergyOptions(cells_per_condition=32), eval_every=100, progress=False, seed=1,
    )


@pytest.fixture(scope="module")
def elbo_fit(sim):
    _, _, data, split = sim
    # the plain model (the nested estimator of the default fit is tested through energy_fit and in
    # test_selection.py): what these tests check is the model's own prediction
    return fit("additive_shift", split.train, config=_config(data), objective="elbo", steps=STEPS, batch_size=128,
               eval_every=100, progress=False, seed=1, select=False)


@pytest.mark.parametrize("which", ["energy_fit", "elbo_fit"])
def test_loss_decreases(which, request):
    res = request.getfixturevalue(which)
    loss = res.history["loss"]
    assert loss.size == res.info["steps_run"] and np.all(np.isfinite(loss))
    assert loss[-50:].mean() < loss[:50].mean() - 0.1 * abs(loss[:50].mean())
    # the data-driven start is on by default for the energy objective only
    assert res.info["data_init"] == (["decoder$params", "x_scale"] if which == "energy_fit" else [])


def test_energy_fit_beats_control_on_held_out_doubles(sim, energy_fit):
    _, _, data, split = sim
    labels = [lab for lab in split.test_labels if split.test_groups[lab] != "out-of-span"
              and all(n in energy_fit.seen_elementary for n in data.registry.components(lab))]
    pred = predict(energy_fit, labels, num_samples=20, n_cells=150, seed=0)
    ctrl = split.train.dense(split.train.cells_of("control"))
    add = AdditiveBaseline().fit(split.train).predict(labels)
    model_ed, ctrl_ed, add_ed = [], [], []
    for lab in labels:
        truth = split.test.dense(split.test.cells_of(lab))
        cells = pred.X[(pred.obs["perturbation"] == lab).to_numpy()]
        model_ed.append(energy_distance(cells, truth))
        ctrl_ed.append(energy_distance(ctrl, truth))
        add_ed.append(energy_distance(add[lab], truth))
    # A short fit is already far better than predicting no effect.
    assert np.median(model_ed) < 0.5 * np.median(ctrl_ed)


def test_implicit_likelihood_fits_with_the_energy_objective(sim, tmp_path):
    # the implicit decoder has no density: the energy objective runs the model as a simulator only
    _, _, data, split = sim
    res = fit("additive_shift", split.train, config=_config(data, likelihood="implicit", noise_dim=2),
              objective="energy", steps=300, energy=EnergyOptions(cells_per_condition=32), eval_every=100,
              progress=False, seed=1)  # the default: the nested estimator
    assert "eta" not in res.global_names and np.isfinite(res.history["loss"]).all()
    assert res.history["loss"][-50:].mean() < res.history["loss"][:50].mean()
    labels = [lab for lab in split.test_labels if split.test_groups[lab] != "out-of-span"
              and all(n in res.seen_elementary for n in data.registry.components(lab))]
    assert labels
    pred = predict(res, labels, num_samples=10, n_cells=100, seed=0)
    ctrl = split.train.dense(split.train.cells_of("control"))
    model_ed, ctrl_ed = [], []
    for lab in labels:
        truth = split.test.dense(split.test.cells_of(lab))
        cells = pred.X[(pred.obs["perturbation"] == lab).to_numpy()]
        assert cells.std(0).mean() > 0.3 * truth.std(0).mean()  # noise is fed through the decoder
        model_ed.append(energy_distance(cells, truth))
        ctrl_ed.append(energy_distance(ctrl, truth))
    assert np.median(model_ed) < 0.5 * np.median(ctrl_ed)
    res.save(tmp_path / "m")
    again = predict(FitResult.load(tmp_path / "m"), labels, num_samples=10, n_cells=100, seed=0)
    np.testing.assert_allclose(again.X, pred.X, rtol=1e-5, atol=1e-6)


def test_prediction_layout(sim, elbo_fit):
    _, _, data, _ = sim
    labels = ["P0+P1", {"P0": 0.5, "P2": 2.0}, "P1"]
    pred = predict(elbo_fit, labels, n_cells=30, num_samples=10, seed=0)
    meta = pred.uns["perturbax"]
    assert meta["labels"] == ["P0+P1", "P0:0.5+P2:2", "P1"]
    assert list(pred.var_names) == list(data.gene_names)
    assert pred.n_obs == 90 and set(pred.obs["draw"]) <= set(range(10))
    assert pred.obs["perturbation"].value_counts().to_dict() == {lab: 30 for lab in meta["labels"]}
    lo, mid, hi = (pred.varm[k] for k in ("pred_lower", "pred_mean", "pred_upper"))
    assert lo.shape == (data.n_genes, 3) and np.all(lo <= mid + 1e-6) and np.all(mid <= hi + 1e-6)
    assert np.all(hi - lo > 0)  # the posterior over W is not a point mass
    assert pred.uns["mean_draws"].shape == (3, 10, data.n_genes)


def test_predict_is_deterministic_by_seed(elbo_fit):
    a = predict(elbo_fit, ["P0+P1"], n_cells=20, num_samples=5, seed=3)
    b = predict(elbo_fit, ["P0+P1"], n_cells=20, num_samples=5, seed=3)
    c = predict(elbo_fit, ["P0+P1"], n_cells=20, num_samples=5, seed=4)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)


def test_fit_is_deterministic_by_seed(sim):
    _, _, data, split = sim
    kw = dict(config=_config(data), objective="elbo", steps=20, batch_size=64, progress=False, patience=None, seed=5,
              select=False)
    a = fit("additive_shift", split.train, **kw)
    b = fit("additive_shift", split.train, **kw)
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])


def test_unseen_and_unknown_perturbations(sim, elbo_fit):
    # P3 is the out-of-span perturbation: it is in the registry but never in training.
    with pytest.raises(UnseenPerturbationError, match="P3"):
        predict(elbo_fit, ["P0+P3"], num_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict(elbo_fit, ["P0+P3"], num_samples=2, n_cells=4, allow_unseen=True)
    assert pred.n_obs == 4
    with pytest.raises(ValueError, match=r"'P9'.*did you mean"):
        predict(elbo_fit, ["P0+P9"], num_samples=2)


def test_predict_moves_observed_cells(sim, elbo_fit):
    """source=<cells>: each cell plus the model's change of its mean from its own label to the
    requested one."""
    _, _, data, split = sim
    ctrl = split.train.select(["control"])
    kw = dict(num_samples=6, seed=2, bootstrap=False)
    moved = predict(elbo_fit, ["P0+P1", "control"], source=ctrl, **kw)
    assert moved.uns["perturbax"]["source"] == "cells" and moved.uns["perturbax"]["source_cells"] == ctrl.n_cells
    assert moved.n_obs == 2 * ctrl.n_cells  # default n_cells: one per source cell
    x = ctrl.dense()
    lab = moved.obs["perturbation"].to_numpy()
    # moved to their own label, the cells come back unchanged, each source cell once
    np.testing.assert_allclose(np.sort(moved.X[lab == "control"], 0), np.sort(x, 0), atol=1e-5)
    # the mean change is the model's: from the same (control) states and posterior draws, the
    # control-source prediction has the same difference of per-draw means
    from_ctrl = predict(elbo_fit, ["P0+P1", "control"], **kw)
    md, cd = moved.uns["mean_draws"], from_ctrl.uns["mean_draws"]
    np.testing.assert_allclose(md[0] - x.mean(0), cd[0] - cd[1], atol=2e-4)
    assert np.abs(cd[0] - cd[1]).max() > 0.1  # a real shift, not a no-op


def test_predict_moved_cells_errors(sim, elbo_fit):
    adata, _, data, split = sim
    # P3 never occurs in training: its effect cannot be taken out of cells that carry it
    with pytest.raises(UnseenPerturbationError, match=r"\['P3'\]"):
        predict(elbo_fit, ["P0"], source=data.select(["P2+P3"]), num_samples=2)
    other_genes = from_anndata(adata[:, ::-1].copy(), "perturbation", "control").select(["control"])
    with pytest.raises(ValueError, match="same genes in another order"):
        predict(elbo_fit, ["P0"], source=other_genes, num_samples=2)
    counts_fit = dataclasses.replace(elbo_fit, config=dataclasses.replace(elbo_fit.config, likelihood="negative_binomial"))
    with pytest.raises(ValueError, match="additive expression space"):
        predict(counts_fit, ["P0"], source=split.train.select(["control"]), num_samples=2)
    with pytest.raises(ValueError, match="observed cells"):
        predict(elbo_fit, ["P0"], source="treated", num_samples=2)


def test_save_load_round_trip(tmp_path, energy_fit):
    energy_fit.save(tmp_path / "m")
    loaded = FitResult.load(tmp_path / "m")
    assert loaded.registry == energy_fit.registry and loaded.gene_names == energy_fit.gene_names
    a = predict(energy_fit, ["P0+P2"], n_cells=10, num_samples=4, seed=0)
    b = predict(loaded, ["P0+P2"], n_cells=10, num_samples=4, seed=0)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded.history["loss"], energy_fit.history["loss"])


def test_load_errors(tmp_path, energy_fit):
    path = energy_fit.save(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a saved perturbax fit"):
        FitResult.load(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        FitResult.load(path)
    meta["format_version"] = 1
    meta["config"]["latent_dim"] = 3  # a different layout than the stored parameters
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the layout"):
        FitResult.load(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        FitResult.load(path)
    energy_fit.save(tmp_path / "n")
    (tmp_path / "n" / "params.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        FitResult.load(tmp_path / "n")


def test_bad_inputs(sim):
    adata, _, data, split = sim
    with pytest.raises(ValueError, match="batch_size=100000 is larger"):
        fit("additive_shift", split.train, config=_config(data), objective="elbo", steps=2, batch_size=100000,
            progress=False)
    # the energy objective samples cells per condition with replacement: a large batch_size only
    # means "all conditions per step", not an error
    big = fit("additive_shift", split.train, config=_config(data), objective="energy", steps=2, batch_size=100000,
              progress=False, patience=None, select=False)
    assert big.info["cells_per_step"] == split.train.n_conditions * big.info["energy_options"]["cells_per_condition"]
    # ... also when a step draws more cells than there are (the model's plate must hold them)
    more = fit("additive_shift", split.train, config=_config(data), objective="energy", steps=2, batch_size=100000,
               energy=EnergyOptions(cells_per_condition=400), progress=False, eval_every=1, patience=5, select=False)
    assert more.info["cells_per_step"] > split.train.n_cells and np.isfinite(more.history["val_loss"]).all()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fit("additive_shift", split.train, config=_config(data), steps=2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="count likelihood needs raw"):
        fit("additive_shift", split.train, config=_config(data, likelihood="negative_binomial"), steps=2, progress=False)
    counts_adata, _ = simulate_additive_shift(n_perturbations=2, latent_dim=2, n_genes=6, n_cells=20, counts=True,
                                              n_out_of_span=0, seed=0)
    counts = from_anndata(counts_adata, "perturbation", "control", layer="counts", counts=True)
    nb = AdditiveShiftConfig(n_genes=6, n_perturbations=counts.K, likelihood="negative_binomial")
    with pytest.raises(ValueError, match="objective='elbo'"):
        fit("additive_shift", counts, config=nb, objective="energy", steps=2, progress=False)
    with pytest.raises(ValueError, match="objective='energy'"):
        fit("additive_shift", split.train, config=_config(data, likelihood="implicit"), objective="elbo", steps=2)
    with pytest.raises(ValueError, match="config.n_genes"):
        fit("additive_shift", split.train, config=AdditiveShiftConfig(n_genes=3, n_perturbations=data.K), steps=2)


def test_nan_guard_returns_last_finite_state(sim):
    _, _, data, split = sim
    with pytest.warns(RuntimeWarning, match="last finite state"):
        res = fit("additive_shift", split.train, config=_config(data), objective="elbo", steps=400, batch_size=64,
                  learning_rate=1e6, eval_every=20, patience=None, progress=False, select=False)
    assert res.info["stop_reason"] == "nan"
    assert all(np.all(np.isfinite(np.asarray(v))) for v in __import__("jax").tree_util.tree_leaves(res.params))


def test_arviz_export(elbo_fit):
    pred = predict(elbo_fit, ["P0+P1", "P2"], n_cells=5, num_samples=8)
    tree = to_arviz(elbo_fit, pred, num_samples=8)
    W = tree["posterior"]["W"]
    assert W.sizes["draw"] == 8 and W.sizes["perturbation"] == elbo_fit.registry.K
    assert tree["posterior_predictive"]["mean_expression"].sizes["condition"] == 2
