"""``perturbax fit`` and ``perturbax predict`` through click's CliRunner, on a tiny simulation."""

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import perturbax.theory
from perturbax.cli import main
from perturbax.cli.fit import cli_message
from perturbax.cli.predict import predict_dir, prediction_summary_table
from perturbax.data.simulate import simulate_additive_shift
from perturbax.inference.result import FitResult

KEY = "guide"  # not the simulator's column name: predict must use the key saved in the fit
STEPS = "30"
FIT_ARGS = ["-k", KEY, "--control", "control", "--steps", STEPS, "--batch-size", "64", "--latent-dim", "2",
            "--seed", "3", "--no-progress"]
# every condition with P2 is held out: P2 is never seen in training
HOLDOUT = "P2,P0+P2,P1+P2,P0:0.5+P2:0.5"
# P2 was never seen: predictable only with --allow-unseen (its shift is a prior draw)
REQUESTED = "P1+P0, P1:2+P0:0.5,control,P2"
CANONICAL = ["P0+P1", "P0:0.5+P1:2", "control", "P2"]
N_CELLS = 12
PRED_ARGS = ["--perturbations", REQUESTED, "--n-cells", str(N_CELLS), "--num-samples", "8", "--seed", "5",
             "--interval", "0.8", "--allow-unseen"]


