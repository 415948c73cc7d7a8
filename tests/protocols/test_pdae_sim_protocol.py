"""The pdae-sim protocol scores a user-written model variant exactly like the built-in model."""

import numpy as np

from perturbax.data import prediction_intervals
from perturbax.models import additive_shift_model
from perturbax.protocols import run_pdae_sim

TINY = dict(simulation={"n_cells": 40}, num_samples=5, population_cells=1000, progress=False)


def test_run_pdae_sim_fits_a_user_model_on_the_same_protocol():
    calls = []

    def my_variant(batch, *, config, n_cells):
        calls.append(config.latent_dim)
        additive_shift_model(batch, config=config, n_cells=n_cells)

    res = run_pdae_sim(seed=0, model=my_variant, objectives=("energy",), steps=30, **TINY)
    assert calls and set(calls) == {5}  # traced with the protocol's config (latent dim 5)
    assert res.settings["model"] == "my_variant"
    model = res.table[res.table.method == "model_energy"]
    baseline = res.table[res.table.method == "additive"]
    # scored on the same in-span held-out conditions as the baselines; the out-of-span one refused
    assert set(model.condition) == set(baseline.condition) and len(model) >= 5
    assert res.refused and not set(res.refused) & set(model.condition)
    assert model.coverage.between(0, 1).all() and np.isfinite(model.energy_pca).all()
    assert model.coverage_observed.between(0, 1).all() and baseline.coverage_observed.isna().all()
    # the observed means of the held-out cells: what the calibrated intervals aim at
    obs = res.split.test.cells_by_condition()
    pred = res.predictions["model_energy"]
    for lab, got in zip(model.condition, model.coverage_observed):
        _, lo, hi = prediction_intervals(pred, lab)
        mean = np.asarray(obs[lab], dtype=np.float64).mean(0)
        assert got == np.mean((lo <= mean) & (mean <= hi))


def test_run_pdae_sim_without_steps_fits_with_the_package_defaults(monkeypatch):
    """``steps=None`` hands fit no length and no early-stopping override (fit's own defaults); a number
    fits exactly that many steps with early stopping off."""
    import perturbax.protocols.pdae_sim as mod

    seen = []

    class Stop(Exception):
        pass

    def spy(model, data, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(mod, "fit", spy)
    for steps in (None, 30):
        try:
            run_pdae_sim(seed=0, objectives=("energy",), steps=steps, **TINY)
        except Stop:
            pass
    assert "steps" not in seen[0] and "patience" not in seen[0]
    assert seen[1]["steps"] == 30 and seen[1]["patience"] is None


def _fake_result(model_energy, coverage):
    """A PDAESimResult with a hand-made table (no fit): the report is generated from its numbers."""
    import pandas as pd

    from perturbax.protocols import PDAESimResult

    conds = ["A+B", "A:2", "B:0.5"]
    groups = ["double", "dose-outside-hull", "dose-in-hull"]
    rows = []
    for method, energies in (("model_energy", model_energy), ("additive", [0.2, 0.3, 0.1]),
                             ("control", [1.0, 2.0, 0.5]), ("noise_floor", [0.05, 0.02, -0.01])):
        for c, g, e in zip(conds, groups, energies):
            rows.append({"method": method, "condition": c, "group": g, "energy_pca": e, "pearson_delta": 0.9,
                         "sd_ratio": 1.0, "coverage": coverage if method == "model_energy" else np.nan,
                         "coverage_observed": coverage - 0.1 if method == "model_energy" else np.nan,
                         "interval_width": 0.1 if method == "model_energy" else np.nan})
    return PDAESimResult(
        table=pd.DataFrame(rows), fits={}, predictions={}, refused={"C": "never seen"}, population_means={},
        split=None, truth=None,
        settings={"seed": 1, "simulation": {"n_perturbations": 3, "latent_dim": 2, "n_genes": 7, "n_cells": 50},
                  "objectives": ["energy"], "likelihood": "gaussian", "steps": 10, "num_samples": 4,
                  "interval": 0.8, "n_pcs": 7},
    )


def test_report_reading_paragraph_is_generated_from_the_numbers(tmp_path):
    """Issue 20: the demo report explains its numbers in words; nothing in it is hard-coded."""
    from perturbax.protocols import reading_paragraph, write_pdae_sim_report

    good = reading_paragraph(_fake_result([0.01, 0.5, -0.02], 0.78))
    assert "For 2 of 3 its predicted cells are as close to the real ones as two halves" in good
    assert "closer to the real cells than the additive baseline on 2 of 3" in good
    assert "Its median energy distance is 0.01, against 0.02 for the noise floor, 0.2 for the additive" in good
    assert "80% credible intervals" in good and "78% of the genes" in good and "about right" in good
    assert "Against the observed mean of the held-out cells" in good and "they contained 68%." in good
    assert "(A:2: extrapolation) its median energy distance is 0.5, inside -0.005" in good
    assert "It refused C" in good and "model_energy's." in good
    bad = reading_paragraph(_fake_result([0.9, 0.8, 0.7], 0.4))
    assert "For 0 of 3" in bad and "additive's -- on these data the model does not improve on it" in bad
    assert "too narrow: the model is over-confident" in bad

    write_pdae_sim_report(_fake_result([0.01, 0.5, -0.02], 0.78), tmp_path, command="perturbax demo --x")
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for text in (md, html):
        assert "Glossary" in text and "noise_floor" in text and "dose-outside-hull" in text
        assert "Units" in text and "7-dimensional PCA space" in text and "For 2 of 3" in text
    assert "group double" in md and "group dose-in-hull" in md and "group out-of-span" in md
    assert "pooled_mean" not in md  # the glossary lists only what the run shows
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "<code>perturbax demo --x</code>" in html
