"""Model-level local identifiability of NumPyro models (perturbax.theory.model_check)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from perturbax.models import AdditiveShiftConfig
from perturbax.models.additive_shift import additive_shift_model
from perturbax.theory import (
    FAIL,
    OK,
    WARNING,
    LatentRotation,
    ModelIdentifiabilityReport,
    bs_equivalences,
    linear_dynamics_mask,
    linear_dynamics_summary_fn,
    linear_gaussian_summary_fn,
    local_identifiability,
    model_identifiability,
    model_summary_fn,
)

G, K, H = 6, 3, 16
FIRST = "decoder.layers.0.weight"
N = 300  # simulated cells per context


def _cfg(d, **kw):
    kw.setdefault("decoder_hidden", (H,))
    return AdditiveShiftConfig(n_genes=G, n_perturbations=kw.pop("K", K), latent_dim=d, **kw)


def _gauge(d, hidden=H):
    """Fix the strict upper triangle of the top d x d block of the first layer: every latent
    rotation moves it, so it removes the rotations from the free parameters."""
    m = np.ones((hidden, d), dtype=bool)
    m[np.triu_indices(d, 1)] = False
    return {FIRST: m}


DIVERSE = np.vstack([np.zeros(K), np.eye(K), [1.0, 1.0, 0.0]])  # control, singles, a double
ONE_SINGLE = np.vstack([np.zeros(K), np.eye(K)[:1]])  # P1, P2 never measured
ONLY_TOGETHER = np.vstack([np.zeros(K), [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # P0, P1 only as a pair


@pytest.fixture(scope="module")
def diverse_d3():
    return model_identifiability(additive_shift_model, DIVERSE, config=_cfg(3), n_samples=N)


def test_diverse_design_has_exactly_the_rotations(diverse_d3):
    rep, d = diverse_d3, 3
    assert isinstance(rep, ModelIdentifiabilityReport)
    assert rep.sites == ("W", FIRST) and rep.latent_frame and rep.observable == "x_mean"
    assert rep.n_params == d * K + H * d and rep.n_contexts == len(DIVERSE)
    assert rep.n_summaries == len(DIVERSE) * (G + G * (G + 1) // 2)
    assert rep.symmetry_names == ("latent rotation (0, 1)", "latent rotation (0, 2)", "latent rotation (1, 2)")
    assert rep.n_null == rep.n_symmetries == d * (d - 1) // 2
    assert rep.n_unexpected == 0 and rep.identifiable and rep.status == OK
    assert rep.symmetry_defect < 1e-12  # rotations are exact null directions of the simulated summaries
    m = rep.margins
    assert m["largest_dropped"] < 1e-12 * m["smallest_kept"] and m["gap"] > 1e9
    assert m["largest_dropped"] < m["tolerance"] < m["smallest_kept"]


def test_undeclared_rotations_show_up_as_unexpected():
    rep = model_identifiability(additive_shift_model, DIVERSE, config=_cfg(2), n_samples=N, symmetries=())
    assert rep.symmetry_names == () and rep.n_symmetries == 0
    assert rep.n_null == rep.n_unexpected == 1 and rep.status == FAIL
    # the rotation moves W and the first layer together
    assert set(rep.unexpected_by_parameter) == {"W", FIRST}
    assert abs(sum(rep.unexpected_by_parameter.values()) - 1.0) < 1e-9


def test_too_small_design_has_more_null_directions():
    d = 2
    rep = model_identifiability(additive_shift_model, ONE_SINGLE, config=_cfg(d), n_samples=N)
    assert rep.n_symmetries == 1 and rep.symmetry_defect < 1e-12
    # the shifts of the two unmeasured perturbations are free: d (K - 1) more directions
    assert rep.n_unexpected == d * (K - 1) == 4 and rep.status == FAIL
    assert rep.n_null == 1 + 4
    for i in range(d):
        for k in (1, 2):
            assert rep.unexpected_entries[f"W[{i},{k}]"] > 0.5
    # the basis is taken orthogonal to the rotation, which also moves W[:, 0] and the first layer a
    # little; the weight of the unexpected space sits on the unmeasured columns
    assert all(rep.unexpected_entries.get(f"W[{i},0]", 0.0) < 0.5 for i in range(d))
    assert rep.unexpected_by_parameter["W"] > 0.95 * rep.n_unexpected
    kept, dropped = rep.gap
    assert dropped < 1e-12 * kept
    assert "Not locally identifiable" in rep.message and "W" in rep.message
    text = str(rep)
    assert "unexpected null directions: 4" in text and "latent rotation (0, 1)" in text


def test_fewer_perturbations_than_latent_dims_adds_no_local_null_direction():
    # K = 2 < d = 3 but every perturbation measured: with the base fixed to N(0, I) the law of the
    # first-layer input, N(A W l + b, A A^T), pins A up to a rotation and then W -- so only the
    # rotations are null (the design-level rank >= d condition is about something else)
    d, k = 3, 2
    rep = model_identifiability(
        additive_shift_model, np.vstack([np.zeros(k), np.eye(k)]), config=_cfg(d, K=k), n_samples=N
    )
    assert rep.n_null == rep.n_symmetries == 3 and rep.n_unexpected == 0 and rep.status == OK
    assert rep.margins["gap"] > 1e9


def test_perturbations_measured_only_together():
    # with the rotation gauge fixed, the null space is exactly W[:, 0] - W[:, 1]
    d = 2
    rep = model_identifiability(
        additive_shift_model, ONLY_TOGETHER, config=_cfg(d), n_samples=N, symmetries=(), mask=_gauge(d)
    )
    assert rep.n_unexpected == rep.n_null == d
    assert set(rep.unexpected_entries) == {"W[0,0]", "W[0,1]", "W[1,0]", "W[1,1]"}
    assert all(abs(v - 0.5) < 1e-8 for v in rep.unexpected_entries.values())
    for direction in rep.unexpected_directions:
        w = direction.weights
        for i in range(d):
            assert abs(w.get(f"W[{i},0]", 0.0) + w.get(f"W[{i},1]", 0.0)) < 1e-8


def test_rank_is_full_once_the_rotation_is_removed():
    d = 3
    # (a) gauge-fixing d(d-1)/2 first-layer entries removes exactly the rotations
    gauged = model_identifiability(
        additive_shift_model, DIVERSE, config=_cfg(d), n_samples=N, symmetries=(), mask=_gauge(d)
    )
    assert gauged.n_params == d * K + H * d - d * (d - 1) // 2
    assert gauged.n_null == 0 and gauged.status == OK
    assert gauged.margins["smallest_kept"] > 1e-6 * float(gauged.singular_values[0])
    # (b) holding the first layer fixed leaves no symmetry, and W alone is identified
    w_only = model_identifiability(additive_shift_model, DIVERSE, config=_cfg(d), n_samples=N, sites=["W"])
    assert w_only.sites == ("W",) and w_only.symmetry_names == ()
    assert w_only.n_params == d * K and w_only.n_null == 0 and w_only.status == OK
    assert any("held fixed" in n for n in w_only.notes)


def test_frame_makes_the_summary_exactly_rotation_invariant():
    d = 2
    c, s = np.cos(0.7), np.sin(0.7)
    R = np.array([[c, -s], [s, c]])
    out = {}
    for frame in (True, False):
        ms = model_summary_fn(additive_shift_model, DIVERSE, config=_cfg(d), n_samples=N, latent_frame=frame)
        assert ms.latent_frame is frame and set(ms.params) == {"W", FIRST}
        rotated = {"W": R @ ms.params["W"], FIRST: ms.params[FIRST] @ R.T}
        with jax.enable_x64(True):
            f = jax.jit(ms.fn)
            a = np.asarray(f({k: jnp.asarray(v) for k, v in ms.params.items()}))
            b = np.asarray(f({k: jnp.asarray(v) for k, v in rotated.items()}))
        out[frame] = np.max(np.abs(a - b)) / np.max(np.abs(a))
    assert out[True] < 1e-12  # every simulated cell is mapped to the same decoder input
    assert out[False] > 1e-4  # fixed base draws: invariant only in expectation


def test_plain_common_random_numbers_break_the_rotation():
    rep = model_identifiability(additive_shift_model, DIVERSE, config=_cfg(2), n_samples=N, latent_frame=False)
    assert not rep.latent_frame and rep.symmetry_names == ("latent rotation (0, 1)",)
    assert rep.symmetry_defect > 1e-5 and rep.status == WARNING
    assert "latent frame" in rep.message


def test_linear_decoder_matches_the_closed_form():
    # decoder_hidden=() makes the decoder x_mean = A z + b: the summaries and their Jacobian have the
    # closed form of perturbax.theory.linear_gaussian_summary_fn (noise 0 since x_mean is summarised)
    d, n = 2, 10000
    cfg = _cfg(d, decoder_hidden=())
    ms = model_summary_fn(additive_shift_model, DIVERSE, config=cfg, n_samples=n, sites=["W", "decoder"])
    assert set(ms.params) == {"W", FIRST, "decoder.layers.0.bias"}
    assert ms.symmetry_names == ("latent rotation (0, 1)",)
    closed = linear_gaussian_summary_fn(DIVERSE)
    E, n_cov = len(DIVERSE), G * (G + 1) // 2

    def oracle(theta):
        p = {"A": theta[FIRST], "W": theta["W"], "b": theta["decoder.layers.0.bias"]}
        p["noise_scale"] = 0.0 * theta["W"][0, 0]
        v = closed(p)
        return jnp.concatenate([v[: E * G], jnp.tile(v[E * G :], E)])  # covariance once per context

    def jac(fn, theta):
        J = jax.jit(jax.jacfwd(fn))(theta)
        return np.concatenate([np.asarray(J[k]).reshape(E * (G + n_cov), -1) for k in sorted(theta)], axis=1)

    with jax.enable_x64(True):
        theta = {k: jnp.asarray(v) for k, v in ms.params.items()}
        mc, ex = np.asarray(jax.jit(ms.fn)(theta)), np.asarray(oracle(theta))
        J_mc, J_ex = jac(ms.fn, theta), jac(oracle, theta)
    assert mc.shape == ex.shape == (E * (G + n_cov),)
    assert np.linalg.norm(mc - ex) < 0.03 * np.linalg.norm(ex)
    assert np.linalg.norm(J_mc - J_ex) < 0.05 * np.linalg.norm(J_ex)
    # the same rank: one null direction, the rotation (exact in the simulation, thanks to the frame)
    s_mc, s_ex = np.linalg.svd(J_mc, compute_uv=False), np.linalg.svd(J_ex, compute_uv=False)
    assert np.sum(s_mc < 1e-10 * s_mc[0]) == np.sum(s_ex < 1e-10 * s_ex[0]) == 1
    assert s_mc[-1] < 1e-13 * s_mc[0] and s_mc[-2] > 1e-4 * s_mc[0]
    t = ravel_pytree({k: jnp.asarray(ms.symmetries[0].get(k, np.zeros(theta[k].shape))) for k in theta})[0]
    assert np.linalg.norm(J_mc @ np.asarray(t)) < 1e-12 * s_mc[0] * np.linalg.norm(t)


def test_non_gaussian_base_has_no_rotation_symmetry():
    rep = model_identifiability(additive_shift_model, DIVERSE, config=_cfg(2, base="laplace"), n_samples=N)
    assert rep.symmetry_names == () and not rep.latent_frame
    assert any("not standard normal" in n for n in rep.notes)
    assert rep.n_null == 0 and rep.status == OK


def test_linear_dynamics_counts_agree_with_the_closed_form():
    from perturbax.models.dynamics import LatentDynamicsConfig, latent_dynamics_model

    ell = 3
    # persistent heterogeneity, standard basal: z(t) ~ N((I - e^{(B-I)t}) W l, I), so (B, S) reach
    # the cells only through the latent means of linear_dynamics_summary_fn
    cfg = LatentDynamicsConfig(
        n_genes=G, n_perturbations=K, latent_dim=ell, basal="standard", heterogeneity="persistent", decoder_hidden=(H,)
    )
    rng = np.random.default_rng(3)
    mask = linear_dynamics_mask(ell)
    B = np.zeros((ell, ell))
    B[np.nonzero(mask["B"])] = b_free = 0.6 * rng.standard_normal(int(mask["B"].sum()))
    S = rng.standard_normal((ell, K))
    design = np.vstack([np.zeros(K), np.eye(K)])
    for times, closed_times in (([40.0], [np.inf]), ([0.5, 2.0], [0.5, 2.0])):
        rep = model_identifiability(
            latent_dynamics_model, design, {"B_free": b_free, "S": S}, config=cfg, times=times, sites=["B", "S"],
            mask=mask, symmetries=[bs_equivalences], n_samples=100,
        )
        assert rep.n_contexts == len(design) * len(times) and rep.n_params == ell * (ell - 1) // 2 + ell * K
        ref = local_identifiability(
            linear_dynamics_summary_fn(design, closed_times), {"B": B, "S": S, "mu": np.zeros(ell)}, mask=mask
        )
        assert rep.n_null == ref.n_null
        if np.isinf(closed_times[0]):
            # at the steady state only W = (I - B)^{-1} S is seen: the B/S trade-offs are null
            assert rep.n_null == ell * (ell - 1) // 2 and rep.n_unexpected == 0 and rep.status == OK
            assert rep.symmetry_defect < 1e-9 and rep.symmetry_names == ("bs_equivalences",)
        else:
            assert rep.n_null == 0


def _hand_made_fit(d, design):
    """A FitResult at initial values (no optimisation): the guide's location of W set to W0."""
    from numpyro import handlers

    from perturbax.data.labels import PerturbationRegistry
    from perturbax.inference import FitResult
    from perturbax.inference.guides import make_guide
    from perturbax.models.batch import Batch

    cfg = _cfg(d, encoder_hidden=(8,))
    dummy = Batch(x=jnp.zeros((2, G)), l=jnp.zeros((2, K)), library=jnp.ones(2))
    kwargs = {"config": cfg, "n_cells": 50}
    guide, names = make_guide(additive_shift_model, dummy, kwargs, global_guide="normal")

    def initial_params(key):
        out = {}
        for fn, b in ((guide, dummy), (additive_shift_model, dummy._replace(x=None))):
            tr = handlers.trace(handlers.seed(fn, key)).get_trace(b, **kwargs)
            out.update({n: s["value"] for n, s in tr.items() if s["type"] == "param"})
        return out

    params = jax.jit(initial_params)(jax.random.PRNGKey(0))
    loc = next(n for n in params if "loc" in n)
    W0 = np.random.default_rng(1).standard_normal((d, K))
    params[loc] = jnp.asarray(W0, dtype=params[loc].dtype).reshape(params[loc].shape)
    fit = FitResult(
        model_name="additive_shift", model=additive_shift_model, guide=guide, config=cfg, params=params,
        global_names=tuple(names), registry=PerturbationRegistry(("P0", "P1", "P2")),
        gene_names=tuple(map(str, range(G))),
        perturbation_key="perturbation", train_conditions=tuple(str(i) for i in range(len(design))),
        train_design=np.asarray(design), n_train=50, objective="elbo", global_guide="normal",
        basal={}, history={"loss": np.zeros(0)},
    )
    return fit, W0


