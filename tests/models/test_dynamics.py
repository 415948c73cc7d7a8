"""The latent dynamical causal programs model (DESIGN 2.2) and its blocks."""

import functools
import json
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from numpyro import handlers

from perturbax.data import simulate_latent_dynamics
from perturbax.models.batch import Batch
from perturbax.models.dynamics import (
    CausalMLP,
    LatentDynamicsConfig,
    acyclicity_measure,
    causal_order,
    check_stable,
    check_times,
    equilibrium_shift,
    full_mask,
    is_acyclic,
    latent_dynamics_model,
    linear_solution,
    lower_triangular_mask,
    mechanism_weights,
    neural_drift,
    order_from_effects,
    order_mask,
    ou_noise_cov,
    sole_target_mask,
    stationary_noise_cov,
    transition_matrix,
)
from perturbax.theory import w_to_bs

SMALL = dict(decoder_hidden=(8,), drift_hidden=(8,))
#: Tests that set ``S`` to a value: a sample site under the normal prior (deterministic under the default horseshoe).
GIVEN_S = dict(s_prior="normal")
TIMES = np.array([0.0, 0.0, 0.4, 1.0, 2.0, 3.0, 6.0, 12.0], np.float32)


def _batch(n=8, G=6, K=3, C=0, x=True, counts=False, t=TIMES, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.poisson(3.0, (n, G)) if counts else rng.normal(size=(n, G))
    return Batch(
        x=jnp.asarray(xs, jnp.float32) if x else None,
        l=jnp.asarray(rng.integers(0, 2, (n, K)), jnp.float32).at[0].set(0.0),
        c=jnp.asarray(np.eye(C)[rng.integers(0, C, n)], jnp.float32) if C else None,
        library=jnp.full((n,), 40.0),
        t=jnp.asarray(t, jnp.float32),
    )


@functools.cache
def _compiled(cfg, n_cells, data_keys, seed):
    def run(batch, data):
        model = handlers.condition(latent_dynamics_model, data=dict(zip(data_keys, data, strict=True)))
        with handlers.seed(rng_seed=seed):
            tr = handlers.trace(model).get_trace(batch, config=cfg, n_cells=n_cells)
        vals = {k: s["value"] for k, s in tr.items() if s["type"] in ("sample", "deterministic")}
        vals.update({f"{k}#log_factor": s["fn"].log_factor for k, s in tr.items() if k == "ode_failure"})
        params = {k: s["value"] for k, s in tr.items() if s["type"] == "param"}
        return vals, params

    return jax.jit(run)


def _run(cfg, batch, data=None, n_cells=50, seed=0):
    """Site values of one (jit-compiled) trace; the same config and shapes compile once."""
    data = data or {}
    keys = tuple(sorted(data))
    return _compiled(cfg, n_cells, keys, seed)(batch, tuple(jnp.asarray(data[k]) for k in keys))


def _site_info(cfg, batch, n_cells=50):
    """``{name: (type, is_observed, in_cell_plate)}`` by abstract evaluation (nothing compiled)."""
    info = {}

    def run(b):
        with handlers.seed(rng_seed=0):
            tr = handlers.trace(latent_dynamics_model).get_trace(b, config=cfg, n_cells=n_cells)
        for k, s in tr.items():
            plate = any(f.name == "cells" for f in s.get("cond_indep_stack", ()))
            info[k] = (s["type"], s.get("is_observed", False), plate)
        return 0

    jax.eval_shape(run, batch)
    return info


# ------------------------------------------------------------------------------------------
# Closed form, transition, noise
# ------------------------------------------------------------------------------------------
def test_transition_series_equals_expm():
    rng = np.random.default_rng(0)
    B = np.tril(rng.normal(0, 1.0, (5, 5)), -1)
    ts = np.array([0.0, 0.1, 1.0, 4.0, 30.0])
    series = np.asarray(transition_matrix(jnp.asarray(B, jnp.float32), jnp.asarray(ts), nilpotent=True))
    expm = np.asarray(transition_matrix(jnp.asarray(B, jnp.float32), jnp.asarray(ts)))
    for i, t in enumerate(ts):
        ref = scipy.linalg.expm((B - np.eye(5)) * t)
        np.testing.assert_allclose(series[i], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(expm[i], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(series[0], np.eye(5))
    # (B - I) is triangular with every eigenvalue -1: E_t has diagonal e^{-t}.
    np.testing.assert_allclose(np.diagonal(series, axis1=1, axis2=2), np.exp(-ts)[:, None] * np.ones(5), rtol=1e-6)


@pytest.mark.parametrize("nilpotent", [True, False])
def test_long_time_limit_is_additive_shift(nilpotent):
    rng = np.random.default_rng(1)
    ell, K, n = 4, 3, 6
    B = np.tril(rng.normal(0, 0.8, (ell, ell)), -1)
    S = rng.normal(size=(ell, K))
    mu = rng.normal(size=ell)
    lab = rng.integers(0, 3, (n, K)).astype(float)
    z0 = rng.normal(size=(n, ell))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    args = dict(B=f32(B), shift=f32(lab @ S.T), anchor=f32(mu))
    z_inf = linear_solution(jnp.asarray(z0, jnp.float32), jnp.full((n,), 80.0), nilpotent=nilpotent, **args)
    W = np.linalg.solve(np.eye(ell) - B, S)
    np.testing.assert_allclose(np.asarray(z_inf), mu + lab @ W.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(equilibrium_shift(B, S), W, rtol=1e-10)
    W_jax = jax.jit(equilibrium_shift)(jnp.asarray(B), jnp.asarray(S))
    np.testing.assert_allclose(np.asarray(W_jax), W, rtol=1e-5, atol=1e-6)
    # ... and at t = 0 nothing has happened yet.
    z_0 = linear_solution(jnp.asarray(z0, jnp.float32), jnp.zeros(n), nilpotent=nilpotent, **args)
    np.testing.assert_allclose(np.asarray(z_0), z0, rtol=1e-6, atol=1e-6)


def test_noise_covariance_matches_lyapunov_and_simulator():
    _, truth = simulate_latent_dynamics(n_programs=4, n_perturbations=2, n_cells=2, n_genes=3, diffusion=0.7, seed=3)
    B = jnp.asarray(truth.B, jnp.float32)
    ref_P = scipy.linalg.solve_continuous_lyapunov(truth.drift_matrix, -np.eye(4))
    for nilpotent in (True, False):
        P = np.asarray(stationary_noise_cov(B, nilpotent=nilpotent))
        np.testing.assert_allclose(P, ref_P, rtol=1e-4, atol=1e-5)
    ts = np.array([0.0, 0.5, 3.0])
    Q = np.asarray(ou_noise_cov(B, jnp.asarray(ts), nilpotent=True))
    for i, t in enumerate(ts):
        np.testing.assert_allclose(0.7**2 * Q[i], truth.noise_cov(t), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(Q[0], np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------
# Drift blocks
# ------------------------------------------------------------------------------------------
@eqx.filter_jit
def _drift_jacobian(g, z, a, s):
    return jax.jacfwd(lambda v: neural_drift(g, v, a, s))(z), neural_drift(g, a, a, s)


def test_neural_drift_jacobian_respects_causal_mask():
    ell = 5
    custom = np.array([[0, 0, 1, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]])
    rng = np.random.default_rng(0)
    for mask in (lower_triangular_mask(ell), custom):
        assert is_acyclic(mask)
        g = CausalMLP(mask, (16,), key=jax.random.PRNGKey(0), init_scale=1.0)
        z, a, s = (jnp.asarray(rng.normal(size=(3, ell)), jnp.float32) for _ in range(3))
        J, at_anchor = jax.vmap(_drift_jacobian, in_axes=(None, 0, 0, 0))(g, z, a, s)
        J = np.asarray(J)
        off = J + np.eye(ell)
        assert np.all(off[:, mask == 0] == 0.0)  # exactly zero, not just small
        assert np.all(np.diagonal(J, axis1=1, axis2=2) == -1.0)
        assert np.all(np.abs(off[:, mask == 1]) > 0)  # parents do act
        np.testing.assert_allclose(np.asarray(at_anchor), np.asarray(s), atol=1e-6)  # F(0) = 0
    assert not is_acyclic(custom + custom.T)


def test_mechanism_weights_replace_targeted_rows():
    ell, K = 4, 2
    B = jnp.asarray(np.tril(np.full((ell, ell), 0.5), -1))
    delta = np.zeros((K, ell, ell))
    delta[0, 2, :2] = [1.0, -2.0]  # perturbation 0 rewires program 2
    delta[1, 3, 1:3] = [0.25, 0.75]  # perturbation 1 rewires program 3
    Bl = np.asarray(mechanism_weights(B, jnp.asarray(delta), jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])))
    np.testing.assert_allclose(Bl[0], B)
    np.testing.assert_allclose(Bl[1][2], [1.5, -1.5, 0.0, 0.0])  # row 2 replaced
    np.testing.assert_allclose(np.delete(Bl[1], 2, axis=0), np.delete(np.asarray(B), 2, axis=0))
    np.testing.assert_allclose(Bl[2][2], [1.0, -0.5, 0.0, 0.0])  # half dose: half the change
    np.testing.assert_allclose(Bl[2][3], [0.5, 0.75, 1.25, 0.0])


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(likelihood="gaussian", n_covariates=2, state_dim=2, target_mask=((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0))),
        dict(
            likelihood="negative_binomial",
            b_prior="horseshoe",
            s_prior="horseshoe",
            learn_rate=True,
            causal_mask=((0, 0, 1, 0), (1, 0, 0, 0), (0, 0, 0, 0), (0, 1, 1, 0)),
            target_mask=((0, 1, 1), (1, 0, 0), (0, 0, 1), (0, 0, 0)),
        ),
        dict(
            likelihood="implicit",
            drift="mechanism",
            diffusion=True,
            heterogeneity="relaxing",
            mechanism_targets=((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)),
        ),
    ],
    ids=["gaussian", "negative_binomial", "implicit"],
)
def test_model_traces_with_documented_sites(kwargs):
    ell, K, G, n = 4, 3, 6, TIMES.size
    cfg = LatentDynamicsConfig(n_genes=G, n_perturbations=K, latent_dim=ell, **SMALL, **kwargs)
    C = cfg.n_covariates
    batch = _batch(n=n, G=G, K=K, C=C, x=cfg.likelihood != "implicit", counts=cfg.likelihood == "negative_binomial")
    info = _site_info(cfg, batch)
    v, params = _run(cfg, batch)

    mask = cfg.mask
    assert v["B_free"].shape == (int(mask.sum()),) and v["B"].shape == (ell, ell)
    B = np.asarray(v["B"])
    assert np.all(B[mask == 0] == 0.0) and np.all(B[mask == 1] != 0.0)
    if cfg.causal_mask is None:  # the default: strictly lower triangular
        assert np.all(np.triu(B) == 0.0) and np.all(B[np.tril_indices(ell, -1)] != 0.0)
    assert v["S"].shape == (ell, K) and v["mu"].shape == (ell,) and v["basal_sd"].shape == (ell,)
    S = np.asarray(v["S"])
    if cfg.target_mask is None:
        assert np.all(S != 0.0)
    else:  # S is zero exactly off the target mask and free on it
        tm = np.asarray(cfg.target_mask)
        assert np.all(S[tm == 0] == 0.0) and np.all(S[tm == 1] != 0.0)
        assert info["S"][0] == "deterministic"
        assert v["S_free"].shape == (int(tm.sum()),)  # only the allowed entries are sampled, as for B
    for site in ("z_base", "z"):
        assert v[site].shape == (n, ell) and info[site][2]
    assert info["z"][0] == "deterministic" and info["z_base"][0] == "sample"
    assert v["x"].shape == (n, G)
    assert info["x"][1] == (cfg.likelihood != "implicit")
    if cfg.likelihood != "implicit":
        assert v["x_mean"].shape == (n, G) and np.all(np.isfinite(np.asarray(v["x_mean"])))
    else:
        assert info["x"][0] == "deterministic" and v["eta"].shape == (n, cfg.noise_dim)
    if cfg.likelihood == "negative_binomial":
        np.testing.assert_allclose(np.asarray(v["x_mean"]).sum(-1), 40.0, rtol=1e-4)
    # Only documented per-cell sites.
    plate_sites = {k for k, (typ, obs, plate) in info.items() if plate and typ == "sample" and not obs}
    expected = {"z_base"}
    expected |= {"s"} if cfg.state_dim else set()
    expected |= {"z_noise"} if cfg.diffusion else set()
    expected |= {"eta"} if cfg.likelihood == "implicit" else set()
    assert plate_sites == expected

    # z(t) is the closed form from the traced globals and z_base (with rate, covariates, mechanisms).
    t = np.asarray(batch.t) * (float(v["rate"]) if cfg.learn_rate else 1.0)
    anchor = v["mu"] + (batch.c @ v["V"].T if C else 0.0)
    if cfg.heterogeneity == "persistent":  # the default: each cell's basal state is its steady state
        anchor = v["z_base"]
    Bc = mechanism_weights(v["B"], v["B_delta"], batch.l) if cfg.drift == "mechanism" else v["B"]
    z_det = linear_solution(v["z_base"], jnp.asarray(t), Bc, batch.l @ v["S"].T, anchor, nilpotent=True)
    if cfg.diffusion:
        assert v["diffusion"].shape == ()
        Q = ou_noise_cov(Bc, jnp.asarray(t), nilpotent=True)
        L = np.linalg.cholesky(np.asarray(Q) + 1e-6 * np.eye(ell))
        z_det = z_det + v["diffusion"] * np.einsum("nij,nj->ni", L, v["z_noise"])
    np.testing.assert_allclose(np.asarray(v["z"]), np.asarray(z_det), rtol=1e-4, atol=1e-5)
    # The two cells at t = 0 are at their basal state (up to the 1e-6 jitter of the noise factor).
    tol = 1e-2 if cfg.diffusion else 1e-6
    np.testing.assert_allclose(np.asarray(v["z"][:2]), np.asarray(v["z_base"][:2]), atol=tol)

    if cfg.drift == "mechanism":
        assert v["B_delta"].shape == (K, ell, ell)
        allowed = np.asarray(cfg.targets).T[:, :, None] * mask[None]
        assert v["B_delta_free"].shape == (int(allowed.sum()),)
        assert np.all(np.asarray(v["B_delta"])[allowed == 0] == 0.0)
    if C:
        assert v["V"].shape == (ell, C)
    if cfg.state_dim:
        assert v["s"].shape == (n, cfg.state_dim)
        first = params["decoder$params"].layers[0].weight
        assert first.shape[1] == ell + cfg.state_dim  # the decoder sees [z(t), s]


def test_model_ode_solver_matches_closed_form():
    ell, K, G = 4, 3, 5
    batch = _batch(n=TIMES.size, G=G, K=K)
    rng = np.random.default_rng(5)
    data = {
        "B_free": rng.normal(0, 0.8, 6),
        "S": rng.normal(size=(ell, K)),
        "mu": rng.normal(size=ell),
        "z_base": rng.normal(size=(TIMES.size, ell)),
        "B_delta_free": rng.normal(0, 0.5, 3 * 6),
    }
    out = {}
    for solver in ("closed_form", "ode"):
        cfg = LatentDynamicsConfig(
            n_genes=G, n_perturbations=K, latent_dim=ell, drift="mechanism", solver=solver, **SMALL, **GIVEN_S
        )
        v, _ = _run(cfg, batch, data)
        out[solver] = v
    assert out["ode"]["ode_failure#log_factor"].shape == (TIMES.size,)
    np.testing.assert_array_equal(np.asarray(out["ode"]["ode_failure#log_factor"]), 0.0)
    assert np.abs(np.asarray(out["ode"]["z"] - out["ode"]["z_base"])).max() > 0.5  # cells did move
    np.testing.assert_allclose(np.asarray(out["ode"]["z"]), np.asarray(out["closed_form"]["z"]), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(out["ode"]["x_mean"]), np.asarray(out["closed_form"]["x_mean"]), rtol=1e-4, atol=1e-4
    )

    # A cell at an extreme time needs more than max_steps: a finite state and a finite penalty
    # on that cell only, no crash (same compiled model: only the data changed).
    v, _ = _run(cfg, batch._replace(t=batch.t.at[-1].set(1e5)), data)
    log_factor = np.asarray(v["ode_failure#log_factor"])
    np.testing.assert_array_equal(log_factor, [0.0] * (TIMES.size - 1) + [-cfg.failure_penalty])
    assert np.all(np.isfinite(np.asarray(v["z"]))) and np.all(np.isfinite(np.asarray(v["x_mean"])))
    np.testing.assert_allclose(np.asarray(v["z"][:-1]), np.asarray(out["ode"]["z"][:-1]))


def _numpy_causal_mlp(g, mask):
    """An independent NumPy forward pass of a (silu) CausalMLP from its stacked weights."""
    Ws = [np.asarray(layer.weight, np.float64) for layer in g.nets.layers]
    bs = [np.asarray(layer.bias, np.float64) for layer in g.nets.layers]

    def silu(h):
        return h / (1.0 + np.exp(-h))

    def forward(u):
        out = np.empty(mask.shape[0])
        for i in range(mask.shape[0]):
            h = u * mask[i]
            for W, b in zip(Ws[:-1], bs[:-1], strict=True):
                h = silu(W[i] @ h + b[i])
            out[i] = (Ws[-1][i] @ h + bs[-1][i])[0]
        return out

    return forward


def test_model_neural_drift_matches_reference_solver():
    ell, K, G = 4, 2, 5
    batch = _batch(n=4, G=G, K=K, t=np.array([0.0, 0.7, 2.0, 5.0]))
    cfg = LatentDynamicsConfig(n_genes=G, n_perturbations=K, latent_dim=ell, drift="neural", **SMALL, **GIVEN_S)
    assert cfg.solver == "ode"
    rng = np.random.default_rng(6)
    S = rng.normal(size=(ell, K))
    v, params = _run(cfg, batch, {"S": S})
    assert "B" not in v and np.all(np.asarray(v["ode_failure#log_factor"]) == 0.0)
    g = _numpy_causal_mlp(params["drift$params"], cfg.mask.astype(float))
    assert np.abs(g(rng.normal(size=ell)) - g(np.zeros(ell))).max() > 1e-3  # a nonlinear drift, not -u
    assert cfg.heterogeneity == "persistent"  # the default: the drift is anchored at each cell's z(0)
    lab = np.asarray(batch.l, np.float64)
    g0 = g(np.zeros(ell))
    for i, t in enumerate(np.asarray(batch.t, np.float64)):
        if t == 0:
            np.testing.assert_array_equal(np.asarray(v["z"][i]), np.asarray(v["z_base"][i]))
            continue
        z0 = np.asarray(v["z_base"][i], np.float64)

        def rhs(_t, y, i=i, z0=z0):
            u = y - z0
            return -u + g(u) - g0 + S @ lab[i]

        ref = scipy.integrate.solve_ivp(rhs, (0.0, t), z0, method="DOP853", rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(v["z"][i]), ref.y[:, -1], rtol=1e-4, atol=1e-4)


def _simulated_batch(truth, adata):
    lab = np.stack([truth.label_vector(s) for s in adata.obs["perturbation"]])
    return Batch(x=None, l=jnp.asarray(lab, jnp.float32), t=jnp.asarray(adata.obs["time"].to_numpy(), jnp.float32))


def _truth_sites(truth):
    rows, cols = np.nonzero(lower_triangular_mask(truth.n_programs))
    return {"B_free": truth.B[rows, cols], "S": truth.S, "mu": truth.mu, "basal_sd": np.sqrt(np.diag(truth.Sigma_0))}


@pytest.mark.parametrize(
    ("heterogeneity", "solver"), [("relaxing", "closed_form"), ("relaxing", "ode"), ("persistent", "closed_form")]
)
def test_model_reproduces_simulator(heterogeneity, solver):
    adata, truth = simulate_latent_dynamics(
        n_programs=4,
        n_perturbations=3,
        times=(0.0, 0.5, 2.0, 8.0),
        n_cells=2,
        n_genes=5,
        heterogeneity=heterogeneity,
        seed=11,
    )
    assert np.any(truth.B)
    batch = _simulated_batch(truth, adata)
    n = batch.size
    cfg = LatentDynamicsConfig(
        n_genes=5,
        n_perturbations=3,
        latent_dim=4,
        likelihood="implicit",
        heterogeneity=heterogeneity,
        solver=solver,
        **SMALL,
        **GIVEN_S,
    )
    sites = _truth_sites(truth)
    # Each cell from its true basal state: the model's z(t) is the simulator's z(t).
    v, _ = _run(cfg, batch, {**sites, "z_base": adata.obsm["z_base_true"]}, n_cells=n)
    np.testing.assert_allclose(np.asarray(v["z"]), adata.obsm["z_true"], rtol=1e-4, atol=5e-5)
    # From the basal mean: the model's z(t) is the simulator's population mean of z(t).
    v, _ = _run(cfg, batch, {**sites, "z_base": np.broadcast_to(truth.mu, (n, 4))}, n_cells=n)
    cells = zip(adata.obs["perturbation"], adata.obs["time"], strict=True)
    expected = np.stack([truth.latent_mean(lab, t) for lab, t in cells])
    np.testing.assert_allclose(np.asarray(v["z"]), expected, rtol=1e-4, atol=5e-5)
    late = adata.obs["time"].to_numpy() == 8.0
    assert np.abs(expected[late] - truth.mu).max() > 0.5  # the perturbations did move the programs


def test_model_mean_over_cells_matches_simulator_population():
    """Unconditioned basal states: the model's population of z(t) has the simulator's mean and
    covariance (diffusion included)."""
    _, truth = simulate_latent_dynamics(n_programs=3, n_perturbations=2, n_cells=2, n_genes=4, diffusion=0.4, seed=2)
    n, t = 4000, 1.5
    label = "P0+P1"
    labels = jnp.tile(jnp.asarray(truth.label_vector(label), jnp.float32), (n, 1))
    batch = Batch(x=None, l=labels, t=jnp.full((n,), t))
    cfg = LatentDynamicsConfig(
        n_genes=4, n_perturbations=2, latent_dim=3, likelihood="implicit", diffusion=True, **SMALL, **GIVEN_S
    )
    v, _ = _run(cfg, batch, {**_truth_sites(truth), "diffusion": 0.4}, n_cells=n, seed=1)
    z = np.asarray(v["z"], np.float64)
    np.testing.assert_allclose(z.mean(0), truth.latent_mean(label, t), atol=0.05)
    np.testing.assert_allclose(np.cov(z.T), truth.latent_cov(t), atol=0.02)


def test_default_control_population_is_stationary():
    """Issue 16 item 5: with the defaults, N(mu, Sigma_0) is the control steady state: the control
    population's latent law is the same at t = 0 and at a late time, in the simulator (exact
    moments and samples) and in the model (the same sites drawn at both times)."""
    _, truth = simulate_latent_dynamics(n_programs=3, n_perturbations=2, edge_prob=1.0, n_cells=2, n_genes=4, seed=4)
    late = 30.0
    np.testing.assert_allclose(truth.latent_cov(late), truth.Sigma_0, atol=1e-12)
    np.testing.assert_allclose(truth.latent_mean("control", late), truth.mu, atol=1e-12)
    n = 4000
    for t, seed in ((0.0, 1), (late, 2)):
        z_sim = truth.sample_latent("control", t, n, seed=seed)
        np.testing.assert_allclose(np.cov(z_sim.T), truth.Sigma_0, atol=0.02)
        cfg = LatentDynamicsConfig(n_genes=4, n_perturbations=2, latent_dim=3, likelihood="implicit", **SMALL)
        batch = Batch(x=None, l=jnp.zeros((n, 2)), t=jnp.full((n,), t))
        v, _ = _run(cfg, batch, _truth_sites(truth), n_cells=n, seed=seed)
        z = np.asarray(v["z"], np.float64)
        np.testing.assert_allclose(z.mean(0), truth.mu, atol=0.03)
        np.testing.assert_allclose(np.cov(z.T), truth.Sigma_0, atol=0.02)


# ------------------------------------------------------------------------------------------
# Checks and config
# ------------------------------------------------------------------------------------------
def test_check_times():
    np.testing.assert_array_equal(check_times([0, 1.5]), [0.0, 1.5])
    with pytest.raises(ValueError, match=r"needs the time of every cell"):
        check_times(None)
    with pytest.raises(ValueError, match=r"negative \(first: cell 1, t=-2"):
        check_times(np.array([0.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match=r"NaN or infinite \(first: cell 2"):
        check_times([0.0, 1.0, np.nan])
    cfg = LatentDynamicsConfig(n_genes=3, n_perturbations=2, latent_dim=2, **SMALL)
    with pytest.raises(ValueError, match="negative"):
        with handlers.seed(rng_seed=0):
            latent_dynamics_model(_batch(n=2, G=3, K=2, t=[1.0, -1.0]), config=cfg, n_cells=2)
    with pytest.raises(ValueError, match="needs the time"):
        with handlers.seed(rng_seed=0):
            latent_dynamics_model(_batch(n=2, G=3, K=2, t=[1.0, 1.0])._replace(t=None), config=cfg, n_cells=2)


def test_check_stable():
    assert check_stable(np.tril(np.full((3, 3), 5.0), -1)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unstable"):
        check_stable(np.array([[0.0, 2.0], [2.0, 0.0]]))  # eigenvalues of B - I: 1 and -3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent_dim=0), "latent_dim must be an integer >= 1"),
        (dict(drift="sde"), "drift='sde' is not supported"),
        (dict(drift="neural", solver="closed_form"), "no closed form"),
        (dict(drift="neural", diffusion=True), "diffusion=True is implemented"),
        (dict(causal_mask=((0, 1), (1, 0))), "directed cycle"),
        (dict(causal_mask=((1, 0), (0, 0))), "diagonal"),
        (dict(causal_mask=((0, 0, 0), (1, 0, 0))), "shape"),
        (dict(time_scale=-1.0), "time_scale"),
        (dict(mechanism_targets=((1, 0), (0, 1))), "only used with drift='mechanism'"),
        (dict(target_mask=((1, 0), (1, 0))), r"no program for perturbation column\(s\) \[1\]"),
        (dict(target_mask=((1, 0, 1), (0, 1, 0))), "target_mask must have shape"),
        (dict(target_mask=((2, 0), (0, 1))), "target_mask must contain only 0/1"),
        (dict(b_scale=0.0), "b_scale"),
        (dict(likelihood="poisson"), "likelihood='poisson'"),
        (dict(acyclicity=1.0), "already acyclic"),
        (dict(acyclicity=-1.0), "acyclicity must be"),
        (dict(acyclicity=1.0, drift="neural"), "neural drift has no B"),
    ],
)
def test_config_errors(kwargs, match):
    kw = dict(n_genes=3, n_perturbations=2, latent_dim=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LatentDynamicsConfig(**kw)


def test_config_round_trip_and_defaults():
    cfg = LatentDynamicsConfig(
        n_genes=3,
        n_perturbations=2,
        latent_dim=3,
        drift="mechanism",
        mechanism_targets=np.eye(3, 2),
        target_mask=np.eye(3, 2, dtype=bool),
        decoder_hidden=(8, 4),
    )
    assert cfg.target_mask == ((1, 0), (0, 1), (0, 0))
    assert cfg.name == "latent_dynamics" and cfg.solver == "closed_form" and cfg.n_programs == 3
    assert LatentDynamicsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LatentDynamicsConfig(n_genes=3, n_perturbations=2, drift="neural").solver == "ode"
    cyclic = LatentDynamicsConfig(
        n_genes=3, n_perturbations=2, latent_dim=2, causal_mask=[[0, 1], [1, 0]], allow_cycles=True
    )
    assert not cyclic.acyclic and cyclic.causal_mask == ((0, 1), (1, 0))
    with pytest.raises(ValueError, match="Unknown LatentDynamicsConfig fields"):
        LatentDynamicsConfig.from_dict({**cfg.to_dict(), "extra": 1})


# ------------------------------------------------------------------------- causal order
def test_order_mask_and_causal_order_round_trip():
    assert np.array_equal(order_mask(range(4)), lower_triangular_mask(4))
    m = order_mask([2, 0, 3, 1])
    assert is_acyclic(m) and m.sum() == 6
    assert m[0, 2] == 1 and m[2, 0] == 0 and m[1, 3] == 1 and m[3, 1] == 0
    rng = np.random.default_rng(0)
    for _ in range(5):
        order = rng.permutation(5).tolist()
        B = order_mask(order) * rng.uniform(0.5, 1.5, (5, 5))
        assert causal_order(B) == order
    with pytest.raises(ValueError, match="permutation"):
        order_mask([0, 0, 1])


def test_acyclicity_measure_is_zero_exactly_on_dags():
    dag = order_mask([1, 0, 2]) * 0.7
    assert float(acyclicity_measure(dag)) == pytest.approx(0.0, abs=1e-6)
    cyc = np.array([[0.0, 0.5, 0.0], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # tr(expm(A)) - 3 for a 2-cycle with weights a^2, b^2: 2 cosh(sqrt(a^2 b^2)) - 2
    expected = 2 * np.cosh(0.5 * 0.4) - 2
    assert float(acyclicity_measure(cyc)) == pytest.approx(expected, rel=1e-5)
    g = jax.grad(lambda b: acyclicity_measure(b))(jnp.asarray(cyc))
    assert float(g[0, 1]) > 0 and float(g[1, 0]) > 0 and float(jnp.abs(g[2]).sum()) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_from_effects_recovers_the_order_of_relabelled_programs(seed):
    _, truth = simulate_latent_dynamics(n_programs=4, n_perturbations=5, edge_prob=1.0, n_cells=2, n_genes=3,
                                        seed=seed)
    W = equilibrium_shift(truth.B, truth.S)
    perm = np.random.default_rng(seed).permutation(4)  # fitted program i = true program perm[i]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # single targets: nothing to warn about
        order, b_hat = order_from_effects(W[perm])
    true_order = [int(np.flatnonzero(perm == j)[0]) for j in range(4)]
    assert order == true_order
    np.testing.assert_allclose(b_hat, truth.B[np.ix_(perm, perm)], atol=1e-8)
    with pytest.raises(ValueError, match="K >= l"):
        order_from_effects(W[:, :3])
    # the perturbation matched to each fitted program is the one that targets its true program alone
    again, _, targets = order_from_effects(W[perm], return_targets=True)
    assert again == order
    assert all(np.flatnonzero(truth.S[:, k]).tolist() == [perm[i]] for i, k in enumerate(targets))
    mask = sole_target_mask(targets, W.shape[1])
    assert mask.shape == W.shape and np.array_equal(mask[:, targets], np.eye(4, dtype=np.int64))
    others = np.setdiff1d(np.arange(W.shape[1]), targets)
    assert mask[:, others].all()
    with pytest.raises(ValueError, match="distinct perturbation columns"):
        sole_target_mask([0, 0, 1, 2], W.shape[1])


def _dense_case(seed=0, ell=3):
    _, truth = simulate_latent_dynamics(n_programs=ell, n_perturbations=ell, edge_prob=1.0, n_cells=2, n_genes=3,
                                        seed=seed)
    S = np.random.default_rng(seed).normal(size=(ell, ell))  # every program targeted, none alone
    return truth.B, S, equilibrium_shift(truth.B, S)


def test_order_from_effects_warns_when_dense_targets_leave_the_order_unidentified():
    """Issue 16 item 4: with dense targets W does not determine the order (a reverse-order B'
    reproduces W exactly); given the targets' support, order_from_effects says so."""
    B, S, W = _dense_case()
    B_rev = np.triu(np.random.default_rng(1).normal(size=B.shape), 1)  # acyclic in the reverse order
    _, S_rev = w_to_bs(W, B_rev)
    np.testing.assert_allclose(equilibrium_shift(B_rev, S_rev), W, atol=1e-10)
    with pytest.warns(UserWarning, match="NOT identified"):
        order, b_hat = order_from_effects(W, targets=S != 0)
    assert np.abs(b_hat - B).max() > 0.1  # the order/B read is one of many consistent with W


def test_order_from_effects_without_targets_skips_a_multi_target_perturbation():
    """Without the targets' support, the l perturbations read as sole targets are those whose B_hat
    is acyclic: a perturbation of two programs that QR with column pivoting picks (B_hat then 7%
    cyclic, a warning before) is passed over, and the order and B are exact."""
    _, truth = simulate_latent_dynamics(n_programs=4, n_perturbations=4, edge_prob=1.0, n_cells=2, n_genes=3, seed=3)
    multi = np.zeros((4, 1))
    multi[[0, 2], 0] = [-3.5, 4.0]
    S = np.hstack([multi, truth.S])
    W = equilibrium_shift(truth.B, S)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order, b_hat, targets = order_from_effects(W, return_targets=True)
    assert order == causal_order(truth.B) and targets == [1, 2, 3, 4]
    np.testing.assert_allclose(b_hat, truth.B, atol=1e-8)


def test_order_from_effects_uses_the_sole_target_perturbations():
    """Single-target perturbations next to dense ones: with the targets' support the order and B
    are recovered exactly from the sole-target columns, without a warning."""
    _, truth = simulate_latent_dynamics(n_programs=4, n_perturbations=4, edge_prob=1.0, n_cells=2, n_genes=3, seed=2)
    dense = np.random.default_rng(0).normal(size=(4, 3)) * 3.0
    S = np.hstack([dense, truth.S])  # 3 dense perturbations first, then one per program
    W = equilibrium_shift(truth.B, S)
    perm = np.array([2, 0, 3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order, b_hat = order_from_effects(W[perm], targets=(S != 0)[perm])
    assert order == [int(np.flatnonzero(perm == j)[0]) for j in range(4)]
    np.testing.assert_allclose(b_hat, truth.B[np.ix_(perm, perm)], atol=1e-8)
    with pytest.raises(ValueError, match="shape of W"):
        order_from_effects(W, targets=S[:, :3] != 0)


def test_acyclicity_penalty_enters_the_log_density():
    cfg = LatentDynamicsConfig(n_genes=6, n_perturbations=3, latent_dim=3, causal_mask=full_mask(3),
                               allow_cycles=True, acyclicity=10.0, **SMALL)
    B = np.zeros((3, 3))
    B[0, 1], B[1, 0] = 0.5, 0.4
    free = B[np.nonzero(full_mask(3))]
    b = _batch(K=3)
    tr = handlers.trace(handlers.seed(handlers.condition(latent_dynamics_model, {"B_free": free}), 0)).get_trace(
        b, config=cfg, n_cells=b.size)
    assert float(tr["acyclicity"]["fn"].log_factor) == pytest.approx(-10.0 * (2 * np.cosh(0.2) - 2), rel=1e-5)
