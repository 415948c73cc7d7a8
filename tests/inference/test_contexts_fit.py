"""Fits with contexts: the context columns travel through fit, save/load and predict (each label
from the control cells of its own context), and through the nested estimator."""

import numpy as np
import pytest

from perturbax.data import from_anndata, prediction_cells
from perturbax.inference import FitResult, fit, predict
from perturbax.models import AdditiveShiftConfig

HELD = "A @ line=z"


def _config(d):
    return AdditiveShiftConfig(n_genes=d.n_genes, n_perturbations=d.K, latent_dim=2, decoder_hidden=(16,),
                               encoder_hidden=(16,))


@pytest.fixture(scope="module")
def data():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import context_adata

    a = context_adata()
    return a, from_anndata(a, "perturbation", "control", context_keys=["line"])


@pytest.fixture(scope="module")
def plain_fit(data, tmp_path_factory):
    _, d = data
    res = fit("additive_shift", d.select([HELD], exclude=True), config=_config(d), steps=20, eval_every=10,
              progress=False, select=False, seed=0)
    path = res.save(tmp_path_factory.mktemp("ctxfit") / "fit")
    return res, FitResult.load(path)


def test_save_load_keeps_contexts_and_context_controls(plain_fit):
    res, loaded = plain_fit
    assert loaded.registry == res.registry and loaded.registry.contexts == (("line", ("x", "y", "z")),)
    # the prediction sources: the control cells of every context, with their context columns
    lab = np.asarray(loaded.basal["l"])
    assert lab.shape == (30 + 35 + 45, 4) and not lab[:, :2].any()
    assert sorted(np.unique(lab[:, 2:], axis=0, return_counts=True)[1].tolist()) == [30, 35, 45]


def test_predict_starts_from_the_context_controls_and_carries_the_context(plain_fit):
    _, loaded = plain_fit
    pr = predict(loaded, [HELD, "B @ line=y"], num_samples=5, seed=1)
    meta = pr.uns["perturbax"]
    assert meta["labels"] == [HELD, "B @ line=y"]
    # default n_cells = the number of control cells of the label's context (z: 45, y: 35)
    cells = prediction_cells(pr)
    assert cells[HELD].shape == (45, 8) and cells["B @ line=y"].shape == (35, 8)
    assert pr.obs["line"].astype(str).tolist() == ["z"] * 45 + ["y"] * 35
    assert set(pr.obs["perturbation"].astype(str)) == {"A", "B"}
    assert meta["coverage"]["covered"].tolist() == [True, True]
    # a plain label is predicted in every context
    every = predict(loaded, "A", num_samples=3, n_cells=4)
    assert every.uns["perturbax"]["labels"] == ["A @ line=x", "A @ line=y", "A @ line=z"]
    assert every.obs["line"].astype(str).tolist() == ["x"] * 4 + ["y"] * 4 + ["z"] * 4


def test_source_cells_of_one_context_read_with_the_fit_registry(data, plain_fit):
    a, _ = data
    _, loaded = plain_fit
    only_z = from_anndata(a[(a.obs["line"] == "z").to_numpy()], "perturbation", "control",
                          registry=loaded.registry, require_control=False)
    src = only_z.select(["control @ line=z"])
    pr = predict(loaded, HELD, source=src, num_samples=4, seed=0)
    assert prediction_cells(pr)[HELD].shape == (45, 8)
    assert np.isfinite(np.asarray(pr.varm["pred_mean"])).all()


@pytest.mark.slow
def test_nested_estimator_with_contexts(data):
    """(slow: three fits) The default fit (nested estimator): the ridge has context columns, the CV holds out
    (perturbation, context) pairs, and the held-out pair's mean is the additive transfer."""
    a, d = data
    train = d.select([HELD], exclude=True)
    res = fit("additive_shift", train, config=_config(d), steps=10, eval_every=10, progress=False, seed=0)
    sel = res.info["selection"]
    assert sel["held_out"] and all(" @ line=" in lab for fold in sel["held_out"] for lab in fold)
    assert res.nested["ridge_effects"].shape == (4, 8) and res.nested["control_labels"].shape == (110, 4)
    pr = predict(res, HELD, num_samples=10, seed=0)
    mean = np.asarray(pr.varm["pred_mean"])[:, 0]
    truth = d.dense(d.cells_of(HELD)).mean(0)
    ctrl_z = d.dense(d.cells_of("control @ line=z")).mean(0)
    # the change from z's control is predicted from A's change in x and y (the ridge path)
    r2 = 1 - np.sum((mean - truth) ** 2) / np.sum((truth - truth.mean()) ** 2)
    assert r2 > 0.9, r2
    assert np.corrcoef(mean - ctrl_z, truth - ctrl_z)[0, 1] > 0.9
    if sel["cells"] == "control":  # re-centred control cells of z, not of the reference x
        assert prediction_cells(pr)[HELD].shape[0] == 45