def test_fit_identifiability_runs_at_the_posterior_mean():
    from perturbax.inference import fit_identifiability
    from perturbax.inference.prediction import posterior_globals

    fit, W0 = _hand_made_fit(2, ONE_SINGLE)
    rep = fit_identifiability(fit, n_samples=N, num_draws=64)
    assert rep.n_contexts == len(ONE_SINGLE) and rep.symmetry_names == ("latent rotation (0, 1)",)
    assert rep.n_unexpected == 2 * (K - 1) and rep.status == FAIL  # its training design is too small
    # the same check at the same point, by hand: the posterior mean of W and the fitted decoder
    W_mean = np.asarray(posterior_globals(fit, 64, seed=0)["W"]).mean(0)
    assert np.abs(W_mean - W0).max() < 0.1
    same = model_identifiability(
        additive_shift_model, ONE_SINGLE, {"W": W_mean, "decoder$params": fit.params["decoder$params"]},
        config=fit.config, n_samples=N,
    )
    np.testing.assert_allclose(rep.singular_values[:10], same.singular_values[:10], rtol=1e-6)


def test_errors_name_what_is_wrong():
    cfg = _cfg(2)
    with pytest.raises(ValueError, match="Unknown parameter 'Q'"):
        model_identifiability(additive_shift_model, DIVERSE, config=cfg, sites=["Q"], n_samples=4)
    with pytest.raises(ValueError, match="does not have"):
        model_identifiability(additive_shift_model, DIVERSE, {"w": np.zeros((2, K))}, config=cfg, n_samples=4)
    with pytest.raises(ValueError, match="per-cell"):
        model_identifiability(additive_shift_model, DIVERSE, {"z_base": np.zeros((2, 2))}, config=cfg, n_samples=4)
    with pytest.raises(ValueError, match="columns"):
        model_identifiability(additive_shift_model, DIVERSE[:, :2], config=cfg, n_samples=4)
    with pytest.raises(ValueError, match="summaries"):
        model_identifiability(additive_shift_model, DIVERSE, config=cfg, summaries=("median",), n_samples=4)
    with pytest.raises(ValueError, match="Cannot declare"):
        model_identifiability(
            additive_shift_model, DIVERSE, config=cfg, sites=["W"], symmetries=[LatentRotation()], n_samples=4
        )
    from perturbax.models.dynamics import LatentDynamicsConfig, latent_dynamics_model

    with pytest.raises(ValueError, match="times="):
        model_identifiability(latent_dynamics_model, DIVERSE, config=LatentDynamicsConfig(n_genes=G, n_perturbations=K))


