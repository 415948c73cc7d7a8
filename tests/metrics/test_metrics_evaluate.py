"""PCA projector and the per-condition evaluation table."""

import numpy as np
import pandas as pd
import pytest

from perturbax.metrics import (
    PCAProjector,
    energy_distance,
    evaluate_conditions,
    mmd_rbf,
    pearson_delta,
    summarize,
    top_de_genes,
)


# ------------------------------------------------------------------------------ PCA
def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 3.0
    pca = PCAProjector.fit(x, n_components=3)
    evals, evecs = np.linalg.eigh(np.cov(x.T))
    top = evecs[:, ::-1][:, :3].T
    for k in range(3):
        assert abs(pca.components[k] @ top[k]) == pytest.approx(1.0, abs=1e-8)
        # sign convention: the largest-|.| loading is positive
        assert pca.components[k, np.argmax(np.abs(pca.components[k]))] > 0
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-12)
    z = pca.transform(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.var(0, ddof=1), evals[::-1][:3], rtol=1e-8)
    # deterministic: refitting gives identical components
    again = PCAProjector.fit(x, n_components=3)
    np.testing.assert_array_equal(again.components, pca.components)


def test_pca_clamps_with_warning_and_full_rank_is_isometric():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8))
    with pytest.warns(UserWarning, match="min\\(n_cells - 1, n_genes\\) = 4"):
        pca = PCAProjector.fit(x, n_components=50)
    assert pca.n_components == 4
    # all variance of x is kept: pairwise distances among fitted cells are preserved
    z = pca.transform(x)
    d_x = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_z = np.linalg.norm(z[:, None] - z[None], axis=-1)
    np.testing.assert_allclose(d_z, d_x, atol=1e-10)
    with pytest.raises(ValueError, match="7 genes but the PCA was fit on 8"):
        pca.transform(np.zeros((2, 7)))


# ------------------------------------------------------------------------------ evaluate
def _synthetic(g=40):
    """Control and two perturbations with sparse mean shifts; a fresh sampler per use."""
    base = np.linspace(1.0, 3.0, g)
    shifts = {"A": np.zeros(g), "A+B": np.zeros(g)}
    shifts["A"][:5] = [3.0, -2.0, 2.5, 1.5, -1.0]
    shifts["A+B"][3:12] = np.linspace(-2.0, 2.5, 9)

    def sample(cond, n, s):
        rng = np.random.default_rng(s)
        mu = base + (0.0 if cond == "ctrl" else shifts[cond])
        return mu + rng.normal(scale=0.7, size=(n, g))

    return sample


def test_perfect_prediction_beats_control_prediction_on_every_column():
    sample = _synthetic()
    control = sample("ctrl", 200, 1)
    truth = {"A": sample("A", 120, 2), "A+B": sample("A+B", 90, 3)}
    perfect = {"A": sample("A", 110, 12), "A+B": sample("A+B", 100, 13)}
    ctrl_pred = {"A": sample("ctrl", 110, 22), "A+B": sample("ctrl", 100, 23)}
    reference = np.vstack([control, sample("A", 100, 30)])
    good = evaluate_conditions(perfect, truth, control, reference=reference, n_pcs=10, top_k=5,
                               method="perfect")
    bad = evaluate_conditions(ctrl_pred, truth, control, reference=reference, n_pcs=10, top_k=5,
                              method="control")
    assert list(good.columns) == [
        "method", "condition", "n_pred", "n_true", "energy_pca", "mmd_pca", "mean_l2",
        "pearson_delta", "pearson_delta_top5", "r2_top5", "mse_top5",
    ]
    assert list(good["condition"]) == ["A", "A+B"]
    assert list(good["n_pred"]) == [110, 100] and list(good["n_true"]) == [120, 90]
    lower_is_better = ["energy_pca", "mmd_pca", "mean_l2", "mse_top5"]
    higher_is_better = ["pearson_delta", "pearson_delta_top5", "r2_top5"]
    for col in lower_is_better:
        assert np.all(good[col].to_numpy() < bad[col].to_numpy()), col
    for col in higher_is_better:
        assert np.all(good[col].to_numpy() > bad[col].to_numpy()), col
    # and in absolute terms: the perfect prediction is near the noise floor
    assert np.all(good["pearson_delta_top5"] > 0.9)
    assert np.all(good["r2_top5"] > 0.9)


