"""Mean-field factors for black-box VI, one per latent site, as pure functions.

Each factor is a frozen dataclass holding only static configuration (the site's
shape); its parameters are a dict of arrays.  ``log_prob`` is *elementwise*: it
returns an array of the site's shape, one log density per independent element, which
is what Rao-Blackwellisation and per-element control variates need.  ``score`` is
∇λ log q(z; λ) in closed form, a dict like the params; both take ``z`` with any
number of leading draw dimensions.  ``quantile(params, u)`` maps uniforms on [0, 1)
of shape (..., *shape) to draws (the inverse CDF; Poisson has none), so a caller can
draw every site's uniforms in one call of the random number generator.

* ``Bernoulli``:    q(z) = Bern(σ(ℓ)),                   params {logits (*shape,)}
* ``Categorical``:  q(z = low + k) = softmax(ℓ)_k,      params {logits (*shape, K)}
* ``Poisson``:      q(z) = Poisson(exp(η)),             params {log_rate (*shape,)}
* ``Normal``:       q(u) = N(m, exp(s)²) on the unconstrained value u,
                    params {loc (*shape,), log_scale (*shape,)}

A :class:`MeanFieldProduct` of such factors, keyed by site name, is the variational
family of :func:`viax.fit` with ``method="bbvi"``.  Entropies are closed form except
for the Poisson factor (``None``: estimate it by Monte Carlo).

Example:
    >>> import jax
    >>> f = Bernoulli((3,))
    >>> p = f.init()
    >>> z = f.sample(p, jax.random.PRNGKey(0), 5)   # (5, 3) of 0/1
    >>> f.log_prob(p, z).shape
    (5, 3)
    >>> f.score(p, z)["logits"].shape   # z − σ(ℓ)
    (5, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.scipy.special import erfinv, gammaln

__all__ = [
    "SUPPORTED_DISCRETE",
    "Bernoulli",
    "Categorical",
    "MeanFieldProduct",
    "Normal",
    "Poisson",
    "standard_normal_quantile",
]

SUPPORTED_DISCRETE = (
    "boolean (Bernoulli) -> Bernoulli-logits factor",
    "integer_interval (Categorical, Binomial, DiscreteUniform) -> Categorical-logits factor",
    "nonnegative_integer (Poisson, Geometric, NegativeBinomial) -> Poisson-log-rate factor",
)

_LOG_2PI = math.log(2 * math.pi)
# Logit of a category that the site's support excludes: exp(-1e9) is exactly 0, so the
# category is never drawn and its score (one-hot − softmax) is exactly 0.
_EXCLUDED_LOGIT = -1e9


def _sum_last(x):
    """``jnp.sum(x, -1)``: by slices when the axis is short, because XLA on CPU sums a
    short minor axis several times slower than it adds its slices."""
    if x.shape[-1] > 16 or x.shape[-1] == 0:
        return jnp.sum(x, axis=-1)
    total = x[..., 0].astype(jnp.int32) if x.dtype == bool else x[..., 0]
    for k in range(1, x.shape[-1]):
        total = total + x[..., k]
    return total


def standard_normal_quantile(u):
    """Φ⁻¹(u) for u uniform on [0, 1), as ``jax.random.normal`` computes it from its
    uniforms: √2 erf⁻¹ of a uniform on [nextafter(−1, 0), 1)."""
    low = jnp.nextafter(jnp.asarray(-1.0, u.dtype), jnp.asarray(0.0, u.dtype))
    return jnp.sqrt(2.0).astype(u.dtype) * erfinv(jnp.maximum(low, low + (1.0 - low) * u))


@dataclass(frozen=True)
class Bernoulli:
    shape: tuple[int, ...]
    name: str = "bernoulli"
    is_discrete: bool = True

    def init(self, probs=None) -> dict:
        if probs is None:
            return {"logits": jnp.zeros(self.shape)}
        probs = jnp.clip(jnp.broadcast_to(jnp.asarray(probs, float), self.shape), 1e-6, 1 - 1e-6)
        return {"logits": jnp.log(probs) - jnp.log1p(-probs)}

    def sample(self, params, rng_key, num_samples: int):
        u = jax.random.uniform(rng_key, (num_samples, *self.shape))
        return self.quantile(params, u)

    def quantile(self, params, u):
        return (u < jax.nn.sigmoid(params["logits"])).astype(jnp.int64)

    def log_prob(self, params, z):
        logits = params["logits"]
        return z * logits - jax.nn.softplus(logits)

    def score(self, params, z) -> dict:
        return {"logits": z - jax.nn.sigmoid(params["logits"])}

    def entropy(self, params):
        logits = params["logits"]
        p = jax.nn.sigmoid(logits)
        return jax.nn.softplus(logits) - p * logits

    def mean(self, params):
        return jax.nn.sigmoid(params["logits"])


@dataclass(frozen=True)
class Categorical:
    """Values ``low, ..., low + num_categories − 1``; ``init(valid=...)`` excludes some."""

    shape: tuple[int, ...]
    num_categories: int
    low: int = 0
    name: str = "categorical"
    is_discrete: bool = True

    def init(self, valid=None) -> dict:
        """``valid``: bool (*shape, K), False where an element's support excludes a value
        (a Binomial with per-element total counts)."""
        logits = jnp.zeros((*self.shape, self.num_categories))
        if valid is not None:
            logits = jnp.where(jnp.asarray(valid), logits, _EXCLUDED_LOGIT)
        return {"logits": logits}

    def sample(self, params, rng_key, num_samples: int):
        u = jax.random.uniform(rng_key, (num_samples, *self.shape))
        return self.quantile(params, u)

    def quantile(self, params, u):
        """Inverse CDF: one uniform per element (``jax.random.categorical`` draws K
        Gumbels and takes 2K logs per element, which dominated a BBVI step)."""
        probs = jax.nn.softmax(params["logits"], axis=-1)
        cdf = jnp.cumsum(probs[..., :-1], axis=-1)
        # z = #{k < K−1 : u ≥ cdf_k}: an excluded category (probability exactly 0) has
        # an empty interval [cdf_(k−1), cdf_k) and is never drawn.
        index = _sum_last(u[..., None] >= cdf).astype(jnp.int64)
        # Rounding can leave cdf_(K−2) a hair below 1 when the last categories are
        # excluded: clamp to the last category with positive probability.
        last = self.num_categories - 1 - jnp.argmax(probs[..., ::-1] > 0, axis=-1)
        return jnp.minimum(index, last) + self.low

    def log_prob(self, params, z):
        log_probs = jax.nn.log_softmax(params["logits"], axis=-1)
        if self.num_categories <= 16:
            # a select per category: XLA's gather is slower than this on CPU
            return _sum_last(jnp.where(self._one_hot(z), log_probs, 0.0))
        index = jnp.asarray(z - self.low, jnp.int32)[..., None]
        log_probs = jnp.broadcast_to(log_probs, index.shape[:-1] + log_probs.shape[-1:])
        return jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]

    def _one_hot(self, z):
        return (z - self.low)[..., None] == jnp.arange(self.num_categories)

    def score(self, params, z) -> dict:
        """one-hot(z) − softmax(ℓ); exactly 0 for an excluded category."""
        probs = jax.nn.softmax(params["logits"], axis=-1)
        return {"logits": self._one_hot(z).astype(probs.dtype) - probs}

    def entropy(self, params):
        log_probs = jax.nn.log_softmax(params["logits"], axis=-1)
        probs = jnp.exp(log_probs)
        return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)

    def mean(self, params):
        probs = jax.nn.softmax(params["logits"], axis=-1)
        return self.low + probs @ jnp.arange(self.num_categories, dtype=probs.dtype)


@dataclass(frozen=True)
class Poisson:
    shape: tuple[int, ...]
    name: str = "poisson"
    is_discrete: bool = True

    def init(self, rate=None) -> dict:
        rate = jnp.ones(self.shape) if rate is None else jnp.broadcast_to(rate, self.shape)
        return {"log_rate": jnp.log(jnp.maximum(jnp.asarray(rate, float), 0.5))}

    def sample(self, params, rng_key, num_samples: int):
        rate = jnp.exp(params["log_rate"])
        return jax.random.poisson(rng_key, rate, (num_samples, *self.shape)).astype(jnp.int64)

    def log_prob(self, params, z):
        eta = params["log_rate"]
        return z * eta - jnp.exp(eta) - gammaln(z + 1.0)

    def score(self, params, z) -> dict:
        return {"log_rate": z - jnp.exp(params["log_rate"])}

    def entropy(self, params):
        return None  # no closed form

    def mean(self, params):
        return jnp.exp(params["log_rate"])


@dataclass(frozen=True)
class Normal:
    """Gaussian factor on a continuous site's unconstrained value (reparameterised)."""

    shape: tuple[int, ...]
    name: str = "normal"
    is_discrete: bool = False

    def init(self, loc=None, scale=None) -> dict:
        loc = jnp.zeros(self.shape) if loc is None else jnp.reshape(jnp.asarray(loc), self.shape)
        scale = 1.0 if scale is None else scale
        return {"loc": loc, "log_scale": jnp.full(self.shape, jnp.log(scale), dtype=float)}

    def transform(self, params, eps):
        return params["loc"] + jnp.exp(params["log_scale"]) * eps

    def sample(self, params, rng_key, num_samples: int):
        eps = jax.random.normal(rng_key, (num_samples, *self.shape))
        return self.transform(params, eps)

    def quantile(self, params, u):
        return self.transform(params, standard_normal_quantile(u))

    def log_prob(self, params, z):
        r = (z - params["loc"]) * jnp.exp(-params["log_scale"])
        return -0.5 * r**2 - params["log_scale"] - 0.5 * _LOG_2PI

    def score(self, params, z) -> dict:
        r = (z - params["loc"]) * jnp.exp(-params["log_scale"])
        return {"loc": r * jnp.exp(-params["log_scale"]), "log_scale": r**2 - 1.0}

    def entropy(self, params):
        return params["log_scale"] + 0.5 * (1.0 + _LOG_2PI)

    def mean(self, params):
        return params["loc"]


@dataclass(frozen=True)
class MeanFieldProduct:
    """q(z) = Π_sites Π_elements q_site(z_element): a dict of factors by site name."""

    factors: tuple[tuple[str, object], ...]
    name: str = "meanfield"

    @property
    def by_name(self) -> dict:
        return dict(self.factors)

    def sample(self, params, rng_key, num_samples: int) -> dict:
        keys = jax.random.split(rng_key, len(self.factors))
        return {
            name: factor.sample(params[name], key, num_samples)
            for (name, factor), key in zip(self.factors, keys, strict=True)
        }

    def log_prob(self, params, values) -> jax.Array:
        return sum(
            jnp.sum(factor.log_prob(params[name], values[name])) for name, factor in self.factors
        )

    def entropy(self, params):
        """Closed-form entropy, or ``None`` when a factor has none."""
        parts = [factor.entropy(params[name]) for name, factor in self.factors]
        if any(part is None for part in parts):
            return None
        return sum(jnp.sum(part) for part in parts)
