"""Latent recovery (MCC, Procrustes / linear R^2) and interval calibration."""

import itertools

import numpy as np
import pytest
import scipy.spatial as spatial
import scipy.stats as ss

from perturbax.metrics import interval_coverage, interval_width, linear_r2, mcc, procrustes_r2


def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------------ MCC
def test_mcc_is_one_for_permuted_scaled_flipped_copy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 4))
    z_hat = z[:, [2, 0, 3, 1]] * np.array([3.0, -0.5, 2.0, -7.0]) + 5.0
    assert mcc(z_hat, z) == pytest.approx(1.0)
    # Spearman is invariant to monotone maps of each column; Pearson is not
    z_mono = np.exp(z_hat)
    assert mcc(z_mono, z, method="spearman") == pytest.approx(1.0)
    assert mcc(z_mono, z) < 0.95


def test_mcc_matching_is_optimal_and_handles_different_widths():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2000, 3))
    noise = rng.normal(size=(2000, 2))
    z_hat = np.column_stack([noise[:, 0], z[:, 1], z[:, 0], noise[:, 1], -z[:, 2]])
    assert mcc(z_hat, z) == pytest.approx(1.0)  # 3 matched pairs out of min(5, 3)
    assert mcc(z, z_hat) == pytest.approx(1.0)
    # brute force over all injective assignments of z's 3 columns into z_hat's 5 columns
    zh = z_hat + rng.normal(size=z_hat.shape)
    c = np.abs(np.corrcoef(zh.T, z.T)[:5, 5:])
    best = max(np.mean([c[p[j], j] for j in range(3)]) for p in itertools.permutations(range(5), 3))
    assert mcc(zh, z) == pytest.approx(best)


def test_mcc_low_for_independent_noise():
    rng = np.random.default_rng(2)
    z, z_hat = rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3))
    # |corr| of independent columns is ~ 1/sqrt(n) = 0.022; the best of 6 matchings stays small
    assert mcc(z_hat, z) < 0.1


def test_mcc_spearman_matches_scipy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 2))
    z_hat = np.column_stack([z[:, 1] + rng.normal(size=50), z[:, 0] ** 3 + rng.normal(size=50)])
    r01 = abs(ss.spearmanr(z_hat[:, 0], z[:, 1]).statistic)
    r10 = abs(ss.spearmanr(z_hat[:, 1], z[:, 0]).statistic)
    r00 = abs(ss.spearmanr(z_hat[:, 0], z[:, 0]).statistic)
    r11 = abs(ss.spearmanr(z_hat[:, 1], z[:, 1]).statistic)
    assert mcc(z_hat, z, method="spearman") == pytest.approx(max(r01 + r10, r00 + r11) / 2)


def test_mcc_errors():
    z = np.random.default_rng(4).normal(size=(10, 2))
    with pytest.raises(ValueError, match="constant"):
        mcc(np.column_stack([z[:, 0], np.ones(10)]), z)
    with pytest.raises(ValueError, match="10 rows.*9"):
        mcc(z, z[:9])
    with pytest.raises(ValueError, match="method"):
        mcc(z, z, method="kendall")


# ------------------------------------------------------------------------------ Procrustes / linear
def test_procrustes_r2_one_for_rotated_scaled_shifted_copy():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(200, 4))
    z_hat = 2.5 * z @ _random_rotation(4, rng) + np.array([1.0, -2.0, 3.0, 0.5])
    assert procrustes_r2(z_hat, z) == pytest.approx(1.0)
    # reflections are allowed too
    assert procrustes_r2(z_hat * np.array([1, -1, 1, 1]), z) == pytest.approx(1.0)


def test_procrustes_r2_matches_scipy_disparity():
    # scipy.spatial.procrustes standardises both sets and returns SS_res / SS_tot of the target
    rng = np.random.default_rng(6)
    z = rng.normal(size=(80, 3))
    z_hat = z @ _random_rotation(3, rng) * 0.3 + rng.normal(scale=0.4, size=(80, 3))
    _, _, disparity = spatial.procrustes(z, z_hat)
    assert procrustes_r2(z_hat, z) == pytest.approx(1 - disparity, rel=1e-10)


def test_procrustes_and_linear_low_for_independent_noise():
    rng = np.random.default_rng(7)
    z, z_hat = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    assert procrustes_r2(z_hat, z) < 0.05
    assert linear_r2(z_hat, z) < 0.05


def test_linear_r2():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(100, 3))
    a = rng.normal(size=(3, 3))
    assert linear_r2(z @ a + 4.0, z) == pytest.approx(1.0)
    # a non-orthogonal map: linear R^2 = 1 but Procrustes R^2 < 1
    shear = np.array([[1.0, 3.0], [0.0, 1.0]])
    assert linear_r2(z[:, :2] @ shear, z[:, :2]) == pytest.approx(1.0)
    assert procrustes_r2(z[:, :2] @ shear, z[:, :2]) < 0.9
    # 1-D: affine least-squares R^2 equals the squared Pearson correlation
    x = rng.normal(size=100)
    y = 2 * x + rng.normal(size=100)
    assert linear_r2(x, y) == pytest.approx(ss.pearsonr(x, y).statistic ** 2, rel=1e-10)


# ------------------------------------------------------------------------------ intervals
def test_interval_coverage_and_width_hand_example():
    lower = np.array([0.0, 0.0, 0.0, 0.0])
    upper = np.array([1.0, 1.0, 1.0, 3.0])
    truth = np.array([0.5, 1.0, 1.5, -0.1])  # inside, on the (closed) bound, above, below
    assert interval_coverage(lower, upper, truth) == pytest.approx(0.5)
    assert interval_width(lower, upper) == pytest.approx(1.5)
    # any shape, elementwise
    assert interval_coverage(lower.reshape(2, 2), upper.reshape(2, 2),
                             truth.reshape(2, 2)) == pytest.approx(0.5)
    assert interval_coverage([-np.inf], [0.0], [-1e300]) == 1.0


def test_interval_coverage_nominal_for_normal_quantiles():
    rng = np.random.default_rng(9)
    truth = rng.normal(size=20000)
    z = ss.norm.ppf(0.95)
    cov = interval_coverage(np.full(20000, -z), np.full(20000, z), truth)
    # binomial sd of the coverage: sqrt(0.9 * 0.1 / 20000) = 0.0021
    assert abs(cov - 0.9) < 4 * 0.0021


def test_interval_errors():
    with pytest.raises(ValueError, match="lower > upper.*index \\(1,\\)"):
        interval_coverage([0.0, 2.0], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        interval_coverage([0.0, 0.0], [1.0, 1.0], [0.5])
    with pytest.raises(ValueError, match="shape"):
        interval_width([0.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        interval_coverage([0.0], [1.0], [np.nan])
