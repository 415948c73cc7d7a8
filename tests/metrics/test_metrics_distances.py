"""Distances between cell sets against independent references (SciPy, brute-force loops,
closed forms)."""

import math
import tracemalloc

import numpy as np
import pytest
import scipy.spatial.distance as ssd
import scipy.stats as ss

from perturbax.metrics import (
    energy_distance,
    mean_l2,
    median_heuristic,
    mmd_rbf,
    pairwise_mean_distance,
)


def _brute_energy(x, y, form):
    """Double loops over pairs, no matrix tricks."""
    x = np.atleast_2d(x.T).T if x.ndim == 1 else x
    y = np.atleast_2d(y.T).T if y.ndim == 1 else y
    n, m = len(x), len(y)
    dxy = sum(np.linalg.norm(a - b) for a in x for b in y) / (n * m)
    sxx = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m) if i != j)
    if form == "U":
        return 2 * dxy - sxx / (n * (n - 1)) - syy / (m * (m - 1))
    return 2 * dxy - sxx / n**2 - syy / m**2


def _brute_mmd(x, y, bandwidths, form):
    def k(a, b):
        d2 = float(np.sum((a - b) ** 2))
        return np.mean([math.exp(-d2 / (2 * h * h)) for h in bandwidths])

    n, m = len(x), len(y)
    kxy = sum(k(a, b) for a in x for b in y) / (n * m)
    if form == "U":
        kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    else:
        kxx = sum(k(a, b) for a in x for b in x) / n**2
        kyy = sum(k(a, b) for a in y for b in y) / m**2
    return kxx + kyy - 2 * kxy


# ------------------------------------------------------------------------------ energy distance
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energy_v_form_is_scipy_squared_in_1d(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=57)
    y = rng.gamma(2.0, 1.0, size=41)
    # scipy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) of the empirical distributions
    assert energy_distance(x, y, form="V") == pytest.approx(ss.energy_distance(x, y) ** 2,
                                                             rel=1e-10)
    # counts with many ties (exact duplicate cells)
    xc, yc = rng.poisson(3.0, size=200), rng.poisson(4.0, size=150)
    assert energy_distance(xc, yc, form="V", chunk_size=37) == pytest.approx(
        ss.energy_distance(xc, yc) ** 2, rel=1e-10)


@pytest.mark.parametrize("form", ["U", "V"])
def test_energy_matches_brute_force(form):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(13, 4))
    y = rng.normal(0.4, 1.5, size=(9, 4)) + 100.0  # far from the origin: exercises centring
    assert energy_distance(x, y, form=form) == pytest.approx(_brute_energy(x, y, form), rel=1e-10)


def test_energy_v_minus_u_identity():
    # V = U + E_U|X-X'|/n + E_U|Y-Y'|/m exactly (algebra of the two estimators)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(31, 3)), rng.normal(size=(23, 3))
    u, v = energy_distance(x, y, form="U"), energy_distance(x, y, form="V")
    exx = pairwise_mean_distance(x, exclude_diagonal=True)
    eyy = pairwise_mean_distance(y, exclude_diagonal=True)
    assert v - u == pytest.approx(exx / 31 + eyy / 23, rel=1e-10)


def test_u_form_unbiased_under_null_and_v_form_biased():
    # Same distribution for both samples: E[U] = 0 exactly, E[V] = E|X-X'| (1/n + 1/m) > 0.
    n = m = 30
    reps = 300
    u, v = np.empty(reps), np.empty(reps)
    for r in range(reps):
        rng = np.random.default_rng(1000 + r)
        x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
        u[r] = energy_distance(x, y, form="U")
        v[r] = energy_distance(x, y, form="V")
    se_u = u.std(ddof=1) / np.sqrt(reps)
    # a 4-standard-error band around 0 (false alarm probability ~6e-5 for a normal mean)
    assert abs(u.mean()) < 4 * se_u
    assert np.all(v >= 0)
    # population E|X-X'| for X ~ N(0, I_2): X-X' ~ N(0, 2 I_2), |.| is Rayleigh(sqrt 2): sqrt(pi)
    bias = math.sqrt(math.pi) * (1 / n + 1 / m)
    se_v = v.std(ddof=1) / np.sqrt(reps)
    assert abs(v.mean() - bias) < 4 * se_v
    assert v.mean() > 10 * se_v  # clearly positive


