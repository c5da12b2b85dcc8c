"""Exponential-family factors: mean = ∇A, entropies against scipy, round trips."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import digamma, gammaln

from viax.conjugate.expfam import (
    Beta,
    Categorical,
    Dirichlet,
    Gamma,
    MultivariateNormal,
    Normal,
    NormalGamma,
    NormalWishart,
    TiedNormalWishart,
    Wishart,
    digamma_positive,
    gammaln_positive,
)

RNG = np.random.default_rng(0)


def _spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


CASES = {
    "normal": (Normal(), Normal.from_standard(np.array([0.3, -1.0]), np.array([0.5, 2.0]))),
    "gamma": (Gamma(), Gamma.from_standard(np.array([0.7, 3.0]), np.array([2.0, 0.5]))),
    "beta": (Beta(), Beta.from_standard(np.array([0.5, 4.0]), np.array([2.0, 1.5]))),
    "dirichlet": (Dirichlet(), Dirichlet.from_standard(np.array([[0.3, 1.0, 4.0]]))),
    "categorical": (Categorical(), (np.array([[0.1, -2.0, 1.0]]),)),
    "mvn": (
        MultivariateNormal(),
        MultivariateNormal.from_standard(np.array([1.0, -1, 0]), _spd(3, 1)),
    ),
    "wishart": (Wishart(), Wishart.from_standard(_spd(3, 2) / 10, np.array(5.5))),
    "normal_wishart": (
        NormalWishart(),
        NormalWishart.from_standard(
            np.array([[0.5, -1.0, 2.0]]), np.array([2.5]), (_spd(3, 3) / 10)[None], np.array([4.5])
        ),
    ),
    "tied_normal_wishart": (
        TiedNormalWishart(),
        TiedNormalWishart.from_standard(
            np.array([[0.5, -1.0, 2.0], [0.0, 1.0, -0.3]]),
            np.array([2.5, 7.0]),
            _spd(3, 5) / 10,
            np.array(4.5),
        ),
    ),
    "normal_gamma": (
        NormalGamma(),
        NormalGamma.from_standard(np.array([0.5, -1.0]), _spd(2, 4), np.array(3.0), np.array(2.0)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mean_is_gradient_of_log_normalizer(name):
    # μ = ∇A(η) is what makes λ* = ∂E[log p]/∂μ the CAVI update; closed forms must agree
    # with autodiff to round-off.
    factor, natural = CASES[name]
    natural = tuple(jnp.asarray(x) for x in natural)
    # Compiled: run op by op, each of the factor's ops compiled alone (~5 s a factor).
    grad = jax.jit(jax.grad(lambda eta: jnp.sum(factor.log_normalizer(eta))))(natural)
    for got, want in zip(jax.jit(factor.mean)(natural), grad, strict=True):
        # ∂A/∂η of a symmetric-matrix statistic: autodiff treats entries as free, the
        # closed form is the symmetric matrix itself; both equal after symmetrising.
        if got.ndim >= 2 and got.shape[-1] == got.shape[-2] and got.shape[-1] > 1:
            want = 0.5 * (want + jnp.swapaxes(want, -1, -2))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def _entropy(factor, natural):
    """The factor's entropy, compiled (op by op it compiles each op alone)."""
    return jax.jit(factor.entropy)(natural)


def test_entropies_match_scipy():
    f, eta = CASES["normal"]
    np.testing.assert_allclose(_entropy(f, eta), stats.norm(0, [0.5, 2.0]).entropy(), rtol=1e-12)
    f, eta = CASES["gamma"]
    want = stats.gamma([0.7, 3.0], scale=1 / np.array([2.0, 0.5])).entropy()
    np.testing.assert_allclose(_entropy(f, eta), want, rtol=1e-12)
    f, eta = CASES["beta"]
    np.testing.assert_allclose(
        _entropy(f, eta), stats.beta([0.5, 4.0], [2.0, 1.5]).entropy(), rtol=1e-12
    )
    f, eta = CASES["dirichlet"]
    np.testing.assert_allclose(
        _entropy(f, eta), [stats.dirichlet([0.3, 1.0, 4.0]).entropy()], rtol=1e-12
    )
    f, eta = CASES["categorical"]
    p = np.exp(eta[0]) / np.exp(eta[0]).sum()
    np.testing.assert_allclose(_entropy(f, eta), [-(p * np.log(p)).sum()], rtol=1e-12)
    f, eta = CASES["mvn"]
    want = stats.multivariate_normal(np.zeros(3), np.linalg.inv(_spd(3, 1))).entropy()
    np.testing.assert_allclose(_entropy(f, eta), want, rtol=1e-12)
    f, eta = CASES["wishart"]
    np.testing.assert_allclose(
        _entropy(f, eta), stats.wishart(5.5, _spd(3, 2) / 10).entropy(), rtol=1e-10
    )


