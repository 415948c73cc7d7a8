"""Issue 21: predict writes its cells to the output file in chunks for large requests."""

import dataclasses

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest

import perturbax.data.stream as stream
import perturbax.inference.prediction as prediction
from perturbax.data import from_anndata, simulate_additive_shift
from perturbax.data.io import write_predictions
from perturbax.inference import fit, predict
from perturbax.inference.prediction import prediction_bytes, prediction_plan
from perturbax.models import AdditiveShiftConfig
from conftest import context_adata  # noqa: E402

SMALL = dict(latent_dim=2, decoder_hidden=(16,), encoder_hidden=(16,))


def _tiny_fit(data, **kw):
    cfg = AdditiveShiftConfig(n_genes=data.n_genes, n_perturbations=data.K, **SMALL)
    return fit("additive_shift", data, config=cfg, objective="elbo", steps=4, eval_every=2, batch_size=32,
               progress=False, select=False, seed=0, **kw)


@pytest.fixture(scope="module")
def plain_fit():
    adata, _ = simulate_additive_shift(n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, seed=0)
    return _tiny_fit(from_anndata(adata, "perturbation", "control"))


@pytest.fixture(scope="module")
def context_fit():
    return _tiny_fit(from_anndata(context_adata(), "perturbation", "control", context_keys=("line",)))


def _with_nested(res, mode):
    """``res`` with the arrays of a nested estimator (lambda 0.5, cell mode ``mode``)."""
    rng = np.random.default_rng(0)
    G, K = len(res.gene_names), res.registry.K
    arrays = {"control_mean": rng.normal(size=G), "ridge_effects": rng.normal(size=(K, G)),
              "model_control": rng.normal(size=G), "model_effects": rng.normal(size=(K, G)),
              "control_cells": rng.normal(size=(7, G)).astype(np.float32), "cell_var": rng.uniform(0.5, 1, G),
              "scores": np.array([0.5, 1.0, 1.5, 2.0])}
    selection = {"lambda": 0.5, "cells": mode, "n_ref": 10.0, "calibration": {"covers": "test"}}
    return dataclasses.replace(res, nested=arrays, info={**res.info, "selection": selection})


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 6 cells' worth of bytes (whole draws: one draw of 5 cells a chunk below)."""
    monkeypatch.setattr(prediction, "OUTPUT_CHUNK_BYTES", 4 * 8 * 6)


def _same_uns(a, b, where="uns"):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same_uns(a[k], b[k], f"{where}[{k!r}]")
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, where
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b, err_msg=where)
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), where


def _same_file(a, b, exact=True):
    assert a.n_obs == b.n_obs and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    if exact:
        np.testing.assert_array_equal(a.X, b.X)
    else:  # the nested re-centring sums a column in other pieces: float64 order of additions
        np.testing.assert_allclose(a.X, b.X, rtol=1e-6, atol=1e-6)
    assert set(a.varm) == set(b.varm) == {"pred_mean", "pred_lower", "pred_upper"}
    for k in a.varm:
        np.testing.assert_array_equal(a.varm[k], b.varm[k])
    _same_uns(dict(a.uns), dict(b.uns))


def _both(res, tmp_path, labels, **kw):
    """The prediction written in chunks and built in memory (same seed), read back; and the number of
    blocks the chunked one was written in."""
    blocks = []
    real = prediction.write_predictions

    def counting(path, cells, *a, **k):
        def each():
            for x in cells:
                blocks.append(x.shape[0])
                yield x
        return real(path, each(), *a, **k)

    prediction.write_predictions = counting
    try:
        s = predict(res, labels, out=tmp_path / "s.h5ad", stream_output=True, **kw)
        n_blocks = len(blocks)
        blocks.clear()
        m = predict(res, labels, out=tmp_path / "m.h5ad", stream_output=False, **kw)
        assert len(blocks) == len(s.uns["perturbax"]["labels"])  # in memory: one block a column
    finally:
        prediction.write_predictions = real
    assert s.isbacked and m.isbacked
    s.file.close()
    m.file.close()
    return ad.read_h5ad(tmp_path / "s.h5ad"), ad.read_h5ad(tmp_path / "m.h5ad"), n_blocks


@pytest.mark.parametrize("nested", [None, "generated", "control"])
def test_chunked_output_equals_the_in_memory_output(plain_fit, tmp_path, tiny_chunks, nested):
    res = plain_fit if nested is None else _with_nested(plain_fit, nested)
    labels = ["P0", "P0+P1"]
    s, m, n_blocks = _both(res, tmp_path, labels, n_cells=28, num_samples=6, seed=3)
    # generated cells: 28 = 6 draws of 5 (the last 3), one draw a chunk; control cells: 6 a chunk
    assert n_blocks == 2 * (5 if nested == "control" else 6)
    _same_file(s, m, exact=nested != "generated")
    assert s.obs["perturbation"].tolist() == ["P0"] * 28 + ["P0+P1"] * 28
    assert s.obs["draw"].tolist()[:7] == [0] * 5 + [1] * 2
    assert s.varm["pred_mean"].shape == (8, 2) and list(s.uns["perturbax"]["labels"]) == labels
    assert "nested" in s.uns["perturbax"] if nested else "nested" not in s.uns["perturbax"]
    if nested:
        return
    # and the AnnData returned in memory (no file) holds the same cells and labels
    mem = predict(res, labels, n_cells=28, num_samples=6, seed=3)
    np.testing.assert_allclose(mem.X, s.X, rtol=1e-6, atol=1e-6)
    assert mem.obs["perturbation"].tolist() == s.obs["perturbation"].tolist()
    np.testing.assert_array_equal(mem.varm["pred_upper"], s.varm["pred_upper"])


