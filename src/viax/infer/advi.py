"""Stochastic ADVI (Kucukelbir et al. 2017, "Automatic Differentiation Variational
Inference", JMLR 18) with Stan's step-size sequence, step-size search and
convergence rule, or any optax optimiser.

Step-size sequence (an optax transform, :func:`scale_by_stan_advi`):

    ρ_k = η · k^(−1/2+ε) · (τ + √s_k)^(−1),
    s_k = α g_k² + (1 − α) s_{k−1},  s_1 = g_1²,  α = 0.1, τ = 1, ε = 1e−16.

η is chosen by 50-step trial runs of each of {100, 10, 1, 0.1, 0.01} (vectorised
over η) keeping the best final ELBO; the run stops when the mean or the median of
the relative ELBO changes in a circular window falls under ``tol_rel_obj``.
"""

from __future__ import annotations

import functools
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from viax.estimators.reparam import elbo_from_noise
from viax.families.gaussian import Family
from viax.infer.driver import Guard, guard_init, guarded_update, jit_once
from viax.model import Target

__all__ = [
    "ADVIInfo",
    "ADVIState",
    "ETA_GRID",
    "ScaleByStanADVIState",
    "StanConvergence",
    "adapt_eta",
    "build_stochastic",
    "scale_by_stan_advi",
    "stan_advi",
    "stan_step_sizes",
]

ETA_GRID = (100.0, 10.0, 1.0, 0.1, 0.01)


class ScaleByStanADVIState(NamedTuple):
    count: jax.Array
    sq_avg: Any  # s_k, a pytree like the params


def scale_by_stan_advi(
    eta: float = 1.0, alpha: float = 0.1, tau: float = 1.0, eps: float = 1e-16
) -> optax.GradientTransformation:
    """Stan's ADVI step-size sequence as an optax transform: g ↦ ρ_k ⊙ g."""

    def init_fn(params):
        return ScaleByStanADVIState(
            count=jnp.zeros([], jnp.int32), sq_avg=jax.tree_util.tree_map(jnp.zeros_like, params)
        )

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        sq_avg = jax.tree_util.tree_map(
            lambda g, s: jnp.where(count == 1, g**2, alpha * g**2 + (1 - alpha) * s),
            updates,
            state.sq_avg,
        )
        base = eta * count.astype(float) ** (-0.5 + eps)
        updates = jax.tree_util.tree_map(
            lambda g, s: base * g / (tau + jnp.sqrt(s)), updates, sq_avg
        )
        return updates, ScaleByStanADVIState(count, sq_avg)

    return optax.GradientTransformation(init_fn, update_fn)


@functools.lru_cache(maxsize=16)
def stan_advi(eta: float = 1.0) -> optax.GradientTransformation:
    """Descent on −ELBO with Stan's sequence (so ascent on the ELBO)."""
    return optax.chain(scale_by_stan_advi(eta), optax.scale(-1.0))


def stan_step_sizes(grads: np.ndarray, eta: float, alpha=0.1, tau=1.0, eps=1e-16) -> np.ndarray:
    """Reference ρ_k for a scalar gradient sequence, written from the formula (tests)."""
    rho, s = [], 0.0
    for k, g in enumerate(np.asarray(grads, dtype=float), start=1):
        s = g**2 if k == 1 else alpha * g**2 + (1 - alpha) * s
        rho.append(eta * k ** (-0.5 + eps) / (tau + np.sqrt(s)))
    return np.asarray(rho)


class ADVIState(NamedTuple):
    params: dict
    opt_state: Any
    guard: Guard


class ADVIInfo(NamedTuple):
    objective: jax.Array  # the S-particle ELBO estimate at this step
    iterate: jax.Array  # (P,) the parameters after this step, flattened (ravel_pytree)


class Stochastic(NamedTuple):
    init: Callable[[dict, float], ADVIState]
    step: Callable
    elbo: Callable  # (params, rng_key, data) -> mean ELBO over num_eval draws
    trials: Callable  # (params, etas, rng_key, data) -> final ELBO per eta


