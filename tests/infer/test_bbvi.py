"""BBVI end to end: viax.fit(method="bbvi") on discrete models with exact answers."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import posteriordb_models
import pytest
from numpyro.distributions import constraints

import viax
from viax.infer.bbvi import bbvi_adagrad, scale_by_bbvi_adagrad

W = np.array(
    [
        [1.0, 0.8, 0.0, 0.0, -0.5, 0.0, 0.3, 0.0, 0.0, 0.6],
        [0.0, 0.9, 1.0, 0.0, 0.0, 0.4, 0.0, -0.7, 0.0, 0.0],
        [0.5, 0.0, 0.0, 1.0, 0.8, 0.0, 0.0, 0.0, 0.9, 0.0],
        [0.0, 0.0, 0.6, 0.0, 0.0, 1.0, 0.7, 0.0, 0.0, -0.4],
        [0.0, -0.6, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.6, 0.8],
    ]
)
Y10 = np.array([1.4, 0.6, 2.2, 1.1, 0.9])


def binary10(y):
    z = numpyro.sample("z", dist.Bernoulli(0.35).expand([10]).to_event(1))
    numpyro.sample("y", dist.Normal(jnp.asarray(W) @ z, 0.7), obs=y)


def _enumerate():
    states = np.array(list(itertools.product([0, 1], repeat=10)), dtype=float)
    log_joint = np.sum(np.where(states == 1, np.log(0.35), np.log(0.65)), axis=1) + np.sum(
        -0.5 * ((Y10 - states @ W.T) / 0.7) ** 2 - np.log(0.7) - 0.5 * np.log(2 * np.pi), axis=1
    )
    return states, log_joint


def _exact_elbo(states, log_joint, probs):
    probs = np.clip(probs, 1e-12, 1 - 1e-12)
    log_q = np.sum(states * np.log(probs) + (1 - states) * np.log1p(-probs), axis=1)
    return float(np.sum(np.exp(log_q) * (log_joint - log_q)))


def _best_meanfield_elbo(states, log_joint, num_starts=20):
    """Brute-force coordinate ascent (CAVI by enumeration) from many starts."""
    rng = np.random.default_rng(0)
    best = -np.inf
    for _ in range(num_starts):
        probs = rng.uniform(0.05, 0.95, 10)
        for _ in range(200):
            for i in range(10):
                others = np.delete(np.arange(10), i)
                log_q = np.sum(
                    states[:, others] * np.log(probs[others])
                    + (1 - states[:, others]) * np.log1p(-probs[others]),
                    axis=1,
                )
                w = np.exp(log_q)
                on, off = states[:, i] == 1, states[:, i] == 0
                # E_{q−i}[log p | z_i = 1] − E_{q−i}[log p | z_i = 0]
                logit = np.sum(w[on] * log_joint[on]) / np.sum(w[on]) - np.sum(
                    w[off] * log_joint[off]
                ) / np.sum(w[off])
                probs[i] = np.clip(1 / (1 + np.exp(-logit)), 1e-9, 1 - 1e-9)
        best = max(best, _exact_elbo(states, log_joint, probs))
    return best


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:.*k-hat:RuntimeWarning")
def test_ten_binary_latents_against_enumeration():
    states, log_joint = _enumerate()
    log_evidence = float(np.logaddexp.reduce(log_joint))
    best = _best_meanfield_elbo(states, log_joint)
    result = viax.fit(
        binary10,
        {"y": Y10},
        method="bbvi",
        num_steps=3000,
        tol_rel_obj=1e-6,
        seed=0,
        progress=False,
    )
    probs = np.asarray(jax.nn.sigmoid(result.params["z"]["logits"]))
    elbo = _exact_elbo(states, log_joint, probs)
    assert elbo <= log_evidence
    assert elbo >= best - 0.1, (elbo, best, log_evidence)
    assert best <= log_evidence


gmm = posteriordb_models.low_dim_gauss_mix_assignments


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:.*k-hat:RuntimeWarning")
def test_gaussian_mixture_with_explicit_assignments(shared_data):
    folder = shared_data / "posteriordb" / "low_dim_gauss_mix-low_dim_gauss_mix"
    data = json.loads((folder / "data.json").read_text())
    reference = json.loads((folder / "reference_moments.json").read_text())["params"]
    # Adam: AdaGrad's first steps (q(z) still vague, gradients ~1e3) shrink its later
    # steps too far for mu within 1500 steps (eta=2 ends 0.09 off mu[2]).
    result = viax.fit(
        gmm,
        data,
        method="bbvi",
        optimizer=optax.adam(0.05),
        num_steps=1500,
        tol_rel_obj=1e-6,
        seed=0,
        progress=False,
    )
    mu = result.sample(2000, seed=1)["mu"].mean(axis=0)
    for k in range(2):
        assert abs(mu[k] - reference[f"mu[{k + 1}]"]["mean"]) < 0.1, mu
    draws = result.sample(10)
    assert draws["z"].shape == (10, 1000) and draws["z"].dtype.kind == "i"


def small(y):
    with numpyro.plate("n", y.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(2.0 * z, 1.0), obs=y)


# A few hundred steps end before the stopping rule's first check (500 steps): the API is
# the point here, and fit() rightly warns that the run did not converge.
@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
def test_fit_bbvi_result_api():
    y = np.array([2.1, -0.3, 1.8, 0.2])
    result = viax.fit(small, {"y": y}, method="bbvi", num_steps=400, seed=0, progress=False)
    assert result.method == "bbvi" and result.family.name == "meanfield"
    assert result.info["rao_blackwell"] == "markov blanket"
    assert result.info["grad_variance"].shape == (result.num_steps,)
    probs = np.asarray(jax.nn.sigmoid(result.params["z"]["logits"]))
    assert probs[0] > 0.7 and probs[1] < 0.3
    assert set(result.sample(5)) == {"z"}
    assert np.isfinite(result.elbo)
    # compiled code is reused by a refit
    again = viax.fit(small, {"y": y}, method="bbvi", num_steps=400, seed=0, progress=False)
    assert again.compile_time < 0.5 * max(result.compile_time, 1e-9) or again.wall_time < 2.0
    np.testing.assert_allclose(again.params["z"]["logits"], result.params["z"]["logits"])


# A few hundred steps end before the stopping rule's first check (500 steps): the API is
# the point here, and fit() rightly warns that the run did not converge.
@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
def test_plain_log_density_falls_back_to_the_whole_joint():
    m = viax.Model(lambda v: -0.5 * jnp.sum(v["x"] ** 2), latents={"x": (constraints.real, 2)})
    result = viax.fit(m, method="bbvi", estimator="score", num_steps=200, progress=False)
    assert result.info["rao_blackwell"].startswith("whole joint")


def test_bad_input():
    y = np.array([0.5, 1.0])
    with pytest.raises(ValueError, match="num_particles >= 2"):
        viax.fit(small, {"y": y}, method="bbvi", num_particles=1, progress=False)
    with pytest.raises(ValueError, match="mean-field"):
        viax.fit(small, {"y": y}, method="bbvi", family="fullrank", progress=False)
    with pytest.raises(viax.ModelError, match="discrete"):
        viax.fit(small, {"y": y}, method="bbvi", estimator="reparam", progress=False)

    def counts(y):
        c = numpyro.sample("c", dist.Multinomial(4, probs=jnp.ones(3) / 3))
        numpyro.sample("y", dist.Normal(c[0], 1.0), obs=y)

    with pytest.raises(viax.ModelError, match="supported supports: boolean"):
        viax.fit(counts, {"y": 1.0}, method="bbvi", progress=False)
    # ADVI still refuses discrete sites
    with pytest.raises(viax.ModelError, match="discrete"):
        viax.fit(small, {"y": y}, method="advi", progress=False)


@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:.*k-hat:RuntimeWarning")
def test_poisson_and_binomial_sites():
    def model(y):
        n = numpyro.sample("n", dist.Poisson(6.0))
        k = numpyro.sample("k", dist.Binomial(jnp.array([3, 5]), 0.5))
        numpyro.sample("y", dist.Normal(n + k.sum(), 1.0), obs=y)

    result = viax.fit(model, {"y": 12.0}, method="bbvi", num_steps=300, progress=False)
    draws = result.sample(200)
    assert draws["k"].shape == (200, 2) and np.all(draws["k"] <= np.array([3, 5]))
    assert np.all(draws["n"] >= 0)
    assert result.info["num_impossible"] == 0


def test_adagrad_matches_the_paper():
    grads = [jnp.asarray([1.0, -2.0]), jnp.asarray([3.0, 0.5])]
    transform = scale_by_bbvi_adagrad(0.5)
    state = transform.init(grads[0])
    total = np.zeros(2)
    for g in grads:
        update, state = transform.update(g, state)
        total += np.asarray(g) ** 2
        np.testing.assert_allclose(update, 0.5 * np.asarray(g) / np.sqrt(total), rtol=1e-6)
    assert bbvi_adagrad(0.5) is bbvi_adagrad(0.5)
