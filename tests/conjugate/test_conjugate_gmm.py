"""Bayesian GMM: agreement with sklearn, autodiff updates against hand-derived ones."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import digamma, logsumexp

from viax.conjugate import ElboDecreaseError, GaussianMixture, GaussianMixtureModel, cavi
from viax.conjugate.engine import conjugate_model, fit_locals, global_means
from viax.conjugate.expfam import Beta, Dirichlet, NormalWishart

sklearn = pytest.importorskip("sklearn")
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture  # noqa: E402

K = 4


# ---------------------------------------------------------------------------------------
# Hand-derived updates (Bishop 2006 eqs. 10.46–10.63; Blei & Jordan 2006 for the sticks)
# ---------------------------------------------------------------------------------------


def hand_globals(X, resp, alpha0, m0, beta0, nu0, cov0, dp):
    nk = resp.sum(0)
    xk = resp.T @ X / nk[:, None]
    beta = beta0 + nk
    means = (beta0 * m0 + nk[:, None] * xk) / beta[:, None]
    scale_inv = np.empty((len(nk), X.shape[1], X.shape[1]))
    for k in range(len(nk)):
        diff = X - xk[k]
        sk = (resp[:, k, None] * diff).T @ diff / nk[k]
        d0 = xk[k] - m0
        scale_inv[k] = cov0 + nk[k] * sk + beta0 * nk[k] / beta[k] * np.outer(d0, d0)
    nu = nu0 + nk
    if dp:
        weights = (1.0 + nk, alpha0 + np.concatenate([np.cumsum(nk[::-1])[-2::-1], [0.0]]))
    else:
        weights = (alpha0 + nk,)
    return weights, means, beta, scale_inv, nu


def hand_responsibilities(X, weights, means, beta, scale_inv, nu, dp):
    d = X.shape[1]
    if dp:
        a, b = weights
        elog_pi = digamma(a) - digamma(a + b)
        elog_pi = elog_pi + np.concatenate([[0.0], np.cumsum(digamma(b) - digamma(a + b))[:-1]])
    else:
        elog_pi = digamma(weights[0]) - digamma(weights[0].sum())
    log_rho = np.empty((X.shape[0], len(nu)))
    for k in range(len(nu)):
        scale = np.linalg.inv(scale_inv[k])
        e_logdet = (
            sum(digamma((nu[k] - i) / 2) for i in range(d))
            + d * math.log(2)
            + np.linalg.slogdet(scale)[1]
        )
        diff = X - means[k]
        quad = d / beta[k] + nu[k] * np.einsum("ni,ij,nj->n", diff, scale, diff)
        log_rho[:, k] = elog_pi[k] + 0.5 * e_logdet - 0.5 * d * math.log(2 * math.pi) - 0.5 * quad
    return np.exp(log_rho - logsumexp(log_rho, axis=1, keepdims=True))


def wide_points():
    """Four clusters in 40-D (400 points): the quadratic forms' D ≥ 32 layout."""
    rng = np.random.default_rng(2)
    centers = rng.normal(0, 3, (4, 40))
    return centers[rng.integers(0, 4, 400)] + rng.normal(size=(400, 40))


