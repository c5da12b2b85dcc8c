"""Held-out evidence of an amortized q, per row, in chunks: the chunk plan does not change
the answer (each row's draw s has its own counter-based noise), and on a linear-Gaussian
model whose exact posterior the affine encoder represents, the importance-sampling
estimate is the exact marginal likelihood of each held-out row."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import stats

import viax
from viax.infer import learn


def _factor(x):
    w = numpyro.param("w", np.array([[0.5], [0.2]]))
    mu = numpyro.param("mu", np.zeros(2))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        numpyro.sample("x", dist.Normal(z @ w.T + mu, sigma).to_event(1), obs=x)


def test_held_out_evidence_does_not_depend_on_the_chunk_plan(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 1)) @ np.array([[1.5, -1.0]]) + 0.6 * rng.normal(size=(60, 2))
    result = viax.fit(_factor, {"x": x}, encoder=viax.MLPEncoder(hidden_sizes=()), progress=False)
    x_test = rng.normal(size=(7, 2)) * 2.0
    # Default plan: one step of 300 draws × 7 rows; then steps of 60 draws of one row,
    # 4 steps per call, 35 blocks over 9 calls (the last padded): other programs, other
    # packing, the same draws.
    assert learn._row_plan(7, 300) == (300, 7, 1, 1)
    first = result.log_evidence(data={"x": x_test}, num_samples=300, seed=3)
    monkeypatch.setattr(learn, "_ROW_STEP", 64)
    monkeypatch.setattr(learn, "_ROW_CALL", 256)
    assert learn._row_plan(7, 300) == (60, 1, 4, 5)
    second = result.log_evidence(data={"x": x_test}, num_samples=300, seed=3)
    for name in ("log_p_rows", "log_p_se_rows", "elbo_rows", "khat_rows", "iwae_rows"):
        np.testing.assert_allclose(getattr(second, name), getattr(first, name), rtol=1e-6)
    # The exact posterior of z_n is Gaussian with a mean linear in x_n: the affine encoder
    # holds it, the log weights are constant up to the fit's tolerance, and log p̂ is the
    # marginal N(μ, w wᵀ + σ² I) of each row.
    params = result.model_params
    w, mu, sigma = np.asarray(params["w"]), np.asarray(params["mu"]), float(params["sigma"])
    exact = stats.multivariate_normal(mu, w @ w.T + sigma**2 * np.eye(2)).logpdf(x_test)
    np.testing.assert_allclose(first.log_p_rows, exact, atol=1e-5)
    assert first.log_p == pytest.approx(first.log_p_rows.sum())
    assert np.all(first.khat_rows < 0.5)
