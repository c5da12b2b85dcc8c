"""Normal–Gamma linear regression: the exact posterior and evidence in closed form."""

import math

import numpy as np
import pytest

from viax.conjugate import LinearRegression, LinearRegressionModel, cavi


def closed_form(X, y, m0, precision0, a0, b0):
    """Textbook oracle (Murphy 2007 §7.6), independent of the engine."""
    n = X.shape[0]
    precision_n = precision0 + X.T @ X
    mean_n = np.linalg.solve(precision_n, precision0 @ m0 + X.T @ y)
    a_n = a0 + 0.5 * n
    b_n = b0 + 0.5 * (y @ y + m0 @ precision0 @ m0 - mean_n @ precision_n @ mean_n)
    log_evidence = (
        -0.5 * n * math.log(2 * math.pi)
        + 0.5 * np.linalg.slogdet(precision0)[1]
        - 0.5 * np.linalg.slogdet(precision_n)[1]
        + a0 * math.log(b0)
        - a_n * math.log(b_n)
        + math.lgamma(a_n)
        - math.lgamma(a0)
    )
    covariance = b_n / (a_n - 1) * np.linalg.inv(precision_n)
    return mean_n, covariance, a_n, b_n, log_evidence


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3)) * [1.0, 10.0, 0.1]  # unscaled columns on purpose
    y = X @ [1.5, -0.2, 4.0] + 2.0 + 0.7 * rng.normal(size=60)
    return X, y


def test_estimator_equals_closed_form(data):
    X, y = data
    m0, prec0, a0, b0 = np.array([0.1, 0.0, -0.3, 1.0]), np.diag([0.5, 2.0, 0.1, 0.01]), 2.0, 3.0
    lr = LinearRegression(mean_prior=m0, precision_prior=prec0, shape_prior=a0, rate_prior=b0)
    lr.fit(X, y)
    Z = np.hstack([X, np.ones((60, 1))])
    mean, cov, a_n, b_n, log_ev = closed_form(Z, y, m0, prec0, a0, b0)
    # float64 closed forms: agreement to 1e-6 is far above round-off (~1e-12 here).
    np.testing.assert_allclose(lr.posterior_mean_, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(lr.coef_covariance_, cov, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([lr.posterior_shape_, lr.posterior_rate_], [a_n, b_n], rtol=1e-8)
    # q is the exact posterior, so the ELBO is log p(y), not just a bound on it.
    assert lr.log_evidence_ == pytest.approx(log_ev, rel=1e-9, abs=1e-6)
    assert lr.intercept_ == pytest.approx(mean[-1], rel=1e-9)
    assert lr.result_.converged and lr.result_.num_steps == 2


def test_functional_layer_result_and_draws(data):
    X, y = data
    model = LinearRegressionModel.default(3, precision=1.0)
    result = cavi(model, (X, y))
    mean, cov, a_n, b_n, log_ev = closed_form(X, y, np.zeros(3), np.eye(3), 1.0, 1.0)
    assert result.method == "cavi" and result.elbo_se == 0.0
    assert result.elbo == pytest.approx(log_ev, rel=1e-9)
    draws = result.sample(20000, seed=1)
    assert draws["weights"].shape == (20000, 3) and draws["noise_precision"].shape == (20000,)
    # Marginal of w is Student-t with covariance `cov`: 20000 draws pin the mean to
    # ~sd/140; 5 standard errors.
    se = np.sqrt(np.diag(cov) / 20000)
    assert np.all(np.abs(draws["weights"].mean(0) - mean) < 5 * se)
    assert draws["noise_precision"].mean() == pytest.approx(a_n / b_n, rel=0.03)
    summary = result.summary(num_samples=500)
    assert list(summary.index[:3]) == ["noise_precision", "weights[0]", "weights[1]"] or (
        "weights[0]" in summary.index
    )


def test_refit_same_shapes_does_not_recompile(data):
    X, y = data
    model = LinearRegressionModel.default(3)
    cavi(model, (X, y))
    again = cavi(LinearRegressionModel.default(3, precision=5.0), (X + 1.0, y))
    assert again.compile_time == 0.0
