"""Never silent: a param that enters the log density only through an operation without a
derivative (``lax.stop_gradient``, ``round``) keeps its initial value; viax says so by
name, before compiling, and does not flag a param whose gradient merely vanishes at the
initial point."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import viax


def _model(y):
    s = numpyro.param("s", 2.0, constraint=constraints.positive)  # only behind stop_gradient
    k = numpyro.param("k", 1.4)  # only through round: a zero derivative almost everywhere
    c = numpyro.param("c", 0.0)  # -c² has zero gradient at 0, its optimum: not flagged
    m = numpyro.param("m", 0.0)
    numpyro.factor("c_penalty", -(c**2))
    mu = numpyro.sample("mu", dist.Normal(m, 1.0))
    scale = jax.lax.stop_gradient(s) + 0.0 * jnp.round(k)
    with numpyro.plate("rows", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_params_behind_stop_gradient_or_round_are_flagged_by_name():
    y = np.random.default_rng(0).normal(1.0, 1.0, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = viax.fit(_model, {"y": y}, progress=False)
    messages = [str(w.message) for w in caught]
    flagged = [m for m in messages if "without a derivative" in m]
    assert len(flagged) == 1, messages
    assert flagged[0].startswith("param site(s) k, s enter the log density only through")
    assert not any("do not enter the log density" in m for m in messages)
    assert result.info["params_without_gradient"] == ("k", "s")
    # They kept their initial values, as the warning says; c stayed at its optimum, and m
    # (a gradient away from 0 at the start) was learned: the ML m is mean(y) (mu's prior
    # variance 1 is fixed, so the marginal maximum is at the sample mean).
    params = result.model_params
    assert float(params["s"]) == pytest.approx(2.0, abs=1e-12)
    assert float(params["k"]) == pytest.approx(1.4, abs=1e-12)
    assert abs(float(params["c"])) < 1e-6
    assert float(params["m"]) == pytest.approx(np.mean(y), abs=1e-4)
