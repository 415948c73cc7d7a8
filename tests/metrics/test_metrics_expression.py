"""Gene-level metrics on means against hand-computed numbers and SciPy."""

import numpy as np
import pytest
import scipy.stats as ss

from perturbax.metrics import mse_means, pearson_delta, r2_means, top_de_genes


def test_top_de_genes_order_and_ties():
    control = np.array([[0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])  # mean 1
    true = np.array([2.0, -2.0, 4.0, 1.5, 1.0])  # delta (1, -3, 3, 0.5, 0)
    # |delta| = (1, 3, 3, 0.5, 0): genes 1 and 2 tie -> lower index first
    np.testing.assert_array_equal(top_de_genes(true, control, 5), [1, 2, 0, 3, 4])
    np.testing.assert_array_equal(top_de_genes(true, control, 2), [1, 2])
    # cell matrices and mean vectors give the same ranking
    cells = np.vstack([true - 1.0, true + 1.0])
    np.testing.assert_array_equal(top_de_genes(cells, control.mean(0), 3), [1, 2, 0])


def test_top_de_genes_errors():
    with pytest.raises(ValueError, match="between 1 and the number of genes \\(3\\)"):
        top_de_genes(np.ones(3), np.zeros(3), 4)
    with pytest.raises(ValueError, match="`true` has 3.*`control` has 2"):
        top_de_genes(np.ones(3), np.zeros(2), 1)


def test_pearson_delta_hand_values():
    control = np.zeros(4)
    true = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson_delta(2 * true, true, control) == pytest.approx(1.0)
    assert pearson_delta(true[::-1], true, control) == pytest.approx(-1.0)
    # delta_pred = (1, 2, 3, 5) vs delta_true = (1, 2, 3, 4):
    # centred (-1.75, -0.75, 0.25, 2.25) and (-1.5, -0.5, 0.5, 1.5);
    # cov = 2.625 + 0.375 + 0.125 + 3.375 = 6.5; |a|^2 = 8.75, |b|^2 = 5
    expected = 6.5 / np.sqrt(8.75 * 5.0)
    assert pearson_delta(np.array([1.0, 2.0, 3.0, 5.0]), true, control) == pytest.approx(expected)
    # gene subset: genes (0, 1, 3) -> (1, 2, 5) vs (1, 2, 4): cov 4.6667, |a|^2 8.6667, |b|^2 4.6667
    a = np.array([1.0, 2.0, 5.0]) - 8 / 3
    b = np.array([1.0, 2.0, 4.0]) - 7 / 3
    sub = (a @ b) / np.sqrt((a @ a) * (b @ b))
    assert pearson_delta(np.array([1.0, 2.0, 3.0, 5.0]), true, control,
                         genes=[0, 1, 3]) == pytest.approx(sub)
    mask = np.array([True, True, False, True])
    assert pearson_delta(np.array([1.0, 2.0, 3.0, 5.0]), true, control,
                         genes=mask) == pytest.approx(sub)


def test_pearson_delta_vs_scipy_on_cells():
    rng = np.random.default_rng(0)
    pred, true, ctrl = (rng.normal(size=(n, 50)) for n in (30, 40, 60))
    ref = ss.pearsonr(pred.mean(0) - ctrl.mean(0), true.mean(0) - ctrl.mean(0)).statistic
    assert pearson_delta(pred, true, ctrl) == pytest.approx(ref, rel=1e-12)


def test_pearson_delta_constant_prediction_is_nan_with_warning():
    ctrl = np.array([[1.0, 2.0, 3.0]])
    with pytest.warns(RuntimeWarning, match="constant"):
        val = pearson_delta(ctrl, np.array([2.0, 2.0, 5.0]), ctrl)
    assert np.isnan(val)


def test_r2_and_mse_hand_values():
    true = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, SS_tot = 5
    pred = np.array([1.0, 2.0, 3.0, 5.0])  # SS_res = 1
    assert r2_means(pred, true) == pytest.approx(0.8)
    assert mse_means(pred, true) == pytest.approx(0.25)
    # constant prediction at the mean: R^2 = 0; constant elsewhere: negative
    assert r2_means(np.full(4, 2.5), true) == pytest.approx(0.0)
    assert r2_means(np.zeros(4), true) == pytest.approx(1 - 30 / 5)
    # gene subset (2, 3): true (3, 4) mean 3.5 SS_tot 0.5, pred (3, 5) SS_res 1 -> -1
    assert r2_means(pred, true, genes=[2, 3]) == pytest.approx(-1.0)
    assert mse_means(pred, true, genes=[2, 3]) == pytest.approx(0.5)


def test_r2_mse_use_means_of_cell_matrices():
    true_cells = np.array([[0.0, 2.0, 2.0, 4.0], [2.0, 2.0, 4.0, 4.0]])  # mean (1, 2, 3, 4)
    pred_cells = np.array([[1.0, 2.0, 3.0, 6.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]])
    assert r2_means(pred_cells, true_cells) == pytest.approx(0.8)
    assert mse_means(pred_cells, true_cells) == pytest.approx(0.25)


def test_expression_errors():
    with pytest.raises(ValueError, match="`pred` has 3.*`true` has 4"):
        r2_means(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="out of range"):
        mse_means(np.ones(4), np.ones(4), genes=[0, 4])
    with pytest.raises(ValueError, match="integer gene indices"):
        mse_means(np.ones(4), np.ones(4), genes=[0.5, 1.0])
    with pytest.raises(ValueError, match="at least 2 genes"):
        pearson_delta(np.ones(4), np.ones(4), np.zeros(4), genes=[1])
    bad = np.ones((2, 4))
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        mse_means(bad, np.ones(4))
