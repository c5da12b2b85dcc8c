"""Probabilistic PCA by maximum likelihood, with viax, checked against the closed form.

    x_n = W z_n + μ + ε_n,   z_n ~ N(0, I_q),   ε_n ~ N(0, σ² I_d)

W, μ and σ are ``numpyro.param`` sites: ``viax.fit`` learns them jointly with q(z)
(variational EM).  The posterior of each z_n is Gaussian, so the bound is tight at the
optimum and θ is the maximum-likelihood estimate of Tipping & Bishop (1999):
σ² = the mean of the discarded eigenvalues of the sample covariance,
W Wᵀ = U_q (Λ_q − σ² I) U_qᵀ.  The same fit with an affine encoder (amortized q) reaches
the same θ.

    python examples/ppca.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import viax

LATENT_DIM = 2


def ppca(x, q=LATENT_DIM):
    n, d = x.shape
    w = numpyro.param("W", lambda key: 0.1 * jax.random.normal(key, (d, q)))
    mu = numpyro.param("mu", jnp.zeros(d))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("rows", n):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([q]).to_event(1))
        numpyro.sample("x", dist.Normal(z @ w.T + mu, sigma).to_event(1), obs=x)


def closed_form(x, q=LATENT_DIM):
    """(σ², W Wᵀ, log-likelihood) of the maximum-likelihood PPCA fit."""
    n, d = x.shape
    centred = x - x.mean(0)
    cov = centred.T @ centred / n
    lam, u = np.linalg.eigh(cov)
    lam, u = lam[::-1], u[:, ::-1]
    s2 = lam[q:].mean()
    ww = u[:, :q] @ np.diag(lam[:q] - s2) @ u[:, :q].T
    c = ww + s2 * np.eye(d)
    log_lik = (
        -0.5
        * n
        * (d * np.log(2 * np.pi) + np.linalg.slogdet(c)[1] + np.trace(np.linalg.solve(c, cov)))
    )
    return s2, ww, log_lik


def make_data(n=100, d=5, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, LATENT_DIM)) * np.array([3.0, 1.5])
    return rng.normal(size=(n, LATENT_DIM)) @ w.T + 0.5 * rng.normal(size=(n, d)) + 2.0


def main():
    x = make_data()
    s2, ww, log_lik = closed_form(x)
    result = viax.fit(ppca, {"x": x})
    print(result)
    w, sigma = result.model_params["W"], result.model_params["sigma"]
    print(f"sigma^2: viax {sigma**2:.6f}, closed form {s2:.6f}")
    print(
        f"|W W' - closed form| / |closed form| = "
        f"{np.linalg.norm(w @ w.T - ww) / np.linalg.norm(ww):.2e}"
    )
    print(f"ELBO {result.elbo:.4f} ± {result.elbo_se:.1g}, exact log-likelihood {log_lik:.4f}")
    print(result.summary(num_samples=200).tail(8))
    return result


if __name__ == "__main__":
    main()
