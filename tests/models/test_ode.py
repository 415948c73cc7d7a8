"""The one ODE solve wrapper (perturbax.models.ode.solve) against closed forms."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from perturbax.models import ode
from perturbax.models.dynamics import linear_drift, linear_solution


def _problem(rng, n=5, ell=4, K=3):
    B = np.tril(rng.normal(0.0, 0.8, (ell, ell)), -1)
    S = rng.normal(0.0, 1.0, (ell, K))
    mu = rng.normal(0.0, 0.5, ell)
    z0 = mu + rng.normal(0.0, 0.5, (n, ell))
    lab = rng.integers(0, 2, (n, K)).astype(float)
    t = np.array([0.0, 0.3, 1.0, 2.5, 6.0])[:n]
    return B, S, mu, z0, lab, t


def _ode_linear(B, S, mu, z0, lab, t, **kw):
    shift = lab @ S.T
    anchor = jnp.broadcast_to(mu, z0.shape)

    def field(_t, y, args):
        return linear_drift(_t, y, (B, *args))

    return ode.solve(field, z0, t, args=(anchor, shift), **kw)


def _expm_oracle(B, S, mu, z0, lab, t):
    """Closed form with scipy's expm in float64, cell by cell."""
    ell = B.shape[0]
    W = np.linalg.solve(np.eye(ell) - B, S)
    out = []
    for i in range(z0.shape[0]):
        E = scipy.linalg.expm((B - np.eye(ell)) * t[i])
        w = W @ lab[i]
        out.append(mu + (np.eye(ell) - E) @ w + E @ (z0[i] - mu))
    return np.stack(out)


def _packed(B):
    rows, cols = np.tril_indices(B.shape[0], -1)
    return rows, cols, B[rows, cols]


@functools.cache
def _ode_value_and_grad(ell):
    """Jitted (in x64) solution of the linear ODE and the gradient of ``sum(weights * y)`` with
    respect to the free entries of B, S and mu; compiled once for both tests below."""
    rows, cols = np.tril_indices(ell, -1)

    def loss(b_free, s, m, z0, lab, t, weights):
        B = jnp.zeros((ell, ell), b_free.dtype).at[rows, cols].set(b_free)
        sol = _ode_linear(B, s, m, z0, lab, t, rtol=1e-10, atol=1e-12, max_steps=4000)
        return jnp.sum(weights * sol.y), sol

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _solve_x64(B, S, mu, z0, lab, t, weights):
    with jax.enable_x64(True):
        _, _, b_free = _packed(B)
        inputs = (jnp.asarray(a) for a in (b_free, S, mu, z0, lab, t, weights))
        (_, sol), grads = _ode_value_and_grad(B.shape[0])(*inputs)
        zj, tj, shift = jnp.asarray(z0), jnp.asarray(t), jnp.asarray(lab @ S.T)
        closed = linear_solution(zj, tj, jnp.asarray(B), shift, jnp.asarray(mu))
        series = linear_solution(zj, tj, jnp.asarray(B), shift, jnp.asarray(mu), nilpotent=True)
    return sol, grads, closed, series


def test_linear_ode_matches_closed_form():
    rng = np.random.default_rng(0)
    B, S, mu, z0, lab, t = _problem(rng)
    oracle = _expm_oracle(B, S, mu, z0, lab, t)
    sol, _, closed, series = _solve_x64(B, S, mu, z0, lab, t, np.ones_like(z0))
    assert sol.y.dtype == jnp.float64
    assert not np.any(np.asarray(sol.failed))
    np.testing.assert_allclose(np.asarray(sol.y), oracle, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(closed), oracle, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(series), oracle, rtol=1e-9, atol=1e-12)
    # Cells at t = 0 take no step and return their initial state.
    assert int(sol.num_steps[0]) == 0 and np.all(np.asarray(sol.num_steps[1:]) > 0)
    np.testing.assert_array_equal(np.asarray(sol.y[0]), z0[0])
    np.testing.assert_allclose(np.asarray(sol.t_reached), t)


