"""Learning θ on a sweep of models a user would bring: each right, flagged or refused.

Every model has ``numpyro.param`` sites (or an ``eqx_module`` network).  A case is

* **right**: θ (and the bound) against an independent computation: the exact marginal
  likelihood maximised by scipy (Gaussian models, quadrature over one latent,
  Gauss–Hermite for a GLMM), the analytic Gaussian-VI optimum (Poisson–lognormal ELBO
  in closed form), or the full-batch fit against the minibatch one;
* **flagged**: the fit returns, with a warning naming the cause;
* **refused**: a named error, before the learning program runs.

Writes benchmarks/results/learn_sweep.json and .md.  Takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import time
import traceback
import warnings

import _common
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.distributions import constraints
from scipy import optimize, special, stats

import viax

RNG = np.random.default_rng(1)
QUIET = {"progress": False}


def _close(a, b) -> float:
    """Largest relative difference."""
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# -- right: Gaussian models with an exact marginal -------------------------------------


def linear_regression():
    n = 40
    x = RNG.normal(size=(n, 3))
    y = x @ np.array([1.0, -0.5, 0.3]) + 0.7 * RNG.normal(size=n)

    def model(x, y):
        alpha = numpyro.param("alpha", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.interval(0.01, 10.0))
        w = numpyro.sample("w", dist.Normal(0.0, alpha).expand([3]).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w, sigma), obs=y)

    def nll(t):
        cov = np.exp(2 * t[0]) * x @ x.T + np.exp(2 * t[1]) * np.eye(n)
        return -stats.multivariate_normal(np.zeros(n), cov).logpdf(y)

    best = optimize.minimize(nll, [0.0, 0.0], method="BFGS", options={"gtol": 1e-9})
    r = viax.fit(model, {"x": x, "y": y}, family="fullrank", **QUIET)
    got = [r.model_params["alpha"], r.model_params["sigma"]]
    return r, "α, σ (positive, interval)", np.exp(best.x), got, -best.fun


def factor_analysis(encoder=None, minibatch=False):
    x = RNG.normal(size=(60, 1)) * np.array([1.5, -1.0, 0.5, 2.0])
    x = x + RNG.normal(size=(60, 4)) * np.sqrt([0.3, 0.5, 1.0, 0.2]) + 0.5

    def model(x):
        w = numpyro.param("w", jnp.full(4, 0.5))
        mu = numpyro.param("mu", jnp.zeros(4), constraint=constraints.real_vector)
        psi = numpyro.param("psi", jnp.ones(4), constraint=constraints.positive)
        with numpyro.plate("N", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(mu + z[:, None] * w, jnp.sqrt(psi)).to_event(1), obs=x)

    def nll(t):
        cov = np.outer(t[:4], t[:4]) + np.diag(np.exp(t[4:]))
        return -stats.multivariate_normal(x.mean(0), cov).logpdf(x).sum()

    best = optimize.minimize(nll, np.r_[np.ones(4), np.zeros(4)], method="BFGS")
    kwargs = {}
    if minibatch:  # batches of 20 of the 60 rows, 6,000 steps, ELBO of 8 draws per row
        steps = 6000
        kwargs = {
            "batch_size": 20,
            "num_epochs": steps // 3,
            "optimizer": optax.adam(optax.cosine_decay_schedule(2e-2, steps)),
            "objective": viax.ELBO(num_samples=8),
        }
    r = viax.fit(model, {"x": x}, encoder=encoder, **kwargs, **QUIET)
    return (
        r,
        "Ψ (positive), μ (real_vector), w",
        np.exp(best.x[4:]),
        r.model_params["psi"],
        -best.fun,
    )


def _stacked_gaussian(y, cov_of):
    n = y.shape[0]
    return lambda t: (
        -stats.multivariate_normal(
            np.zeros(2 * n),
            np.kron(np.eye(n), cov_of(t)) + 100.0 * np.kron(np.ones((n, n)), np.eye(2)),
        ).logpdf(y.ravel())
    )


def matrix_params(kind):
    y = RNG.multivariate_normal([0.5, -0.5], [[1.0, 0.6], [0.6, 0.5]], size=25)

    def model(y):
        if kind == "corr_cholesky":
            scale_tril = numpyro.param("p", jnp.eye(2), constraint=constraints.corr_cholesky)
        elif kind == "lower_cholesky":
            scale_tril = numpyro.param("p", jnp.eye(2), constraint=constraints.lower_cholesky)
        else:
            cov = numpyro.param("p", jnp.eye(2), constraint=constraints.positive_definite)
            scale_tril = jnp.linalg.cholesky(cov)
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("y", dist.MultivariateNormal(mu, scale_tril=scale_tril), obs=y)

    if kind == "corr_cholesky":

        def cov_of(t):
            return np.array([[1.0, np.tanh(t[0])], [np.tanh(t[0]), 1.0]])

        start = [0.0]
    else:

        def cov_of(t):
            lower = np.array([[np.exp(t[0]), 0.0], [t[1], np.exp(t[2])]])
            return lower @ lower.T

        start = [0.0, 0.0, 0.0]
    best = optimize.minimize(
        _stacked_gaussian(y, cov_of),
        start,
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000},
    )
    r = viax.fit(model, {"y": y}, family="fullrank", **QUIET)
    p = r.model_params["p"]
    got = p if kind == "positive_definite" else p @ p.T
    return r, f"Σ ({kind})", cov_of(best.x), got, -best.fun


def unit_interval_and_positive_ordered():
    sd_true = np.array([0.5, 2.0])
    y = RNG.multivariate_normal(
        [0, 0], np.array([[1, 0.5], [0.5, 1]]) * np.outer(sd_true, sd_true), 40
    )

    def model(y):
        rho = numpyro.param("rho", 0.3, constraint=constraints.unit_interval)
        sd = numpyro.param(
            "sd", jnp.array([1.0, 1.5]), constraint=constraints.positive_ordered_vector
        )
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        cov = jnp.array([[1.0, rho], [rho, 1.0]]) * jnp.outer(sd, sd)
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("y", dist.MultivariateNormal(mu, cov), obs=y)

    def cov_of(t):
        rho, sd = special.expit(t[0]), np.cumsum(np.exp(t[1:]))
        return np.array([[1.0, rho], [rho, 1.0]]) * np.outer(sd, sd)

    best = optimize.minimize(_stacked_gaussian(y, cov_of), [0.0, 0.0, 0.0], method="BFGS")
    r = viax.fit(model, {"y": y}, family="fullrank", **QUIET)
    want = np.r_[special.expit(best.x[0]), np.cumsum(np.exp(best.x[1:]))]
    got = np.r_[r.model_params["rho"], r.model_params["sd"]]
    return r, "ρ (unit_interval), sd (positive_ordered_vector)", want, got, -best.fun


def _normal_mean_marginal(y, weights, extra=None):
    """max over log s of log ∫ N(μ; 0, 10) Π N(y_i; μ, s)^{w_i} dμ, on a grid of μ."""
    grid = np.linspace(-40, 40, 20001)

    def nll(t):
        terms = weights * stats.norm.logpdf(y[None, :], grid[:, None], np.exp(t[0]))
        return -(
            special.logsumexp(terms.sum(1) + stats.norm.logpdf(grid, 0, 10))
            + np.log(grid[1] - grid[0])
        )

    best = optimize.minimize(
        nll, [0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12}
    )
    return np.exp(best.x[0]), -best.fun


Y30 = RNG.normal(1.0, 2.0, size=30)
MASK = np.arange(30) % 3 != 0


def handler(kind):
    def model(y, mask):
        s = numpyro.param("s", 1.0, constraint=constraints.positive)
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        if kind == "factor":
            numpyro.deterministic("twice_mu", 2 * mu)
            numpyro.factor("likelihood", dist.Normal(mu, s).log_prob(y).sum())
            return
        with numpyro.plate("N", y.shape[0]):
            if kind == "mask":
                with handlers.mask(mask=mask):
                    numpyro.sample("y", dist.Normal(mu, s), obs=y)
            else:
                with handlers.scale(scale=2.0):
                    numpyro.sample("y", dist.Normal(mu, s), obs=y)

    weights = {"mask": MASK.astype(float), "scale": np.full(30, 2.0), "factor": np.ones(30)}[kind]
    s, log_marginal = _normal_mean_marginal(Y30, weights)
    r = viax.fit(model, {"y": Y30, "mask": MASK}, **QUIET)
    return r, "s (positive)", s, r.model_params["s"], log_marginal


def two_plates():
    y1, y2 = Y30[:18], RNG.normal(0.5, 1.5, size=12)

    def model(y1, y2):
        s = numpyro.param(
            "s", lambda key: jnp.exp(0.1 * jax.random.normal(key)), constraint=constraints.positive
        )
        m = numpyro.param("m", jnp.zeros(2), event_dim=1)
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("A", y1.shape[0]):
            numpyro.sample("y1", dist.Normal(mu + m[0], s), obs=y1)
        with numpyro.plate("B", y2.shape[0]):
            numpyro.sample("y2", dist.Normal(mu + m[1], s), obs=y2)

    grid = np.linspace(-40, 40, 8001)

    def nll(t):
        ll = stats.norm.logpdf(y1[None], grid[:, None] + t[1], np.exp(t[0])).sum(1)
        ll = ll + stats.norm.logpdf(y2[None], grid[:, None] + t[2], np.exp(t[0])).sum(1)
        return -(special.logsumexp(ll + stats.norm.logpdf(grid, 0, 10)) + np.log(grid[1] - grid[0]))

    best = optimize.minimize(
        nll,
        [0, 0, 0],
        method="Nelder-Mead",
        options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000},
    )
    r = viax.fit(model, {"y1": y1, "y2": y2}, **QUIET)
    got = [r.model_params["s"], r.model_params["m"][0] - r.model_params["m"][1]]
    return (
        r,
        "s (callable init), m (event_dim=1; m₀−m₁ identified)",
        [np.exp(best.x[0]), best.x[1] - best.x[2]],
        got,
        -best.fun,
    )


def eqx_ppca():
    import equinox as eqx
    from numpyro.contrib.module import eqx_module

    x = RNG.normal(size=(50, 2)) @ RNG.normal(size=(2, 4)) + 0.4 * RNG.normal(size=(50, 4))

    def model(x):
        decoder = eqx_module("decoder", eqx.nn.Linear(2, 4, key=jax.random.PRNGKey(1)))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("N", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([2]).to_event(1))
            numpyro.sample("x", dist.Normal(jax.vmap(decoder)(z), sigma).to_event(1), obs=x)

    lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    r = viax.fit(model, {"x": x}, family="fullrank", **QUIET)
    return (
        r,
        "σ² of PPCA, eqx.nn.Linear decoder (Tipping & Bishop)",
        lam[2:].mean(),
        float(r.model_params["sigma"]) ** 2,
        None,
    )


def mixture():
    y = np.r_[RNG.normal(-2, 1, 24), RNG.normal(1, 1, 40), RNG.normal(4, 1, 16)]

    def model(y):
        w = numpyro.param("w", jnp.ones(3) / 3, constraint=constraints.simplex)
        m = numpyro.param("m", jnp.array([-1.0, 0.0, 1.0]), constraint=constraints.ordered_vector)
        s = numpyro.sample("s", dist.LogNormal(0, 1))
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample(
                "y", dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(m, s)), obs=y
            )

    grid = np.linspace(-2, 1.5, 401)

    def unpack(t):
        return special.softmax(np.r_[t[:2], 0.0]), np.cumsum(np.r_[t[2], np.exp(t[3:5])])

    def nll(t):
        w, m = unpack(t)
        comp = np.log(w) + stats.norm.logpdf(y[None, :, None], m, np.exp(grid)[:, None, None])
        ll = special.logsumexp(comp, axis=2).sum(1) + stats.norm.logpdf(grid)
        return -(special.logsumexp(ll) + np.log(grid[1] - grid[0]))

    best = optimize.minimize(nll, [0, 0, -1, 0, 0], method="BFGS")
    r = viax.fit(model, {"y": y}, **QUIET)
    return (
        r,
        "w (simplex), m (ordered_vector); exact ML (q is Gaussian in log s: bound not tight)",
        np.r_[unpack(best.x)],
        np.r_[r.model_params["w"], r.model_params["m"]],
        -best.fun,
    )


def _glmm(likelihood):
    """A GLMM with θ = (b0, τ) learned: u_j ~ N(0, τ) for each group, y_i ~
    likelihood(b0 + u_g(i))."""

    def model(g, y, J):
        b0 = numpyro.param("b0", 0.0)
        tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
        with numpyro.plate("groups", J):
            u = numpyro.sample("u", dist.Normal(0, tau))
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("y", likelihood(b0 + u[g]), obs=y)

    return model


def poisson_glmm(num_draws=None):
    groups, per = 8, 5
    g = np.repeat(np.arange(groups), per)
    y = RNG.poisson(np.exp(0.5 + RNG.normal(0, 0.8, groups)[g]))

    model = _glmm(lambda eta: dist.Poisson(jnp.exp(eta)))

    def negative_elbo(t):  # mean-field Gaussian q(u_j) = N(m_j, s_j²): E exp(u) = exp(m + s²/2)
        b0, tau2, m, s2 = t[0], np.exp(2 * t[1]), t[2 : 2 + groups], np.exp(2 * t[2 + groups :])
        ll = np.sum(y * (b0 + m[g]) - np.exp(b0 + m[g] + s2[g] / 2) - special.gammaln(y + 1))
        prior = np.sum(-0.5 * np.log(2 * np.pi * tau2) - (m**2 + s2) / (2 * tau2))
        return -(ll + prior + np.sum(0.5 * np.log(2 * np.pi * np.e * s2)))

    best = optimize.minimize(
        negative_elbo, np.zeros(2 + 2 * groups), method="BFGS", options={"gtol": 1e-10}
    )
    r = viax.fit(model, {"g": g, "y": y, "J": groups}, num_draws=num_draws, **QUIET)
    what = f"b0, τ; the analytic Gaussian-VI optimum ({r.info['num_draws']} fixed draws)"
    return (
        r,
        what,
        [best.x[0], np.exp(best.x[1])],
        [r.model_params["b0"], r.model_params["tau"]],
        -best.fun,
    )


def _bernoulli_vi_optimum(g, y, groups):
    """max over (b0, τ, m_j, s_j) of the mean-field Gaussian ELBO of the logit GLMM, its
    expectations by 40-point Gauss–Hermite quadrature per row (exact to ~1e-12 here)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / np.sqrt(2 * np.pi)

    def negative_elbo(t):
        b0, tau2 = t[0], np.exp(2 * t[1])
        m, s = t[2 : 2 + groups], np.exp(t[2 + groups :])
        eta = b0 + m[g][:, None] + s[g][:, None] * nodes[None]
        ll = np.sum((y[:, None] * eta - np.logaddexp(0, eta)) @ weights)
        prior = np.sum(-0.5 * np.log(2 * np.pi * tau2) - (m**2 + s**2) / (2 * tau2))
        return -(ll + prior + np.sum(0.5 * np.log(2 * np.pi * np.e) + np.log(s)))

    starts = [np.r_[0.0, lt, np.zeros(groups), np.full(groups, lt)] for lt in (0.0, -1.0, -3.0)]
    best = min(
        (optimize.minimize(negative_elbo, x0, method="L-BFGS-B") for x0 in starts),
        key=lambda o: o.fun,
    )
    return np.array([best.x[0], np.exp(best.x[1])]), -best.fun


