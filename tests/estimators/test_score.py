"""Score-function estimator: unbiasedness against exact ELBO gradients, variance
ordering (plain > Rao-Blackwell > Rao-Blackwell + control variate), bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax
from viax.estimators.score import (
    build_structure,
    leave_one_out_control_variate,
    score_estimator,
)
from viax.infer.bbvi import _repeated_gradients
from viax.model import build_target

Y_GAUSS = np.array([0.7, -1.2])


def gauss_model(y):
    with numpyro.plate("n", 2):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


Y_BERN = np.array([1.3, -0.4, 0.9])


def bern_model(y):
    with numpyro.plate("n", 3):
        z = numpyro.sample("z", dist.Bernoulli(0.4))
        numpyro.sample("y", dist.Normal(1.5 * z, 1.0), obs=y)
    numpyro.factor("pair", 0.7 * z[0] * z[1] - 0.5 * z[1] * z[2])


def _structure(model, data):
    target, arrays, _ = build_target(model, data)
    return build_structure(target, arrays), arrays


def _mean_and_se(structure, arrays, params, name, num_repeats=4000):
    fn = _repeated_gradients(structure, name, 8, num_repeats)
    grads = fn(params, jax.random.PRNGKey(1), arrays)
    mean = jax.tree_util.tree_map(lambda g: np.asarray(-g.mean(0)), grads)
    se = jax.tree_util.tree_map(lambda g: np.asarray(g.std(0) / np.sqrt(g.shape[0])), grads)
    return mean, se


@pytest.mark.parametrize("name", ["score", "score+rb", "score+cv", "score+rb+cv", "score+rb+ema"])
def test_score_gradient_unbiased_gaussian(name):
    structure, arrays = _structure(gauss_model, {"y": Y_GAUSS})
    m, s = np.array([0.3, -0.5]), np.array([-0.2, 0.1])
    params = {"z": {"loc": jnp.asarray(m), "log_scale": jnp.asarray(s)}}
    mean, se = _mean_and_se(structure, arrays, params, name)
    # ELBO = E log N(z;0,1) + E log N(y;z,1) + H: closed form in (m, s).
    exact_loc = -m + (Y_GAUSS - m)
    exact_log_scale = 1.0 - 2.0 * np.exp(2 * s)
    assert np.all(np.abs(mean["z"]["loc"] - exact_loc) < 4 * se["z"]["loc"])
    assert np.all(np.abs(mean["z"]["log_scale"] - exact_log_scale) < 4 * se["z"]["log_scale"])


def _exact_bern_grad(logits):
    states = jnp.asarray(list(itertools.product([0, 1], repeat=3)))

    def elbo(logits):
        log_q = jnp.sum(states * logits - jax.nn.softplus(logits), axis=1)
        log_prior = jnp.sum(dist.Bernoulli(0.4).log_prob(states), axis=1)
        log_lik = jnp.sum(dist.Normal(1.5 * states, 1.0).log_prob(Y_BERN), axis=1)
        pair = 0.7 * states[:, 0] * states[:, 1] - 0.5 * states[:, 1] * states[:, 2]
        return jnp.sum(jnp.exp(log_q) * (log_prior + log_lik + pair - log_q))

    return np.asarray(jax.grad(elbo)(logits))


@pytest.mark.parametrize("name", ["score", "score+rb", "score+cv", "score+rb+cv"])
def test_score_gradient_unbiased_bernoulli(name):
    structure, arrays = _structure(bern_model, {"y": Y_BERN})
    logits = jnp.asarray([0.5, -1.0, 0.2])
    mean, se = _mean_and_se(structure, arrays, {"z": {"logits": logits}}, name)
    exact = _exact_bern_grad(logits)
    assert np.all(np.abs(mean["z"]["logits"] - exact) < 4 * se["z"]["logits"])


def mixture_model(y):
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    with numpyro.plate("n", y.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(p))
        numpyro.sample("y", dist.Normal(2.0 * z, 1.0), obs=y)


def test_variance_ordering_with_200_local_latents():
    rng = np.random.default_rng(0)
    y = rng.normal(2.0 * (rng.random(200) < 0.3), 1.0)
    structure, arrays = _structure(mixture_model, {"y": y})
    params = dict(structure.init_params)
    params["z"] = {"logits": jnp.asarray(2.0 * y - 2.0)}  # near the local optimum
    variance = viax.gradient_variance(
        mixture_model,
        {"y": y},
        params=params,
        estimators=["score", "score+rb", "score+rb+cv"],
        num_repeats=100,
    )
    plain, rb, rb_cv = variance["score"], variance["score+rb"], variance["score+rb+cv"]
    # measured (seed 0, 100 repeats of 16 draws): plain 2.4e5, rb 1.1e4, rb+cv 1.1e3,
    # i.e. plain / rb = 23, rb / (rb+cv) = 9.5, plain / (rb+cv) = 215.  The global site p
    # keeps the whole joint in its blanket, which bounds what RB can do for it.
    assert plain / rb > 10
    assert rb / rb_cv > 4
    assert plain / rb_cv > 100


def test_leave_one_out_control_variate_removes_a_linear_term():
    h = {"logits": jax.random.normal(jax.random.PRNGKey(0), (50, 4))}
    f = {"logits": 3.0 * h["logits"] + 0.01 * jax.random.normal(jax.random.PRNGKey(1), (50, 4))}
    adjusted = leave_one_out_control_variate(f, h, elem_ndim=1)
    assert np.max(np.abs(np.asarray(adjusted["logits"]))) < 0.2


def test_control_variates_need_two_particles():
    structure, _ = _structure(bern_model, {"y": Y_BERN})
    with pytest.raises(ValueError, match="num_particles >= 2"):
        score_estimator(structure, 1, "score", True, True)
    score_estimator(structure, 1, "score", True, False)  # fine without


def test_reparam_refuses_discrete_sites():
    structure, _ = _structure(bern_model, {"y": Y_BERN})
    with pytest.raises(viax.ModelError, match="discrete"):
        score_estimator(structure, 4, "reparam", False, False)


def test_impossible_draws_are_floored_and_counted():
    def model():
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        # p has no mass at z = 1: log p = -inf there
        numpyro.factor("forbid", jnp.where(z == 1, -jnp.inf, 0.0))

    structure, arrays = _structure(model, {})
    est = score_estimator(structure, 16, "score", True, True)
    grads, _, info = est.grad(
        structure.init_params, est.init(structure.init_params), jax.random.PRNGKey(0), arrays
    )
    assert int(info.num_impossible) > 0
    assert np.isfinite(float(info.objective))
    assert np.all(np.isfinite(np.asarray(grads["z"]["logits"])))
    assert float(grads["z"]["logits"]) > 0  # descent on -ELBO lowers the logit of z = 1