@pytest.fixture(scope="module", autouse=True)
def _coverage_without_theory():
    """Until perturbax.theory.check_design exists, predict's identifiability notes are empty."""
    if hasattr(perturbax.theory, "check_design"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("perturbax.inference.prediction._coverage_notes", lambda fit, labels, vecs: {})
        yield


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fitpredict")
    adata, _ = simulate_additive_shift(n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, n_out_of_span=0,
                                       seed=0)
    adata.obs = adata.obs.rename(columns={"perturbation": KEY})
    counts, _ = simulate_additive_shift(n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, n_out_of_span=0,
                                        seed=0, counts=True)
    paths = {"data": tmp / "sim.h5ad", "counts": tmp / "sim_counts.h5ad"}
    adata.write_h5ad(paths["data"])
    counts.write_h5ad(paths["counts"])
    return {"tmp": tmp, "paths": paths, "genes": [str(g) for g in adata.var_names]}


@pytest.fixture(scope="module")
def fitted(files):
    out = files["tmp"] / "model_a"
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--holdout", HOLDOUT, "--out", out])
    assert res.exit_code == 0, res.output
    return {"dir": out, "output": res.output}


@pytest.fixture(scope="module")
def predicted(files, fitted):
    out = files["tmp"] / "pred_a.h5ad"
    summary = files["tmp"] / "summary_a.csv"
    res = _run(["predict", fitted["dir"], *PRED_ARGS, "--out", out, "--summary", summary])
    assert res.exit_code == 0, res.output
    return {"h5ad": out, "csv": summary, "output": res.output}


# --------------------------------------------------------------------------------------- help
def test_help_lists_fit_and_predict():
    res = _run(["--help"])
    assert res.exit_code == 0
    assert "fit" in res.output.split() and "predict" in res.output.split()
    res = _run(["fit", "--help"])
    assert res.exit_code == 0 and "elbo for negative_binomial" in res.output


# ---------------------------------------------------------------------------------------- fit
def test_fit_saves_a_loadable_model(files, fitted):
    fit = FitResult.load(fitted["dir"])
    assert fit.perturbation_key == KEY
    assert list(fit.gene_names) == files["genes"]
    assert fit.objective == "energy"  # the default for the gaussian likelihood
    assert fit.config.latent_dim == 2 and fit.config.likelihood == "gaussian"
    assert fit.registry.names == ("P0", "P1", "P2")
    assert fit.seen_elementary == ("P0", "P1")  # the held-out conditions did not train
    assert not any("P2" in c for c in fit.train_conditions)
    assert fit.info["seed"] == 3 and fit.info["steps_run"] == 30
    out = fitted["output"]
    assert "Steps run: 30 of 30" in out and "stop reason: steps" in out
    assert f"Final loss: {fit.history['loss'][-1]:.6g}" in out
    assert f"Saved to {fitted['dir']}" in out
    assert "Held out 4 condition(s)" in out
    # the held-out record is true: the best evaluation's loss and step, whose parameters were saved
    val, val_step = fit.history["val_loss"], fit.history["val_step"]
    assert fit.info["best_step"] == val_step[int(np.argmin(val))] and fit.info["best_val_loss"] == val.min()
    assert (f"Held-out loss: best {val.min():.6g} at step {fit.info['best_step']} (the parameters saved), "
            f"last {val[-1]:.6g} at step {val_step[-1]}") in out


def test_fit_holdout_unknown_condition_fails(files, tmp_path):
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--holdout", "P0+P1:3", "--out", tmp_path / "m"])
    assert res.exit_code != 0
    line = _error_line(res)
    assert "P0+P1:3" in line and "zero cells" in line and "P0+P1" in line
    assert not (tmp_path / "m").exists()


def test_fit_negative_binomial_needs_counts(files, tmp_path):
    res = _run(["fit", files["paths"]["counts"], "-k", "perturbation", "--control", "control",
                "--likelihood", "negative_binomial", "--out", tmp_path / "nb_x"])
    assert res.exit_code != 0
    line = _error_line(res)
    assert "counts" in line and "--layer counts" in line
    assert not (tmp_path / "nb_x").exists()

    out = tmp_path / "nb_counts"
    res = _run(["fit", files["paths"]["counts"], "-k", "perturbation", "--control", "control",
                "--likelihood", "negative_binomial", "--layer", "counts", "--steps", "5", "--batch-size", "32",
                "--latent-dim", "2", "--no-progress", "--out", out])
    assert res.exit_code == 0, res.output
    assert "objective elbo" in res.output  # the default for negative_binomial
    meta = json.loads((out / "meta.json").read_text())  # (FitResult.load is checked on the gaussian fit)
    assert meta["config"]["likelihood"] == "negative_binomial" and meta["objective"] == "elbo"
    assert meta["info"]["cli"]["layer"] == "counts"
    assert {p.name for p in out.iterdir()} >= {"meta.json", "params.npz", "basal.npz", "history.npz"}


@pytest.mark.parametrize(
    "likelihood, objective, expected",
    [("implicit", "elbo", "--objective energy"), ("negative_binomial", "energy", "--objective elbo")],
)
def test_fit_refuses_impossible_combinations(files, tmp_path, likelihood, objective, expected):
    res = _run(["fit", files["paths"]["counts"], "-k", "perturbation", "--control", "control", "--layer", "counts",
                "--likelihood", likelihood, "--objective", objective, "--out", tmp_path / "m"])
    assert res.exit_code != 0
    assert expected in _error_line(res)
    assert not (tmp_path / "m").exists()


def test_fit_and_predict_implicit_likelihood(files, tmp_path):
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--steps", "5", "--likelihood", "implicit",
                "--out", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    assert "objective energy" in res.output  # the default for implicit
    res = _run(["predict", tmp_path / "m", "-p", "P0+P1", "--n-cells", "20", "--out", tmp_path / "p.h5ad"])
    assert res.exit_code == 0, res.output
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.shape == (20, len(files["genes"])) and np.isfinite(pred.X).all()


def test_fit_mean_weight(files, tmp_path):
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--objective", "elbo", "--mean-weight", "1",
                "--out", tmp_path / "m"])
    assert res.exit_code != 0 and "--objective energy" in _error_line(res)
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--steps", "3", "--mean-weight", "0.5", "--out", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    fit = FitResult.load(tmp_path / "m")
    assert fit.info["energy_options"]["mean_weight"] == 0.5 and fit.info["cli"]["mean_weight"] == 0.5