def test_energy_two_gaussians_closed_form():
    # X ~ N(mu1, s^2), Y ~ N(mu2, s^2): X - Y ~ N(d, 2 s^2), a folded normal with mean
    # sig sqrt(2/pi) exp(-d^2 / (2 sig^2)) + d (1 - 2 Phi(-d / sig)), sig = s sqrt 2;
    # E|X - X'| = E|Y - Y'| = 2 s / sqrt(pi).
    mu1, mu2, s = 0.3, 1.3, 1.2
    d, sig = mu2 - mu1, s * math.sqrt(2)
    e_xy = sig * math.sqrt(2 / math.pi) * math.exp(-(d**2) / (2 * sig**2)) + d * (
        1 - 2 * ss.norm.cdf(-d / sig)
    )
    population = 2 * e_xy - 2 * (2 * s / math.sqrt(math.pi))
    reps, n = 20, 2000
    est = np.array([
        energy_distance(np.random.default_rng(r).normal(mu1, s, n),
                        np.random.default_rng(100 + r).normal(mu2, s, n))
        for r in range(reps)
    ])
    se = est.std(ddof=1) / math.sqrt(reps)
    assert population > 0.3
    assert abs(est.mean() - population) < 5 * se
    assert abs(est.mean() - population) < 0.05 * population


@pytest.mark.parametrize("chunk", [1, 7, 13, 50])
def test_chunked_equals_unchunked(chunk):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 6))
    y = rng.normal(0.5, 1.0, size=(77, 6))
    for form in ("U", "V"):
        ref = energy_distance(x, y, form=form, chunk_size=10_000)
        assert energy_distance(x, y, form=form, chunk_size=chunk) == pytest.approx(ref, rel=1e-10)
        ref_mmd = mmd_rbf(x, y, form=form, chunk_size=10_000)
        assert mmd_rbf(x, y, form=form, chunk_size=chunk) == pytest.approx(ref_mmd, rel=1e-10)
    assert pairwise_mean_distance(x, y, chunk_size=chunk) == pytest.approx(
        pairwise_mean_distance(x, y, chunk_size=10_000), rel=1e-10)
    # n > m: the smaller set takes the chunked position; the value must not depend on the order
    assert energy_distance(y, x, chunk_size=chunk) == pytest.approx(
        energy_distance(x, y, chunk_size=chunk), rel=1e-12)


def test_pairwise_mean_distance_vs_scipy_cdist():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) * 3 + 1e3
    assert pairwise_mean_distance(x, y, chunk_size=9) == pytest.approx(
        ssd.cdist(x, y).mean(), rel=1e-10)
    assert pairwise_mean_distance(x, chunk_size=9) == pytest.approx(ssd.cdist(x, x).mean(),
                                                                    rel=1e-10)
    assert pairwise_mean_distance(x, exclude_diagonal=True, chunk_size=9) == pytest.approx(
        ssd.pdist(x).mean(), rel=1e-10)


def test_energy_of_identical_sets():
    x = np.random.default_rng(7).normal(size=(25, 3))
    assert energy_distance(x, x, form="V") == pytest.approx(0.0, abs=1e-12)
    # U-form of a set with itself: 2 E_V - 2 E_U = -2 E_U|X-X'| / n  (< 0, exact identity)
    exx = pairwise_mean_distance(x, exclude_diagonal=True)
    assert energy_distance(x, x, form="U") == pytest.approx(-2 * exx / 25, rel=1e-10)


def test_memory_is_chunk_sized_not_n_by_m():
    n = m = 6000
    g = 200
    rng = np.random.default_rng(8)
    x = rng.normal(size=(n, g))
    y = rng.normal(size=(m, g)) + 0.1
    nm_bytes = n * m * 8

    def peak(chunk):
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        val = energy_distance(x, y, chunk_size=chunk)
        peak_bytes = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return val, peak_bytes

    val_small, peak_small = peak(512)
    # expected: centred copies of x and y (2 n g 8 B) + one (512, m) block + small vectors
    expected = 2 * n * g * 8 + 512 * m * 8
    assert peak_small < expected + 8 * 2**20
    assert peak_small < nm_bytes / 4
    # the measurement does see the blocks: one full (n, m) block when unchunked
    val_full, peak_full = peak(n)
    assert peak_full > nm_bytes
    assert val_small == pytest.approx(val_full, rel=1e-10)


