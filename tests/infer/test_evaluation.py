"""The final evaluation of a fit over many rows: the minibatch path's difference
estimator against the exact pass, and full-batch log weights summed over row blocks."""

import numpy as np
import numpyro
import numpyro.distributions as dist

import viax
import viax.result
from viax.infer import chunked
from viax.infer import minibatch as mb


def logistic(X, y):
    a = numpyro.sample("a", dist.Normal(0, 10))
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ beta), obs=y)


def test_difference_estimator_agrees_with_the_exact_pass_within_its_own_error(monkeypatch):
    """4,096 rows in 128 batches of 32 (16 sampled here; 32 by default, from passes of
    over 128 batches): the log weights of 200 draws from the sampled batches plus the
    first-order expansion at the mean of q agree with the pass over every row within 5
    of their own row-sampling sds (each computed from the sampled batches), the ELBO
    within 4 of its row-sampling se; a second call reuses the sums at the mean and
    reads only the sampled batches.  Where the error is above a tenth of the log
    weights' spread, the evaluation is exact, and says why."""
    monkeypatch.setattr(mb, "_EVAL_BATCHES", 16)
    monkeypatch.setattr(mb, "_EVAL_BATCHES_FIRST", 16)
    rng = np.random.default_rng(0)
    n = 4096
    X = rng.normal(size=(n, 3)) * np.array([1.0, 10.0, 0.1])
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + X @ np.array([1.0, -0.1, 3.0]))))).astype(float)
    result = mb.fit_minibatch(
        logistic,
        {"X": X, "y": y},
        batch_size=32,
        num_steps=100,
        steps_per_chunk=50,
        precondition=False,
        evaluate=False,
        progress=False,
    )
    evaluator = result.log_weights_fn
    exact = evaluator._exact(200, 5)

    monkeypatch.setattr(mb, "_EVAL_MAX_RELATIVE_SD", np.inf)
    estimate = evaluator(200, 5)
    last = dict(evaluator.last)
    assert last["method"] == "difference estimator" and last["batches"] == "16 of 128"
    total, sampled = evaluator._sampled_batches()
    _, sd, mean_se = evaluator._estimate(200, 5, total, sampled)
    assert np.all(np.abs(estimate - exact) <= 5 * sd), np.max(np.abs(estimate - exact) / sd)
    assert abs(estimate.mean() - exact.mean()) <= 4 * mean_se
    np.testing.assert_allclose(evaluator(200, 5), estimate, rtol=1e-12)  # sums reused

    monkeypatch.setattr(mb, "_EVAL_MAX_RELATIVE_SD", 0.0)
    np.testing.assert_array_equal(evaluator(200, 5), exact)
    assert evaluator.last["method"] == "exact" and "exceeded" in evaluator.last["reason"]


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5))
    with numpyro.plate("n", len(y)):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_full_batch_log_weights_sum_the_rows_in_blocks(monkeypatch):
    """Past the memory budget, ``Result.log_weights`` sums the rows in blocks (a scan,
    memory O(block × draws)) and gives the whole-data numbers; the budget is shrunk
    here so that 300 rows are cut into 3 blocks of 100."""
    y = np.random.default_rng(1).normal(3.0, 2.0, size=300)
    result = viax.fit(normal_model, {"y": y}, seed=0, progress=False)
    whole = result.log_weights(500, seed=3)
    assert "log_weights_rows" not in result.info
    monkeypatch.setattr(viax.result, "_WHOLE_LOG_WEIGHTS", 0)
    monkeypatch.setattr(chunked, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 500 * 9 * 100)
    blocked = result.log_weights(500, seed=3)
    assert result.info["log_weights_rows"].startswith("300 rows in 3 blocks of 100")
    np.testing.assert_allclose(blocked, whole, rtol=1e-10)
