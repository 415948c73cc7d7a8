"""The context path from the command line: fit with a held-out (perturbation, context) pair,
check-design on it, predict it, evaluate it."""

import json
import sys
from pathlib import Path

import anndata as ad
import pytest
from click.testing import CliRunner

from perturbax.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import context_adata  # noqa: E402

PAIR = "A @ line=z"
FIT = ["-k", "perturbation", "-c", "control", "--context-keys", "line", "--steps", "20", "--latent-dim", "2",
       "--batch-size", "64", "--no-select", "--no-progress", "--seed", "1"]


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctxcli")
    data = tmp / "lines.h5ad"
    context_adata().write_h5ad(data)
    res = _run(["fit", data, *FIT, "--holdout", PAIR, "--out", tmp / "fit"])
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "data": data, "fit": tmp / "fit", "fit_output": res.output}


def test_fit_holds_out_the_pair_and_names_the_contexts(files):
    out = files["fit_output"]
    assert "Held out 1 condition(s): A @ line=z" in out
    assert "Contexts: line (3: x, y, z; reference x)" in out
    meta = json.loads((files["fit"] / "meta.json").read_text())
    assert meta["registry"]["contexts"] == [["line", ["x", "y", "z"]]]
    assert meta["info"]["cli"]["context_keys"] == ["line"] and meta["info"]["cli"]["holdout"] == [PAIR]
    assert PAIR not in meta["train_conditions"] and "control @ line=z" in meta["train_conditions"]


def test_check_design_on_the_held_out_pair(files):
    res = _run(["check-design", files["data"], "-k", "perturbation", "-c", "control", "--context-keys", "line",
                "--holdout", PAIR, "-p", PAIR, "--json", "-"])
    assert res.exit_code == 0, res.output
    test = json.loads(res.output)["tests"][0]
    assert test["label"] == PAIR and test["covered"] and test["context_transfer"] and not test["measured"]
    text = _run(["check-design", files["data"], "-k", "perturbation", "-c", "control", "--context-keys", "line",
                 "--holdout", PAIR, "-p", PAIR]).output
    assert "context transfer" in text and "interpolation" not in text


def test_predict_and_evaluate_the_pair(files):
    pred = files["tmp"] / "pred.h5ad"
    res = _run(["predict", files["fit"], "-p", PAIR, "--num-samples", "10", "-o", pred])
    assert res.exit_code == 0, res.output
    assert 'Contexts (obs columns "line"): A @ line=z' in res.output
    a = ad.read_h5ad(pred)
    assert a.n_obs == 45 and set(a.obs["line"].astype(str)) == {"z"} and set(a.obs["perturbation"]) == {"A"}
    assert list(a.uns["perturbax"]["labels"]) == [PAIR]
    csv = files["tmp"] / "eval.csv"
    res = _run(["evaluate", pred, files["data"], "-k", "perturbation", "-c", "control", "--context-keys", "line",
                "--reference", files["data"], "--baselines", "additive,linear", "--top-k", "5", "--n-pcs", "5",
                "--out", csv])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(csv)
    assert table["condition"].tolist() == [PAIR] * 3 and table["method"].tolist() == ["pred", "additive", "linear"]
    # deltas are taken from z's own control: the linear baseline transfers A's shift almost exactly
    assert table.loc[table["method"] == "linear", "pearson_delta"].item() > 0.95


@pytest.mark.parametrize("args, match", [
    (["--holdout", "A @ line=w"], "'w' is not a category of context 'line'"),
    (["--holdout", "A @ lin=z"], "Did you mean 'line'"),
    (["--context-keys", "lines"], r"no column \(context_keys\) 'lines'.*Did you mean 'line'"),
])
def test_fit_errors_are_one_line(files, args, match):
    import re

    base = [a for a in FIT if a not in ("--context-keys", "line")] if "--context-keys" in args else FIT
    res = _run(["fit", files["data"], *base, *args, "--out", files["tmp"] / "bad"])
    assert res.exit_code != 0 and re.search(match, _error_line(res)), res.output


def test_pair_without_context_keys_says_how(files):
    res = _run(["check-design", files["data"], "-k", "perturbation", "-c", "control", "-p", PAIR])
    assert res.exit_code != 0 and "--context-keys" in _error_line(res)
    res = _run(["predict", files["fit"], "-p", "A @ line=q", "-o", files["tmp"] / "p.h5ad"])
    assert res.exit_code != 0 and "'q' is not a category of context 'line'" in _error_line(res)
