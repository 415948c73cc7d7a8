"""``perturbax demo`` end to end (fast setting)."""

import pandas as pd
from click.testing import CliRunner

from perturbax.cli import main


def test_demo_fast_writes_report(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--fast", "--no-progress"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "evaluation.csv")
    assert set(table["method"]) == {"model_energy", "control", "additive", "linear", "noise_floor"}
    # every method is scored on the same in-span held-out conditions; out-of-span ones are refused
    assert table.groupby("method")["condition"].apply(frozenset).nunique() == 1
    assert "out-of-span" not in set(table["group"]) and "Refused" in res.output
    means = table.groupby("method")["energy_pca"].mean()
    assert means["model_energy"] < 0.5 * means["control"]
    assert means["additive"] < 0.5 * means["control"]
    assert abs(means["noise_floor"]) < 0.25 * means["control"]
    model = table[table["method"] == "model_energy"]
    assert model["coverage"].between(0, 1).all() and (model["interval_width"] > 0).all()
    report = (out / "report.md").read_text()
    assert "perturbax demo --seed 0 --steps 200 --objectives energy --fast" in report
    assert (out / "predicted_vs_true.png").stat().st_size > 10_000 and (out / "loss.png").exists()
    # issue 20: a reading paragraph from the numbers, a glossary, the plots inline, an HTML copy with them embedded
    wide = table.pivot(index="condition", columns="method", values="energy_pca")
    k, n = int((wide["model_energy"] <= wide["noise_floor"]).sum()), len(wide)
    sentence = f"For {k} of {n} its predicted cells are as close to the real ones as two halves of the real cells"
    assert sentence in report and sentence in res.output.replace("\n", " ")
    assert "## Glossary" in report and "## Units" in report and "![predicted_vs_true](predicted_vs_true.png)" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and sentence in html


def test_demo_rejects_unknown_objective(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--objectives", "mle"])
    assert res.exit_code != 0 and "unknown objective" in res.output
