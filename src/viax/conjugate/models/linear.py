"""Bayesian linear regression with a Normal–Gamma prior: the exact posterior.

    τ ~ Gamma(a0, b0),   w | τ ~ N(m0, (τ Λ0)⁻¹),   y_n | w, τ ~ N(x_nᵀ w, τ⁻¹).

The posterior is Normal–Gamma (Bishop 2006 §3.3; Murphy 2007 "Conjugate Bayesian
analysis of the Gaussian distribution" §7.6):

    Λn = Λ0 + XᵀX,  mn = Λn⁻¹(Λ0 m0 + Xᵀy),  an = a0 + N/2,
    bn = b0 + ½(yᵀy + m0ᵀΛ0m0 − mnᵀΛn mn),

and the evidence is

    log p(y) = −N/2 log 2π + ½ log|Λ0| − ½ log|Λn| + a0 log b0 − an log bn
               + log Γ(an) − log Γ(a0).

With one Normal–Gamma factor q(w, τ) the family contains the posterior, so one CAVI
sweep lands on it and the ELBO equals log p(y) exactly: a closed-form test of the
whole engine.  Expected log likelihood per point, in q's mean parameters:

    ½ E log τ − ½ log 2π − ½ (y² E[τ] − 2 y xᵀ E[τw] + xᵀ E[τ w wᵀ] x).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from viax.conjugate.engine import ConjugateModel, conjugate_model, to_device
from viax.conjugate.expfam import NormalGamma
from viax.conjugate.models._base import check_finite_2d, check_spd

__all__ = ["LinearRegressionModel"]

_LOG_2PI = math.log(2.0 * math.pi)


@conjugate_model
class LinearRegressionModel(ConjugateModel):
    """Global factor ``regression`` (NormalGamma over (w, τ)); no locals.
    Batches: ``{"x": (N, P), "y": (N,), "mask": (N,)}``."""

    mean_prior: jax.Array  # m0 (P,)
    precision_prior: jax.Array  # Λ0 (P, P)
    shape_prior: jax.Array  # a0
    rate_prior: jax.Array  # b0

    name = "normal-gamma-linear-regression"

    @classmethod
    def create(
        cls,
        mean_prior,
        precision_prior,
        shape_prior: float = 1.0,
        rate_prior: float = 1.0,
    ) -> LinearRegressionModel:
        m0 = np.atleast_1d(np.asarray(mean_prior, np.float64))
        p = m0.shape[0]
        prec = np.asarray(precision_prior, np.float64)
        if prec.ndim == 0:
            prec = prec * np.eye(p)
        prec = check_spd(prec, "precision_prior")
        if prec.shape != (p, p):
            raise ValueError(f"precision_prior must have shape ({p}, {p}), got {prec.shape}")
        for label, value in [("shape_prior", shape_prior), ("rate_prior", rate_prior)]:
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be > 0, got {value}")
        return cls(
            to_device(m0),
            to_device(prec),
            to_device(shape_prior, np.float64),
            to_device(rate_prior, np.float64),
        )

    @classmethod
    def default(cls, n_features: int, precision: float = 1e-2) -> LinearRegressionModel:
        """m0 = 0, Λ0 = precision · I, a0 = b0 = 1."""
        return cls.create(np.zeros(n_features), precision)

    def global_factors(self):
        return {"regression": NormalGamma()}

    def prior(self):
        return {
            "regression": NormalGamma.from_standard(
                self.mean_prior, self.precision_prior, self.shape_prior, self.rate_prior
            )
        }

    def local_log_joint(self, global_mean, local_mean, batch):
        tau_w, tau_wwt, tau, log_tau = global_mean["regression"]
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        quad = jnp.sum((x @ tau_wwt) * x, -1)
        per_point = (
            0.5 * log_tau - 0.5 * _LOG_2PI - 0.5 * (y**2 * tau - 2.0 * y * (x @ tau_w) + quad)
        )
        return jnp.sum(mask * per_point)

    def init_globals(self, rng_key, batch):
        return self.prior()

    def prepare(self, data, pad_to=None):
        X, y = data
        X = check_finite_2d(X)
        y = np.asarray(y, np.float64)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinite values")
        if X.shape[1] != self.mean_prior.shape[0]:
            raise ValueError(f"X has {X.shape[1]} columns, the prior {self.mean_prior.shape[0]}")
        n = X.shape[0]
        mask = np.ones(n)
        if pad_to is not None and pad_to > n:
            X = np.concatenate([X, np.zeros((pad_to - n, X.shape[1]))])
            y = np.concatenate([y, np.zeros(pad_to - n)])
            mask = np.concatenate([mask, np.zeros(pad_to - n)])
        return {"x": to_device(X), "y": to_device(y), "mask": to_device(mask)}

    def sample_sites(self, global_natural, rng, num_samples):
        draws = NormalGamma().sample(global_natural["regression"], rng, num_samples)
        return {"weights": draws["weights"], "noise_precision": draws["precision"]}
