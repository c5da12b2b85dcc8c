"""The Laplace-started minibatch fit: the full-data Newton step from the subsample's MAP,
and the draws' second-order Taylor control variate (minibatch.Curvature)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from viax import data as vdata
from viax.families.gaussian import MeanField
from viax.infer import minibatch as mb


def regression(X, y):
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, 1), obs=y)


def logistic(X, y):
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ beta), obs=y)


def _regression_data(n=4096):
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(50.0, 10.0, size=n)])
    y = X @ np.array([1.0, -0.5, 0.02]) + rng.normal(size=n)
    return X, y


def test_newton_start_is_exact_on_a_quadratic_log_joint():
    """A linear regression's log joint is quadratic, so its q* is known (mean-field:
    the posterior mean, sds 1/sqrt(precision_jj)).  The whitening's MAP on 256 of the
    4,096 rows lies 2-9 sds from the posterior mean (seeds 0-3); one Newton step with
    the full data's gradient and the subsample's Hessian takes the start there up to
    that Hessian's error (about 1/sqrt(256)), and the draws' Taylor control variate is
    exact here: what noise is left comes from the rows.  The rule then stops at its
    shortest window (500 steps of 64 rows) with the answer within 0.05 sd (the rule's
    MCSE is about 0.01 sd on seeds 0-3; measured errors 0.010-0.015 sd).  Raw scales (an
    intercept beside a predictor centred at 50: correlation 0.98) as the whitening must
    handle."""
    X, y = _regression_data()
    result = mb.fit_minibatch(
        regression,
        {"X": X, "y": y},
        batch_size=64,
        num_precondition_rows=256,
        evaluate=False,
        progress=False,
    )
    precision = X.T @ X + np.eye(3) / 100
    mean = np.linalg.solve(precision, X.T @ y)
    meanfield_sd = 1 / np.sqrt(np.diag(precision))
    sd = np.sqrt(np.diag(np.linalg.inv(precision)))
    info = result.info
    assert info["newton_start"].startswith("taken"), info["newton_start"]
    moved = float(info["newton_start"].split(":")[1].split()[0])  # in posterior sds
    assert moved > 1.0
    assert "second-order Taylor" in info["control_variate"] and info["num_particles"] == 2
    # The subsample MAP of a quadratic log joint: Newton's first step, checked by a second.
    assert info["map_steps"] == info["map_newton_steps"] <= 3, info
    assert result.converged and result.num_steps <= 520, result.message
    loc = np.asarray(result.params["loc"])
    np.testing.assert_array_less(np.abs(loc - mean) / sd, 0.05)
    np.testing.assert_allclose(np.exp(result.params["log_scale"]), meanfield_sd, rtol=0.02)


def test_taylor_control_variate_is_unbiased_and_quiets_the_draws():
    """On a logistic regression (not quadratic) and one batch, the ELBO estimate with
    the control variate has the same mean over the draws as without it (within 4
    standard errors of their difference, 1,000 draws), and the variance of its gradient
    over the draws is at least 10 times smaller (measured: 15-45 times): f − f̃ is what
    is left of the log joint after its quadratic Taylor model at the anchor (Miller et
    al. 2017).  The batch is held fixed (the rows' noise is the anchor's business); its
    local terms scaled by N/|B| = 32 have a Hessian that differs from the full data's by
    its sampling error, about 1/sqrt(64) relative, which is what limits the ratio here
    (over all 2,048 rows it is 1,000-2,400)."""
    rng = np.random.default_rng(0)
    n, batch_size = 2048, 64
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n) * 3])
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ np.array([0.3, 1.0, -0.5]))))).astype(float)
    source = vdata.as_source({"X": X, "y": y})
    bm, constants = mb._analyse_cached(logistic, source, batch_size)
    family = MeanField(bm.global_dim)
    full = {**constants, "X": X, "y": y, "_rows": np.arange(n)}

    def log_joint(u):
        return sum(bm.log_joint_parts(u, {}, full))

    @jax.jit
    def laplace():
        """The Laplace answer on every row: Newton from 0, in one compiled program."""

        def newton(u, _):
            return u - jnp.linalg.solve(jax.hessian(log_joint)(u), jax.grad(log_joint)(u)), None

        u, _ = jax.lax.scan(newton, jnp.zeros(bm.global_dim), None, length=10)
        local = jax.value_and_grad(lambda v: bm.log_joint_parts(v, {}, full)[1])(u)
        return u, -jax.hessian(log_joint)(u), jax.grad(log_joint)(u), local

    u, hessian, grad, (local_value, local_grad) = jax.tree_util.tree_map(np.asarray, laplace())
    tril = np.linalg.cholesky(np.linalg.inv(hessian))
    whitening = mb.Whitening(u, tril, np.diag(hessian) ** -0.5)
    anchor = mb.Anchor(u, local_value, local_grad, np.asarray(1.0))
    curvature = mb.Curvature(grad, hessian, np.asarray(1.0))
    objective = mb.elbo_objective(bm, family, 2)
    # q off the optimum (whitened: 0.5 sd shifts, scales 20% narrow) so gradients are not 0.
    params = {"global": {"loc": np.full(3, 0.5), "log_scale": np.full(3, -0.2)}, "local": {}}
    num = 1000
    rows = rng.choice(n, batch_size, replace=False)
    batch = {**constants, "X": X[rows], "y": y[rows], "_rows": rows}
    keys = jax.random.split(jax.random.PRNGKey(1), num)

    @jax.jit
    def estimates(enabled):
        # The plain estimator is the same program with the variate's weight at 0.
        setup = (whitening, anchor, curvature._replace(enabled=enabled))

        def one(key):
            (_, elbo), grad = jax.value_and_grad(objective, has_aux=True)(
                params, {**batch, "_setup": setup}, key
            )
            return elbo, grad["global"]["loc"]

        return jax.vmap(one)(keys)

    plain_elbo, plain_grad = map(np.asarray, estimates(0.0))
    taylor_elbo, taylor_grad = map(np.asarray, estimates(1.0))
    difference = taylor_elbo - plain_elbo
    assert abs(difference.mean()) <= 4 * difference.std() / np.sqrt(num)
    assert abs(taylor_grad.mean(0) - plain_grad.mean(0)).max() <= 4 * (
        np.sqrt((plain_grad.var(0) + taylor_grad.var(0)) / num).max()
    )
    np.testing.assert_array_less(10 * taylor_grad.var(0), plain_grad.var(0))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_particles_is_refused_by_name(bad):
    X, y = _regression_data(64)
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        mb.fit_minibatch(regression, {"X": X, "y": y}, batch_size=32, num_particles=bad)


def test_newton_step_that_does_not_raise_the_log_joint_is_not_taken():
    """The Newton start is a trust region's ratio test: where the second pass finds the
    log joint risen by less than a quarter of the quadratic model's prediction, the
    whitening and the anchor stay at the subsample's MAP, and ``info`` says so."""
    X, y = _regression_data(256)
    source = vdata.as_source({"X": X, "y": y})
    bm, constants = mb._analyse_cached(regression, source, 64)
    batch = {**constants, "X": X[:64], "y": y[:64], "_rows": np.arange(64)}
    dim = bm.global_dim
    whitening = mb.Whitening(np.zeros(dim), np.eye(dim), np.ones(dim))
    anchor = mb.Anchor(np.zeros(dim), np.asarray(-100.0), np.full(dim, 2.0), np.asarray(1.0))
    seen = []

    def anchor_at(center, value):
        seen.append(np.asarray(center))
        return mb.Anchor(center, np.asarray(value), np.zeros(dim), np.asarray(1.0))

    # Predicted gain ½|Aᵀg|² = 6 nats (the prior's gradient at 0 is 0); found: 1 nat.
    kept = mb._newton_start(bm, whitening, anchor, batch, lambda c: anchor_at(c, -99.0))
    assert kept[0] is whitening and kept[1] is anchor
    assert kept[2].startswith("not taken") and "predicted +6" in kept[2], kept[2]
    np.testing.assert_allclose(seen[0], np.full(dim, 2.0))  # ẑ + H⁻¹ g
    taken = mb._newton_start(bm, whitening, anchor, batch, lambda c: anchor_at(c, -95.0))
    assert taken[2].startswith("taken") and taken[1].value == -95.0
    np.testing.assert_allclose(taken[0].center, np.full(dim, 2.0))


