"""``perturbax evaluate`` through click's CliRunner."""

import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from perturbax.baselines import AdditiveBaseline
from perturbax.cli import main
from perturbax.data.io import predictions_to_anndata
from perturbax.data.simulate import simulate_additive_shift
from perturbax.data.splits import split_from_column
from perturbax.metrics import evaluate_conditions

KEY = "perturbation"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    adata, _ = simulate_additive_shift(seed=2, n_cells=30, n_genes=12, decoder_hidden=8)
    split = split_from_column(adata, KEY, "control")
    model = AdditiveBaseline(unmeasured="zero").fit(split.train)
    labels = [lab for lab in split.test_labels if "+" in lab and ":" not in lab][:3]
    pred = model.predict(labels)
    test_cells = split.test.cells_by_condition()
    ctrl = split.train.dense(split.train.cells_of("control"))
    genes = split.train.gene_names
    # reversed component order in the predictions file: matched canonically
    flipped = {"+".join(reversed(lab.split("+"))): x for lab, x in pred.items()}
    paths = {
        "pred": tmp / "pred.h5ad",
        "truth": tmp / "truth.h5ad",
        "perfect": tmp / "perfect.h5ad",
        "train": tmp / "train.h5ad",
        "truth_noctrl": tmp / "truth_noctrl.h5ad",
    }
    predictions_to_anndata(flipped, gene_names=genes).write_h5ad(paths["pred"])
    truth = {"control": ctrl, **{lab: test_cells[lab] for lab in labels}}
    predictions_to_anndata(truth, gene_names=genes).write_h5ad(paths["truth"])
    predictions_to_anndata({lab: test_cells[lab] for lab in labels}, gene_names=genes).write_h5ad(
        paths["truth_noctrl"])
    # columns in another order in the perfect predictions: genes are matched by name
    order = np.arange(len(genes))[::-1]
    predictions_to_anndata({lab: test_cells[lab][:, order] for lab in labels},
                           gene_names=[genes[i] for i in order]).write_h5ad(paths["perfect"])
    split.train.to_anndata().write_h5ad(paths["train"])
    return {"paths": paths, "labels": labels, "pred": pred, "truth": truth, "ctrl": ctrl,
            "train": split.train.dense()}


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_help_lists_commands():
    res = _run(["--help"])
    assert res.exit_code == 0
    assert "evaluate" in res.output and "demo" in res.output


def test_evaluate_matches_the_api(files, tmp_path):
    p = files["paths"]
    out = tmp_path / "table.csv"
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "--perturbation-key", KEY, "--control",
                "control", "--reference", str(p["train"]), "--n-pcs", "5", "--top-k", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "MEAN" in res.output and "MEDIAN" in res.output
    table = pd.read_csv(out)
    assert list(table["condition"]) == files["labels"]
    assert (table["method"] == "pred").all()
    truth = {lab: files["truth"][lab] for lab in files["labels"]}
    expected = evaluate_conditions(files["pred"], truth, files["ctrl"], reference=files["train"],
                                   n_pcs=5, top_k=4, method="pred")
    cols = ["energy_pca", "mmd_pca", "mean_l2", "pearson_delta", "pearson_delta_top4", "r2_top4", "mse_top4"]
    np.testing.assert_allclose(table[cols].to_numpy(), expected[cols].to_numpy(), rtol=1e-5, atol=1e-7)
    for lab in files["labels"]:
        assert lab in res.output


def test_evaluate_perfect_prediction(files):
    p = files["paths"]
    res = _run(["evaluate", str(p["perfect"]), str(p["truth"]), "-k", KEY, "--control", "control",
                "--energy-form", "V", "--method", "oracle", "--top-k", "5"])
    assert res.exit_code == 0, res.output
    lines = [ln.split() for ln in res.output.splitlines() if ln.startswith("oracle")]
    assert len(lines) == 3
    header = next(ln for ln in res.stdout.splitlines() if ln.startswith("method")).split()
    for row in lines:
        vals = dict(zip(header, row))
        assert float(vals["energy_pca"]) == pytest.approx(0.0, abs=1e-8)
        assert float(vals["mean_l2"]) == pytest.approx(0.0, abs=1e-8)
        assert float(vals["r2_top5"]) == pytest.approx(1.0)
        assert float(vals["pearson_delta"]) == pytest.approx(1.0)


def test_evaluate_control_from_reference(files):
    p = files["paths"]
    res = _run(["evaluate", str(p["pred"]), str(p["truth_noctrl"]), "-k", KEY, "--control", "control",
                "--reference", str(p["train"]), "--n-pcs", "5"])
    assert res.exit_code == 0, res.output
    assert "using the 'control' cells of the reference" in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth_noctrl"]), "-k", KEY, "--control", "control"])
    assert res.exit_code == 1
    assert "No control cells ('control' in obs['perturbation']) in TRUTH" in res.output
    assert "--reference" in res.output


def test_evaluate_errors_name_the_problem(files):
    p = files["paths"]
    res = _run(["evaluate", str(p["truth"]), str(p["pred"]), "-k", KEY, "--control", "control"])
    # the "truth" here has no control and the predictions name conditions it lacks
    assert res.exit_code == 1 and "Error:" in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["train"]), "-k", KEY, "--control", "control"])
    assert res.exit_code == 1
    assert "predicted condition(s) are not measured in TRUTH" in res.output
    assert files["labels"][0] in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", "perturbaton", "--control", "control"])
    assert res.exit_code == 1 and "Did you mean 'perturbation'" in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", KEY])
    assert res.exit_code == 2 and "--control" in res.output


