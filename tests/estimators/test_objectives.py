"""ELBO / IWAE objectives and the DReG gradient estimator (Tucker et al. 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

import viax
from viax.estimators.objectives import objective_value_and_grad


def test_values_on_known_log_weights():
    lw = jnp.log(jnp.array([[1.0, 2.0], [3.0, 4.0]]))  # (K=2, R=2)
    assert float(viax.ELBO().value(lw, 2.0)) == pytest.approx(2.0 * float(jnp.mean(lw, 0).sum()))
    expected = np.log(2.0) + np.log(3.0)  # log mean(1, 3) + log mean(2, 4)
    assert float(viax.IWAE(num_samples=2).value(lw)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: viax.IWAE(num_samples=0),
        lambda: viax.IWAE(gradient="reinforce"),
        lambda: viax.ELBO(num_samples=1.5),
    ],
)
def test_bad_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()


X = 1.5


def _gradients(objective, num_samples: int, num_replicates: int):
    """Per-replicate gradients of the loss in θ = prior mean and φ = (loc, log_scale) of
    q(z) = N(loc, e^{2 log_scale}) for p(z) = N(θ, 1), p(x | z) = N(z, 1), x = 1.5."""

    def one(key):
        eps = jax.random.normal(key, (num_samples,))

        def draw_fn(phi):
            return phi["loc"] + jnp.exp(phi["log_scale"]) * eps

        def log_p_fn(theta, z):
            return (norm.logpdf(z, theta, 1.0) + norm.logpdf(X, z, 1.0))[:, None]

        def log_q_fn(phi, z):
            return norm.logpdf(z, phi["loc"], jnp.exp(phi["log_scale"]))[:, None]

        phi = {"loc": jnp.asarray(0.3), "log_scale": jnp.asarray(0.0)}
        _, (g_theta, g_phi) = objective_value_and_grad(
            objective, log_p_fn, draw_fn, log_q_fn, jnp.asarray(0.2), phi
        )
        return jnp.stack([g_theta, g_phi["loc"], g_phi["log_scale"]])

    keys = jax.random.split(jax.random.PRNGKey(0), num_replicates)
    return np.asarray(jax.jit(jax.vmap(one))(keys))


def test_dreg_has_the_iwae_gradient_and_less_variance_at_k50():
    k, n = 50, 4000
    dreg = _gradients(viax.IWAE(num_samples=k), k, n)
    plain = _gradients(viax.IWAE(num_samples=k, gradient="standard"), k, n)
    se = np.sqrt(dreg.var(0) / n + plain.var(0) / n)
    # Same expectation: the estimates differ by less than 4 standard errors.
    assert np.all(np.abs(dreg.mean(0) - plain.mean(0)) < 4 * se), (dreg.mean(0), plain.mean(0))
    # θ's gradient is the same estimator; φ's variance falls (Tucker et al. 2019).
    np.testing.assert_allclose(dreg[:, 0], plain[:, 0], rtol=1e-10)
    ratio = dreg[:, 1:].var(0) / plain[:, 1:].var(0)
    assert np.all(ratio < 0.5), ratio


def test_iwae_value_of_the_exact_posterior_is_log_evidence():
    from scipy.stats import norm as np_norm

    # q = p(z | x) = N(x/2, 1/2): every weight equals p(x) = N(x; 0, 2), so L_K = log p(x).
    log_px = np_norm.logpdf(X, 0.0, np.sqrt(2.0))
    z = X / 2 + np.sqrt(0.5) * np.random.default_rng(1).standard_normal(5)
    lw = np_norm.logpdf(z, 0, 1) + np_norm.logpdf(X, z, 1) - np_norm.logpdf(z, X / 2, np.sqrt(0.5))
    assert float(viax.IWAE(5).value(jnp.asarray(lw[:, None]))) == pytest.approx(log_px, abs=1e-12)