@pytest.mark.slow
def test_memory_and_value_at_benchmark_scale():
    n = m = 20_000
    g = 2_000
    chunk = 2048
    rng = np.random.default_rng(9)
    x = rng.normal(size=(n, g))
    y = rng.normal(size=(m, g))
    y[:, 0] += 3.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    val = energy_distance(x, y, chunk_size=chunk)
    peak_bytes = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak_bytes < 2 * n * g * 8 + chunk * m * 8 + 64 * 2**20
    assert peak_bytes < n * m * 8 / 2
    # independent check: the U-statistic of 2000-cell subsamples is unbiased for the same value
    sub = energy_distance(x[:2000], y[:2000])
    assert val > 0
    assert val == pytest.approx(sub, rel=0.1)


# ------------------------------------------------------------------------------ MMD
@pytest.mark.parametrize("form", ["U", "V"])
def test_mmd_matches_brute_force(form):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(15, 3))
    y = rng.normal(0.7, 1.0, size=(12, 3))
    bw = [0.5, 1.0, 3.0]
    assert mmd_rbf(x, y, bandwidths=bw, form=form, chunk_size=4) == pytest.approx(
        _brute_mmd(x, y, bw, form), rel=1e-10)


def test_mmd_default_bandwidths_are_median_multiples():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(20, 4))
    y = rng.normal(1.0, 1.0, size=(18, 4))
    med = np.median(ssd.pdist(np.vstack([x, y])))
    assert median_heuristic(x, y) == pytest.approx(med, rel=1e-10)
    bw = med * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    assert mmd_rbf(x, y) == pytest.approx(_brute_mmd(x, y, bw, "U"), rel=1e-10)


def test_median_heuristic_subsample_is_deterministic():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(900, 3))
    y = rng.normal(size=(700, 3))
    a, b = median_heuristic(x, y), median_heuristic(x, y)
    assert a == b
    full = np.median(ssd.pdist(np.vstack([x, y])))
    assert a == pytest.approx(full, rel=0.05)  # 1000 of 1600 cells: close to the full median


def test_mmd_zero_for_identical_and_positive_for_shift():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(60, 5))
    assert mmd_rbf(x, x.copy(), form="V") == pytest.approx(0.0, abs=1e-12)
    y_same = rng.normal(size=(60, 5))
    small = mmd_rbf(x, y_same, bandwidths=[2.0])
    mid = mmd_rbf(x, rng.normal(size=(60, 5)) + 1.0, bandwidths=[2.0])
    big = mmd_rbf(x, rng.normal(size=(60, 5)) + 3.0, bandwidths=[2.0])
    assert mid > 0 and big > mid > small
    assert mmd_rbf(x, rng.normal(size=(60, 5)) + 1.0, form="V") > 0


# ------------------------------------------------------------------------------ mean L2, errors
def test_mean_l2():
    x = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0)
    y = np.array([[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]])  # mean (4, 4)
    assert mean_l2(x, y) == pytest.approx(5.0)


def test_errors_name_the_problem():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="3 genes.*4"):
        energy_distance(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="1 cell"):
        energy_distance(np.ones((1, 3)), x, form="U")
    energy_distance(np.ones((1, 3)), x, form="V")  # the V-form is defined for one cell
    bad = np.ones((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"nan.*\(2, 1\)"):
        mmd_rbf(bad, x)
    with pytest.raises(ValueError, match="form"):
        energy_distance(x, x, form="W")
    with pytest.raises(ValueError, match="chunk_size"):
        energy_distance(x, x, chunk_size=0)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(x, x + 1, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="identical"):
        mmd_rbf(x, x)
    with pytest.raises(ValueError, match="exclude_diagonal"):
        pairwise_mean_distance(x, x, exclude_diagonal=True)
    with pytest.raises(ValueError, match="shape"):
        energy_distance(np.zeros((2, 2, 2)), x)


def test_float32_and_sparse_inputs_are_computed_in_float64():
    import scipy.sparse as sp

    rng = np.random.default_rng(14)
    x = rng.poisson(2.0, size=(30, 8)).astype(np.float32)
    y = rng.poisson(3.0, size=(20, 8)).astype(np.float32)
    ref = _brute_energy(x.astype(np.float64), y.astype(np.float64), "U")
    assert energy_distance(x, y) == pytest.approx(ref, rel=1e-10)
    assert energy_distance(sp.csr_matrix(x), sp.csr_matrix(y)) == pytest.approx(ref, rel=1e-10)
