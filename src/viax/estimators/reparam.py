"""Reparameterisation (pathwise) estimates of the ELBO.

    L(λ) = E_ε[log p̃(T(ε; λ))] + H[q_λ]                     (closed-form entropy)
    L(λ) = E_ε[log p̃(T(ε; λ)) − log q_{sg(λ)}(T(ε; λ))]      ("sticking the landing")

Differentiating either estimate with ``jax.grad`` gives the pathwise gradient.  The
second drops the score term ∇λ log q, which has mean zero and vanishes at the exact
posterior (Roeder, Wu & Duvenaud 2017); ``sg`` is ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from viax.families.gaussian import Family

__all__ = ["elbo_from_noise", "elbo_terms"]


def elbo_from_noise(
    family: Family,
    log_density_fn: Callable[[jax.Array], jax.Array],
    params: dict,
    eps: jax.Array,
    stick_the_landing: bool = False,
) -> jax.Array:
    """Monte Carlo ELBO from base noise ``eps`` (S, noise_dim); differentiable in params."""
    z = jax.vmap(lambda e: family.transform(params, e))(eps)
    log_p = jax.vmap(log_density_fn)(z)
    if stick_the_landing:
        frozen = jax.lax.stop_gradient(params)
        log_q = jax.vmap(lambda x: family.log_prob(frozen, x))(z)
        return jnp.mean(log_p - log_q)
    return jnp.mean(log_p) + family.entropy(params)


def elbo_terms(family: Family, log_density_fn, params, rng_key, num_samples: int):
    """Per-draw ``log p̃(z) − log q(z)`` for z ~ q: shape (num_samples,)."""
    z, log_q = family.sample_and_log_prob(params, rng_key, num_samples)
    return jax.vmap(log_density_fn)(z) - log_q
