"""Learning θ with q (viax.infer.learn): closed forms, amortization, VAE, refusals."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints
from ppca import closed_form, ppca  # examples/ppca.py, as a user would import it
from scipy import optimize, stats

import viax
from viax.infer.learn import fit_learn

# -- probabilistic PCA ------------------------------------------------------------------


def _ppca_data(n=60, d=4, q=2):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(d, q)) * np.array([2.0, 1.0])
    return rng.normal(size=(n, q)) @ w.T + 0.5 * rng.normal(size=(n, d)) + 1.0


def _ppca_log_lik(x, w, mu, s2):
    c = w @ w.T + s2 * np.eye(x.shape[1])
    return stats.multivariate_normal(mu, c).logpdf(x).sum()


def _relative_errors(result, s2, ww):
    w, sigma = result.model_params["W"], result.model_params["sigma"]
    return abs(sigma**2 - s2) / s2, np.linalg.norm(w @ w.T - ww) / np.linalg.norm(ww)


X_PPCA = _ppca_data()
# Maximum-likelihood σ², W Wᵀ and log-likelihood (Tipping & Bishop 1999): σ² the mean of
# the discarded eigenvalues of the sample covariance, W = U_q (Λ_q − σ² I)^½.
S2, WW, LOG_LIK = closed_form(X_PPCA, q=2)


def test_ppca_full_batch_and_amortized_reach_the_closed_form():
    # The posterior of z_n is Gaussian and the log joint quadratic in z, so the fixed-draw
    # ELBO is the exact ELBO and its maximum over (θ, q) is the maximum likelihood.
    plain = viax.fit(ppca, {"x": X_PPCA}, progress=False)
    amortized = viax.fit(
        ppca, {"x": X_PPCA}, encoder=viax.MLPEncoder(hidden_sizes=()), progress=False
    )
    for result in (plain, amortized):
        assert result.converged, result.message
        assert max(_relative_errors(result, S2, WW)) < 1e-3
        assert abs(result.elbo - LOG_LIK) < 1e-3
        np.testing.assert_allclose(result.model_params["mu"], X_PPCA.mean(0), rtol=1e-4)
    assert abs(plain.elbo - amortized.elbo) < 1e-3
    table = plain.summary(num_samples=50)
    assert set(table.loc[table["kind"] == "param"].index) >= {"sigma", "W[0,0]", "mu[3]"}
    assert table.loc["sigma", "mean"] == pytest.approx(float(plain.model_params["sigma"]))


def test_ppca_minibatch_reaches_the_closed_form():
    steps = 20_000
    result = fit_learn(
        ppca,
        {"x": X_PPCA},
        encoder=viax.MLPEncoder(hidden_sizes=()),
        objective=viax.ELBO(num_samples=16),
        batch_size=30,
        num_epochs=steps // 2,
        optimizer=optax.adam(optax.cosine_decay_schedule(1e-2, steps)),
        progress=False,
    )
    assert max(_relative_errors(result, S2, WW)) < 1e-3
    p = result.model_params
    learned = _ppca_log_lik(X_PPCA, p["W"], p["mu"], p["sigma"] ** 2)
    assert LOG_LIK - learned < 1e-3
    # The ELBO estimate of 1000 draws per row carries Monte Carlo error: 3 se.
    assert abs(result.elbo - LOG_LIK) < 1e-3 + 3 * result.elbo_se


def test_early_stopping_stops_near_the_maximum_likelihood_of_the_training_rows():
    # With a constant step the held-out ELBO (40 rows, fixed draws) stops improving once
    # the iterates only jitter: the rule stops, reports converged, and returns the best
    # check.  Its precision is what 40 rows can resolve at 2 se (measured 0.03-0.045
    # nats per row below the maximum for lr 5e-3 to 1e-2): 0.1 allows twice that.
    x = _ppca_data(n=400)
    rule = viax.EarlyStopping(validation_fraction=0.1, patience=5)
    with pytest.raises(viax.ModelError, match="EarlyStopping.*minibatch"):
        viax.fit(ppca, {"x": x}, encoder=viax.MLPEncoder(()), stop_rule=rule, progress=False)
    result = viax.fit(
        ppca,
        {"x": x},
        encoder=viax.MLPEncoder(hidden_sizes=()),
        objective=viax.ELBO(num_samples=4),
        batch_size=40,
        num_epochs=1000,
        optimizer=optax.adam(1e-2),
        stop_rule=rule,
        progress=False,
    )
    assert result.converged and result.message.startswith("early stopping")
    assert result.num_steps < 1000 * 9 and len(result.info["validation"]) >= 6
    kept = np.setdiff1d(np.arange(len(x)), result.info["held_out_rows"])
    assert kept.size == 360
    _, _, log_lik = closed_form(x[kept], q=2)
    p = result.model_params
    gap = (log_lik - _ppca_log_lik(x[kept], p["W"], p["mu"], p["sigma"] ** 2)) / kept.size
    assert 0 <= gap < 0.1


# -- type-II maximum likelihood in the normal-normal model ------------------------------


def normal_normal(y, sigma):
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    mu = numpyro.param("mu", 0.0)
    with numpyro.plate("groups", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_type_ii_maximum_likelihood_of_tau():
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.5, 1.5, 12)
    y = 1.0 + 2.0 * rng.standard_normal(12) + sigma * rng.standard_normal(12)

    def negative_profile(log_tau):  # μ profiled out: the precision-weighted mean
        var = np.exp(2 * log_tau) + sigma**2
        mu = np.sum(y / var) / np.sum(1 / var)
        return -stats.norm.logpdf(y, mu, np.sqrt(var)).sum()

    best = optimize.minimize_scalar(
        negative_profile, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}
    )
    result = viax.fit(normal_normal, {"y": y, "sigma": sigma}, progress=False)
    assert result.model_params["tau"] == pytest.approx(np.exp(best.x), rel=1e-4)
    # Given (μ, τ) the θ_j are independent Gaussians: mean-field q is exact.
    assert result.elbo == pytest.approx(-best.fun, abs=1e-4)
    idata = result.to_arviz(num_samples=20)
    assert float(idata.constant_data["tau"]) == pytest.approx(float(result.model_params["tau"]))


# -- a small VAE on binarized digits ------------------------------------------------------


def test_small_vae_on_digits_improves_and_its_is_estimate_bounds_the_elbo():
    pytest.importorskip("sklearn")
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from numpyro.contrib.module import eqx_module
    from sklearn.datasets import load_digits

    x = (load_digits().data > 8).astype(float)
    x_train, x_test = x[:600], x[1600:1728]
    net = eqx.nn.MLP(2, 64, 16, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))

    def vae(x):
        decoder = eqx_module("decoder", net)
        with numpyro.plate("rows", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=jax.vmap(decoder)(z)).to_event(1), obs=x)

    with pytest.warns(RuntimeWarning, match="no convergence test"):
        result = viax.fit(
            vae,
            {"x": x_train},
            encoder=viax.MLPEncoder(hidden_sizes=(16,)),
            objective=viax.IWAE(num_samples=5),
            optimizer=optax.adam(1e-2),
            batch_size=100,
            num_epochs=10,
            progress=False,
        )
    assert not result.converged  # a fixed budget, never "converged"
    epochs = result.info["epoch_objective"] / len(x_train)
    assert epochs[-1] > epochs[0] + 5.0, epochs  # nats per row
    ev = result.log_evidence(data={"x": x_test}, num_samples=500)
    assert ev.log_p_rows.shape == ev.khat_rows.shape == (len(x_test),)
    assert ev.log_p >= ev.elbo and np.all(ev.log_p_rows >= ev.elbo_rows - 1e-12)
    assert ev.log_p == pytest.approx(ev.log_p_rows.sum())
    assert "decoder$params" in result.model_params


# -- refused before compiling, by name ----------------------------------------------------


def _stateful(y):
    state = numpyro.primitives.mutable("counter", {"n": 0.0})
    del state
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    numpyro.sample("y", dist.Normal(mu, 1), obs=y)


def _no_plate(y):
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    numpyro.sample("y", dist.Normal(mu, 1), obs=y)


def _global_and_local(x):
    scale = numpyro.sample("scale", dist.LogNormal(0, 1))
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0, scale))
        numpyro.sample("x", dist.Normal(z, 1), obs=x)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (_stateful, {"objective": viax.ELBO()}, "counter"),
        (ppca, {"batch_size": 10}, "local latent.*z.*encoder"),
        (_no_plate, {"encoder": viax.MLPEncoder()}, "encoder=.*data plate"),
        (
            _global_and_local,
            {"encoder": viax.MLPEncoder(), "objective": viax.IWAE(5), "batch_size": 5},
            "scale",
        ),
    ],
)
def test_sites_it_cannot_learn_are_refused_by_name(model, kwargs, match):
    data = {"y": np.ones(3)} if model in (_stateful, _no_plate) else {"x": X_PPCA}
    if model is _global_and_local:
        data = {"x": X_PPCA[:, 0]}
    with pytest.raises((viax.ModelError, ValueError), match=match):
        viax.fit(model, data, progress=False, **kwargs)


def test_bbvi_refuses_learning_arguments():
    with pytest.raises(ValueError, match="encoder"):
        viax.fit(ppca, {"x": X_PPCA}, method="bbvi", encoder=viax.MLPEncoder())
    # Without learning arguments the param sites themselves are refused by name (bbvi
    # would hold them at their initial values), before anything compiles.
    with pytest.raises(viax.ModelError, match="param site.*W.*method='advi'"):
        viax.fit(ppca, {"x": X_PPCA}, method="bbvi", progress=False)
