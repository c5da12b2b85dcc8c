"""GMM with tied, diagonal and spherical covariances.

Oracles: the hand-derived conjugate updates (Bishop 2006 §10.2 with a Gamma per
precision), and sklearn's BayesianGaussianMixture, whose "diag" M-step is the same and
whose E-step uses the Wishart's E log|Λ| instead of a Gamma's (a difference of order
1/N_k), whose "spherical" posterior counts N_k, not N_k·D, observations per shared
precision (the exact conjugate posterior counts every coordinate), and whose "tied"
update averages K Wishart updates (ν0 + N/K) where the posterior has ν0 + N.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import digamma, logsumexp

from viax.conjugate import GaussianMixture, GaussianMixtureModel
from viax.conjugate.engine import fit_locals, global_means
from viax.conjugate.expfam import Dirichlet, NormalGamma, TiedNormalWishart

sklearn = pytest.importorskip("sklearn")
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture  # noqa: E402

K = 4


def hand_updates(X, resp, covariance_type, alpha0, m0, beta0, nu0, c0, reg):
    """Conjugate posterior given responsibilities, then the responsibilities it implies."""
    n, d = X.shape
    nk = resp.sum(0)
    xk = resp.T @ X / nk[:, None]
    beta = beta0 + nk
    means = (beta0 * m0 + nk[:, None] * xk) / beta[:, None]
    scatter = np.stack([resp[:, k] @ (X - xk[k]) ** 2 for k in range(len(nk))])  # (K, D)
    shift = (beta0 * nk / beta)[:, None] * (xk - m0) ** 2
    if covariance_type == "diag":
        shape = np.repeat((0.5 * nu0 + 0.5 * nk)[:, None], d, 1)
        rate = 0.5 * c0 + 0.5 * (scatter + shift) + 0.5 * reg * nk[:, None]
    else:
        shape = 0.5 * nu0 + 0.5 * d * nk
        rate = 0.5 * c0 + 0.5 * (scatter + shift).sum(1) + 0.5 * reg * d * nk
    alpha = alpha0 + nk
    elog_pi = digamma(alpha) - digamma(alpha.sum())
    elog_lam = digamma(shape) - np.log(rate)
    lam = shape / rate
    sq = (X[:, None, :] - means[None]) ** 2  # (N, K, D)
    if covariance_type == "diag":
        expected = (0.5 * elog_lam - 0.5 * reg * lam).sum(1) - 0.5 * (sq * lam).sum(2)
    else:
        expected = d * (0.5 * elog_lam - 0.5 * reg * lam) - 0.5 * lam * sq.sum(2)
    log_rho = elog_pi + expected - 0.5 * d / beta - 0.5 * d * math.log(2 * math.pi)
    new_resp = np.exp(log_rho - logsumexp(log_rho, axis=1, keepdims=True))
    return alpha, means, beta, shape, rate, new_resp


def hand_tied(X, resp, alpha0, m0, beta0, nu0, cov0, reg):
    """Tied Normal–Wishart posterior given responsibilities, and the responsibilities
    it implies (Bishop 2006 §10.2 with one Wishart for all components)."""
    n, d = X.shape
    nk = resp.sum(0)
    xk = resp.T @ X / nk[:, None]
    beta = beta0 + nk
    means = (beta0 * m0 + nk[:, None] * xk) / beta[:, None]
    scale_inv = cov0 + reg * n * np.eye(d)
    for k in range(len(nk)):
        diff = X - xk[k]
        shift = xk[k] - m0
        scale_inv = scale_inv + (resp[:, k, None] * diff).T @ diff
        scale_inv = scale_inv + beta0 * nk[k] / beta[k] * np.outer(shift, shift)
    nu = nu0 + n
    alpha = alpha0 + nk
    scale = np.linalg.inv(scale_inv)
    e_logdet = sum(digamma((nu - i) / 2) for i in range(d)) + d * math.log(2)
    e_logdet += np.linalg.slogdet(scale)[1]
    diff = X[:, None, :] - means[None]
    quad = d / beta + nu * np.einsum("nki,ij,nkj->nk", diff, scale, diff)
    log_rho = (
        digamma(alpha)
        - digamma(alpha.sum())
        + 0.5 * e_logdet
        - 0.5 * reg * nu * np.trace(scale)
        - 0.5 * d * math.log(2 * math.pi)
        - 0.5 * quad
    )
    new_resp = np.exp(log_rho - logsumexp(log_rho, axis=1, keepdims=True))
    return alpha, means, beta, scale_inv, nu, new_resp


def test_tied_updates_equal_hand_derived(X):
    reg = 1e-3
    model = GaussianMixtureModel.from_data(
        X,
        K,
        weight_concentration_prior_type="dirichlet_distribution",
        covariance_type="tied",
        reg_covar=reg,
    )
    resp = np.random.default_rng(1).dirichlet(np.ones(K), X.shape[0])
    batch = model.prepare(X)
    g = jax.jit(model.globals_from_responsibilities)(jnp.asarray(resp), batch)
    alpha, means, beta, scale_inv, nu, want_resp = hand_tied(
        X, resp, 1.0 / K, X.mean(0), 1.0, 2.0, np.cov(X.T), reg
    )
    comp = TiedNormalWishart.to_standard(g["components"])
    np.testing.assert_allclose(Dirichlet.to_standard(g["weights"])["concentration"], alpha)
    np.testing.assert_allclose(comp["mean"], means, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(comp["mean_precision"], beta, rtol=1e-8)
    np.testing.assert_allclose(np.linalg.inv(comp["scale"]), scale_inv, rtol=1e-8)
    np.testing.assert_allclose(comp["df"], nu, rtol=1e-12)
    local = model.init_locals(None, batch, None)
    local, _ = jax.jit(fit_locals)(model, global_means(model, g), local, batch)
    np.testing.assert_allclose(
        jax.nn.softmax(local["assignments"][0]), want_resp, rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_autodiff_updates_equal_hand_derived(X, covariance_type):
    reg = 1e-3  # nonzero, to check its place in the rate and the E-step
    model = GaussianMixtureModel.from_data(
        X,
        K,
        weight_concentration_prior_type="dirichlet_distribution",
        covariance_type=covariance_type,
        reg_covar=reg,
    )
    variances = np.var(X, axis=0, ddof=1)
    c0 = variances if covariance_type == "diag" else variances.mean()
    np.testing.assert_allclose(model.covariance_prior, c0)
    resp = np.random.default_rng(1).dirichlet(np.ones(K), X.shape[0])
    batch = model.prepare(X)
    g = jax.jit(model.globals_from_responsibilities)(jnp.asarray(resp), batch)
    alpha, means, beta, shape, rate, want_resp = hand_updates(
        X, resp, covariance_type, 1.0 / K, X.mean(0), 1.0, 2.0, c0, reg
    )
    comp = NormalGamma.to_standard(g["components"])
    got_means = comp["mean"][..., 0] if covariance_type == "diag" else comp["mean"]
    got_beta = comp["precision"][:, 0, 0, 0] if covariance_type == "diag" else comp["precision"]
    # Closed forms of the same float64 numbers on both sides: 1e-8 relative.
    np.testing.assert_allclose(Dirichlet.to_standard(g["weights"])["concentration"], alpha)
    np.testing.assert_allclose(got_means, means, rtol=1e-8, atol=1e-10)
    if covariance_type == "spherical":
        np.testing.assert_allclose(got_beta, beta[:, None, None] * np.eye(2), atol=1e-10)
    else:
        np.testing.assert_allclose(got_beta, beta, rtol=1e-8)
    np.testing.assert_allclose(comp["shape"], shape, rtol=1e-8)
    np.testing.assert_allclose(comp["rate"], rate, rtol=1e-8)
    local = model.init_locals(None, batch, None)
    local, _ = jax.jit(fit_locals)(model, global_means(model, g), local, batch)
    np.testing.assert_allclose(
        jax.nn.softmax(local["assignments"][0]), want_resp, rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_agrees_with_sklearn(X, covariance_type):
    labels = KMeans(n_clusters=K, n_init=1, random_state=0).fit(X).labels_
    sk = BayesianGaussianMixture(
        n_components=K,
        covariance_type=covariance_type,
        reg_covar=0.0,
        tol=1e-8,
        max_iter=200,
        random_state=0,  # its k-means start: the labels computed above
    ).fit(X)
    ours = GaussianMixture(
        n_components=K, covariance_type=covariance_type, reg_covar=0.0, tol=1e-8, max_iter=200
    ).fit(X, initial_resp=np.eye(K)[labels])
    assert ours.converged_ and sk.converged_
    # Coordinate ascent: the exact ELBO never falls (CAVI raises otherwise).
    assert np.all(np.diff(ours.lower_bounds_) >= -1e-9 * abs(ours.lower_bound_))
    assert np.array_equal(ours.predict(X), sk.predict(X))
    assert ours.means_.shape == sk.means_.shape and ours.covariances_.shape == sk.covariances_.shape
    nk = ours.predict_proba(X).sum(0)  # N_k at the optimum
    if covariance_type == "diag":
        # Same M-step; sklearn's E log λ differs by O(1/N_k) (measured: 3e-4 on the means,
        # 2.5e-4 relative on the variances, 1e-3 on the responsibilities).
        np.testing.assert_allclose(ours.means_, sk.means_, atol=2e-3)
        np.testing.assert_allclose(ours.covariances_, sk.covariances_, rtol=2e-3)
        np.testing.assert_allclose(ours.degrees_of_freedom_, sk.degrees_of_freedom_, rtol=1e-3)
        np.testing.assert_allclose(ours.predict_proba(X), sk.predict_proba(X), atol=5e-3)
    elif covariance_type == "tied":
        # The posterior's ν0 + N against sklearn's ν0 + N/K: same labels, means within
        # 1.2e-3 (measured); the shared covariance is pulled 4× less toward the prior.
        np.testing.assert_allclose(ours.means_, sk.means_, atol=5e-3)
        assert ours.degrees_of_freedom_ == pytest.approx(2.0 + X.shape[0], rel=1e-12)
        assert sk.degrees_of_freedom_ == pytest.approx(2.0 + X.shape[0] / K, rel=1e-12)
    else:
        # One precision per component seen by every coordinate: ν_k = ν0 + D·N_k
        # (sklearn: ν0 + N_k), so the prior weighs half as much; the means agree to 2e-3
        # (measured), the variances to the prior's share (7% here, on clusters of 80-150).
        np.testing.assert_allclose(ours.means_, sk.means_, atol=5e-3)
        np.testing.assert_allclose(ours.degrees_of_freedom_, 2.0 + 2.0 * nk, rtol=1e-6)
        np.testing.assert_allclose(ours.covariances_[:3], sk.covariances_[:3], rtol=0.1)
    draws = ours.result_.sample(50, seed=0)
    precision_shape = {"tied": (50, 2, 2), "diag": (50, K, 2), "spherical": (50, K)}[
        covariance_type
    ]
    assert draws["means"].shape == (50, K, 2) and draws["precisions"].shape == precision_shape


def test_bad_covariance_priors(X):
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        GaussianMixture(n_components=2, covariance_type="diag", covariance_prior=1.0).fit(X)
    with pytest.raises(ValueError, match="must be positive"):
        GaussianMixture(n_components=2, covariance_type="spherical", covariance_prior=-1.0).fit(X)
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        GaussianMixture(n_components=2, covariance_type="block").fit(X)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        GaussianMixture(n_components=2, covariance_type="tied", covariance_prior=np.eye(3)).fit(X)
    constant = np.c_[X[:, 0], np.ones(len(X))]
    with pytest.raises(ValueError, match="constant feature"):
        GaussianMixture(n_components=2, covariance_type="diag").fit(constant)