def bernoulli_glmm():
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    rng = np.random.default_rng(5)  # its own data: a τ clearly away from 0 (see the docs)
    groups, per = 10, 8
    g = np.repeat(np.arange(groups), per)
    logits = 0.3 + rng.normal(0, 1.2, groups)[g]
    y = (rng.uniform(size=groups * per) < special.expit(logits)).astype(float)

    model = _glmm(lambda eta: dist.Bernoulli(logits=eta))

    reference, best_elbo = _bernoulli_vi_optimum(g, y, groups)
    # NumPyro's SVI, same model and mean-field Gaussian q, run long: 30,000 Adam steps of
    # 16 draws on a cosine schedule; θ is the mean of the last 10% of the iterates.
    steps = 30_000
    svi = SVI(
        model,
        AutoNormal(model),
        optax.adam(optax.cosine_decay_schedule(1e-2, steps)),
        Trace_ELBO(num_particles=16),
    )
    state = svi.init(jax.random.PRNGKey(0), g=g, y=y, J=groups)

    def body(state, _):
        state, _ = svi.update(state, g=g, y=y, J=groups)
        p = svi.get_params(state)
        return state, jnp.stack([p["b0"], p["tau"]])

    _, path = jax.lax.scan(body, state, None, length=steps)
    numpyro_theta = np.asarray(path[-steps // 10 :]).mean(0)
    r = viax.fit(model, {"g": g, "y": y, "J": groups}, num_draws=512, **QUIET)
    what = (
        "b0, τ against the Gaussian-VI optimum by quadrature; viax 512 fixed draws; NumPyro "
        f"SVI (AutoNormal, 30,000 steps) {_close(numpyro_theta, reference):.1g} off"
    )
    return r, what, reference, [r.model_params["b0"], r.model_params["tau"]], best_elbo


def hierarchical(objective, minibatch):
    y = RNG.normal(0, 1.7, 40) + RNG.normal(size=40)

    def model(y):
        tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
        mu = numpyro.param("mu", 0.0)
        with numpyro.plate("J", y.shape[0]):
            t = numpyro.sample("t", dist.Normal(mu, tau))
            numpyro.sample("y", dist.Normal(t, 1.0), obs=y)

    best = optimize.minimize(
        lambda t: -stats.norm.logpdf(y, t[0], np.sqrt(1 + np.exp(2 * t[1]))).sum(),
        [0, 0],
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12},
    )
    kwargs = {}
    if minibatch:
        steps = 4000
        kwargs = {
            "encoder": viax.MLPEncoder(hidden_sizes=()),
            "batch_size": 10,
            "num_epochs": steps // 4,
            "optimizer": optax.adam(optax.cosine_decay_schedule(2e-2, steps)),
        }
    r = viax.fit(model, {"y": y}, objective=objective, **kwargs, **QUIET)
    name = type(objective).__name__ + f"({objective.num_samples})"
    path = "minibatch, affine encoder, cosine schedule" if minibatch else "full batch"
    what = f"τ, μ, {path}, {name}"
    return (
        r,
        what,
        [np.exp(best.x[1]), best.x[0]],
        [r.model_params["tau"], r.model_params["mu"]],
        -best.fun,
    )


RIGHT = {
    "type-II linear regression": linear_regression,
    "factor analysis": factor_analysis,
    "factor analysis, affine encoder": lambda: factor_analysis(viax.MLPEncoder(hidden_sizes=())),
    "factor analysis, affine encoder, minibatch": lambda: factor_analysis(
        viax.MLPEncoder(hidden_sizes=()), minibatch=True
    ),
    "corr_cholesky": lambda: matrix_params("corr_cholesky"),
    "lower_cholesky": lambda: matrix_params("lower_cholesky"),
    "positive_definite": lambda: matrix_params("positive_definite"),
    "unit_interval, positive_ordered_vector": unit_interval_and_positive_ordered,
    "handlers.mask on observations": lambda: handler("mask"),
    "handlers.scale(2)": lambda: handler("scale"),
    "numpyro.factor + deterministic": lambda: handler("factor"),
    "one param in two plates": two_plates,
    "eqx_module PPCA": eqx_ppca,
    "mixture, learned weights and means": mixture,
    "Poisson GLMM": poisson_glmm,
    "Poisson GLMM, 512 draws": lambda: poisson_glmm(512),
    "Bernoulli GLMM": bernoulli_glmm,
    "hierarchical, full batch": lambda: hierarchical(viax.ELBO(), False),
    "hierarchical, full batch, IWAE(1)": lambda: hierarchical(viax.IWAE(num_samples=1), False),
    "hierarchical, minibatch ELBO(4)": lambda: hierarchical(viax.ELBO(num_samples=4), True),
    "hierarchical, minibatch IWAE(1)": lambda: hierarchical(viax.IWAE(num_samples=1), True),
    "hierarchical, minibatch IWAE(5)": lambda: hierarchical(viax.IWAE(num_samples=5), True),
}


# -- flagged or refused ------------------------------------------------------------------


def _simple(init, constraint=constraints.positive, unused=False):
    def model(y):
        s = numpyro.param("s", init, constraint=constraint)
        if unused:
            numpyro.param("unused", jnp.ones(2))
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, jnp.sum(s)), obs=y)

    return model


