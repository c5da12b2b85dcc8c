"""Each family's log_prob, entropy and moments against numpyro.distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from viax.families import FullRank, LowRank, MeanField, make_family

DIM = 4


def _random_params(family, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = family.init()
    return {
        k: v + 0.3 * jax.random.normal(keys[i % 3], v.shape)
        for i, (k, v) in enumerate(params.items())
    }


def _reference(family, params):
    if isinstance(family, MeanField):
        return dist.MultivariateNormal(params["loc"], jnp.diag(jnp.exp(2 * params["log_scale"])))
    if isinstance(family, FullRank):
        return dist.MultivariateNormal(params["loc"], scale_tril=family.scale_tril(params))
    return dist.LowRankMultivariateNormal(
        params["loc"], params["cov_factor"], jnp.exp(2 * params["log_diag"])
    )


@pytest.mark.parametrize("family", [MeanField(DIM), FullRank(DIM), LowRank(DIM, 2)])
def test_log_prob_entropy_covariance_match_numpyro(family):
    params = _random_params(family)
    ref = _reference(family, params)
    z = jax.random.normal(jax.random.PRNGKey(1), (7, DIM))
    ours = jax.vmap(lambda x: family.log_prob(params, x))(z)
    np.testing.assert_allclose(ours, ref.log_prob(z), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(family.entropy(params), ref.entropy(), rtol=1e-10)
    np.testing.assert_allclose(family.covariance(params), ref.covariance_matrix, rtol=1e-10)
    np.testing.assert_allclose(family.stddev(params), jnp.sqrt(jnp.diag(ref.covariance_matrix)))
    # Draws with their log density (computed from the base noise where the map is square).
    draws, log_q = family.sample_and_log_prob(params, jax.random.PRNGKey(4), 5)
    np.testing.assert_allclose(log_q, ref.log_prob(draws), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", [MeanField(DIM), FullRank(DIM), LowRank(DIM, 2)])
def test_samples_have_the_family_moments(family):
    params = _random_params(family, seed=3)
    z = family.sample(params, jax.random.PRNGKey(2), 200_000)
    cov = family.covariance(params)
    # Standard error of a sample mean is sd/sqrt(n) ≈ 0.003 here; 5 se is 0.015.
    np.testing.assert_allclose(
        z.mean(0), params["loc"], atol=5 * jnp.sqrt(jnp.max(jnp.diag(cov)) / 200_000)
    )
    np.testing.assert_allclose(jnp.cov(z.T), cov, atol=0.02)


@pytest.mark.parametrize("family", [MeanField(DIM), FullRank(DIM), LowRank(DIM, 2)])
def test_init_from_a_gaussian_and_affine_pushforward(family):
    a = jax.random.normal(jax.random.PRNGKey(5), (DIM, DIM))
    cov = a @ a.T + DIM * jnp.eye(DIM)
    loc = jnp.arange(DIM, dtype=float)
    params = family.init(loc=loc, cov=cov)
    np.testing.assert_allclose(family.mean(params), loc)
    if isinstance(family, FullRank):
        np.testing.assert_allclose(family.covariance(params), cov, rtol=1e-10)
    else:  # the diagonal is matched
        np.testing.assert_allclose(jnp.diag(family.covariance(params)), jnp.diag(cov), rtol=0.05)
    center, scale = jnp.ones(DIM), jnp.array([1.0, 2.0, 0.5, 3.0])
    pushed = family.affine(params, center, scale)
    np.testing.assert_allclose(family.mean(pushed), center + scale * loc, rtol=1e-12)
    np.testing.assert_allclose(
        family.covariance(pushed), scale[:, None] * family.covariance(params) * scale, rtol=1e-10
    )


def test_unknown_family_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="valid families: meanfield, fullrank, lowrank"):
        make_family("diagonal", 3)
    with pytest.raises(ValueError, match="rank must be in"):
        make_family("lowrank", 3, rank=5)