def test_columns_agree_with_the_standalone_metrics():
    sample = _synthetic(g=12)
    control = sample("ctrl", 60, 1)
    truth = {"A": sample("A", 50, 2)}
    pred = {"A": sample("A", 40, 3), "unused": sample("ctrl", 5, 4)}
    df = evaluate_conditions(pred, truth, control, n_pcs=4, top_k=3, energy_form="V")
    assert "method" not in df.columns and len(df) == 1
    # default reference: the control cells only (issue 16 item 9: never the evaluated cells)
    pca = PCAProjector.fit(control, n_components=4)
    zp, zt = pca.transform(pred["A"]), pca.transform(truth["A"])
    row = df.iloc[0]
    assert row["energy_pca"] == pytest.approx(energy_distance(zp, zt, form="V"), rel=1e-10)
    assert row["mmd_pca"] == pytest.approx(mmd_rbf(zp, zt, form="V"), rel=1e-10)
    genes = top_de_genes(truth["A"], control, 3)
    np.testing.assert_array_equal(np.sort(genes), [0, 1, 2])  # the three largest |shifts|
    assert row["pearson_delta_top3"] == pytest.approx(
        pearson_delta(pred["A"], truth["A"], control, genes=genes))
    dm = pred["A"].mean(0)[genes] - truth["A"].mean(0)[genes]
    assert row["mse_top3"] == pytest.approx(np.mean(dm**2))
    assert row["mean_l2"] == pytest.approx(np.linalg.norm(pred["A"].mean(0) - truth["A"].mean(0)))


def test_default_pca_space_does_not_depend_on_the_evaluated_cells():
    """Issue 16 item 9: by default the PCA is fit on the control cells, so the distributional
    metrics of a condition do not change when other evaluated conditions are added."""
    sample = _synthetic(g=12)
    control = sample("ctrl", 60, 1)
    truth = {"A": sample("A", 50, 2)}
    pred = {"A": sample("A", 40, 3), "A+B": sample("A+B", 40, 4)}
    alone = evaluate_conditions(pred, truth, control, n_pcs=3, top_k=3)
    more = evaluate_conditions(pred, {**truth, "A+B": sample("A+B", 50, 5) * 5.0}, control, n_pcs=3, top_k=3)
    for col in ("energy_pca", "mmd_pca"):
        assert more[col].iloc[0] == pytest.approx(alone[col].iloc[0], rel=1e-12)
    explicit = evaluate_conditions(pred, truth, control, reference=control, n_pcs=3, top_k=3)
    assert alone["energy_pca"].iloc[0] == pytest.approx(explicit["energy_pca"].iloc[0], rel=1e-12)


def test_evaluate_errors():
    sample = _synthetic(g=12)
    control = sample("ctrl", 20, 1)
    truth = {"A": sample("A", 10, 2), "A+B": sample("A+B", 10, 3)}
    with pytest.raises(ValueError, match=r"lacks 1 condition.*\['A\+B'\]"):
        evaluate_conditions({"A": truth["A"]}, truth, control, n_pcs=3, top_k=2)
    with pytest.raises(ValueError, match=r"pred\['A'\]` has 5 genes"):
        evaluate_conditions({"A": truth["A"][:, :5], "A+B": truth["A+B"]}, truth, control)
    with pytest.raises(ValueError, match="form"):
        evaluate_conditions(truth, truth, control, energy_form="u")
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_conditions({"A": truth["A"][:1], "A+B": truth["A+B"]}, truth, control,
                            n_pcs=3, top_k=2)


def test_summarize_mean_and_median_per_method():
    df = pd.DataFrame({
        "method": ["m1", "m1", "m1", "m2"],
        "condition": ["a", "b", "c", "a"],
        "n_pred": [5, 5, 5, 5],
        "n_true": [5, 5, 5, 5],
        "energy_pca": [1.0, 2.0, 6.0, 4.0],
        "r2_top20": [0.5, np.nan, 0.7, 0.1],
    })
    out = summarize(df)
    assert list(out.index) == ["m1", "m2"]
    assert out.loc["m1", ("energy_pca", "mean")] == pytest.approx(3.0)
    assert out.loc["m1", ("energy_pca", "median")] == pytest.approx(2.0)
    assert out.loc["m1", ("r2_top20", "mean")] == pytest.approx(0.6)  # NaN skipped
    assert out.loc["m2", ("n_conditions", "")] == 1
    assert ("n_pred", "mean") not in out.columns
    overall = summarize(df, by=None)
    assert overall[("energy_pca", "median")].iloc[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="'dataset' is not in the table"):
        summarize(df, by="dataset")
