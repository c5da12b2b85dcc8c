"""Gaussian variational families on R^D, as pure functions over a parameter dict.

Every family is reparameterised: ``z = transform(params, eps)`` with ``eps`` of shape
``(noise_dim,)`` from N(0, I).  Parameters are unconstrained (log scales), so any
optimiser may move them freely.

* ``MeanField``:  q = N(m, diag(s²)),            params {loc (D,), log_scale (D,)}
* ``FullRank``:   q = N(m, L Lᵀ), L lower-tri,   params {loc (D,), tril (D, D), log_diag (D,)}
  with L = strict_lower(tril) + diag(exp(log_diag)).
* ``LowRank``:    q = N(m, W Wᵀ + diag(d²)),     params {loc, cov_factor (D, R), log_diag (D,)}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Family", "FullRank", "LowRank", "MeanField", "make_family", "FAMILIES"]

_LOG_2PI = math.log(2 * math.pi)


class Family:
    """Interface: subclasses are frozen dataclasses holding only static config."""

    name: str = ""
    dim: int

    @property
    def noise_dim(self) -> int:
        return self.dim

    def init(self, loc=None, cov=None) -> dict:
        raise NotImplementedError

    def transform(self, params, eps):
        raise NotImplementedError

    def log_prob(self, params, z):
        raise NotImplementedError

    def entropy(self, params):
        raise NotImplementedError

    def mean(self, params):
        return params["loc"]

    def covariance(self, params):
        raise NotImplementedError

    def sample(self, params, rng_key, num_samples: int):
        """Draws of shape (num_samples, D)."""
        eps = jax.random.normal(rng_key, (num_samples, self.noise_dim))
        return jax.vmap(lambda e: self.transform(params, e))(eps)

    def sample_and_log_prob(self, params, rng_key, num_samples: int):
        z = self.sample(params, rng_key, num_samples)
        return z, jax.vmap(lambda x: self.log_prob(params, x))(z)

    def _affine_sample_and_log_prob(self, params, rng_key, num_samples, log_det):
        # z = m + A ε with A square: log q(z) = log N(ε; 0, I) − log|det A|, no solve.
        eps = jax.random.normal(rng_key, (num_samples, self.noise_dim))
        z = jax.vmap(lambda e: self.transform(params, e))(eps)
        log_q = -0.5 * jnp.sum(eps**2, axis=1) - log_det - 0.5 * self.dim * _LOG_2PI
        return z, log_q

    def affine(self, params, center, scale):
        """Params of the pushforward of q under z ↦ center + scale ⊙ z (scale (D,))."""
        raise NotImplementedError


@dataclass(frozen=True)
class MeanField(Family):
    dim: int
    name: str = "meanfield"

    def init(self, loc=None, cov=None):
        loc = jnp.zeros(self.dim) if loc is None else jnp.asarray(loc)
        var = jnp.ones(self.dim) if cov is None else jnp.diagonal(jnp.atleast_2d(cov))
        return {"loc": loc, "log_scale": 0.5 * jnp.log(var)}

    def transform(self, params, eps):
        return params["loc"] + jnp.exp(params["log_scale"]) * eps

    def log_prob(self, params, z):
        r = (z - params["loc"]) * jnp.exp(-params["log_scale"])
        return -0.5 * jnp.sum(r**2) - jnp.sum(params["log_scale"]) - 0.5 * self.dim * _LOG_2PI

    def entropy(self, params):
        return jnp.sum(params["log_scale"]) + 0.5 * self.dim * (1.0 + _LOG_2PI)

    def sample_and_log_prob(self, params, rng_key, num_samples: int):
        log_det = jnp.sum(params["log_scale"])
        return self._affine_sample_and_log_prob(params, rng_key, num_samples, log_det)

    def covariance(self, params):
        return jnp.diag(jnp.exp(2 * params["log_scale"]))

    def stddev(self, params):
        return jnp.exp(params["log_scale"])

    def affine(self, params, center, scale):
        return {
            "loc": center + scale * params["loc"],
            "log_scale": params["log_scale"] + jnp.log(scale),
        }


@dataclass(frozen=True)
class FullRank(Family):
    dim: int
    name: str = "fullrank"

    def init(self, loc=None, cov=None):
        loc = jnp.zeros(self.dim) if loc is None else jnp.asarray(loc)
        chol = jnp.eye(self.dim) if cov is None else jnp.linalg.cholesky(cov)
        return {"loc": loc, "tril": jnp.tril(chol, -1), "log_diag": jnp.log(jnp.diagonal(chol))}

    def _strict_lower(self, params):
        # A constant mask and a select: jnp.tril/jnp.diag lower to scatters, which
        # cost more than the rest of a step on CPU.
        return jnp.where(np.tri(self.dim, k=-1, dtype=bool), params["tril"], 0.0)

    def scale_tril(self, params):
        return self._strict_lower(params) + np.eye(self.dim) * jnp.exp(params["log_diag"])

    def transform(self, params, eps):
        return params["loc"] + self._strict_lower(params) @ eps + jnp.exp(params["log_diag"]) * eps

    def log_prob(self, params, z):
        chol = self.scale_tril(params)
        r = jax.scipy.linalg.solve_triangular(chol, z - params["loc"], lower=True)
        return -0.5 * jnp.sum(r**2) - jnp.sum(params["log_diag"]) - 0.5 * self.dim * _LOG_2PI

    def entropy(self, params):
        return jnp.sum(params["log_diag"]) + 0.5 * self.dim * (1.0 + _LOG_2PI)

    def sample_and_log_prob(self, params, rng_key, num_samples: int):
        log_det = jnp.sum(params["log_diag"])
        return self._affine_sample_and_log_prob(params, rng_key, num_samples, log_det)

    def covariance(self, params):
        chol = self.scale_tril(params)
        return chol @ chol.T

    def stddev(self, params):
        return jnp.sqrt(jnp.sum(self.scale_tril(params) ** 2, axis=1))

    def affine(self, params, center, scale):
        return self.affine_tril(params, center, jnp.diag(scale))

    def affine_tril(self, params, center, tril):
        """Pushforward under z ↦ center + A z with A lower triangular (D, D)."""
        chol = tril @ self.scale_tril(params)
        return {
            "loc": center + tril @ params["loc"],
            "tril": jnp.tril(chol, -1),
            "log_diag": jnp.log(jnp.abs(jnp.diagonal(chol))),
        }


@dataclass(frozen=True)
class LowRank(Family):
    dim: int
    rank: int = 2
    name: str = "lowrank"

    @property
    def noise_dim(self):
        return self.rank + self.dim

    def init(self, loc=None, cov=None):
        loc = jnp.zeros(self.dim) if loc is None else jnp.asarray(loc)
        if cov is None:
            return {
                "loc": loc,
                "cov_factor": jnp.zeros((self.dim, self.rank)),
                "log_diag": jnp.zeros(self.dim),
            }
        # Leading eigenvectors carry the correlated part, the rest goes on the diagonal.
        eigval, eigvec = jnp.linalg.eigh(cov)
        eigval, eigvec = eigval[::-1][: self.rank], eigvec[:, ::-1][:, : self.rank]
        diag = jnp.maximum(
            jnp.diagonal(cov) - jnp.sum(eigvec**2 * eigval, axis=1), 1e-3 * jnp.diagonal(cov)
        )
        factor = eigvec * jnp.sqrt(jnp.maximum(eigval - 0.5 * jnp.min(diag), 0.0))
        return {"loc": loc, "cov_factor": factor, "log_diag": 0.5 * jnp.log(diag)}

    def transform(self, params, eps):
        return (
            params["loc"]
            + params["cov_factor"] @ eps[: self.rank]
            + jnp.exp(params["log_diag"]) * eps[self.rank :]
        )

    def _capacitance(self, params):
        w = params["cov_factor"] * jnp.exp(-params["log_diag"])[:, None]  # D^-1/2 W
        return jnp.eye(self.rank) + w.T @ w, w

    def log_prob(self, params, z):
        # Woodbury and the matrix determinant lemma: O(D R²).
        cap, w = self._capacitance(params)
        chol = jnp.linalg.cholesky(cap)
        r = (z - params["loc"]) * jnp.exp(-params["log_diag"])
        v = jax.scipy.linalg.solve_triangular(chol, w.T @ r, lower=True)
        maha = jnp.sum(r**2) - jnp.sum(v**2)
        logdet = 2 * jnp.sum(params["log_diag"]) + 2 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        return -0.5 * (maha + logdet + self.dim * _LOG_2PI)

    def entropy(self, params):
        cap, _ = self._capacitance(params)
        logdet = 2 * jnp.sum(params["log_diag"]) + jnp.linalg.slogdet(cap)[1]
        return 0.5 * logdet + 0.5 * self.dim * (1.0 + _LOG_2PI)

    def covariance(self, params):
        w = params["cov_factor"]
        return w @ w.T + jnp.diag(jnp.exp(2 * params["log_diag"]))

    def stddev(self, params):
        return jnp.sqrt(
            jnp.sum(params["cov_factor"] ** 2, axis=1) + jnp.exp(2 * params["log_diag"])
        )

    def affine(self, params, center, scale):
        return {
            "loc": center + scale * params["loc"],
            "cov_factor": scale[:, None] * params["cov_factor"],
            "log_diag": params["log_diag"] + jnp.log(scale),
        }


FAMILIES = ("meanfield", "fullrank", "lowrank")


def make_family(name: str, dim: int, rank: int | None = None) -> Family:
    """The family called ``name`` on R^dim; ``rank`` only for "lowrank"."""
    if name == "meanfield":
        return MeanField(dim)
    if name == "fullrank":
        return FullRank(dim)
    if name == "lowrank":
        rank = 2 if rank is None else int(rank)
        if not 1 <= rank <= dim:
            raise ValueError(f"lowrank family: rank must be in [1, {dim}], got {rank}")
        return LowRank(dim, rank)
    raise ValueError(f"unknown family {name!r}; valid families: {', '.join(FAMILIES)}")