def _per_row(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("N", y.shape[0]):
        b = numpyro.param("b", jnp.zeros(y.shape[0]))
        numpyro.sample("y", dist.Normal(mu + b, 1.0), obs=y)


def _same_name(y):
    mu = numpyro.param("mu", 0.0)
    mu = numpyro.sample("mu", dist.Normal(mu, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _enumerated(y):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    with numpyro.plate("N", y.shape[0]):
        c = numpyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
        numpyro.sample("y", dist.Normal(jnp.array([-1.0, 1.0])[c], 1.0), obs=y)


def _obs_mask(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, s), obs=y, obs_mask=jnp.arange(y.shape[0]) % 3 > 0)


def _local(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    with numpyro.plate("N", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, s))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def _global_vector(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    z = numpyro.sample("z", dist.Normal(0.0, s).expand([y.shape[0]]).to_event(1))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


OTHER = {
    "integer initial value": (_simple(3), {}),
    "NaN initial value": (_simple(jnp.nan), {}),
    "inf in an initial vector": (_simple(jnp.array([1.0, jnp.inf]), constraints.real_vector), {}),
    "initial value outside positive": (_simple(-1.0), {}),
    "unit_interval init 0 (on the boundary)": (_simple(0.0, constraints.unit_interval), {}),
    "simplex init not summing to 1": (_simple(jnp.array([0.5, 0.6]), constraints.simplex), {}),
    "positive_integer constraint": (_simple(2.0, constraints.positive_integer), {}),
    "param the density ignores": (_simple(1.0, unused=True), {}),
    "param named like a latent": (_same_name, {}),
    "per-row param, full batch": (_per_row, {}),
    "per-row param, minibatch": (_per_row, {"batch_size": 5}),
    "enumerated discrete latent": (_enumerated, {}),
    "obs_mask (masked latent)": (_obs_mask, {}),
    "encoder, latent outside the plate": (_global_vector, {"encoder": viax.MLPEncoder()}),
    "encoder, data_keys not in data": (_local, {"encoder": viax.MLPEncoder(data_keys=("x",))}),
}


def run_other(model, kwargs):
    reached = []

    def spy(original):
        def wrapped(*args, **kw):
            reached.append(original.__name__)
            return original(*args, **kw)

        return wrapped

    from viax.infer import learn

    saved = learn._full_batch, learn._minibatch
    learn._full_batch, learn._minibatch = spy(saved[0]), spy(saved[1])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                r = viax.fit(model, {"y": Y30[:20]}, **kwargs, **QUIET)
                names = [str(w.message).split(":")[0][:90] for w in caught]
                verdict = "flagged" if caught else "right?"
                return verdict, f"returned, θ {r.model_params}; warnings: {names or 'none'}"
            except Exception as err:  # noqa: BLE001
                where = traceback.extract_tb(err.__traceback__)[-1].filename
                origin = "viax" if "/viax/" in where else where.rsplit("site-packages/", 1)[-1]
                before = "before" if not reached else "after"
                return (
                    "refused",
                    f"{type(err).__name__} ({origin}, {before} the learning program): {err}",
                )
    finally:
        learn._full_batch, learn._minibatch = saved


def main():
    rows, start = [], time.perf_counter()
    for name, case in RIGHT.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r, what, want, got, log_marginal = case()
        gap = None if log_marginal is None else log_marginal - r.elbo
        row = {
            "model": name,
            "params": what,
            "reference": np.round(np.ravel(np.asarray(want, float)), 5).tolist(),
            "viax": np.round(np.ravel(np.asarray(got, float)), 5).tolist(),
            "max relative error": _close(got, want),
            "reference − ELBO (nats)": gap,
            "elbo_se": r.elbo_se,
            "converged": r.converged,
            "k-hat": r.khat,
            "warnings": sorted({str(w.message)[:80] for w in caught}),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(row, flush=True)
    others = []
    for name, (model, kwargs) in OTHER.items():
        verdict, detail = run_other(model, kwargs)
        others.append({"model": name, "verdict": verdict, "detail": detail[:400]})
        print(others[-1], flush=True)
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "note": "2-core machine shared with two other helpers: the seconds are inflated",
        "right": rows,
        "flagged_or_refused": others,
        "total_seconds": time.perf_counter() - start,
    }
    _common.write_json("learn_sweep.json", payload)

    def fmt(v):
        return "" if v is None else (f"{v:.2g}" if isinstance(v, float) else str(v))

    table = _common.markdown_table(
        [
            "model",
            "θ",
            "max rel. error vs reference",
            "reference − ELBO",
            "elbo se",
            "converged",
            "k̂",
        ],
        [
            [
                r["model"],
                r["params"],
                fmt(r["max relative error"]),
                fmt(r["reference − ELBO (nats)"]),
                fmt(r["elbo_se"]),
                r["converged"],
                fmt(r["k-hat"]),
            ]
            for r in rows
        ],
    )
    table2 = _common.markdown_table(
        ["model", "verdict", "what the user gets"],
        [
            [o["model"], o["verdict"], o["detail"].replace("|", "/").replace("\n", " ")]
            for o in others
        ],
    )
    text = (
        "# Learning θ: a sweep of models, each right, flagged or refused\n\n"
        f"`{payload['command']}`, {payload['date']}, commit "
        f"{payload['machine'].get('git_commit', '?')}. {payload['note']}; "
        f"{payload['total_seconds']:.0f} s in all.\n\n## Right\n\n"
        + table
        + "\n\n## Flagged or refused\n\n"
        + table2
        + "\n"
    )
    (_common.RESULTS_DIR / "learn_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
