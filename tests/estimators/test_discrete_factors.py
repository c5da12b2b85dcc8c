"""Mean-field factors of BBVI: closed-form scores against autodiff, inverse-CDF draws
against their probabilities, and the leave-one-out control-variate coefficient against
its definition computed draw by draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viax.estimators.score import _leave_one_out_coefficient
from viax.families.discrete import (
    Bernoulli,
    Categorical,
    Normal,
    Poisson,
    standard_normal_quantile,
)

KEY = jax.random.PRNGKey(0)


def _cases():
    cat = Categorical((3,), 4, low=1)
    logits = jnp.asarray([[0.3, -1e9, 1.2, -0.4], [0.0, 0.5, -0.5, 2.0], [1.0, 1.0, -1e9, -1e9]])
    return [
        (Bernoulli((3,)), {"logits": jnp.asarray([0.4, -1.3, 2.0])}),
        (cat, {"logits": logits}),
        (Poisson((3,)), {"log_rate": jnp.asarray([0.1, 1.5, -0.7])}),
        (
            Normal((3,)),
            {"loc": jnp.asarray([0.2, -1.0, 3.0]), "log_scale": jnp.asarray([0.1, -0.5, 0.3])},
        ),
    ]


@pytest.mark.parametrize("case", range(4))
def test_closed_form_score_is_the_gradient_of_log_q(case):
    factor, params = _cases()[case]
    z = factor.sample(params, KEY, 50)
    expected = jax.vmap(lambda zs: jax.grad(lambda p: jnp.sum(factor.log_prob(p, zs)))(params))(z)
    got = factor.score(params, z)
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12)


def test_categorical_inverse_cdf_draws_its_probabilities():
    factor = Categorical((2,), 4, low=0)
    # element 0 excludes an interior category, element 1 its last two
    logits = jnp.log(jnp.asarray([[0.2, 0.0, 0.5, 0.3], [0.35, 0.65, 0.0, 0.0]]))
    logits = jnp.where(jnp.isfinite(logits), logits, -1e9)
    num = 200_000
    z = np.asarray(factor.sample({"logits": logits}, KEY, num))
    probs = np.asarray(jax.nn.softmax(logits))
    for i in range(2):
        freq = np.bincount(z[:, i], minlength=4) / num
        se = np.sqrt(probs[i] * (1 - probs[i]) / num)
        assert np.all(np.abs(freq - probs[i]) <= 4 * se + 1e-12), (i, freq, probs[i])
        assert np.all(freq[probs[i] == 0] == 0)  # excluded categories are never drawn


def test_bernoulli_quantile_draws_its_probability():
    factor = Bernoulli((3,))
    probs = np.array([0.02, 0.5, 0.9])
    params = factor.init(probs)
    z = np.asarray(factor.sample(params, KEY, 100_000))
    se = np.sqrt(probs * (1 - probs) / 100_000)
    assert np.all(np.abs(z.mean(0) - probs) <= 4 * se)


def test_standard_normal_quantile_is_jax_normal_from_the_same_uniforms():
    u = jax.random.uniform(KEY, (1000,))
    np.testing.assert_allclose(
        standard_normal_quantile(u), jax.random.normal(KEY, (1000,)), rtol=1e-13
    )
    assert np.all(np.isfinite(np.asarray(standard_normal_quantile(jnp.asarray([0.0, 1 - 2**-53])))))


def test_leave_one_out_coefficient_is_computed_from_the_other_draws():
    num_draws, num_elements, num_categories = 7, 5, 3
    h = {"logits": jax.random.normal(KEY, (num_draws, num_elements, num_categories))}
    cost = jax.random.normal(jax.random.PRNGKey(1), (num_draws, num_elements)) + 2.0
    f = {"logits": h["logits"] * cost[..., None] + 0.1}
    a = np.asarray(_leave_one_out_coefficient(f, h, 1))
    f_np, h_np = np.asarray(f["logits"]), np.asarray(h["logits"])
    for s in range(num_draws):
        others = np.delete(np.arange(num_draws), s)
        fo, ho = f_np[others], h_np[others]
        cov = np.mean((fo - fo.mean(0)) * (ho - ho.mean(0)), axis=0).sum(-1)
        var = np.var(ho, axis=0).sum(-1)
        np.testing.assert_allclose(a[s], cov / var, rtol=1e-10)
