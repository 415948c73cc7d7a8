"""Large designs: the peel+SVD path agrees with a plain SVD and with a constructed ground truth.

The full-size case (K = 2000, 20000 rows, 10000 tests) is a slow test that prints its time; no
test asserts wall-clock time.
"""

import time

import numpy as np
import pytest
import scipy.sparse as sp

from perturbax.theory import check_design, rowspace


def _design(rng, K, n_rows, n_tests):
    """Ground truth by construction: perturbations in `alone` are measured alone, those in
    `paired` only together with a measured-alone one (so identified), those in `never` never
    appear. A test is covered iff it contains no `never` perturbation."""
    perm = rng.permutation(K)
    n_alone, n_never = int(0.7 * K), int(0.1 * K)
    alone, never, paired = perm[:n_alone], perm[n_alone : n_alone + n_never], perm[n_alone + n_never :]
    entries: list[tuple[int, int, float]] = []  # (row, column, dose); row 0 is the control
    r = 1
    for k in alone:
        entries.append((r, k, rng.choice([1.0, 0.5, 2.0])))
        r += 1
    for k in paired:
        entries += [(r, k, 1.0), (r, rng.choice(alone), 1.0)]
        r += 1
    usable = np.concatenate([alone, paired])
    while r < n_rows:
        a, b = rng.choice(usable, 2, replace=False)
        entries += [(r, a, rng.choice([1.0, 1 / 3])), (r, b, rng.choice([1.0, 2.0, 1e-3]))]
        r += 1
    rows, cols, vals = map(np.asarray, zip(*entries))
    L = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, K))
    L = sp.vstack([L, L[: n_rows // 20]]).tocsr()  # 5% duplicated rows
    tcols, truth = [], []
    for j in range(n_tests):
        pool = usable if j % 2 else np.arange(K)
        idx = rng.choice(pool, 3, replace=False)
        tcols.append(idx)
        truth.append(not np.isin(idx, never).any())
    tvals = rng.choice([1.0, 0.5, 1 / 3, 1e-3], 3 * n_tests)
    T = sp.csr_matrix((tvals, (np.repeat(np.arange(n_tests), 3), np.concatenate(tcols))), shape=(n_tests, K))
    return L, T, np.array(truth), np.sort(never)


def _check(rep, truth, never, K):
    assert rep.rank == K - never.size
    np.testing.assert_array_equal(np.flatnonzero(~rep.identified), never)
    np.testing.assert_array_equal(rep.covered, truth)


def test_peel_matches_svd_and_ground_truth():
    rng = np.random.default_rng(0)
    K = 120
    L, T, truth, never = _design(rng, K, 400, 300)
    peel = check_design(L, T, max_details=25, method="peel")
    svd = check_design(L, T, max_details=25, method="svd")
    assert peel.method == "peel" and svd.method == "svd" and peel.n_eliminated > 0
    for rep in (peel, svd):
        _check(rep, truth, never, K)
    np.testing.assert_allclose(peel.relative_residuals, svd.relative_residuals, atol=1e-9)
    for a, b in zip(peel.tests[:25], svd.tests[:25]):
        assert (a.coefficients is None) == (b.coefficients is None)
        if a.coefficients is not None:
            keys = set(a.coefficients) | set(b.coefficients)
            for k in keys:
                assert a.coefficients.get(k, 0.0) == pytest.approx(b.coefficients.get(k, 0.0), abs=1e-7)
        assert a.in_convex_hull == b.in_convex_hull


def test_doubles_only_bipartite_design_large_block(monkeypatch):
    """No single-perturbation rows: the whole design goes to the (Gram-based) block SVD. Doubles
    a + b with a from one half and b from the other form a connected bipartite graph, whose
    incidence matrix has rank K - 1; the missing direction is +1 on one half, -1 on the other."""
    rng = np.random.default_rng(5)
    K = 300  # more than 256 block columns and at least 2 K rows: the Gram-based block SVD
    left, right = np.arange(0, K, 2), np.arange(1, K, 2)
    edges = [(left[i], right[i]) for i in range(K // 2)] + [(left[i + 1], right[i]) for i in range(K // 2 - 1)]
    edges += [(rng.choice(left), rng.choice(right)) for _ in range(400)]  # 699 rows >= 2 K
    L = np.zeros((len(edges) + 1, K))
    for r, (a, b) in enumerate(edges, start=1):
        L[r, a] = L[r, b] = 1.0
    sign = np.where(np.arange(K) % 2 == 0, 1.0, -1.0)
    tests = np.vstack([np.eye(K)[0] + np.eye(K)[1], np.eye(K)[0], np.eye(K)[0] + np.eye(K)[2]])
    calls = []
    gram = rowspace._right_svd_gram
    monkeypatch.setattr(rowspace, "_right_svd_gram", lambda B: calls.append(B.shape) or gram(B))
    rep = check_design(L, tests, max_details=0)
    assert calls == [(len(set(edges)), K)]  # distinct rows only
    assert rep.method == "peel" and rep.n_eliminated == 0
    assert rep.rank == K - 1 and rep.identified_elementary == ()
    # e_a + e_b (left + right) is covered; e_a is at distance 1/sqrt(K) (projection on sign/sqrt(K))
    assert rep.covered.tolist() == [True, False, False]
    np.testing.assert_allclose(rep.relative_residuals[1:], [1 / np.sqrt(K), 2 / np.sqrt(2 * K)], rtol=1e-8)
    svd = check_design(L, tests, max_details=0, method="svd")
    assert svd.rank == K - 1
    np.testing.assert_allclose(rep.relative_residuals, svd.relative_residuals, atol=1e-9)
    # the one direction the design misses
    np.testing.assert_allclose(np.abs(rep.space.residuals(sign[None, :])), np.abs(sign[None, :]), atol=1e-8)


def test_scaled_down_case_is_correct():
    rng = np.random.default_rng(1)
    K = 400
    L, T, truth, never = _design(rng, K, 4000, 2000)
    rep = check_design(L, T)
    assert rep.method == "peel"
    _check(rep, truth, never, K)
    assert rep.n_distinct_rows < rep.n_rows
    # uncovered tests name a never-measured perturbation as the missing direction
    names = set(np.asarray(rep.names)[never])
    for t in rep.tests[:100]:
        if not t.covered:
            assert set(t.missing_direction) <= names


@pytest.mark.slow
def test_full_scale_case_timing():
    rng = np.random.default_rng(2)
    K = 2000
    L, T, truth, never = _design(rng, K, 20000, 10000)
    start = time.perf_counter()
    rep = check_design(L, T)
    elapsed = time.perf_counter() - start
    print(f"\ncheck_design: K={K}, {rep.n_rows} rows, {T.shape[0]} tests: {elapsed:.2f} s")
    _check(rep, truth, never, K)


def test_unconverged_coefficients_are_reported_not_invented(monkeypatch):
    """If the iterative solve (large designs) stops early, coefficients are withheld."""
    rng = np.random.default_rng(7)
    L, T, truth, never = _design(rng, 60, 200, 20)
    good = check_design(L, T, method="peel")
    assert any(t.coefficients is not None for t in good.tests)
    cgne = rowspace._cgne
    monkeypatch.setattr(rowspace, "_cgne", lambda D, B: cgne(D, B, maxiter=1))
    capped = check_design(L, T, method="peel")
    np.testing.assert_array_equal(capped.covered, good.covered)
    withheld = [b for b in capped.tests if b.covered and b.coefficients is None]
    assert withheld and all(b.in_convex_hull is None and "did not converge" in b.message for b in withheld)
    for a, b in zip(good.tests, capped.tests):  # what is given after one iteration is the right answer
        if b.coefficients is not None:
            assert b.coefficients == pytest.approx(a.coefficients, abs=1e-7)