def test_evaluate_default_pca_space_is_the_control_cells(files, tmp_path):
    """Issue 16 item 9: without --reference the PCA is fit on TRUTH's control cells only."""
    p = files["paths"]
    out = tmp_path / "table.csv"
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "--perturbation-key", KEY, "--control", "control", "--n-pcs", "4",
                "--top-k", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    truth = {lab: files["truth"][lab] for lab in files["labels"]}
    on_control = evaluate_conditions(files["pred"], truth, files["ctrl"], reference=files["ctrl"], n_pcs=4, top_k=4)
    with_test = evaluate_conditions(files["pred"], truth, files["ctrl"], n_pcs=4, top_k=4,
                                    reference=np.vstack([files["ctrl"], *truth.values()]))
    np.testing.assert_allclose(table["energy_pca"], on_control["energy_pca"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(table["energy_pca"], with_test["energy_pca"], rtol=1e-3)


def test_evaluate_baselines_next_to_the_prediction(files, tmp_path):
    """Issue 20: --baselines scores baselines fitted on --reference on the same conditions, in one table."""
    p = files["paths"]
    out = tmp_path / "t.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", KEY, "-c", "control", "--reference",
                    str(p["train"]), "--baselines", "additive,control", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # quiet: the undefined Pearson delta of the control baseline is a note, not a RuntimeWarning
    assert not [w for w in caught if issubclass(w.category, (RuntimeWarning, FutureWarning, DeprecationWarning))
                and "anndata" not in w.filename], [str(w.message) for w in caught]
    assert "pearson_delta is undefined (nan) for the control baseline" in res.output
    table = pd.read_csv(out)
    assert table["method"].tolist() == ["pred"] * 3 + ["additive"] * 3 + ["control"] * 3
    # PRED holds the additive baseline's own predictions (fitted with unmeasured="zero" on the same
    # training cells): its gene-level scores match the additive rows
    pred_rows, add_rows = table[table.method == "pred"], table[table.method == "additive"]
    np.testing.assert_allclose(pred_rows["mean_l2"].to_numpy(), add_rows["mean_l2"].to_numpy(), rtol=1e-5)
    ctrl_rows = table[table.method == "control"]
    assert (ctrl_rows["mean_l2"].to_numpy() > add_rows["mean_l2"].to_numpy()).all()
    assert "Mean over conditions, per method:" in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", KEY, "-c", "control", "--baselines", "additive"])
    assert res.exit_code != 0 and "pass --reference TRAIN.h5ad" in res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", KEY, "-c", "control", "--reference", str(p["train"]),
                "--baselines", "additve"])
    assert res.exit_code != 0 and "--baselines additve: unknown baseline; choose from control, pooled_mean, additive, linear" in res.output


def test_evaluate_where_selects_truth_cells(files, tmp_path):
    import anndata as ad

    p = files["paths"]
    one = ad.read_h5ad(p["truth"])
    two = one.copy()
    two.X = two.X + 5.0
    one.obs["part"], two.obs["part"] = "one", "two"
    two.obs_names = [f"{n}_2" for n in two.obs_names]
    ad.concat([one, two]).write_h5ad(tmp_path / "both.h5ad")
    args = ["-k", KEY, "-c", "control", "--out"]
    res = _run(["evaluate", str(p["pred"]), str(tmp_path / "both.h5ad"), *args, str(tmp_path / "w.csv"),
                "--where", "part=one"])
    assert res.exit_code == 0, res.output
    res = _run(["evaluate", str(p["pred"]), str(p["truth"]), *args, str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    got, want = pd.read_csv(tmp_path / "w.csv"), pd.read_csv(tmp_path / "o.csv")
    np.testing.assert_allclose(got["energy_pca"], want["energy_pca"], rtol=1e-6)
    res = _run(["evaluate", str(p["pred"]), str(tmp_path / "both.h5ad"), *args, str(tmp_path / "b.csv")])
    assert not np.allclose(pd.read_csv(tmp_path / "b.csv")["energy_pca"], want["energy_pca"], rtol=1e-3)


def test_evaluate_baselines_never_train_on_the_evaluated_conditions(files, tmp_path):
    """A --reference holding the evaluated conditions too (e.g. the whole file): the baselines are
    fitted without them, so their scores equal those fitted on the true training cells."""
    import anndata as ad

    p = files["paths"]
    train, truth = ad.read_h5ad(p["train"]), ad.read_h5ad(p["truth"])
    truth = truth[truth.obs[KEY].astype(str) != "control"].copy()
    truth.obs_names = [f"t{i}" for i in range(truth.n_obs)]
    ad.concat([train, truth]).write_h5ad(tmp_path / "all.h5ad")
    tables = []
    for ref in (p["train"], tmp_path / "all.h5ad"):
        out = tmp_path / f"{ref.stem}.csv"
        res = _run(["evaluate", str(p["pred"]), str(p["truth"]), "-k", KEY, "-c", "control", "--reference", str(ref),
                    "--baselines", "linear", "--out", str(out)])
        assert res.exit_code == 0, res.output
        tables.append(pd.read_csv(out).query("method == 'linear'"))
    np.testing.assert_allclose(tables[1]["mean_l2"], tables[0]["mean_l2"], rtol=1e-5)
    assert "3 evaluated condition(s) are in --reference; the baselines are fitted without them" in res.output
