"""Evidence estimates and k-hat against exact log p(x) and known failures of q."""

import sys
import warnings

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats as st
from scipy.special import betaln

import viax
from viax.diagnostics import evidence_from_log_weights, iwae_bound, khat_verdict, psis


def _assert_bounds_ordered(ev, exact):
    """ELBO ≤ L_10 ≤ L_100 ≤ log p(x), each within 3 combined standard errors."""
    chain = [(ev.elbo, ev.elbo_se), ev.iwae[10], ev.iwae[100], (exact, 0.0)]
    for (lo, lo_se), (hi, hi_se) in zip(chain, chain[1:], strict=False):
        assert lo <= hi + 3 * np.hypot(lo_se, hi_se) + 1e-9, (lo, hi)


def _assert_is_estimate_matches(ev, exact):
    assert abs(ev.log_p - exact) <= 3 * ev.log_p_se + 1e-9, (ev.log_p, ev.log_p_se, exact)


def beta_bernoulli(x):
    p = numpyro.sample("p", dist.Beta(2.0, 3.0))
    numpyro.sample("x", dist.Bernoulli(probs=p), obs=x)


X_BERNOULLI = np.array([1] * 9 + [0] * 21)


def fit_quietly(*args, **kwargs):
    """Fit, letting through only the k-hat warning: a Gaussian q in logit space has
    lighter tails than a Beta posterior, so p/q has infinite variance and k̂ > 0.7."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*k-hat", category=RuntimeWarning)
        return viax.fit(*args, progress=False, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_beta_bernoulli_evidence(seed):
    exact = betaln(2 + 9, 3 + 21) - betaln(2, 3)
    result = fit_quietly(beta_bernoulli, {"x": X_BERNOULLI}, family="meanfield")
    ev = result.log_evidence(num_samples=10_000, seed=seed)
    _assert_is_estimate_matches(ev, exact)
    _assert_bounds_ordered(ev, exact)
    assert ev.elbo < exact - 1e-3  # the logit-normal q is not the Beta posterior
    # The defensive proposal's Student-t half bounds the weights: a reliable estimate.
    assert ev.khat < 0.5
    assert set(ev.iwae) == {1, 10, 100, 1000}
    assert ev.iwae[1][0] == pytest.approx(ev.elbo)


def test_importance_resampling_corrects_the_mean():
    exact_mean = 11 / 35
    result = fit_quietly(beta_bernoulli, {"x": X_BERNOULLI}, family="meanfield")
    resampled = result.sample(4000, seed=0, importance_resample=True)["p"]
    # Draws from p itself: se of a 4000-draw mean is 0.078/63 ≈ 0.0012; 4 se + resampling.
    assert abs(resampled.mean() - exact_mean) < 0.006


SIGMA, PRIOR_SD = 2.0, 3.0
Y = np.random.default_rng(0).normal(1.5, SIGMA, size=20)


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    numpyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def test_normal_normal_evidence_and_khat_for_the_exact_posterior():
    cov = SIGMA**2 * np.eye(len(Y)) + PRIOR_SD**2
    exact = st.multivariate_normal(np.zeros(len(Y)), cov).logpdf(Y)
    result = viax.fit(normal_model, {"y": Y}, family="fullrank", progress=False)
    # q is the posterior: p/q is constant, so k-hat is -inf and every bound is exact.
    assert result.khat < 0.5 and result.khat_verdict == "good"
    ev = result.log_evidence(num_samples=10_000, seed=0)
    for value in (ev.elbo, ev.iwae[10][0], ev.iwae[1000][0]):
        assert value == pytest.approx(exact, abs=1e-6)
    # The defensive mixture is not the posterior, so its estimate carries a small se.
    _assert_is_estimate_matches(ev, exact)
    assert ev.log_p_se < 5e-3  # ESS ≈ 98% of the draws


def regression(X, y, a0=3.0, b0=2.0, g=4.0):
    tau = numpyro.sample("tau", dist.Gamma(a0, b0))
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, jnp.sqrt(g / tau)).expand([X.shape[1]]).to_event(1)
    )
    numpyro.sample("y", dist.Normal(X @ beta, 1.0 / jnp.sqrt(tau)), obs=y)


def test_normal_gamma_linear_regression_evidence():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 3))
    y = X @ np.array([1.0, -0.5, 0.25]) + rng.normal(scale=0.8, size=30)
    a0, b0, g = 3.0, 2.0, 4.0
    # Marginally y ~ Student-t_{2 a0}(0, (b0 / a0)(I + g X Xᵀ)).
    shape = (b0 / a0) * (np.eye(30) + g * X @ X.T)
    exact = st.multivariate_t(np.zeros(30), shape, df=2 * a0).logpdf(y)
    result = fit_quietly(regression, {"X": X, "y": y}, family="fullrank")
    ev = result.log_evidence(num_samples=20_000, seed=0)
    _assert_is_estimate_matches(ev, exact)
    _assert_bounds_ordered(ev, exact)
    assert ev.khat < 0.5


def correlated(rho):
    def model():
        numpyro.sample("x", dist.MultivariateNormal(np.zeros(2), np.array([[1, rho], [rho, 1]])))

    return model


def test_khat_flags_a_too_narrow_meanfield_q():
    # Mean-field on corr 0.99: q's sds are sqrt(1 - 0.99²) ≈ 0.14 of the marginals'.
    with pytest.warns(RuntimeWarning, match="k-hat"):
        result = viax.fit(correlated(0.99), family="meanfield", progress=False)
    assert result.khat > 0.7 and result.khat_verdict == "do not trust"
    assert result.info["num_khat_draws"] == 10_000  # 1000 draws, confirmed on 9 batches more
    table = result.diagnostics(num_samples=2000)
    assert "DO NOT TRUST" in table.loc["k-hat", "note"]


def test_a_khat_of_one_or_more_is_confirmed_on_one_batch_when_batches_are_slow(monkeypatch):
    # As on a million rows, where one batch of the 1000 final draws takes minutes: the
    # upward bias of 1000 draws cannot lift a usable k-hat to 1, so one more batch will do.
    fit_module = sys.modules["viax.fit"]
    monkeypatch.setattr(fit_module, "_CONFIRM_SECONDS", 0.0)
    rng = np.random.default_rng(0)

    def draw(key):
        return rng.standard_t(0.8, size=1000)

    first = draw(None)
    info = {}
    weights = fit_module._more_log_weights(draw, 0, first, 1.3, info)
    assert weights.size == 2000 and np.array_equal(weights[:1000], first)
    assert "confirmed on 2000, not 10000" in info["khat_draws_reason"]
    info = {}
    assert fit_module._more_log_weights(draw, 0, first, 0.9, info).size == 10_000
    assert info == {}  # below 1 the ten-fold confirmation runs however slow it is


def test_importance_resampling_widens_a_moderately_narrow_q():
    result = viax.fit(correlated(0.6), family="meanfield", progress=False)
    assert result.khat < 0.7
    raw = result.sample(4000, seed=1)["x"]
    resampled = result.sample(4000, seed=1, importance_resample=True)["x"]
    assert np.all(np.abs(raw.std(0) - 0.8) < 0.05)  # mean-field sd: sqrt(1 - 0.36)
    assert np.all(np.abs(resampled.std(0) - 1.0) < 0.1)


def test_iwae_and_psis_helpers_on_known_weights():
    rng = np.random.default_rng(0)
    # log w ~ N(-σ²/2, σ²): E[exp w] = 1, so log p(x) = 0 exactly.
    sigma = 0.5
    log_weights = rng.normal(-(sigma**2) / 2, sigma, size=100_000)
    ev = evidence_from_log_weights(log_weights)
    assert abs(ev.log_p) < 3 * ev.log_p_se
    assert ev.elbo == pytest.approx(-(sigma**2) / 2, abs=3 * ev.elbo_se)
    l10, se10 = iwae_bound(log_weights, 10)
    assert ev.elbo < l10 < 0.0 + 3 * se10
    assert ev.khat < 0.5
    _, khat = psis(rng.standard_t(1.1, size=4000))  # heavy tails: infinite variance
    assert khat > 0.7
    assert [khat_verdict(k) for k in (0.2, 0.6, 0.9, float("nan"))] == [
        "good",
        "usable",
        "do not trust",
        "do not trust",
    ]
    with pytest.raises(ValueError, match="NaN"):
        psis(np.array([0.0, np.nan, 1.0]))


def test_to_arviz_carries_log_weights_and_verdicts(tmp_path):
    import arviz as az

    result = viax.fit(normal_model, {"y": Y}, progress=False)
    idata = result.to_arviz(num_samples=400, seed=0)
    assert idata.sample_stats["log_weight"].shape == (1, 400)
    assert idata.posterior.attrs["khat"] == result.khat
    assert idata.posterior.attrs["khat_verdict"] == "good"
    assert np.isfinite(idata.posterior.attrs["log_p"])
    az.summary(idata, kind="stats")
    idata.to_netcdf(str(tmp_path / "p.nc"))
    back = az.from_netcdf(str(tmp_path / "p.nc"))
    np.testing.assert_array_equal(
        back.sample_stats["log_weight"].values, idata.sample_stats["log_weight"].values
    )


def test_plot_with_reference_moments(tmp_path):
    result = fit_quietly(beta_bernoulli, {"x": X_BERNOULLI})
    reference = {"params": {"p": {"mean": 11 / 35, "std": 0.078}}}
    path = tmp_path / "plot.png"
    fig = result.plot(reference=reference, path=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert any(line.get_label() == "reference" for ax in fig.axes for line in ax.lines)


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng: rng.standard_normal(4000),  # light tail
        lambda rng: np.log(rng.pareto(1.5, 4000) + 1),  # k = 1/1.5
        lambda rng: st.t.logpdf(rng.standard_normal(1000), df=3) - st.norm.logpdf(0),
        lambda rng: np.where(rng.random(2000) < 0.1, -np.inf, rng.gumbel(size=2000)),
    ],
)
def test_psis_matches_arviz(draw):
    # viax's NumPy PSIS is ArviZ's algorithm without the import cost: same numbers.
    import arviz as az

    log_weights = draw(np.random.default_rng(3))
    smoothed, khat = psis(log_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, expected_khat = az.psislw(log_weights.copy(), normalize=False)
    np.testing.assert_allclose(khat, float(expected_khat), rtol=1e-12)
    np.testing.assert_allclose(smoothed, expected, rtol=1e-12, atol=1e-12)


def test_psis_recovers_a_known_pareto_tail():
    # Weights w = 1 + Pareto(α) have a generalised Pareto tail with k = 1/α.
    rng = np.random.default_rng(0)
    ks = [psis(np.log1p(rng.pareto(2.0, 20_000)))[1] for _ in range(5)]
    assert abs(np.mean(ks) - 0.5) < 0.05
