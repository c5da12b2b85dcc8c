"""The default stopping rule of stochastic runs: R̂ stationarity, iterate averaging,
Monte Carlo error (viax.infer.stopping), against exact answers."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import viax
from viax.infer.stopping import MCSEStop, effective_sample_size, parse_stop_rule, split_rhat

# --- the statistics ------------------------------------------------------------------


def test_ess_of_ar1_matches_its_closed_form():
    # AR(1) with coefficient φ: ESS = n (1 − φ) / (1 + φ); Geyer's estimator on one
    # 4000-draw chain is within ~15% of it.
    rng = np.random.default_rng(0)
    phi = np.array([0.0, 0.5, 0.9])
    x = np.zeros((4000, 3))
    noise = rng.normal(size=x.shape)
    for t in range(1, x.shape[0]):
        x[t] = phi * x[t - 1] + noise[t]
    exact = 4000 * (1 - phi) / (1 + phi)
    np.testing.assert_allclose(effective_sample_size(x), exact, rtol=0.15)


def test_split_rhat_sees_a_drift_and_not_noise():
    rng = np.random.default_rng(1)
    assert np.all(split_rhat(rng.normal(size=(200, 5))) < 1.05)
    drift = rng.normal(size=(200, 2)) + np.linspace(0.0, 3.0, 200)[:, None]
    assert np.all(split_rhat(drift) > 1.2)
    assert split_rhat(np.ones((40, 1)))[0] == 1.0  # a coordinate that never moves


def test_tracker_averages_an_ornstein_uhlenbeck_process():
    # λ_t = 0.95 λ_{t−1} + 0.3 ε_t from λ_0 = 20: a transient, then a stationary AR(1)
    # around 0 with sd 0.96; the average must be within a few of its MCSEs of 0.
    rng = np.random.default_rng(2)
    rule = MCSEStop(tol=0.05, max_halvings=0).start(3, scale=np.ones(3))
    z, stop = np.full(3, 20.0), False
    while not stop:
        chunk = []
        for _ in range(100):
            z = 0.95 * z + 0.3 * rng.normal(size=3)
            chunk.append(z)
        stop, message = rule.update(np.array(chunk))
    assert rule.converged and rule.stop_reason == "mcse" and "MCSE" in message
    assert np.all(rule.mcse <= 0.05) and np.all(np.abs(rule.average) < 4 * rule.mcse)
    assert rule.summary()["averaged_steps"] > 0
    # the transient is not averaged: stationarity is found after the decay from 20
    assert rule.history[0][1].startswith("stationary")


def test_stop_rule_argument_is_checked():
    assert parse_stop_rule("stan") == "stan" and isinstance(parse_stop_rule("mcse"), MCSEStop)
    with pytest.raises(ValueError, match="unknown stop_rule 'rhat'"):
        parse_stop_rule("rhat")
    with pytest.raises(ValueError, match="tol must be a number > 0"):
        MCSEStop(tol=0.0)
    with pytest.raises(ValueError, match="unknown stop_rule"):
        viax.fit(lambda: None, stop_rule="never", progress=False)


# --- BBVI against the exact mean-field optimum ------------------------------------------

K, N, PRIOR, NOISE = 12, 20, 0.3, 0.8
_rng = np.random.default_rng(0)
W = _rng.normal(size=(N, K)) * (_rng.uniform(size=(N, K)) < 0.5)
Y = W @ (_rng.uniform(size=K) < PRIOR) + NOISE * _rng.normal(size=N)


def twelve_causes(y):
    z = numpyro.sample("z", dist.Bernoulli(PRIOR).expand([K]).to_event(1))
    numpyro.sample("y", dist.Normal(jnp.asarray(W) @ z, NOISE), obs=y)


STATES = np.array(list(itertools.product([0, 1], repeat=K)), dtype=float)  # 4096 states
LOG_JOINT = np.sum(np.where(STATES == 1, np.log(PRIOR), np.log1p(-PRIOR)), axis=1) + np.sum(
    -0.5 * ((Y - STATES @ W.T) / NOISE) ** 2 - np.log(NOISE) - 0.5 * np.log(2 * np.pi), axis=1
)


def exact_elbo(probs):
    """ELBO of mean-field Bernoulli q's (S, K) by enumerating the 4096 states."""
    probs = np.clip(probs, 1e-12, 1 - 1e-12)
    log_q = STATES @ np.log(probs).T + (1 - STATES) @ np.log1p(-probs).T
    return np.sum(np.exp(log_q) * (LOG_JOINT[:, None] - log_q), axis=0)


