"""Model-level local identifiability from Jacobian ranks (closed-form linear models)."""

import json

import jax
import numpy as np
import pytest

from perturbax.theory import (
    FAIL,
    OK,
    WARNING,
    bs_equivalences,
    latent_rotations,
    linear_dynamics_mask,
    linear_dynamics_summary_fn,
    linear_gaussian_summary_fn,
    local_identifiability,
    parameter_names,
)

G, K = 6, 4


def _als_params(d, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "A": rng.standard_normal((G, d)),
        "W": rng.standard_normal((d, K)),
        "b": rng.standard_normal(G),
        "noise_scale": np.array(0.7),
    }


DIVERSE = np.vstack([np.zeros(K), np.eye(K), [1.0, 1.0, 0.0, 0.0]])  # rank K
TOO_SMALL = np.vstack([np.zeros(K), np.eye(K)[:1]])  # only e1 measured


@pytest.fixture(scope="module")
def als_d3():
    params = _als_params(3)
    fn = linear_gaussian_summary_fn(DIVERSE)
    plain = local_identifiability(fn, params)
    with_rot = local_identifiability(fn, params, symmetries=[latent_rotations])
    small = local_identifiability(linear_gaussian_summary_fn(TOO_SMALL), params, symmetries=[latent_rotations])
    return plain, with_rot, small


def test_rotations_are_the_only_null_directions(als_d3):
    plain, with_rot, _ = als_d3
    d = 3
    n_params = G * d + d * K + G + 1
    assert plain.n_params == n_params
    assert plain.n_null == d * (d - 1) // 2 == 3
    assert plain.n_unexpected == 3 and plain.status == FAIL  # nothing declared
    assert with_rot.n_null == 3 and with_rot.n_symmetries == 3
    assert with_rot.n_unexpected == 0 and with_rot.identifiable and with_rot.status == OK
    assert with_rot.symmetry_defect < 1e-10
    kept, dropped = with_rot.gap
    assert dropped < 1e-10 * kept  # a clear gap between kept and dropped singular values
    # rotations move only A and W
    assert set(plain.unexpected_by_parameter) <= {"A", "W"}


def test_too_small_design_has_more_null_directions(als_d3):
    _, _, small = als_d3
    d = 3
    # W's columns for the K - 1 unmeasured perturbations are free: d (K - 1) more directions
    assert small.n_unexpected == d * (K - 1) == 9 and small.status == FAIL
    assert small.unexpected_by_parameter["W"] > 8
    for i in range(d):
        for k in range(1, K):
            assert small.unexpected_entries[f"W[{i},{k}]"] > 0.5
    assert not any(n.startswith("W[") and n.endswith(",0]") and v > 0.5 for n, v in small.unexpected_entries.items())
    assert "Not locally identifiable" in small.message
    d_json = json.loads(small.to_json())
    assert d_json["n_unexpected"] == 9 and len(d_json["unexpected_directions"]) == 9
    assert "unexpected null directions: 9" in str(small)


def test_two_latent_dimensions_have_one_rotation():
    params = _als_params(2, seed=1)
    rep = local_identifiability(linear_gaussian_summary_fn(DIVERSE), params, symmetries=latent_rotations)
    assert rep.n_null == 1 and rep.n_symmetries == 1 and rep.n_unexpected == 0


def test_float32_and_global_config_untouched():
    before = jax.config.jax_enable_x64
    params = _als_params(3)
    rep = local_identifiability(linear_gaussian_summary_fn(DIVERSE), params, symmetries=[latent_rotations], x64=False)
    assert rep.dtype == "float32" and rep.rtol == 1e-3
    assert rep.n_null == 3 and rep.n_unexpected == 0
    assert jax.config.jax_enable_x64 == before


def test_declared_symmetry_that_is_not_one():
    params = _als_params(3)
    shift_b = {"b": np.ones(G)}  # b is identified: not a null direction
    rep = local_identifiability(linear_gaussian_summary_fn(DIVERSE), params, symmetries=[latent_rotations, shift_b])
    assert rep.n_symmetries == 4 and rep.symmetry_defect > 0.01
    assert rep.status == WARNING and "not null directions" in rep.message


@pytest.fixture(scope="module")
def dynamics():
    rng = np.random.default_rng(4)
    ell, k = 3, 3
    params = {
        "B": np.tril(0.6 * rng.standard_normal((ell, ell)), -1),
        "S": rng.standard_normal((ell, k)),
        "mu": rng.standard_normal(ell),
    }
    design = np.vstack([np.zeros(k), np.eye(k)])
    mask = linear_dynamics_mask(ell)
    steady = local_identifiability(linear_dynamics_summary_fn(design, [np.inf]), params, mask=mask)
    steady_sym = local_identifiability(
        linear_dynamics_summary_fn(design, [np.inf]), params, mask=mask, symmetries=[bs_equivalences]
    )
    two_times = local_identifiability(linear_dynamics_summary_fn(design, [0.5, 2.0]), params, mask=mask)
    return steady, steady_sym, two_times


def test_steady_state_leaves_b_and_s_unidentified(dynamics):
    steady, steady_sym, _ = dynamics
    ell = 3
    assert steady.n_params == ell * (ell - 1) // 2 + ell * 3 + ell  # only the lower triangle of B is free
    assert "B[0,1]" not in steady.parameter_names and "B[1,0]" in steady.parameter_names
    assert steady.n_unexpected == ell * (ell - 1) // 2 and steady.status == FAIL
    assert set(steady.unexpected_by_parameter) == {"B", "S"}
    assert steady_sym.n_symmetries == 3 and steady_sym.n_unexpected == 0 and steady_sym.status == OK
    assert steady_sym.symmetry_defect < 1e-10


def test_two_time_points_identify_b_and_s(dynamics):
    _, _, two = dynamics
    assert two.n_null == 0 and two.identifiable and two.status == OK
    assert two.singular_values[-1] > 1e-4 * two.singular_values[0]


def test_parameter_names_and_errors():
    names = parameter_names({"W": np.zeros((2, 2)), "enc": {"w": np.zeros(2)}, "s": 0.0})
    assert names == ("W[0,0]", "W[0,1]", "W[1,0]", "W[1,1]", "enc.w[0]", "enc.w[1]", "s")
    params = {"B": np.zeros((2, 2)), "S": np.eye(2), "mu": np.zeros(2)}
    upper = {"B": np.array([[0.0, 1.0], [0.0, 0.0]])}
    fn = linear_dynamics_summary_fn(np.eye(2), [1.0])
    with pytest.raises(ValueError, match="moves entries that mask fixes"):
        local_identifiability(fn, params, mask=linear_dynamics_mask(2), symmetries=[upper])
    with pytest.raises(ValueError, match="unknown parameters"):
        local_identifiability(fn, params, symmetries=[{"C": 1.0}])