def test_report_serialises(diverse_d3):
    d = json.loads(diverse_d3.to_json())
    assert d["status"] == OK and d["n_symmetries"] == 3 and d["symmetry_names"][0] == "latent rotation (0, 1)"
    assert d["margins"]["smallest_kept"] == pytest.approx(diverse_d3.gap[0])
    assert d["sites"] == ["W", FIRST] and d["latent_frame"] is True and len(d["around_cut"]) == 6
    text = diverse_d3.render()
    assert "singular values around the cut" in text and "latent rotation (1, 2)" in text


def test_frame_square_root_derivative():
    # the inverse square root's custom JVP (Daleckii-Krein) matches finite differences, and stays
    # finite and correct where eigenvalues coincide (S = 2 I: d(S^{-1/2}) = -dS / (2 * 2^{3/2}))
    from perturbax.theory.model_check import _frame, _inv_sqrt_spd

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        X = rng.standard_normal((5, 3))
        S, dS = jnp.asarray(X.T @ X), jnp.asarray(rng.standard_normal((3, 3)))
        dS = dS + dS.T
        _, jvp = jax.jvp(_inv_sqrt_spd, (S,), (dS,))
        h = 1e-6
        fd = (_inv_sqrt_spd(S + h * dS) - _inv_sqrt_spd(S - h * dS)) / (2 * h)
        np.testing.assert_allclose(np.asarray(jvp), np.asarray(fd), rtol=1e-6, atol=1e-8)
        _, jvp_eq = jax.jvp(_inv_sqrt_spd, (2.0 * jnp.eye(3),), (dS,))
        np.testing.assert_allclose(np.asarray(jvp_eq), -np.asarray(dS) / (2 * 2**1.5), rtol=1e-10)
        # the frame has orthonormal rows and is equivariant: O(A R^T) = R O(A)
        A = jnp.asarray(rng.standard_normal((7, 3)))
        R = jnp.asarray(np.linalg.qr(rng.standard_normal((3, 3)))[0])
        O = _frame(A)
        np.testing.assert_allclose(np.asarray(O @ O.T), np.eye(3), atol=1e-12)
        np.testing.assert_allclose(np.asarray(_frame(A @ R.T)), np.asarray(R @ O), atol=1e-12)