def test_gradients_match_central_differences():
    """d/d(B, S, mu) of a scalar function of the ODE solution (and of the closed forms) against
    central finite differences of the float64 expm oracle."""
    rng = np.random.default_rng(2)
    B, S, mu, z0, lab, t = _problem(rng)
    rows, cols, b_free = _packed(B)
    weights = rng.normal(size=z0.shape)

    def oracle_loss(bf, s, m):
        Bm = np.zeros_like(B)
        Bm[rows, cols] = bf
        return float(np.sum(weights * _expm_oracle(Bm, s, m, z0, lab, t)))

    theta = (b_free, S, mu)
    eps = 1e-6
    fd = []
    for idx, p in enumerate(theta):
        g = np.zeros_like(p)
        for j in np.ndindex(p.shape):
            up = [q.copy() for q in theta]
            dn = [q.copy() for q in theta]
            up[idx][j] += eps
            dn[idx][j] -= eps
            g[j] = (oracle_loss(*up) - oracle_loss(*dn)) / (2 * eps)
        fd.append(g)

    _, g_ode, _, _ = _solve_x64(B, S, mu, z0, lab, t, weights)
    with jax.enable_x64(True):
        zj, labj, tj, wj = (jnp.asarray(a) for a in (z0, lab, t, weights))

        def closed_loss(bf, s, m):
            Bm = jnp.zeros(B.shape).at[rows, cols].set(bf)
            return jnp.sum(wj * linear_solution(zj, tj, Bm, labj @ s.T, m, nilpotent=True))

        g_closed = jax.grad(closed_loss, argnums=(0, 1, 2))(*(jnp.asarray(p) for p in theta))
    for a, b, c in zip(g_ode, g_closed, fd, strict=True):
        assert np.abs(c).max() > 1e-3  # the check is not vacuous
        np.testing.assert_allclose(np.asarray(a), c, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(b), c, rtol=1e-6, atol=1e-8)


def _stiff(_t, y, args):
    return -1e4 * (y - args)


def test_max_steps_failure_is_finite_flagged_and_warned():
    y0 = jnp.ones((3, 2))
    t = jnp.array([0.0, 5.0, 5.0])
    target = jnp.zeros((3, 2))
    with pytest.warns(RuntimeWarning, match=r"ODE solve failed for 2 of 3 cells: cell 1 at t=5"):
        sol = ode.solve(_stiff, y0, t, args=target, max_steps=2)
    assert np.all(np.isfinite(np.asarray(sol.y)))
    np.testing.assert_array_equal(np.asarray(sol.failed), [False, True, True])
    assert np.all(np.asarray(sol.t_reached[1:]) < 5.0)
    np.testing.assert_allclose(np.asarray(sol.penalty(100.0)), [0.0, 100.0, 100.0])

    # Under jit: no Python warning, the flags come back, and gradients stay finite.
    def loss(y0):
        s = ode.solve(_stiff, y0, t, args=target, max_steps=2)
        return jnp.sum(s.y), s.failed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (_, failed), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(y0)
    np.testing.assert_array_equal(np.asarray(failed), [False, True, True])
    assert np.all(np.isfinite(np.asarray(g)))


def test_nonfinite_state_is_replaced_and_flagged():
    def explode(_t, y, args):
        return y**2  # blows up at t = 1 from y0 = 1

    y0 = jnp.array([[1.0], [0.1]])
    with pytest.warns(RuntimeWarning, match="cell 0 at t=3"):
        sol = ode.solve(explode, y0, jnp.array([3.0, 1.0]), max_steps=64)
    assert np.all(np.isfinite(np.asarray(sol.y)))
    np.testing.assert_array_equal(np.asarray(sol.failed), [True, False])
    np.testing.assert_allclose(float(sol.y[1, 0]), 0.1 / (1 - 0.1), rtol=1e-4)  # y = y0 / (1 - y0 t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(y0=jnp.ones(3), t=jnp.ones(3)), "y0 must have shape"),
        (dict(y0=jnp.ones((3, 2)), t=jnp.ones(2)), "one time per cell"),
        (dict(y0=jnp.ones((3, 2)), t=jnp.ones(3), max_steps=0), "max_steps"),
        (dict(y0=jnp.ones((3, 2)), t=jnp.ones(3), rtol=0.0), "rtol and atol"),
    ],
)
def test_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ode.solve(lambda _t, y, _a: -y, **kwargs)