def test_fit_input_and_output_errors(files, tmp_path):
    res = _run(["fit", tmp_path / "missing.h5ad", *FIT_ARGS, "--out", tmp_path / "m"])
    assert res.exit_code != 0 and "does not exist" in res.output
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--out", tmp_path / "no" / "such" / "m"])
    assert res.exit_code != 0 and "does not exist" in _error_line(res)
    res = _run(["fit", files["paths"]["data"], "-k", "guid", "--control", "control", "--out", tmp_path / "m"])
    assert res.exit_code != 0 and f"Did you mean {KEY!r}" in _error_line(res)
    bad = tmp_path / "not.h5ad"
    bad.write_text("not an h5ad file")
    res = _run(["fit", bad, *FIT_ARGS, "--out", tmp_path / "m"])
    assert res.exit_code != 0 and "Cannot read" in _error_line(res)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------ predict
def test_predict_writes_cells_labels_and_summary(files, fitted, predicted):
    pred = ad.read_h5ad(predicted["h5ad"])
    assert list(pred.var_names) == files["genes"]
    assert KEY in pred.obs.columns and "perturbation" not in pred.obs.columns
    labels = pred.obs[KEY].astype(str)
    assert list(dict.fromkeys(labels)) == CANONICAL
    assert all((labels == lab).sum() == N_CELLS for lab in CANONICAL)
    assert pred.n_obs == N_CELLS * len(CANONICAL)
    X = np.asarray(pred.X)
    assert np.isfinite(X).all()
    meta = pred.uns["perturbax"]
    assert [str(x) for x in meta["labels"]] == CANONICAL
    assert meta["num_samples"] == 8 and meta["source"] == "control" and meta["interval"] == pytest.approx(0.8)
    assert set(pred.obs["draw"]) <= set(range(8))
    assert f"Wrote {predicted['h5ad']}" in predicted["output"]

    table = pd.read_csv(predicted["csv"])
    assert list(table.columns) == ["perturbation", "gene", "mean", "lower", "upper"]
    assert len(table) == len(CANONICAL) * len(files["genes"])
    assert list(table["perturbation"].unique()) == CANONICAL
    outside = table[(table["lower"] > table["mean"]) | (table["mean"] > table["upper"])]
    # (a float32 mean of identical draws, e.g. of the control, can land one ulp outside its bounds)
    assert outside.empty, f"posterior mean outside [lower, upper]:\n{outside.to_string()}"
    assert (table["lower"] < table["upper"]).any()
    for j, lab in enumerate(CANONICAL):
        rows = table[table["perturbation"] == lab]
        assert list(rows["gene"]) == files["genes"]
        np.testing.assert_allclose(rows["mean"], pred.varm["pred_mean"][:, j], rtol=1e-6)
        np.testing.assert_allclose(rows["upper"], pred.varm["pred_upper"][:, j], rtol=1e-6)
    # control needs no fitted shift: its predicted mean is close to the training control mean
    train = ad.read_h5ad(files["paths"]["data"])
    ctrl_mean = np.asarray(train.X[(train.obs[KEY] == "control").to_numpy()]).mean(0)
    other = np.abs(np.asarray(train.X).mean(0) - ctrl_mean).max()
    assert np.abs(pred.varm["pred_mean"][:, 2] - ctrl_mean).max() < max(other, 1.0)