def test_chunked_output_with_contexts(context_fit, tmp_path, tiny_chunks):
    s, m, n_blocks = _both(context_fit, tmp_path, ["A"], num_samples=4, seed=1)
    _same_file(s, m)
    # one column per context, each from its own control cells (30/35/45), in chunks of whole draws
    assert list(s.uns["perturbax"]["labels"]) == ["A @ line=x", "A @ line=y", "A @ line=z"]
    assert s.obs["line"].tolist() == ["x"] * 30 + ["y"] * 35 + ["z"] * 45
    assert set(s.obs["perturbation"]) == {"A"} and n_blocks == 3 * 4
    assert s.varm["pred_lower"].shape == (8, 3)
    assert list(s.uns["perturbax"]["coverage"]["covered"]) == [True, True, True]


def _in_memory_bytes(res, columns, n_cells, num_samples):
    """:func:`prediction_bytes` of a prediction from the training control cells, built in memory."""
    n_values = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(res.params))
    return prediction_bytes(len(res.gene_names), columns, n_cells, num_samples, int(np.shape(res.basal["library"])[0]),
                            n_values)


def test_prediction_chooses_chunks_above_half_the_available_memory(plain_fit, tmp_path, monkeypatch, tiny_chunks):
    res = plain_fit
    n_src = int(np.shape(res.basal["library"])[0])
    in_memory = _in_memory_bytes(res, 1, 28, 6)
    assert prediction_plan(res, 1, 28, 6, n_src, available=3 * in_memory)[0] is False
    chunked, line = prediction_plan(res, 1, 28, 6, n_src, available=in_memory)
    assert chunked and "written in chunks" in line and "--no-stream-output" in line
    assert prediction_plan(res, 1, 28, 6, n_src, stream_output=False, available=10 * in_memory)[1].endswith(
        "built in memory (as asked).")
    with pytest.raises(ValueError, match="GiB of memory.*--stream-output"):
        prediction_plan(res, 1, 28, 6, n_src, stream_output=False, available=in_memory // 2)
    with pytest.raises(ValueError, match="GiB of memory"):
        prediction_plan(res, 1, 10**12, 6, n_src)
    # predict(out=...) with the default stream_output=None follows that choice
    monkeypatch.setattr(stream, "available_memory", lambda: in_memory)
    a = predict(res, ["P1"], n_cells=28, num_samples=6, out=tmp_path / "auto.h5ad")
    monkeypatch.setattr(stream, "available_memory", lambda: 10**12)
    b = predict(res, ["P1"], n_cells=28, num_samples=6, out=tmp_path / "big.h5ad")
    np.testing.assert_array_equal(a.X[:], b.X[:])
    a.file.close()
    b.file.close()
    with pytest.raises(ValueError, match="out="):
        predict(res, ["P1"], stream_output=True)


def test_write_predictions_refuses_bad_blocks_and_leaves_no_file(tmp_path):
    genes = ["g0", "g1"]
    good = np.ones((2, 2), np.float32)
    bad = np.array([[1.0, np.nan]], np.float32)
    path = tmp_path / "p.h5ad"
    with pytest.raises(ValueError, match="NaN/Inf value.*'B'"):
        write_predictions(path, [good, bad], ["A", "A", "B"], gene_names=genes)
    with pytest.raises(ValueError, match="blocks hold 2 cells but 3 are labelled"):
        write_predictions(path, [good], ["A", "A", "B"], gene_names=genes)
    with pytest.raises(ValueError, match="3 genes"):
        write_predictions(path, [np.ones((3, 3))], ["A", "A", "B"], gene_names=genes)
    assert list(tmp_path.iterdir()) == []
    out = write_predictions(path, [good, good[:1]], ["A", "A", "B"], gene_names=genes, obs={"draw": [0, 1, 0]},
                            varm={"pred_mean": np.zeros((2, 2))}, uns={"perturbax": {"labels": ["A", "B"]}})
    assert out.obs["perturbation"].tolist() == ["A", "A", "B"] and out.X[:].shape == (3, 2)
    assert list(out.obs_names) == ["pred_0", "pred_1", "pred_2"] and out.obs["draw"].tolist() == [0, 1, 0]
    out.file.close()


def test_cli_predict_stream_output_flag_and_automatic_choice(plain_fit, tmp_path, monkeypatch, tiny_chunks):
    from click.testing import CliRunner

    from perturbax.cli import main

    plain_fit.save(tmp_path / "model")
    args = ["predict", str(tmp_path / "model"), "-p", "P0,P2", "--n-cells", "28", "--num-samples", "6",
            "--summary", str(tmp_path / "s.csv")]
    runs = {}
    for flag in ("--stream-output", None):
        out = tmp_path / f"{flag}.h5ad"
        r = CliRunner().invoke(main, [*args, "-o", str(out), *([flag] if flag else [])])
        assert r.exit_code == 0, r.output
        runs[flag] = (r.output, ad.read_h5ad(out))
    assert "Output: 56 cells x 8 genes" in runs["--stream-output"][0]
    assert "written in chunks of about 6 cells (as asked)." in runs["--stream-output"][0]
    assert "built in memory (chosen from the size; --stream-output" in runs[None][0]
    _same_file(runs["--stream-output"][1], runs[None][1])
    # little memory available: chosen to be written in chunks
    low = _in_memory_bytes(plain_fit, 2, 28, 6) - 1
    monkeypatch.setattr(stream, "available_memory", lambda: low)
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "low.h5ad")])
    assert r.exit_code == 0, r.output
    assert "written in chunks of about 6 cells (chosen from the size; --no-stream-output" in r.output
    assert "Labels (obs[\"perturbation\"]): P0 (28), P2 (28)" in r.output
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "no.h5ad"), "--no-stream-output"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "--stream-output" in r.output
    assert not (tmp_path / "no.h5ad").exists()