@pytest.mark.parametrize(
    "prior_type, wide",
    [("dirichlet_process", False), ("dirichlet_distribution", False), ("dirichlet_process", True)],
)
def test_autodiff_updates_equal_hand_derived(X, prior_type, wide):
    dp = prior_type == "dirichlet_process"
    if wide:
        X = wide_points()
    model = GaussianMixtureModel.from_data(
        X, K, weight_concentration_prior_type=prior_type, reg_covar=0.0
    )
    resp = np.random.default_rng(1).dirichlet(np.ones(K), X.shape[0])
    batch = model.prepare(X)
    g = jax.jit(model.globals_from_responsibilities)(jnp.asarray(resp), batch)
    cov0 = np.cov(X.T)
    want = hand_globals(X, resp, 1.0 / K, X.mean(0), 1.0, float(X.shape[1]), cov0, dp)
    comp = NormalWishart.to_standard(g["components"])
    weights = Beta.to_standard(g["weights"]) if dp else Dirichlet.to_standard(g["weights"])
    got_weights = (weights["a"], weights["b"]) if dp else (weights["concentration"],)
    # Both sides are float64 closed forms of the same numbers: 1e-8 relative leaves
    # room only for round-off in the matrix inverses.
    for got, exp in zip(got_weights, want[0], strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-8)
    np.testing.assert_allclose(comp["mean"], want[1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(comp["mean_precision"], want[2], rtol=1e-8)
    np.testing.assert_allclose(np.linalg.inv(comp["scale"]), want[3], rtol=1e-8)
    np.testing.assert_allclose(comp["df"], want[4], rtol=1e-8)
    # The local update: η = ∂F/∂μ_local, normalised, equals Bishop's eq. 10.49.
    local = model.init_locals(None, batch, None)
    local, _ = jax.jit(fit_locals)(model, global_means(model, g), local, batch)
    want_resp = hand_responsibilities(X, want[0], want[1], want[2], want[3], want[4], dp)
    np.testing.assert_allclose(
        jax.nn.softmax(local["assignments"][0]), want_resp, rtol=1e-8, atol=1e-12
    )


def sklearn_constant(model, n):
    """Exact ELBO − sklearn's lower bound: the prior normalisers, −N D/2 log 2π and
    the log π of the multivariate gamma that sklearn drops (derived in the docs)."""
    d = X_dim = model.mean_prior.shape[0]
    del X_dim
    prior = model.prior()
    factors = model.global_factors()
    a0 = float(jnp.sum(factors["weights"].log_normalizer(prior["weights"])))
    a0 += float(jnp.sum(factors["components"].log_normalizer(prior["components"])))
    k = model.n_components
    return -a0 - 0.5 * n * d * math.log(2 * math.pi) + k * d * (d - 1) / 4 * math.log(math.pi)


@pytest.mark.parametrize("prior_type", ["dirichlet_process", "dirichlet_distribution"])
def test_agrees_with_sklearn_bayesian_gaussian_mixture(X, prior_type):
    # Same data, priors (sklearn's defaults) and start: sklearn's own k-means labels.
    # reg_covar = 0: sklearn adds reg_covar in its M-step but not its E-step, which is
    # not coordinate ascent on one objective; with 0 both run the same algorithm.
    iterations = 25
    sk = BayesianGaussianMixture(
        n_components=K,
        weight_concentration_prior_type=prior_type,
        reg_covar=0.0,
        max_iter=iterations,
        tol=0.0,
        random_state=0,
    )
    with pytest.warns(ConvergenceWarning):
        sk.fit(X)
    labels = KMeans(n_clusters=K, n_init=1, random_state=0).fit(X).labels_
    ours = GaussianMixture(
        n_components=K,
        weight_concentration_prior_type=prior_type,
        reg_covar=0.0,
        max_iter=iterations,
        tol=0.0,
    )
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=25"):
        ours.fit(X, initial_resp=np.eye(K)[labels])
    assert ours.n_iter_ == iterations == sk.n_iter_
    # Lower bounds: ours is the exact ELBO, sklearn's drops constants; the gap must be
    # that constant at every sweep.  Round-off of ~1e-13 × |ELBO| per term.
    gap = np.asarray(ours.lower_bounds_) - np.asarray(sk.lower_bounds_)
    constant = sklearn_constant(ours.model_, X.shape[0])
    np.testing.assert_allclose(gap, constant, rtol=0, atol=1e-8)
    # Parameters after 25 identical sweeps: equal to round-off amplified by 25
    # matrix inversions; 1e-7 relative is a stated tolerance with margin.
    np.testing.assert_allclose(ours.weights_, sk.weights_, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ours.means_, sk.means_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.covariances_, sk.covariances_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.degrees_of_freedom_, sk.degrees_of_freedom_, rtol=1e-7)
    np.testing.assert_allclose(ours.predict_proba(X), sk.predict_proba(X), atol=1e-7)
    assert ours.score(X) == pytest.approx(sk.score(X), rel=1e-8)


def test_elbo_never_decreases(X):
    # Same K and prior type as the sklearn test: the compiled loop is reused.
    model = GaussianMixtureModel.from_data(X, K)
    start = jax.jit(model.init_globals, static_argnums=2)(
        jax.random.PRNGKey(3), model.prepare(X), "random"
    )
    result = cavi(
        model,
        X,
        max_iter=60,
        tol=1e-10,
        init=(start, model.init_locals(None, model.prepare(X), None)),
    )
    steps = np.diff(result.elbo_trace)
    assert np.all(steps >= -1e-9 * np.abs(result.elbo_trace[1:]))
    assert result.elbo >= result.elbo_trace[-1] - 1e-9 * abs(result.elbo)
    # Another max_iter: the compiled sweep is reused (max_iter is not static), and
    # the first 5 sweeps from the same start are the first 5 of the run above.
    again = cavi(
        model, X, max_iter=5, tol=0.0, init=(start, model.init_locals(None, model.prepare(X), None))
    )
    assert again.compile_time == 0.0 and again.num_steps == 5
    np.testing.assert_allclose(again.elbo_trace, result.elbo_trace[:5], rtol=1e-12)


@pytest.mark.slow
def test_draws_and_arviz(X):
    # The sklearn test's configuration: its compiled CAVI loop is reused, only the
    # sampler (Gamma draws for the Beta sticks and the Wishart) compiles here.
    labels = KMeans(n_clusters=K, n_init=1, random_state=0).fit(X).labels_
    gm = GaussianMixture(n_components=K, reg_covar=0.0, max_iter=25, tol=0.0)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        result = gm.fit(X, initial_resp=np.eye(K)[labels]).result_
    draws = result.sample(200, seed=0)
    assert draws["weights"].shape == (200, K)
    assert np.all(draws["weights"].sum(1) <= 1.0 + 1e-12)
    assert draws["means"].shape == (200, K, 2) and draws["precisions"].shape == (200, K, 2, 2)
    idata = result.to_arviz(num_samples=50)
    assert idata.sample_stats["elbo_trace"].shape == (result.num_steps,)


@conjugate_model
class _NotConjugate(GaussianMixtureModel):
    """A log joint that is not linear in the responsibilities: λ* = ∂F/∂μ is then not
    the coordinate optimum, and the ELBO can fall — which CAVI must report."""

    def local_log_joint(self, global_mean, local_mean, batch):
        resp = local_mean["assignments"][0]
        return jnp.sum(resp**2 * 30.0 * self.expected_log_likelihood(global_mean, batch["x"]))


def test_elbo_decrease_raises(X):
    good = GaussianMixtureModel.from_data(
        X, 3, weight_concentration_prior_type="dirichlet_distribution"
    )
    bad = _NotConjugate(**{f: getattr(good, f) for f in good.__dataclass_fields__})
    with pytest.raises(ElboDecreaseError, match="lowered the ELBO"):
        cavi(bad, X, max_iter=30, tol=0.0)


def test_estimator_conventions(X):
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    gm = GaussianMixture(n_components=K, random_state=0)
    assert gm.get_params()["n_components"] == K
    assert clone(gm).set_params(n_components=2).n_components == 2
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        gm.set_params(bogus=1)
    # sklearn's NotFittedError (a ValueError and an AttributeError), as sklearn's checks
    # require; before the estimators were sklearn's own they raised a RuntimeError.
    with pytest.raises(NotFittedError, match="not fitted"):
        gm.predict(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = make_pipeline(StandardScaler(), gm).fit(X)
    labels = pipe.predict(X)
    assert labels.shape == (X.shape[0],) and len(np.unique(labels)) == 3  # 3 true clusters
    fitted = pipe[-1]
    assert fitted.converged_ and fitted.elbo_trace_.shape == (fitted.n_iter_,)
    np.testing.assert_allclose(fitted.predict_proba(StandardScaler().fit_transform(X)).sum(1), 1.0)