def test_same_seed_same_fit_same_predictions_and_uns_round_trips(files, fitted, predicted, tmp_path):
    out = tmp_path / "model_b"
    res = _run(["fit", files["paths"]["data"], *FIT_ARGS, "--holdout", HOLDOUT, "--out", out])
    assert res.exit_code == 0, res.output
    labels = [s.strip() for s in REQUESTED.split(",")]
    mem, _ = predict_dir(out, labels, n_cells=N_CELLS, num_samples=8, seed=5, interval=0.8, allow_unseen=True)
    path = tmp_path / "pred_b.h5ad"
    mem.write_h5ad(path)
    back = ad.read_h5ad(path)

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [plain(x) for x in np.asarray(v, dtype=object).tolist()]
        return v.item() if isinstance(v, np.generic) else v

    assert plain(back.uns["perturbax"]) == plain(mem.uns["perturbax"])
    np.testing.assert_array_equal(back.uns["mean_draws"], mem.uns["mean_draws"])

    a = ad.read_h5ad(predicted["h5ad"])  # the CLI's prediction from the first fit
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(back.X))
    for key in ("pred_mean", "pred_lower", "pred_upper"):
        np.testing.assert_array_equal(a.varm[key], back.varm[key])
    assert list(a.obs[KEY].astype(str)) == list(back.obs[KEY].astype(str))
    pd.testing.assert_frame_equal(pd.read_csv(predicted["csv"]), prediction_summary_table(back).astype(
        {"mean": np.float64, "lower": np.float64, "upper": np.float64}), check_exact=False, rtol=1e-6)


def test_predict_unseen_needs_allow_unseen(files, fitted, tmp_path):
    out = tmp_path / "p.h5ad"
    res = _run(["predict", fitted["dir"], "-p", "P0+P2", "--out", out])
    assert res.exit_code != 0
    line = _error_line(res)
    assert "P2" in line and "never seen" in line and "--allow-unseen" in line
    assert not out.exists()


def test_predict_unknown_name_lists_close_matches(fitted, tmp_path):
    res = _run(["predict", fitted["dir"], "-p", "P0,P0+P11", "--out", tmp_path / "p.h5ad"])
    assert res.exit_code != 0
    line = _error_line(res)
    assert "'P11'" in line and "did you mean ['P1']" in line
    assert not (tmp_path / "p.h5ad").exists()


