"""Learning θ on models a user would bring: each right (against an exact marginal
likelihood maximised by scipy), flagged, or refused by name before the learning program
compiles.  The wider sweep (mixtures, GLMMs, masks, minibatch against full batch) is in
docs/guide/learning.md, "What can be learned, and what is refused"."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import optimize, stats

import viax
from viax.infer import learn

RNG = np.random.default_rng(1)
Y = RNG.normal(1.0, 2.0, size=20)


class _Compiled(Exception):
    """Raised instead of running (and compiling) the learning program."""


@pytest.fixture
def no_learning_program(monkeypatch):
    def refuse(*args, **kwargs):
        raise _Compiled

    monkeypatch.setattr(learn, "_full_batch", refuse)
    monkeypatch.setattr(learn, "_minibatch", refuse)


# -- refused by name, before the learning program compiles ------------------------------


def _with_param(init, constraint=constraints.positive, **kwargs):
    def model(y):
        s = numpyro.param("s", init, constraint=constraint, **kwargs)
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, jnp.sum(s)), obs=y)

    return model


def _per_row_param(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("N", y.shape[0]):
        b = numpyro.param("b", jnp.zeros(y.shape[0]))
        numpyro.sample("y", dist.Normal(mu + b, 1.0), obs=y)


def _discrete(y):
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    c = numpyro.sample("c", dist.Bernoulli(p))
    numpyro.sample("y", dist.Normal(c, 1.0), obs=y)


def _latent_outside_plate(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    z = numpyro.sample("z", dist.Normal(0.0, s).expand([y.shape[0]]).to_event(1))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def _local(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    with numpyro.plate("N", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, s))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def _obs_mask(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, s), obs=y, obs_mask=jnp.arange(y.shape[0]) % 3 > 0)


REFUSED = [
    ("integer init", _with_param(3), {}, "param site 's' has an initial value of dtype int"),
    ("NaN init", _with_param(jnp.nan), {}, "param site 's': its initial value is not finite"),
    ("inf in init", _with_param(jnp.array([1.0, jnp.inf]), constraints.real_vector), {}, "1 of 2"),
    ("outside positive", _with_param(-1.0), {}, "param site 's': its initial value is outside"),
    ("on the boundary", _with_param(0.0, constraints.unit_interval), {}, "lies on the boundary"),
    ("not a simplex", _with_param(jnp.array([0.5, 0.6]), constraints.simplex), {}, "Simplex"),
    ("integer constraint", _with_param(2.0, constraints.positive_integer), {}, "site 's'"),
    ("per-row param, minibatch", _per_row_param, {"batch_size": 5}, "param site(s) b change shape"),
    ("discrete latent", _discrete, {}, "site(s) c are discrete latents"),
    ("obs_mask: masked latent", _obs_mask, {}, "latent site(s) y_unobserved are masked"),
    (
        "encoder, global latent",
        _latent_outside_plate,
        {"encoder": viax.MLPEncoder()},
        "z lie outside",
    ),
    ("encoder, unknown key", _local, {"encoder": viax.MLPEncoder(data_keys=("x",))}, "data_keys x"),
]


@pytest.mark.parametrize(
    ("model", "kwargs", "phrase"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_what_cannot_be_learned_is_refused_by_name(model, kwargs, phrase, no_learning_program):
    with pytest.raises(viax.ModelError) as caught:
        viax.fit(model, {"y": Y}, progress=False, **kwargs)
    assert phrase in str(caught.value)


def _unused(y):
    a = numpyro.param("a", 1.0, constraint=constraints.positive)
    numpyro.param("b", jnp.ones(2))  # enters no density: its gradient is identically zero
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, a), obs=y)


def test_a_param_the_density_ignores_is_flagged(no_learning_program):
    with pytest.warns(UserWarning, match=r"param site\(s\) b do not enter the log density"):
        with pytest.raises(_Compiled):
            viax.fit(_unused, {"y": Y}, progress=False)


# -- right: against the exact marginal likelihood --------------------------------------


def test_iwae_with_one_sample_is_the_elbo():
    # IWAE(1) used to average all M fixed draws as one group (L_M): q ran off.
    elbo = viax.fit(_with_param(1.0), {"y": Y}, progress=False)
    iwae = viax.fit(_with_param(1.0), {"y": Y}, objective=viax.IWAE(num_samples=1), progress=False)
    assert iwae.converged and iwae.elbo == pytest.approx(elbo.elbo, abs=1e-9)
    assert float(iwae.model_params["s"]) == pytest.approx(float(elbo.model_params["s"]), abs=1e-7)


X_FA = RNG.normal(size=(60, 1)) * np.array([1.5, -1.0, 0.5, 2.0]) + RNG.normal(
    size=(60, 4)
) * np.sqrt([0.3, 0.5, 1.0, 0.2])


def _factor_analysis(x):
    w = numpyro.param("w", jnp.full(x.shape[1], 0.5))
    mu = numpyro.param("mu", jnp.zeros(x.shape[1]), constraint=constraints.real_vector)
    psi = numpyro.param("psi", jnp.ones(x.shape[1]), constraint=constraints.positive)
    with numpyro.plate("N", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(mu + z[:, None] * w, jnp.sqrt(psi)).to_event(1), obs=x)


def test_factor_analysis_reaches_the_maximum_likelihood():
    # One factor: q(z_n) Gaussian is the exact posterior, x_n ~ N(μ, w wᵀ + Ψ).
    def negative_log_lik(t):
        cov = np.outer(t[:4], t[:4]) + np.diag(np.exp(t[4:]))
        return -stats.multivariate_normal(X_FA.mean(0), cov).logpdf(X_FA).sum()

    best = optimize.minimize(
        negative_log_lik, np.r_[np.ones(4), np.zeros(4)], method="BFGS", options={"gtol": 1e-9}
    )
    result = viax.fit(_factor_analysis, {"x": X_FA}, progress=False)
    assert result.converged, result.message
    np.testing.assert_allclose(result.model_params["psi"], np.exp(best.x[4:]), rtol=1e-5)
    w = result.model_params["w"]
    np.testing.assert_allclose(np.outer(w, w), np.outer(best.x[:4], best.x[:4]), atol=1e-5)
    assert result.elbo == pytest.approx(-best.fun, abs=1e-6)


Y_CORR = RNG.multivariate_normal([0.5, -0.5], [[1.0, 0.6], [0.6, 1.0]], size=25)


def _correlated(y):
    L = numpyro.param("L", jnp.eye(2), constraint=constraints.corr_cholesky)
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.MultivariateNormal(mu, scale_tril=L), obs=y)


def test_corr_cholesky_param_reaches_the_exact_marginal_maximum():
    # Rows stacked: y ~ N(0, I ⊗ C(ρ) + 100 · 11ᵀ ⊗ I) with μ integrated out.
    n = Y_CORR.shape[0]

    def negative_log_marginal(t):
        c = np.array([[1.0, np.tanh(t[0])], [np.tanh(t[0]), 1.0]])
        cov = np.kron(np.eye(n), c) + 100.0 * np.kron(np.ones((n, n)), np.eye(2))
        return -stats.multivariate_normal(np.zeros(2 * n), cov).logpdf(Y_CORR.ravel())

    best = optimize.minimize_scalar(
        lambda t: negative_log_marginal([t]), bracket=(-1, 1), tol=1e-10
    )
    result = viax.fit(_correlated, {"y": Y_CORR}, family="fullrank", progress=False)
    assert result.converged, result.message
    L = result.model_params["L"]
    assert (L @ L.T)[0, 1] == pytest.approx(np.tanh(best.x), abs=1e-6)
    assert result.elbo == pytest.approx(-best.fun, abs=1e-6)
