"""Training objectives for learning a model p_θ with a reparameterised q_φ.

Each objective is a small frozen dataclass (after BlackJAX's ``vi`` objectives): it
validates its own arguments, turns log weights into the objective's value, and gives
its gradient estimator.  Log weights come in an array (K, R): K draws per row for R
rows (R = 1 when the weights are of the whole joint), ``lw[k, r] = log p_θ(x_r, z_kr) −
log q_φ(z_kr | x_r)``, and the objective over the data is ``row_scale`` × the sum over
the rows (row_scale = N/B for a minibatch of B of N rows).

* :class:`ELBO`: ``L = E_q[log p_θ(x, z) − log q_φ(z)]``, estimated by the mean over K.
* :class:`IWAE`: the importance-weighted bound (Burda, Grosse & Salakhutdinov 2016)

      L_K = E[log (1/K) Σ_k p_θ(x, z_k)/q_φ(z_k)],   L_1 = ELBO ≤ L_K ≤ log p(x),

  with the doubly reparameterised gradient (DReG; Tucker, Lawson, Gu & Maddison 2019)
  for φ: with normalised weights w̃_k = w_k / Σ_j w_j,

      ∇_θ L_K = E[Σ_k w̃_k ∇_θ log w_k],
      ∇_φ L_K = E[Σ_k w̃_k² (∂ log w_k / ∂z_k) (∂z_k / ∂φ)],

  where ``log w_k`` is differentiated through z_k only (q's parameters stopped in
  log q).  The plain reparameterised gradient's signal-to-noise ratio for φ falls as
  1/√K (Rainforth et al. 2018); DReG's does not, and it has no score term left.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = ["ELBO", "IWAE", "Objective", "objective_value_and_grad"]

_GRADIENTS = ("dreg", "standard")


def _check_num_samples(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ELBO:
    """The evidence lower bound, ``num_samples`` draws per row per step.

    ``stick_the_landing=True`` drops the score term of log q from φ's gradient
    (Roeder, Wu & Duvenaud 2017): zero variance at the exact posterior.

    Example:
        >>> objective = ELBO(num_samples=1)
    """

    num_samples: int = 1
    stick_the_landing: bool = False
    name = "elbo"

    def __post_init__(self):
        object.__setattr__(self, "num_samples", _check_num_samples(self.num_samples))

    def value(self, log_weights: jax.Array, row_scale=1.0) -> jax.Array:
        """row_scale × Σ_r mean_k lw[k, r] for ``log_weights`` (K, R)."""
        return row_scale * jnp.sum(jnp.mean(log_weights, axis=0))

    @property
    def stop_q(self) -> bool:
        return self.stick_the_landing


@dataclass(frozen=True)
class IWAE:
    """The importance-weighted bound L_K with K = ``num_samples`` draws per row.

    ``gradient="dreg"`` (default): the doubly reparameterised estimator of Tucker et al.
    (2019); ``"standard"``: the plain reparameterised gradient of L_K (Burda et al. 2016).

    Example:
        >>> objective = IWAE(num_samples=5)
    """

    num_samples: int = 5
    gradient: str = "dreg"
    name = "iwae"

    def __post_init__(self):
        object.__setattr__(self, "num_samples", _check_num_samples(self.num_samples))
        if self.gradient not in _GRADIENTS:
            raise ValueError(
                f"gradient must be one of {', '.join(_GRADIENTS)}, got {self.gradient!r}"
            )

    def value(self, log_weights: jax.Array, row_scale=1.0) -> jax.Array:
        """row_scale × Σ_r [logsumexp_k lw[k, r] − log K] for ``log_weights`` (K, R)."""
        num = log_weights.shape[0]
        return row_scale * jnp.sum(logsumexp(log_weights, axis=0) - jnp.log(num))

    @property
    def stop_q(self) -> bool:
        return False


Objective = ELBO | IWAE


def objective_value_and_grad(
    objective: Objective,
    log_p_fn: Callable[[Any, Any], jax.Array],
    draw_fn: Callable[[Any], Any],
    log_q_fn: Callable[[Any, Any], jax.Array],
    theta: Any,
    phi: Any,
    row_scale=1.0,
    draw_and_log_q_fn: Callable[[Any], tuple[Any, jax.Array]] | None = None,
    draw_with_aux_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    log_q_at_fn: Callable[[Any, Any, Any], jax.Array] | None = None,
):
    """The objective's estimate and the gradient of its *negative* (a loss) in (θ, φ).

    Args:
        log_p_fn: ``(theta, z) -> (K, R)`` log p_θ(x_r, z_kr).
        draw_fn: ``phi -> z``, a pytree whose leaves lead with (K,) or (K, R) axes.
        log_q_fn: ``(phi, z) -> (K, R)`` log q_φ(z_kr | x_r).
        draw_and_log_q_fn: optional ``phi -> (z, log q_φ(z))`` equal to
            ``(draw_fn(phi), log_q_fn(phi, draw_fn(phi)))`` in value and gradient but
            cheaper (one pass of an encoder instead of two); used where q's parameters
            are differentiated in log q (not for ``stick_the_landing`` nor DReG, whose
            log q holds them fixed).
        draw_with_aux_fn, log_q_at_fn: optional pair for the estimators that hold q's
            parameters fixed in log q (DReG, ``stick_the_landing``): ``phi -> (z, aux)``
            with ``aux`` what log q needs (an encoder's output for the rows), and
            ``(aux, phi, z) -> (K, R)`` log q_φ(z) from it, equal to
            ``log_q_fn(phi, z)``.  The draw's own pass of an encoder then serves log q;
            without them log q runs the encoder forward a second time.

    Returns:
        ``(value, (grad_theta, grad_phi))``.
    """
    if draw_with_aux_fn is None or log_q_at_fn is None:

        def draw_with_aux_fn(phi):
            return draw_fn(phi), None

        def log_q_at_fn(aux, phi, z):
            del aux
            return log_q_fn(phi, z)

    if isinstance(objective, IWAE) and objective.gradient == "dreg":
        return _dreg(objective, log_p_fn, draw_with_aux_fn, log_q_at_fn, theta, phi, row_scale)

    def loss(theta, phi):
        if draw_and_log_q_fn is not None and not objective.stop_q:
            z, log_q = draw_and_log_q_fn(phi)
            return -objective.value(log_p_fn(theta, z) - log_q, row_scale)
        if objective.stop_q:  # log q at z with q's parameters (and their output) fixed
            z, aux = draw_with_aux_fn(phi)
            frozen = jax.lax.stop_gradient((aux, phi))
            return -objective.value(log_p_fn(theta, z) - log_q_at_fn(*frozen, z), row_scale)
        z = draw_fn(phi)
        q_params = jax.lax.stop_gradient(phi) if objective.stop_q else phi
        log_weights = log_p_fn(theta, z) - log_q_fn(q_params, z)
        return -objective.value(log_weights, row_scale)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(theta, phi)
    return -value, grads


def _dreg(objective, log_p_fn, draw_with_aux_fn, log_q_at_fn, theta, phi, row_scale):
    z, draw_vjp, aux = jax.vjp(draw_with_aux_fn, phi, has_aux=True)
    frozen = jax.lax.stop_gradient((aux, phi))

    def log_weights_fn(theta, z):
        return log_p_fn(theta, z) - log_q_at_fn(*frozen, z)

    log_weights, weights_vjp = jax.vjp(log_weights_fn, theta, z)
    normalised = jax.lax.stop_gradient(jax.nn.softmax(log_weights, axis=0))  # (K, R)
    # One backward pass: the IWAE cotangent −w̃ gives θ's gradient, and since lw[k, r]
    # depends on z[k, r] alone, multiplying z's cotangent by w̃ once more gives DReG's
    # −w̃² ∂lw/∂z for φ.
    grad_theta, grad_z = weights_vjp(-row_scale * normalised)

    def reweight(g):  # leaves lead with (K,) for joint weights (R = 1), else (K, R)
        w = normalised[:, 0] if normalised.shape[1] == 1 else normalised
        return g * w.reshape(w.shape + (1,) * (g.ndim - w.ndim))

    (grad_phi,) = draw_vjp(jax.tree_util.tree_map(reweight, grad_z))
    return objective.value(log_weights, row_scale), (grad_theta, grad_phi)