def test_subsample_map_is_newtons_on_the_dense_hessian():
    """For a few latents the whitening's MAP search is Newton's method on the dense
    Hessian (one compiled program for value, gradient and Hessian; the L-BFGS search's
    diagonal-curvature program is never compiled), from the nudged start on raw scales
    (an intercept beside a predictor centred at 50).  Its centre is the MAP and its
    factor the Laplace one, against Newton's method in NumPy on the closed-form logistic
    gradient and Hessian: the search stops at a Newton decrement gᵀH⁻¹g ≤ 1e-8, i.e.
    within 1e-4 posterior sds of the MAP (quadratic convergence puts it far closer)."""
    rng = np.random.default_rng(5)
    n = 2048
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(50.0, 10.0, size=n)])
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ np.array([-1.0, 1.0, 0.02]))))).astype(float)
    source = vdata.as_source({"X": X, "y": y})
    bm, constants = mb._analyse_cached(logistic, source, 256)
    batch = {**constants, "X": X, "y": y, "_rows": np.arange(n)}
    whitening, info = mb._whitening(bm, batch, n, np.zeros(bm.global_dim))
    beta = np.zeros(3)
    for _ in range(30):  # prior N(0, 10²): Newton on the exact log posterior
        p = 1 / (1 + np.exp(-(X @ beta)))
        hessian = (X * (p * (1 - p))[:, None]).T @ X + np.eye(3) / 100
        beta = beta + np.linalg.solve(hessian, X.T @ (y - p) - beta / 100)
    sd = np.sqrt(np.diag(np.linalg.inv(hessian)))
    assert "dense Hessian" in info["preconditioner"], info
    assert info["map_steps"] == info["map_newton_steps"] <= 12, info
    np.testing.assert_array_less(np.abs(np.asarray(whitening.center) - beta) / sd, 1e-4)
    tril = np.asarray(whitening.tril)
    np.testing.assert_allclose(tril @ tril.T, np.linalg.inv(hessian), rtol=1e-6)
    assert mb._map_fns(bm)[2]._cache_size() == 0  # the diagonal curvature: not compiled


def test_step_noise_depends_on_the_step_alone():
    """The steps' draws of q are made on the host for models without per-row latents,
    handed to each compiled chunk as data: step t's noise is a function of (seed, t)
    alone, so chunks of any length (a resumed run, a segment cut by the stopping rule)
    see the same numbers; the numbers are standard normal (20,000 of them: mean within
    4 se = 0.028 of 0, variance within 4 se = 0.04 of 1)."""
    whole = mb._step_noise(5, 10, 6, (2, 3))
    parts = np.concatenate([mb._step_noise(5, 10, 2, (2, 3)), mb._step_noise(5, 12, 4, (2, 3))])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape == (6, 2, 3) and not np.allclose(whole, mb._step_noise(6, 10, 6, (2, 3)))
    many = mb._step_noise(0, 0, 2000, (2, 5))
    assert abs(many.mean()) < 0.028 and abs(many.var() - 1) < 0.04