@functools.lru_cache(maxsize=128)
def build_stochastic(
    target: Target,
    family: Family,
    optimizer: optax.GradientTransformation,
    num_particles: int,
    stick_the_landing: bool,
    num_eval: int = 100,
    num_trial_steps: int = 50,
) -> Stochastic:
    """Pure init/step for reparameterised ADVI; cached so refits reuse compiled code."""

    def init(params, step_scale=1.0):
        return ADVIState(params, optimizer.init(params), guard_init(target.dim, step_scale))

    def step(state: ADVIState, rng_key, data):
        eps = jax.random.normal(rng_key, (num_particles, family.noise_dim))

        def loss_fn(params):
            log_density_fn = functools.partial(target.log_density, data=data)
            return -elbo_from_noise(family, log_density_fn, params, eps, stick_the_landing)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)

        def apply(old):
            params, opt_state = old
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(lambda u: state.guard.step_scale * u, updates)
            return optax.apply_updates(params, updates), opt_state

        (params, opt_state), guard, _ = guarded_update(
            state.guard, loss, grads["loc"], apply, (state.params, state.opt_state)
        )
        info = ADVIInfo(objective=-loss, iterate=ravel_pytree(params)[0])
        return ADVIState(params, opt_state, guard), info

    def elbo(params, rng_key, data):
        # Closed-form entropy: log q at the draws of an exploded q (a trial η too
        # large) is round-off garbage that can make the estimate absurdly positive.
        log_density_fn = functools.partial(target.log_density, data=data)
        eps = jax.random.normal(rng_key, (num_eval, family.noise_dim))
        value = elbo_from_noise(family, log_density_fn, params, eps)
        return jnp.where(jnp.isfinite(value), value, -jnp.inf)

    def trials(params, etas, rng_key, data):
        # One compiled, vectorised η search: each candidate restarts from ``params``.
        def one(eta, key):
            state = init(params, eta)
            keys = jax.random.split(key, num_trial_steps + 1)
            state, _ = jax.lax.scan(lambda s, k: step(s, k, data), state, keys[1:])
            value = elbo(state.params, keys[0], data)
            return jnp.where(state.guard.num_nonfinite > 0, -jnp.inf, value)

        return jax.vmap(one)(etas, jax.random.split(rng_key, etas.shape[0]))

    # The ELBO check runs every eval_elbo steps for the whole run: compile it fully.
    return Stochastic(init, step, jax.jit(elbo), jit_once(trials))


def adapt_eta(algo: Stochastic, params, rng_key, data, grid=ETA_GRID) -> tuple[float, dict]:
    """Stan's step-size search: the η of ``grid`` whose short run ends at the best ELBO."""
    values = np.asarray(algo.trials(params, jnp.asarray(grid, dtype=float), rng_key, data))
    scores = dict(zip(grid, values.tolist(), strict=True))
    finite = np.isfinite(values)
    if not finite.any():
        raise FloatingPointError(
            "ADVI step-size search: every candidate η in "
            f"{list(grid)} diverged (non-finite ELBO); check the model's scale or "
            "pass optimizer=optax.adam(...) with a small rate"
        )
    return float(np.asarray(grid)[finite][np.argmax(values[finite])]), scores


class StanConvergence:
    """Stan's rule: every ``eval_elbo`` steps push |ΔELBO / ELBO| into a circular
    buffer of size max(0.1·max_steps/eval_elbo, 2); stop when its mean or median
    falls under ``tol_rel_obj``; warn when both stay above 0.5 late in the run."""

    def __init__(self, tol_rel_obj: float, max_steps: int, eval_elbo: int, initial_elbo: float):
        self.tol = tol_rel_obj
        self.eval_elbo = eval_elbo
        size = max(int(0.1 * max_steps / eval_elbo), 2)
        self.window: deque[float] = deque(maxlen=size)
        self.previous = initial_elbo
        self.history: list[tuple[int, float]] = []
        self.warned = False  # the "may be diverging" warning is given once per run

    def update(self, elbo: float, step: int) -> tuple[bool, str]:
        rel = abs((elbo - self.previous) / elbo) if elbo != 0 else np.inf
        self.previous = elbo
        self.window.append(rel)
        self.history.append((step, elbo))
        mean, median = float(np.mean(self.window)), float(np.median(self.window))
        if mean < self.tol:
            return True, f"mean relative ELBO change {mean:.2g} < tol_rel_obj {self.tol}"
        if median < self.tol:
            return True, f"median relative ELBO change {median:.2g} < tol_rel_obj {self.tol}"
        if step > 10 * self.eval_elbo and mean > 0.5 and median > 0.5 and not self.warned:
            self.warned = True
            warnings.warn(
                f"ADVI: relative ELBO change still {median:.2g} at step {step}; the "
                "optimisation may be diverging, proceed with caution",
                RuntimeWarning,
                stacklevel=3,
            )
        return False, ""
