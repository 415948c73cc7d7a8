"""Simulators with ground truth: determinism, layout, additivity, nonlinearity, dynamics."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from scipy.stats import kurtosis

from perturbax.data import check_counts, from_anndata
from perturbax.data.simulate import (
    AdditiveShiftTruth,
    LatentDynamicsTruth,
    sample_base,
    simulate_additive_shift,
    simulate_latent_dynamics,
)


@pytest.fixture(scope="module")
def als():
    return simulate_additive_shift(seed=3)


@pytest.fixture(scope="module")
def ldc():
    return simulate_latent_dynamics(n_cells=60, seed=5)


@pytest.fixture(scope="module", params=["relaxing", "persistent"])
def ldc_both(request):
    return simulate_latent_dynamics(n_cells=60, heterogeneity=request.param, seed=5)


def _labels_of(adata) -> np.ndarray:
    return adata.obs["perturbation"].astype(str).to_numpy()


# ------------------------------------------------------------------------------------ additive
def test_additive_same_seed_identical_different_seed_differs():
    a1, t1 = simulate_additive_shift(n_cells=30, seed=7)
    a2, t2 = simulate_additive_shift(n_cells=30, seed=7)
    a3, t3 = simulate_additive_shift(n_cells=30, seed=8)
    np.testing.assert_array_equal(a1.X, a2.X)
    np.testing.assert_array_equal(a1.obsm["z_true"], a2.obsm["z_true"])
    assert list(a1.obs["perturbation"]) == list(a2.obs["perturbation"])
    assert list(a1.obs["split"]) == list(a2.obs["split"])
    np.testing.assert_array_equal(t1.W, t2.W)
    for w1, w2 in zip(t1.decoder.weights, t2.decoder.weights, strict=True):
        np.testing.assert_array_equal(w1, w2)
    assert t1.train_labels == t2.train_labels and t1.test_labels == t2.test_labels
    assert not np.allclose(t1.W, t3.W)
    assert a1.X.shape == a3.X.shape and not np.allclose(a1.X, a3.X)
    # The truth's own sampler is deterministic too.
    np.testing.assert_array_equal(t1.sample("P0+P1", 50, seed=1), t2.sample("P0+P1", 50, seed=1))
    assert not np.allclose(t1.sample("P0+P1", 50, seed=1), t1.sample("P0+P1", 50, seed=2))


def test_parameters_do_not_depend_on_n_cells():
    _, small = simulate_additive_shift(n_cells=10, seed=4)
    _, large = simulate_additive_shift(n_cells=50, seed=4)
    np.testing.assert_array_equal(small.W, large.W)
    assert small.test_labels == large.test_labels


def test_additive_layout_and_from_anndata(als):
    adata, truth = als
    assert isinstance(truth, AdditiveShiftTruth)
    assert list(adata.var_names) == [f"g{g}" for g in range(20)]
    assert truth.names == ("P0", "P1", "P2", "P3", "P4", "P5")
    assert truth.W.shape == (5, 6)
    labels = _labels_of(adata)
    assert set(labels) == set(truth.train_labels) | set(truth.test_labels)
    assert not set(truth.train_labels) & set(truth.test_labels)
    assert np.all(np.unique(labels, return_counts=True)[1] == 200)

    pdata = from_anndata(adata, "perturbation", "control")
    assert pdata.registry.names == truth.registry.names
    assert set(pdata.conditions) == set(labels)  # labels were already canonical
    for e, lab in enumerate(pdata.conditions):
        np.testing.assert_array_equal(pdata.design[e], truth.registry.encode(lab))
        assert truth.registry.canonical(lab) == lab
    np.testing.assert_allclose(pdata.X, adata.X)

    split = adata.obs["split"].astype(str).to_numpy()
    group = adata.obs["group"].astype(str).to_numpy()
    for lab in np.unique(labels):
        rows = labels == lab
        assert set(split[rows]) == {"train" if lab in truth.train_labels else "test"}
        assert set(group[rows]) == {truth.groups[lab]}
    assert truth.groups["control"] == "control"
    assert {truth.groups[f"P{k}"] for k in range(5)} == {"single"}
    # half of the 10 pairs train, the rest test
    doubles = [lab for lab, g in truth.groups.items() if g == "double"]
    assert len(doubles) == 10
    assert sum(lab in truth.train_labels for lab in doubles) == 5
    # a training subset reads too, and knows nothing about the out-of-span perturbation
    train = from_anndata(adata[split == "train"], "perturbation", "control")
    assert train.registry.names == ("P0", "P1", "P2", "P3", "P4")


def test_zero_padded_names_sort_numerically():
    adata, truth = simulate_additive_shift(n_perturbations=11, n_out_of_span=1, n_cells=2, doubles=None, seed=1)
    assert truth.names == tuple(f"P{k:02d}" for k in range(12))
    assert tuple(sorted(truth.names)) == truth.names
    assert from_anndata(adata, "perturbation", "control").registry.names == truth.names


def test_counts_layer(tmp_path):
    adata, truth = simulate_additive_shift(n_cells=80, counts=True, mean_library_size=3000.0, seed=2)
    counts = adata.layers["counts"]
    assert np.issubdtype(counts.dtype, np.integer)
    check_counts(counts, "layers['counts']")
    pdata = from_anndata(adata, "perturbation", "control", layer="counts", counts=True)
    np.testing.assert_array_equal(pdata.X, counts.astype(np.float32))
    # X is log-normalised, which a count likelihood must refuse
    with pytest.raises(ValueError, match="non-integer"):
        from_anndata(adata, "perturbation", "control", counts=True)
    total = counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adata.X, np.log1p(counts / total * 1e4), rtol=1e-5, atol=1e-5)
    lib = adata.obs["library_size"].to_numpy()
    assert np.all(lib > 0)
    # E[total | library] = library (NB mean = library * softmax)
    ratio = total.ravel() / lib
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(ratio.size)
    assert abs(lib.mean() / 3000.0 - 1.0) < 0.05
    # the truth draws counts of fresh cells, and the AnnData survives a round trip to disk
    fresh = truth.sample("P1", 10, seed=0, counts=True)
    assert fresh.shape == (10, 20) and np.issubdtype(fresh.dtype, np.integer)
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.layers["counts"], counts)
    assert back.uns["simulation"]["simulator"] == "additive_shift"


def test_latent_shifts_are_additive(als):
    adata, truth = als
    labels = _labels_of(adata)
    z, zb = adata.obsm["z_true"], adata.obsm["z_base_true"]
    L = truth.registry.encode_many(labels)
    np.testing.assert_allclose(z - zb, L @ truth.W.T, atol=1e-12)
    for lab in np.unique(labels):
        rows = labels == lab
        n = rows.sum()
        err = z[rows].mean(axis=0) - truth.W @ truth.registry.encode(lab)
        assert np.all(np.abs(err) < 4.0 / np.sqrt(n)), (lab, err)
        np.testing.assert_allclose(truth.latent_mean(lab), truth.W @ truth.registry.encode(lab))
    norms = np.linalg.norm(truth.W, axis=0)
    assert np.all((norms >= 1.0 - 1e-12) & (norms <= 2.0 + 1e-12))


@pytest.mark.parametrize(("kind", "kurt_range"), [("normal", (-0.3, 0.3)), ("laplace", (1.5, 5.0)), ("uniform", (-1.4, -1.0))])
def test_base_distribution_standardised(kind, kurt_range):
    adata, _ = simulate_additive_shift(base=kind, n_cells=200, n_genes=3, decoder_hidden=4, seed=11)
    zb = adata.obsm["z_base_true"]
    n = zb.shape[0]
    assert np.all(np.abs(zb.mean(axis=0)) < 4 / np.sqrt(n))
    excess = kurtosis(zb, axis=0)  # per dim
    var_se = np.sqrt((excess + 2) / n)
    assert np.all(np.abs(zb.var(axis=0) - 1.0) < 4 * var_se + 1e-3)
    pooled = kurtosis(zb.ravel())
    assert kurt_range[0] < pooled < kurt_range[1], pooled
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not supported"):
        sample_base("cauchy", 3, 2, rng)


def test_decoder_is_nonlinear_in_gene_space(als):
    _, truth = als
    n = 20000
    draws = {lab: truth.sample(lab, n, seed=i) for i, lab in enumerate(["control", *truth.names[:5]])}
    rel = []
    for i, j in itertools.combinations(range(5), 2):
        a, b = truth.names[i], truth.names[j]
        x_ab = truth.sample(f"{a}+{b}", n, seed=100 + 10 * i + j)
        m = {k: v.mean(axis=0) for k, v in draws.items()}
        resid = x_ab.mean(axis=0) - m[a] - m[b] + m["control"]
        se = np.sqrt((x_ab.var(axis=0) + draws[a].var(axis=0) + draws[b].var(axis=0) + draws["control"].var(axis=0)) / n)
        # far beyond Monte-Carlo error ...
        # (under additivity in gene space, |resid| would be ~ |se|)
        assert np.linalg.norm(resid) > 5 * np.linalg.norm(se), (a, b)
        rel.append(np.linalg.norm(resid) / np.linalg.norm(x_ab.mean(axis=0) - m["control"]))
    # ... and a clear fraction of the double's effect
    assert np.median(rel) > 0.1, rel


def test_noise_is_fed_into_the_network(als):
    _, truth = als
    dec = truth.decoder
    assert dec.obs_noise > 0 and dec.noise_scale > 0
    rng = np.random.default_rng(0)
    n = 4000
    directions = [np.zeros(5), 2.0 * truth.W[:, 0] / np.linalg.norm(truth.W[:, 0])]
    var = [dec.decode(np.tile(z, (n, 1)), rng).var(axis=0) for z in directions]
    # log-variance ratio has sampling sd ~ sqrt(4 / n) ~ 0.03 per gene (under Gaussianity);
    # a constant additive noise would give ratios ~ 1 for every gene
    assert np.max(np.abs(np.log(var[0] / var[1]))) > 0.5
    # the noise enters through eta: without eta and without observation noise the output is fixed
    z = np.tile(directions[1], (5, 1))
    eta = dec.noise_scale * rng.standard_normal((5, dec.noise_dim))
    out = dec.network(z, eta)
    assert np.ptp(out, axis=0).max() > 1e-3
    np.testing.assert_array_equal(dec.network(z), dec.network(z, np.zeros_like(eta)))
    adata, quiet = simulate_additive_shift(n_cells=5, noise_scale=0.0, obs_noise=0.0, seed=3)
    np.testing.assert_allclose(adata.X, quiet.decoder.network(adata.obsm["z_true"]), rtol=1e-5, atol=1e-5)


def test_sample_matches_simulated_population(als):
    adata, truth = als
    labels = _labels_of(adata)
    for lab in ["control", truth.test_labels[0], truth.test_labels[-1]]:
        x = adata.X[labels == lab].astype(np.float64)
        pop = truth.population_mean(lab, n_cells=20000)
        se = np.sqrt(x.var(axis=0) / x.shape[0] + x.var(axis=0) / 20000)
        assert np.all(np.abs(x.mean(axis=0) - pop) < 4.5 * se), lab


def test_out_of_span_only_in_test(als):
    adata, truth = als
    assert truth.out_of_span == ("P5",)
    labels = _labels_of(adata)
    split = adata.obs["split"].astype(str).to_numpy()
    group = adata.obs["group"].astype(str).to_numpy()
    uses = np.array([truth.registry.encode(lab)[5] != 0 for lab in labels])
    assert uses.any()
    assert set(split[uses]) == {"test"}
    assert set(group[uses]) == {"out-of-span"}
    assert "P5" not in set(labels)  # never alone
    assert set(group[~uses]) <= {"control", "single", "double", "dose-in-hull", "dose-outside-hull"}
    assert "out-of-span" in set(truth.groups.values())


def test_dose_groups_default_and_explicit():
    _, truth = simulate_additive_shift(n_cells=2, seed=0)
    dose_labels = [lab for lab, g in truth.groups.items() if g.startswith("dose")]
    assert {truth.groups[lab] for lab in dose_labels} == {"dose-in-hull", "dose-outside-hull"}
    assert all(lab in truth.test_labels for lab in dose_labels)
    assert any(":-1" in lab for lab in dose_labels)  # negative doses are representable
    for lab in dose_labels:
        assert truth.registry.canonical(lab) == lab
    doses = ["P0:0.5+P1:0.5", "P0:2", {"P0": 1, "P1": -1}, "P2:0.5", "P0:0.9+P1:0.9", "P0+P5"]
    _, no_doubles = simulate_additive_shift(n_cells=2, doubles=None, doses=doses, seed=0)
    g = no_doubles.groups
    assert g["P0:0.5+P1:0.5"] == "dose-in-hull"
    assert g["P2:0.5"] == "dose-in-hull"
    assert g["P0:2"] == "dose-outside-hull"
    assert g["P0+P1:-1"] == "dose-outside-hull"
    assert g["P0:0.9+P1:0.9"] == "dose-outside-hull"  # sum of doses > 1 without the double
    assert g["P0+P5"] == "out-of-span"
    _, with_double = simulate_additive_shift(n_cells=2, doubles=[("P0", "P1")], doses=doses, seed=0)
    assert with_double.groups["P0:0.9+P1:0.9"] == "dose-in-hull"  # inside the unit square now
    assert "P0+P1" in with_double.train_labels
    with pytest.raises(ValueError, match="twice"):
        simulate_additive_shift(n_cells=2, doses=["P0"], seed=0)


def test_doubles_specification():
    _, all_train = simulate_additive_shift(n_cells=2, doubles="all", seed=0)
    assert not [lab for lab in all_train.test_labels if all_train.groups[lab] == "double"]
    _, none_train = simulate_additive_shift(n_cells=2, doubles=None, seed=0)
    assert len([lab for lab in none_train.test_labels if none_train.groups[lab] == "double"]) == 10
    _, listed = simulate_additive_shift(n_cells=2, doubles=[("P3", "P1"), (2, 4)], seed=0)
    train_doubles = [lab for lab in listed.train_labels if listed.groups[lab] == "double"]
    assert sorted(train_doubles) == ["P1+P3", "P2+P4"]
    with pytest.raises(ValueError, match="itself"):
        simulate_additive_shift(n_cells=2, doubles=[(1, 1)])
    with pytest.raises(ValueError, match="in-span"):
        simulate_additive_shift(n_cells=2, doubles=[("P0", "P5")])
    with pytest.raises(ValueError, match="not supported"):
        simulate_additive_shift(n_cells=2, doubles="some")


# ------------------------------------------------------------------------------- latent dynamics
def test_dynamics_same_seed_identical_different_seed_differs():
    a1, t1 = simulate_latent_dynamics(n_cells=10, seed=1)
    a2, t2 = simulate_latent_dynamics(n_cells=10, seed=1)
    a3, t3 = simulate_latent_dynamics(n_cells=10, seed=2)
    np.testing.assert_array_equal(a1.X, a2.X)
    np.testing.assert_array_equal(a1.obs["time"], a2.obs["time"])
    for name in ("B", "S", "mu", "Sigma_0"):
        np.testing.assert_array_equal(getattr(t1, name), getattr(t2, name))
    assert not np.allclose(a1.X, a3.X)
    assert not (np.allclose(t1.S, t3.S) and np.allclose(t1.mu, t3.mu))


def test_dynamics_structure(ldc):
    _, truth = ldc
    assert isinstance(truth, LatentDynamicsTruth)
    B, S = truth.B, truth.S
    assert B.shape == (4, 4) and S.shape == (4, 4)
    np.testing.assert_array_equal(np.triu(B), 0.0)
    nz = np.abs(B[B != 0])
    assert np.all((nz >= 0.5) & (nz <= 1.5))
    np.testing.assert_allclose(np.linalg.eigvals(B - np.eye(4)), -1.0, atol=1e-6)
    # default: perturbation k targets program k only
    assert np.all((S != 0) == np.eye(4, dtype=bool))
    assert np.all((np.abs(np.diag(S)) >= 1.0) & (np.abs(np.diag(S)) <= 2.0))
    np.testing.assert_allclose(truth.Sigma_0, np.diag(np.diag(truth.Sigma_0)))
    np.testing.assert_allclose((np.eye(4) - B) @ truth.W_equilibrium, S, atol=1e-12)
    # target="random" and a matrix
    _, rnd = simulate_latent_dynamics(n_programs=3, n_perturbations=5, target="random", n_cells=2, seed=3)
    assert rnd.S.shape == (3, 5) and np.all((rnd.S != 0).any(axis=0))
    M = np.arange(6.0).reshape(3, 2)
    _, given = simulate_latent_dynamics(n_programs=3, n_perturbations=2, target=M, n_cells=2, seed=3)
    np.testing.assert_array_equal(given.S, M)
    with pytest.raises(ValueError, match="shape"):
        simulate_latent_dynamics(n_programs=3, n_perturbations=2, target=M.T, n_cells=2)


def test_closed_form_matches_numerical_integration(ldc_both):
    _, truth = ldc_both
    A = truth.B - np.eye(4)
    rng = np.random.default_rng(0)
    for t in (0.0, 0.3, 2.0, 8.0):
        np.testing.assert_allclose(truth.expm(t), expm(A * t), atol=1e-12)
    for label in ["control", "P1", "P0+P3", {"P2": 0.5, "P1": -2.0}]:
        l = truth.registry.encode(label)
        z0 = truth.mu + rng.standard_normal(4)
        t_eval = np.array([0.1, 0.5, 1.0, 3.0, 8.0])
        # relaxing: deviations from mu decay; persistent: z0 is the cell's own set point
        anchor = truth.mu if truth.heterogeneity == "relaxing" else z0

        def rhs(_t, z, l=l, anchor=anchor):
            return A @ (z - anchor) + truth.S @ l

        sol = solve_ivp(rhs, (0.0, 8.0), z0, method="DOP853", t_eval=t_eval, rtol=1e-12, atol=1e-12)
        assert sol.success
        closed = np.stack([truth.solve(z0, label, t) for t in t_eval])
        np.testing.assert_allclose(closed, sol.y.T, atol=1e-6, rtol=0)
        # per-row times
        np.testing.assert_allclose(truth.solve(np.tile(z0, (5, 1)), label, t_eval), closed, atol=1e-12)


def test_long_time_mean_is_equilibrium_shift(ldc):
    _, truth = ldc
    W_eq = np.linalg.solve(np.eye(4) - truth.B, truth.S)
    for label in ["P0", "P2+P3", "P1:0.5"]:
        l = truth.registry.encode(label)
        z_inf = truth.latent_mean(label, 200.0)
        np.testing.assert_allclose(z_inf, truth.mu + W_eq @ l, atol=1e-9)
        # it is a fixed point of the drift
        np.testing.assert_allclose((truth.B - np.eye(4)) @ (z_inf - truth.mu) + truth.S @ l, 0.0, atol=1e-9)
        np.testing.assert_allclose(truth.latent_mean(label, 0.0), truth.mu, atol=1e-12)
    traj = truth.latent_mean("P0", [0.0, 1.0, 200.0])
    assert traj.shape == (3, 4)


def test_dynamics_layout_and_per_time_means(ldc_both):
    adata, truth = ldc_both
    times = adata.obs["time"].to_numpy()
    labels = _labels_of(adata)
    assert sorted(np.unique(times)) == [0.5, 1.0, 2.0, 4.0, 8.0]
    pdata = from_anndata(adata, "perturbation", "control", time_key="time")
    assert pdata.registry.names == truth.names == ("P0", "P1", "P2", "P3")
    assert set(pdata.conditions) == set(truth.train_labels) | set(truth.test_labels)
    for e, lab in enumerate(pdata.conditions):
        np.testing.assert_array_equal(pdata.design[e], truth.registry.encode(lab))
    np.testing.assert_allclose(pdata.times, times)
    assert len([lab for lab in truth.test_labels if truth.groups[lab] == "double"]) == 3
    split = adata.obs["split"].astype(str).to_numpy()
    assert set(split[np.isin(labels, truth.test_labels)]) == {"test"}

    z, z0 = adata.obsm["z_true"], adata.obsm["z_base_true"]
    ctrl = labels == "control"
    if truth.heterogeneity == "persistent":
        np.testing.assert_allclose(z[ctrl], z0[ctrl], atol=1e-12)  # each cell's own steady state
    else:
        late = ctrl & (times == 8.0)
        assert np.all(z[late].std(axis=0) < 0.5 * z0[late].std(axis=0))  # deviations relax
    for lab in np.unique(labels):
        for t in np.unique(times):
            rows = (labels == lab) & (times == t)
            np.testing.assert_allclose(z[rows], truth.solve(z0[rows], lab, t), atol=1e-12)
            var = np.diag(truth.latent_cov(t))
            n = rows.sum()
            err = z[rows].mean(axis=0) - truth.latent_mean(lab, t)
            assert np.all(np.abs(err) < 4 * np.sqrt(var / n)), (lab, t, err)
            # Gaussian sample variance: sd ~ var * sqrt(2 / n)
            assert np.all(np.abs(z[rows].var(axis=0) - var) < 4.5 * var * np.sqrt(2 / n)), (lab, t)
    # perturbed programs actually move over time (the effects are visible)
    p = (labels == "P0") & (times == 8.0)
    assert np.abs(z[p].mean(axis=0) - truth.mu).max() > 5 * np.sqrt(truth.Sigma_0.diagonal().max() / p.sum())


def test_dynamics_with_diffusion_matches_euler_maruyama():
    adata, truth = simulate_latent_dynamics(
        n_programs=3, n_perturbations=2, times=(0.5, 3.0), n_cells=1500, n_genes=4, diffusion=0.5, seed=9,
        heterogeneity="relaxing",  # the SDE below is anchored at mu
    )
    labels = _labels_of(adata)
    times = adata.obs["time"].to_numpy()
    A = truth.B - np.eye(3)
    drive = truth.S @ truth.registry.encode("P0")
    # Euler-Maruyama with small steps, started from the same basal law (independent of the
    # exact-transition sampler used by the simulator)
    rng = np.random.default_rng(1)
    n, dt = 3000, 0.002
    y = truth.mu + np.sqrt(np.diag(truth.Sigma_0)) * rng.standard_normal((n, 3))
    em = {}
    for step in range(1, 1501):
        y = y + ((y - truth.mu) @ A.T + drive) * dt + truth.diffusion * np.sqrt(dt) * rng.standard_normal((n, 3))
        if step in (250, 1500):
            em[round(step * dt, 6)] = y.copy()
    for t in (0.5, 3.0):
        rows = (labels == "P0") & (times == t)
        z = adata.obsm["z_true"][rows]
        cov = truth.latent_cov(t)
        sd = np.sqrt(np.diag(cov))
        for sample in (z, em[t]):
            m = sample.shape[0]
            assert np.all(np.abs(sample.mean(axis=0) - truth.latent_mean("P0", t)) < 4 * sd / np.sqrt(m))
            # covariance entries: sd of a sample covariance ~ sqrt((s_ii s_jj + s_ij^2) / m)
            tol = 4 * np.sqrt((np.outer(sd**2, sd**2) + cov**2) / m)
            assert np.all(np.abs(np.cov(sample.T) - cov) < tol), t
        # the diffusion adds spread beyond the transported basal covariance, in the data too
        e = expm(A * t)
        deterministic = e @ truth.Sigma_0 @ e.T
        assert np.all(np.diag(cov) - np.diag(deterministic) > 0.05)
        assert np.all(z.var(axis=0) > np.diag(deterministic) + 0.05)
        resid = z - truth.solve(adata.obsm["z_base_true"][rows], "P0", t)
        assert np.all(resid.std(axis=0) > 0.1)


def test_dynamics_counts_and_sampling():
    adata, truth = simulate_latent_dynamics(n_cells=20, counts=True, seed=4)
    check_counts(adata.layers["counts"], "layers['counts']")
    pdata = from_anndata(adata, "perturbation", "control", layer="counts", counts=True, time_key="time")
    assert pdata.n_cells == adata.n_obs
    assert "library_size" in adata.obs
    x = truth.sample("P0+P1", 2.0, 30, seed=0)
    np.testing.assert_array_equal(x, truth.sample("P0+P1", 2.0, 30, seed=0))
    assert x.shape == (30, 20) and np.all(x >= 0)
    zs = truth.sample_latent("P0+P1", 2.0, 4000, seed=1)
    cov = truth.latent_cov(2.0)
    se = np.sqrt(np.diag(cov) / 4000)
    assert np.all(np.abs(zs.mean(axis=0) - truth.latent_mean("P0+P1", 2.0)) < 4 * se)


def test_default_dynamics_control_cells_are_stationary():
    """Issue 16 item 5: with the defaults the simulated control cells have the same latent law at
    every time (N(mu, Sigma_0), the control steady state), in the data and in the truth's moments."""
    adata, truth = simulate_latent_dynamics(
        n_programs=3, n_perturbations=2, times=(0.5, 8.0), n_cells=1500, n_genes=3, edge_prob=1.0, seed=3
    )
    labels, times = _labels_of(adata), adata.obs["time"].to_numpy()
    sd = np.sqrt(np.diag(truth.Sigma_0))
    tol = 4 * np.sqrt((np.outer(sd**2, sd**2) + truth.Sigma_0**2) / 1500)
    for t in (0.5, 8.0):
        z = adata.obsm["z_true"][(labels == "control") & (times == t)]
        assert np.all(np.abs(np.cov(z.T) - truth.Sigma_0) < tol), t
        assert np.all(np.abs(z.mean(0) - truth.mu) < 4 * sd / np.sqrt(1500)), t
        np.testing.assert_allclose(truth.latent_cov(t), truth.Sigma_0, atol=1e-12)