def test_predict_rejects_bad_model_dirs(fitted, tmp_path):
    out = tmp_path / "p.h5ad"
    broken = tmp_path / "broken"
    shutil.copytree(fitted["dir"], broken)
    (broken / "meta.json").write_text('{"format": "perturbax.fit", "format_vers')
    res = _run(["predict", broken, "-p", "P0", "--out", out])
    assert res.exit_code != 0
    assert "corrupted" in _error_line(res) and "meta.json" in _error_line(res)

    meta = json.loads((fitted["dir"] / "meta.json").read_text())
    del meta["model_name"]
    (broken / "meta.json").write_text(json.dumps(meta))
    res = _run(["predict", broken, "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "'model_name'" in _error_line(res)

    (broken / "meta.json").write_text("[1, 2]")
    res = _run(["predict", broken, "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "malformed" in _error_line(res)

    shutil.copy(fitted["dir"] / "meta.json", broken / "meta.json")
    (broken / "params.npz").write_bytes(b"not a zip")
    res = _run(["predict", broken, "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "corrupted" in _error_line(res)

    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(["predict", empty, "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "not a saved perturbax fit" in _error_line(res)

    res = _run(["predict", tmp_path / "nowhere", "-p", "P0", "--out", out])
    assert res.exit_code != 0 and "does not exist" in res.output
    assert not out.exists()


def test_predict_output_folder_must_exist(fitted, tmp_path):
    res = _run(["predict", fitted["dir"], "-p", "P0", "--out", tmp_path / "no" / "p.h5ad"])
    assert res.exit_code != 0 and "does not exist" in _error_line(res)
    res = _run(["predict", fitted["dir"], "-p", "P0", "--out", tmp_path / "p.h5ad",
                "--summary", tmp_path / "no" / "s.csv"])
    assert res.exit_code != 0 and "--summary" in _error_line(res)
    assert not (tmp_path / "p.h5ad").exists()
    res = _run(["predict", fitted["dir"], "-p", "P0,,P1", "--out", tmp_path / "p.h5ad"])
    assert res.exit_code != 0 and "empty item" in res.output


# ------------------------------------------------------------------------------------ helpers
def test_cli_message_rewrites_keywords_as_flags():
    assert cli_message(ValueError("Pass layer='counts' (or another)")) == "Pass --layer counts (or another)"
    assert cli_message(ValueError("Pass sep='|' (CLI: --sep) if")) == "Pass --sep '|' if"
    assert cli_message(ValueError("batch_size=5000 is too large")) == "--batch-size 5000 is too large"
    assert cli_message(ValueError("Pass allow_unseen=True to")) == "Pass --allow-unseen to"
    assert cli_message(KeyError("Unknown 'x'")) == "Unknown 'x'"
    assert cli_message(ValueError("no keywords here; a=b")) == "no keywords here; a=b"


def test_prediction_summary_table_layout():
    pred = ad.AnnData(np.zeros((1, 3), np.float32))
    pred.var_names = ["a", "b", "c"]
    pred.uns["perturbax"] = {"labels": ["X", "Y"]}
    pred.varm["pred_mean"] = np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
    pred.varm["pred_lower"] = pred.varm["pred_mean"] - 1
    pred.varm["pred_upper"] = pred.varm["pred_mean"] + 1
    t = prediction_summary_table(pred)
    assert list(t["perturbation"]) == ["X"] * 3 + ["Y"] * 3
    assert list(t["gene"]) == ["a", "b", "c"] * 2
    assert list(t["mean"]) == [1, 2, 3, 4, 5, 6]
    assert list(t["lower"]) == [0, 1, 2, 3, 4, 5]
    pred.varm["pred_upper"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="pred_upper"):
        prediction_summary_table(pred)


def test_where_selects_cells_for_fit_and_source_cells(files, tmp_path):
    """Issue 20: --where KEY=VALUE keeps only some cells of the h5ad in fit and predict --source-cells."""
    adata = ad.read_h5ad(files["paths"]["data"])
    adata.obs["site"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    path = tmp_path / "sites.h5ad"
    adata.write_h5ad(path)
    n_b = int((adata.obs["site"] == "b").sum())
    res = _run(["fit", path, *FIT_ARGS, "--steps", "3", "--no-select", "--where", "site=b", "--out", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    assert f"on {n_b} cells" in res.output
    assert FitResult.load(tmp_path / "m").info["cli"]["where"] == ["site=b"]
    src = adata[adata.obs[KEY] == "P0"].copy()
    n_src = int((src.obs["site"] == "a").sum())
    src.write_h5ad(tmp_path / "src.h5ad")
    res = _run(["predict", tmp_path / "m", "-p", "P1", "--num-samples", "2", "--source-cells", tmp_path / "src.h5ad",
                "--where", "site=a", "--out", tmp_path / "p.h5ad"])
    assert res.exit_code == 0, res.output
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.uns["perturbax"]["source_cells"] == n_src and pred.n_obs == n_src
    res = _run(["fit", path, *FIT_ARGS, "--steps", "3", "--no-select", "--where", "site=c", "--out", tmp_path / "m2"])
    assert res.exit_code != 0
    assert "--where site=c: no cell has obs['site'] == 'c'; values present: 'a', 'b'" in _error_line(res)
    res = _run(["predict", tmp_path / "m", "-p", "P1", "--where", "site=a", "--out", tmp_path / "q.h5ad"])
    assert res.exit_code != 0 and "pass --source-cells too" in _error_line(res)


def test_fit_and_predict_report_the_nested_estimator(fitted, predicted):
    """`perturbax fit` with default flags selects the nested estimator on training conditions
    and says what it chose; `perturbax predict` says what its intervals cover."""
    fit = FitResult.load(fitted["dir"])
    sel = fit.info["selection"]
    assert f"Nested estimator: lambda={sel['lambda']:g}, cells={sel['cells']}" in fitted["output"]
    assert fit.nested and set(fit.nested) >= {"ridge_effects", "model_effects", "scores"}
    assert f"Nested estimator: lambda={sel['lambda']:g}, cells={sel['cells']}; intervals:" in predicted["output"]
