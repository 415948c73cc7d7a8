"""``perturbax check-design`` through click's CliRunner on the command object."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from perturbax.cli.check_design import check_design


@pytest.fixture()
def design_csv(tmp_path):
    path = tmp_path / "design.csv"
    pd.DataFrame(
        {"A": [0, 1, 0, 1, 0.5], "B": [0, 0, 1, 1, 0], "C": [0, 0, 0, 0, 0]},
    ).to_csv(path, index=False)
    return path


@pytest.fixture()
def small_h5ad(tmp_path):
    labels = ["ctrl"] * 4 + ["KLF1"] * 3 + ["MAPK1"] * 3 + ["KLF1+MAPK1"] * 2 + ["TGFBR2+KLF1"] * 2
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=np.random.default_rng(0).poisson(2.0, (len(labels), 5)).astype(np.float32), obs=obs)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def _run(args):
    return CliRunner().invoke(check_design, [str(a) for a in args])


def test_csv_design_json(design_csv, tmp_path):
    out = tmp_path / "report.json"
    res = _run(["--design", design_csv, "--perturbations", "A+B,A:0.5+C:2", "--perturbations", "B:3", "--json", out])
    assert res.exit_code == 0, res.output
    assert "Design check: FAIL" in res.output and f"JSON report written to {out}" in res.output
    rep = json.loads(out.read_text())
    assert rep["schema"] == "perturbax.check_design/1"
    assert rep["rank"] == 2 and rep["identified_elementary"] == ["A", "B"]
    assert rep["unidentified_elementary"] == ["C"]
    assert rep["n_rows"] == 5 and rep["n_distinct_rows"] == 5
    tests = {t["label"]: t for t in rep["tests"]}
    assert list(tests) == ["A+B", "A:0.5+C:2", "B:3"]
    ab, ac, b3 = tests.values()
    assert ab["covered"] is True and ab["in_convex_hull"] is True
    # the training label "A+B" is itself measured; the representation uses the distinct training labels
    assert set(ab["coefficients"]) <= {"A", "B", "A+B", "A:0.5"}
    lhs = ab["coefficients"].get("A", 0) + ab["coefficients"].get("A+B", 0) + 0.5 * ab["coefficients"].get("A:0.5", 0)
    assert lhs == pytest.approx(1.0)
    assert ac["covered"] is False and ac["coefficients"] is None
    assert ac["missing_direction"] == {"C": 1.0} and ac["suggested_additions"] == ["C"]
    assert ac["relative_residual"] == pytest.approx(2 / np.sqrt(4.25))
    assert b3["covered"] is True and b3["in_convex_hull"] is False


def test_json_to_stdout_and_latent_dim(design_csv):
    res = _run(["--design", design_csv, "-p", "A", "--json", "-", "--latent-dim", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["latent_dim"] == 3 and rep["latent_dim_ok"] is False and rep["status"] == "fail"
    # minimum-norm over the dependent rows A, B, A+B, A:0.5: c = D (D^T D)^{-1} e_A = (4, -2, 2, 2) / 7
    assert rep["tests"][0]["coefficients"] == pytest.approx({"A": 4 / 7, "B": -2 / 7, "A+B": 2 / 7, "A:0.5": 2 / 7})


def test_h5ad_design(small_h5ad, tmp_path):
    out = tmp_path / "r.json"
    res = _run([small_h5ad, "--perturbation-key", "perturbation", "--control", "ctrl",
                "--perturbations", "KLF1:2+MAPK1,TGFBR2,TGFBR2+MAPK1", "--json", out])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["elementary"] == ["KLF1", "MAPK1", "TGFBR2"]
    assert rep["control_present"] is True and rep["n_distinct_rows"] == 5
    assert rep["rank"] == 3 and rep["identified_elementary"] == ["KLF1", "MAPK1", "TGFBR2"]
    assert all(t["covered"] for t in rep["tests"])
    # TGFBR2 = (KLF1+TGFBR2) - KLF1, but KLF1, MAPK1, KLF1+MAPK1 are dependent: the minimum-norm
    # solution of c1 + c3 = -1, c2 + c3 = 0 (c4 = 1) is c3 = -1/3
    assert rep["tests"][1]["coefficients"] == pytest.approx(
        {"KLF1": -2 / 3, "MAPK1": 1 / 3, "KLF1+MAPK1": -1 / 3, "KLF1+TGFBR2": 1.0}
    )


def test_unmeasured_names_get_a_verdict(design_csv, small_h5ad):
    """Issue 20: a name the design never measured is answered (not identifiable: measure it), not
    a usage error -- from a design CSV and from an h5ad."""
    res = _run(["--design", design_csv, "--perturbations", "A+X,Y,A+B", "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    tests = {t["label"]: t for t in rep["tests"]}
    assert tests["A+X"]["verdict"] == "not identified" and tests["A+X"]["unmeasured"] == ["X"]
    assert tests["Y"]["unmeasured"] == ["Y"] and tests["A+B"]["verdict"] == "identified"
    assert rep["unmeasured"] == ["X", "Y"] and rep["elementary"][:3] == ["A", "B", "C"]
    res = _run([small_h5ad, "-k", "perturbation", "-c", "ctrl", "-p", "KLF1+GATA1,KLF2"])
    assert res.exit_code == 0, res.output
    assert "0 of 2 test perturbations are identified; 2 are not: KLF1+GATA1, KLF2." in res.output
    assert "GATA1 was never measured" in res.output and "measure it alone" in res.output
    # the hint names only a measured perturbation (one that a test could use)
    assert "KLF2 (did you mean KLF1?) was never measured" in res.output


def test_bad_usage(design_csv, small_h5ad, tmp_path):
    neither = _run(["--perturbations", "A"])
    assert neither.exit_code == 2 and "Give exactly one design" in neither.output
    both = _run([small_h5ad, "--design", design_csv, "--perturbation-key", "perturbation", "--control", "ctrl"])
    assert both.exit_code == 2 and "Give exactly one design" in both.output
    missing = _run(["--design", tmp_path / "nope.csv"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    no_key = _run([small_h5ad])
    assert no_key.exit_code == 2 and "--perturbation-key and --control" in no_key.output
    wrong_key = _run([small_h5ad, "--perturbation-key", "pert", "--control", "ctrl"])
    assert wrong_key.exit_code == 1 and "Did you mean 'perturbation'" in wrong_key.output


def test_bad_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("A,B\n0,0\n1,x\n")
    res = _run(["--design", path])
    assert res.exit_code == 1 and "not numeric" in res.output
    path.write_text("A,B\n0,0\n1,\n")
    res = _run(["--design", path])
    assert res.exit_code == 1 and "missing or non-finite dose in row 2" in res.output


def test_csv_with_label_column(tmp_path):
    path = tmp_path / "labelled.csv"
    pd.DataFrame({"label": ["ctrl", "A", "B"], "A": [0, 1, 0], "B": [0, 0, 1]}).to_csv(path, index=False)
    res = _run(["--design", path, "--control", "ctrl", "--perturbations", "A+B,ctrl", "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["reference"] == "ctrl" and [t["covered"] for t in rep["tests"]] == [True, True]


def test_tiny_dose_is_reported_ill_conditioned(tmp_path):
    # issue 16 item 8: A measured only at dose 1e-6 covers A, through a coefficient of 1e6
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"A": [0, 1e-6, 0], "B": [0, 0, 1]}).to_csv(path, index=False)
    res = _run(["--design", path, "--perturbations", "A,B"])
    assert res.exit_code == 0, res.output
    assert "Design check: WARNING" in res.output and "ILL-CONDITIONED" in res.output
    rep = json.loads(_run(["--design", path, "--perturbations", "A,B", "--json", "-"]).output)
    a, b = rep["tests"]
    assert a["ill_conditioned"] is True and a["coefficient_norm"] == pytest.approx(1e6, rel=1e-6)
    assert b["ill_conditioned"] is False and b["coefficient_norm"] == pytest.approx(1.0)
    assert rep["n_ill_conditioned"] == 1


def test_where_selects_rows(small_h5ad, tmp_path):
    """Issue 20: --where KEY=VALUE keeps only some cells of DATA (here: drops the TGFBR2+KLF1 cells)."""
    adata = ad.read_h5ad(small_h5ad)
    adata.obs["batch"] = ["a"] * 12 + ["b"] * 2
    path = tmp_path / "batches.h5ad"
    adata.write_h5ad(path)
    res = _run([path, "-k", "perturbation", "-c", "ctrl", "-p", "TGFBR2", "--where", "batch=a", "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["n_rows"] == 4 and rep["tests"][0]["unmeasured"] == ["TGFBR2"]
    res = _run([path, "-k", "perturbation", "-c", "ctrl", "-p", "TGFBR2"])
    assert "1 of 1 test perturbation is identified" in res.output
    assert "TGFBR2  = (KLF1+TGFBR2) - KLF1" in res.output
    bad = _run([path, "-k", "perturbation", "-c", "ctrl", "--where", "batch=c"])
    assert bad.exit_code == 1 and "--where batch=c: no cell has obs['batch'] == 'c'; values present: 'a', 'b'" in bad.output


def test_norman_design_in_the_users_terms():
    """Issue 20 on the real Norman design (skipped where the shared file is absent)."""
    from perturbax.data.datasets import NORMAN19_FILE, find_data_file

    try:
        path = find_data_file(NORMAN19_FILE)
    except FileNotFoundError:
        pytest.skip("the Norman 2019 development file is not available")
    res = _run([path, "-k", "condition", "-c", "control", "--where", "dataset=norman19",
                "-p", "KLF1+SGK1,MAP2K3+MAPK1,GATA1", "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    ks, mm, gata = rep["tests"]
    assert ks["equation"] == "KLF1 + SGK1" and mm["equation"] == "MAP2K3 + MAPK1"
    assert len(ks["coefficients"]) > 2  # the minimum-norm weights spread over dependent conditions
    assert gata["verdict"] == "not identified" and gata["unmeasured"] == ["GATA1"]
    assert rep["message"].startswith("2 of 3 test perturbations are identified; 1 is not: GATA1.")
    assert rep["rank"] == 28 and rep["design_additions"] == ["BPGM", "CEBPE", "FOXL2"]
