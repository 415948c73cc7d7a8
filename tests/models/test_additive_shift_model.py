"""The additive-shift model function and its blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from perturbax.models import AdditiveShiftConfig, Batch, additive_shift_model, base_distribution


def _trace(config, batch, n_cells=100, seed=0):
    with handlers.seed(rng_seed=seed):
        return handlers.trace(additive_shift_model).get_trace(batch, config=config, n_cells=n_cells)


def _batch(B=7, G=12, K=3, C=0, x=True):
    rng = np.random.default_rng(0)
    return Batch(
        x=jnp.asarray(rng.poisson(3.0, (B, G)), jnp.float32) if x else None,
        l=jnp.asarray(rng.integers(0, 2, (B, K)), jnp.float32),
        c=jnp.asarray(rng.integers(0, 2, (B, C)), jnp.float32) if C else None,
        library=jnp.full((B,), 36.0),
    )


def test_sites_and_shapes_gaussian():
    cfg = AdditiveShiftConfig(n_genes=12, n_perturbations=3, latent_dim=4)
    tr = _trace(cfg, _batch())
    assert tr["W"]["value"].shape == (4, 3)
    assert tr["z_base"]["value"].shape == (7, 4)
    assert tr["x"]["is_observed"] and tr["x_mean"]["value"].shape == (7, 12)
    # The plate scales the minibatch log-likelihood to the full data set.
    assert tr["x"]["scale"] == pytest.approx(100 / 7)


def test_shift_is_additive_in_latent_space():
    cfg = AdditiveShiftConfig(n_genes=5, n_perturbations=3, latent_dim=2)
    b = _batch(B=4, G=5, x=False)
    W = jnp.arange(6.0).reshape(2, 3)
    z0 = jnp.ones((4, 2))
    labels = jnp.array([[0, 0, 0], [1, 0, 0], [0, 1, 1], [0.5, 0, 2.0]], jnp.float32)
    cond = handlers.condition(additive_shift_model, data={"W": W, "z_base": z0})
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(cond).get_trace(b._replace(l=labels), config=cfg, n_cells=4)
    # The decoder sees z = z_base + W l: compare with a decoder applied by hand.
    dec = tr["decoder$params"]["value"]
    import equinox as eqx

    from perturbax.models.blocks import MLP

    net = eqx.combine(dec, MLP(2, 5, cfg.decoder_hidden, key=jax.random.PRNGKey(0)))
    expected = jax.vmap(net)(z0 + labels @ W.T)
    np.testing.assert_allclose(tr["x_mean"]["value"], expected, rtol=1e-5, atol=1e-5)


def test_covariates_shift_latent():
    cfg = AdditiveShiftConfig(n_genes=6, n_perturbations=2, n_covariates=2, latent_dim=3)
    tr = _trace(cfg, _batch(B=5, G=6, K=2, C=2))
    assert tr["V"]["value"].shape == (3, 2)


def test_negative_binomial_and_horseshoe():
    cfg = AdditiveShiftConfig(n_genes=12, n_perturbations=3, latent_dim=2, likelihood="negative_binomial", w_prior="horseshoe")
    tr = _trace(cfg, _batch())
    assert {"W_tau", "W_lambda", "W_raw"} <= set(tr)
    np.testing.assert_allclose(tr["x_mean"]["value"].sum(-1), 36.0, rtol=1e-4)  # library x softmax
    assert np.isfinite(float(tr["x"]["fn"].log_prob(tr["x"]["value"]).sum()))


def test_implicit_refuses_observed_cells():
    cfg = AdditiveShiftConfig(n_genes=12, n_perturbations=3, latent_dim=2, likelihood="implicit", noise_dim=3)
    with pytest.raises(ValueError, match="objective='energy'"):
        _trace(cfg, _batch())
    tr = _trace(cfg, _batch(x=False))
    assert tr["eta"]["value"].shape == (7, 3) and tr["x"]["type"] == "deterministic"


@pytest.mark.parametrize("kind", ["normal", "laplace", "uniform"])
def test_base_distributions_have_unit_variance(kind):
    d = base_distribution(kind, 3)
    s = d.sample(jax.random.PRNGKey(0), (20000,))
    np.testing.assert_allclose(np.var(s, 0), 1.0, atol=0.05)
    np.testing.assert_allclose(np.mean(s, 0), 0.0, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent_dim=0), "latent_dim must be an integer >= 1"),
        (dict(likelihood="poisson"), "likelihood='poisson' is not supported"),
        (dict(w_prior="laplace"), "w_prior"),
        (dict(w_scale=0.0), "w_scale"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdditiveShiftConfig(n_genes=3, n_perturbations=2, **kwargs)


def test_config_round_trip():
    cfg = AdditiveShiftConfig(n_genes=3, n_perturbations=2, decoder_hidden=(8, 4))
    assert AdditiveShiftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown AdditiveShiftConfig fields"):
        AdditiveShiftConfig.from_dict({**cfg.to_dict(), "extra": 1})