def best_meanfield_elbo(num_starts=32, num_sweeps=200):
    """CAVI from many random starts, the best ELBO by enumeration.  The log joint is
    quadratic in z, so E_{q−i}[log p | z_i = 1] − E_{q−i}[log p | z_i = 0] is exact in
    closed form: logit(prior) + w_i·(y − Σ_{j≠i} w_j p_j)/σ² − |w_i|²/(2σ²)."""
    probs = np.random.default_rng(1).uniform(0.05, 0.95, (num_starts, K))
    for _ in range(num_sweeps):
        for i in range(K):
            residual = Y[None] - probs @ W.T + probs[:, i : i + 1] * W[:, i][None]
            logit = (
                np.log(PRIOR / (1 - PRIOR))
                + (residual @ W[:, i] - 0.5 * W[:, i] @ W[:, i]) / NOISE**2
            )
            probs[:, i] = 1 / (1 + np.exp(-logit))
    return float(exact_elbo(probs).max())


def test_cavi_updates_match_enumeration():
    # The closed-form coordinate update equals the enumerated one at a random q.
    probs = np.random.default_rng(3).uniform(0.1, 0.9, K)
    i = 4
    others = [j for j in range(K) if j != i]
    weights = np.exp(
        STATES[:, others] @ np.log(probs[others])
        + (1 - STATES[:, others]) @ np.log1p(-probs[others])
    )
    on = STATES[:, i] == 1
    enumerated = np.sum(weights[on] * LOG_JOINT[on]) / np.sum(weights[on]) - np.sum(
        weights[~on] * LOG_JOINT[~on]
    ) / np.sum(weights[~on])
    residual = Y - W @ probs + probs[i] * W[:, i]
    closed = np.log(PRIOR / (1 - PRIOR)) + (residual @ W[:, i] - 0.5 * W[:, i] @ W[:, i]) / NOISE**2
    np.testing.assert_allclose(closed, enumerated, rtol=1e-9)


@pytest.fixture(scope="module")
def best():
    value = best_meanfield_elbo()
    assert value <= np.logaddexp.reduce(LOG_JOINT)
    return value


def _fit(seed, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*k-hat", category=RuntimeWarning)
        return viax.fit(twelve_causes, {"y": Y}, method="bbvi", seed=seed, progress=False, **kwargs)


def _probs(result):
    return np.asarray(jax.nn.sigmoid(result.params["z"]["logits"]))


def test_bbvi_reaches_the_meanfield_optimum_on_every_seed(best):
    # The issue: Stan's rule stopped five seeds 0.40-1.13 nats short.  With the default
    # rule every seed ends within 0.2 nats (measured: 0.03-0.15 over 15 runs on three
    # such models, docs/guide/stopping.md).  One compiled step serves all seeds.
    for seed in range(5):
        result = _fit(seed)
        gap = best - exact_elbo(_probs(result)[None])[0]
        assert gap < 0.2, (seed, gap, result.message)
        assert result.converged, result.message
        info = result.info
        assert info["stop_rule"] == "mcse" and info["stop_reason"] in ("gain", "budget", "mcse")
        assert info["averaged_steps"] > 0 and info["mcse_max_relative"] <= 0.1
        assert np.all(np.isfinite(info["mcse"]["z"]["logits"]))
        assert info["mcse"]["z"]["logits"].shape == (K,)


def test_stan_rule_is_still_selectable_and_stops_as_before(best):
    result = _fit(0, stop_rule="stan")
    assert result.converged and "relative ELBO change" in result.message
    assert result.info["stop_rule"] == "stan" and result.info["stop_reason"] == "stan"
    assert result.num_steps <= 2000 and len(result.info["elbo_evaluations"]) > 0
    assert np.isnan(result.info["mcse"]["z"]["logits"]).all()  # the last iterate: unknown
    # ... and, as the issue reported, short of the optimum by more than 1% of |ELBO| sees.
    assert best - exact_elbo(_probs(result)[None])[0] > 0.2


# --- stochastic ADVI against DADVI -------------------------------------------------------

Y10 = np.array([1.2, 0.4, 2.1, 1.7, 0.9, 1.5, 2.6, 0.3, 1.1, 1.9])


def normal_scale(y):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


# A Gaussian q on log σ has lighter tails than this posterior: k̂ can exceed 0.7 from
# 1000 draws whatever the optimiser (the question here is the stopping rule).
@pytest.mark.filterwarnings("ignore:.*k-hat:RuntimeWarning")
def test_averaged_adam_iterate_agrees_with_dadvi_within_its_error():
    reference = viax.fit(normal_scale, {"y": Y10}, progress=False)  # DADVI, the default
    adam = optax.adam(0.05)
    for seed in range(2):
        result = viax.fit(normal_scale, {"y": Y10}, optimizer=adam, seed=seed, progress=False)
        assert result.converged and result.info["stop_rule"] == "mcse"
        for name in ("loc", "log_scale"):
            error = result.info["error"][name]  # sqrt(MCSE² + step-size bias²)
            assert np.all(np.isfinite(error)) and np.all(error > 0)
            difference = np.abs(np.asarray(result.params[name] - reference.params[name]))
            # 4 errors: DADVI's own fixed-draw error (a few % of an sd) is not counted.
            assert np.all(difference < 4 * error), (seed, name, difference, error)