def test_normal_wishart_and_normal_gamma_entropy_by_chain_rule():
    # H(μ, Λ) = H(Λ) + E_Λ[H(μ | Λ)], H(μ | Λ) = D/2 (1 + log 2π) − ½ log|βΛ|.
    f, eta = CASES["normal_wishart"]
    scale, beta, df, d = _spd(3, 3) / 10, 2.5, 4.5, 3
    e_logdet = (
        sum(digamma((df - i) / 2) for i in range(d)) + d * math.log(2) + np.linalg.slogdet(scale)[1]
    )
    want = (
        stats.wishart(df, scale).entropy()
        + d / 2 * (1 + math.log(2 * math.pi))
        - d / 2 * math.log(beta)
        - 0.5 * e_logdet
    )
    np.testing.assert_allclose(_entropy(f, eta), [want], rtol=1e-10)
    # Tied: one Wishart, two means given it: H(Λ) + Σ_k E_Λ[H(μ_k | Λ)].
    f, eta = CASES["tied_normal_wishart"]
    scale, betas = _spd(3, 5) / 10, np.array([2.5, 7.0])
    e_logdet = (
        sum(digamma((df - i) / 2) for i in range(d)) + d * math.log(2) + np.linalg.slogdet(scale)[1]
    )
    want = stats.wishart(df, scale).entropy() + sum(
        d / 2 * (1 + math.log(2 * math.pi)) - d / 2 * math.log(b) - 0.5 * e_logdet for b in betas
    )
    np.testing.assert_allclose(_entropy(f, eta), want, rtol=1e-10)
    f, eta = CASES["normal_gamma"]
    prec, a, b, d = _spd(2, 4), 3.0, 2.0, 2
    e_log_tau = digamma(a) - math.log(b)
    want = (
        stats.gamma(a, scale=1 / b).entropy()
        + d / 2 * (1 + math.log(2 * math.pi))
        - 0.5 * np.linalg.slogdet(prec)[1]
        - d / 2 * e_log_tau
    )
    np.testing.assert_allclose(_entropy(f, eta), want, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unconstrained_round_trip(name):
    factor, natural = CASES[name]
    natural = tuple(jnp.asarray(x) for x in natural)
    back = jax.jit(lambda eta: factor.from_unconstrained(factor.to_unconstrained(eta)))(natural)
    for got, want in zip(back, natural, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_weights_scale_everything_and_zero_weight_vanishes():
    eta = (jnp.asarray([[0.1, -2.0, 1.0], [1.0, 0.0, 0.0]]),)
    plain, weighted = Categorical(), Categorical(weights=jnp.asarray([3.0, 0.0]))
    np.testing.assert_allclose(weighted.entropy(eta), [3 * plain.entropy(eta)[0], 0.0])
    np.testing.assert_allclose(weighted.mean(eta)[0][0], 3 * plain.mean(eta)[0][0])
    np.testing.assert_allclose(weighted.mean(eta)[0][1], 0.0)


def test_samples_have_the_right_moments():
    f, eta = CASES["normal_wishart"]
    draws = f.sample(tuple(jnp.asarray(x) for x in eta), np.random.default_rng(0), 20000)
    mean_stats = f.mean(tuple(jnp.asarray(x) for x in eta))
    # E[Λ] = νW: 20000 draws give a Monte Carlo error of about 1% of the entries.
    np.testing.assert_allclose(draws["precision"].mean(0), mean_stats[2], rtol=0.05, atol=0.05)
    np.testing.assert_allclose(draws["mean"].mean(0), [[0.5, -1.0, 2.0]], atol=0.05)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_means_match_the_mean_parameters(name):
    """Every factor's host sampler against its closed-form mean parameters μ = E[t(z)]
    : the sample mean of t(draws) within 5 Monte Carlo standard errors (from the draws'
    own spread) of μ."""
    factor, natural = CASES[name]
    natural = tuple(jnp.asarray(x) for x in natural)
    draws = factor.sample(natural, np.random.default_rng(1), 40000)
    stats = _sufficient_statistics(name, draws)
    for got, want in zip(stats, jax.jit(factor.mean)(natural), strict=True):
        se = got.std(0) / np.sqrt(got.shape[0])
        assert np.all(np.abs(got.mean(0) - np.asarray(want)) <= 5 * se + 1e-12)


def _sufficient_statistics(name, draws):
    """t(z) per draw (see expfam's table), each (S, *shape), for the factors of CASES."""
    if name in ("normal", "gamma", "beta", "dirichlet", "categorical", "mvn", "wishart"):
        x = draws["value"]
        return {
            "normal": lambda: (x, x**2),
            "gamma": lambda: (np.log(x), x),
            "beta": lambda: (np.log(x), np.log1p(-x)),
            "dirichlet": lambda: (np.log(x),),
            "categorical": lambda: (np.eye(3)[x],),
            "mvn": lambda: (x, x[..., :, None] * x[..., None, :]),
            "wishart": lambda: (x, np.linalg.slogdet(x)[1]),
        }[name]()
    if name == "normal_gamma":
        w, tau = draws["weights"], draws["precision"]
        return (
            tau[:, None] * w,
            tau[:, None, None] * w[:, :, None] * w[:, None, :],
            tau,
            np.log(tau),
        )
    # Normal–Wishart, one or K means: (Λμ, μᵀΛμ, Λ, log|Λ|).
    mu, lam = draws["mean"], draws["precision"]
    shared = name == "tied_normal_wishart"
    lam_mu = np.einsum("s...ij,skj->ski" if shared else "skij,skj->ski", lam, mu)
    return (lam_mu, np.einsum("ski,ski->sk", mu, lam_mu), lam, np.linalg.slogdet(lam)[1])


def test_cholesky_and_inverse_match_lapack():
    # expfam factors SPD matrices with its own loops (LAPACK's batched potrf can
    # deadlock XLA's CPU thread pool): same numbers as numpy, NaN where not SPD.
    from viax.conjugate.expfam import _chol_logdet, _cholesky, _spd_inv

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 7, 7))
    a = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(7)
    chol, logdet = jax.jit(_chol_logdet)(jnp.asarray(a))
    np.testing.assert_allclose(chol, np.linalg.cholesky(a), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(a)[1], rtol=1e-12)
    np.testing.assert_allclose(jax.jit(_spd_inv)(jnp.asarray(a)), np.linalg.inv(a), rtol=1e-10)
    assert np.isnan(np.asarray(_cholesky(jnp.asarray(-np.eye(2))))).any()


def test_fast_digamma_and_gammaln_match_scipy():
    """The series behind Dirichlet's mean and log normalizer, against scipy (float64:
    round-off; float32: the E-step's precision)."""
    x = np.concatenate([np.geomspace(1e-4, 1e8, 20001), np.linspace(0.5, 30.0, 5001)])
    for fast, reference in [(digamma_positive, digamma), (gammaln_positive, gammaln)]:
        ref = reference(x)
        got = np.asarray(jax.jit(fast)(jnp.asarray(x, jnp.float64)))
        assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)) < 2e-14
        x32 = x.astype(np.float32)
        got32 = np.asarray(jax.jit(fast)(jnp.asarray(x32))).astype(np.float64)
        ref32 = reference(x32.astype(np.float64))
        assert np.max(np.abs(got32 - ref32) / np.maximum(np.abs(ref32), 1.0)) < 5e-6
