"""benchmarks/oracle_ceiling.py: the oracle decoder's least squares and the counts its sections report."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import oracle_ceiling as oc  # noqa: E402


def test_fit_decoder_learns_a_smooth_map_and_predicts_inside_its_support():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 2))
    A = rng.normal(size=(2, 3))
    x = np.tanh(z @ A) + 0.5 * z[:, :1]
    g, mse = oc.fit_decoder(z, x, hidden=(32, 32), seed=0, steps=1500)
    assert mse < 5e-3
    z_new = rng.normal(scale=0.8, size=(100, 2))
    truth = np.tanh(z_new @ A) + 0.5 * z_new[:, :1]
    assert np.mean((g(z_new) - truth) ** 2) < 2e-2
    # the residuals are resampled with their gene correlations: cells = g(z) + rows of the residuals
    res = np.arange(6.0).reshape(2, 3)
    cells = oc.oracle_cells(lambda zz: np.zeros((zz.shape[0], 3)), res, z_new[:5], np.random.default_rng(1))
    assert all(any(np.array_equal(c, r) for r in res) for c in cells)


def _table(seeds, draws, oracle_ratio, true_ratio):
    rows = []
    for s in seeds:
        rows.append({"seed": s, "method": "additive", "draw": 0, "condition": "a", "group": "double",
                     "energy_pca": 1.0})
        for d in range(draws):
            rows.append({"seed": s, "method": "oracle_decoder", "draw": d, "condition": "a", "group": "double",
                         "energy_pca": oracle_ratio[s][d]})
            rows.append({"seed": s, "method": "true_population", "draw": d, "condition": "a", "group": "double",
                         "energy_pca": true_ratio})
    t = pd.DataFrame(rows)
    t["train_mse"], t["n_pred"] = 0.01, 200
    return t


def test_seeds_meeting_counts_seeds_at_or_below_one_eighth_per_draw():
    t = _table([0, 1, 2], 2, {0: [0.1, 0.2], 1: [0.125, 0.1], 2: [0.5, 0.01]}, 0.0)
    counts = oc.seeds_meeting(t)
    assert counts["oracle_decoder"].tolist() == [2, 2]  # draw 0: seeds 0, 1; draw 1: seeds 1, 2
    assert counts["true_population"].tolist() == [3, 3]
    text = oc.section_pdae(t, None, {"command": "cmd", "minutes": 1.0, "date": "today"})
    assert "oracle decoder on 2 of 3 seeds" in text
    assert "on 2.0 seeds on average (2-2)" in text and "true population on 3.0 (3-3)" in text


def test_dynamics_section_tallies_each_target_for_the_oracle_and_the_model():
    pairs = [{"pair": "P0 @ t=1", "group": "held-out pair", "ratio_expected": 1.5, "ed_u": 0.0},
             {"pair": "P0+P1 @ t=1", "group": "unseen double", "ratio_expected": 2.5, "ed_u": 0.0},
             {"pair": "P0 @ t=6", "group": "2x last", "ratio_expected": 2.9, "ed_u": 0.0}]
    model = {"runs": [{"seed": 0, "pairs": [
        {"pair": "P0 @ t=1", "group": "held-out pair", "dynamics": {"ratio_expected": 2.1}},
        {"pair": "P0+P1 @ t=1", "group": "unseen double", "dynamics": {"ratio_expected": 1.9}},
        {"pair": "P0 @ t=6", "group": "t = 6 (2x last)", "dynamics": {"ratio_expected": 3.1}}]}]}
    text = oc.section_dynamics([{"seed": 0, "multi": False, "train_mse": 0.01, "pairs": pairs}], model,
                               {"command": "cmd", "minutes": 1.0, "date": "today"})
    row = next(ln for ln in text.splitlines() if ln.startswith("| all"))
    assert row == "| all |  | oracle 1/1, model 0/1 | oracle 0/1, model 1/1 | oracle 1/1, model 0/1 |"
