"""A compiled L-BFGS minimiser with one gradient evaluation per step.

Directions come from optax's ``scale_by_lbfgs`` (two-loop recursion); the step
length is controlled by accept/reject rather than a line search: a proposal
``x − η d`` is accepted when it satisfies Armijo's sufficient-decrease condition,
then η returns to 1; otherwise η shrinks fourfold and the step is retried from x.
Each step costs exactly one ``value_and_grad``, so the compiled program holds one
copy of the objective's gradient (a zoom line search holds several and compiles
several times slower), and a non-finite proposal is simply rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

__all__ = ["LBFGSInfo", "LBFGSState", "lbfgs"]

_ARMIJO = 1e-4


class LBFGSState(NamedTuple):
    position: Any
    value: jax.Array
    grad: Any
    direction: Any  # ≈ H⁻¹ grad
    memory: Any  # optax scale_by_lbfgs state
    step_size: jax.Array
    num_rejected: jax.Array


class LBFGSInfo(NamedTuple):
    value: jax.Array
    grad_norm: jax.Array  # max |∇| at the current position
    accepted: jax.Array


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _max_abs(tree):
    return jnp.max(jnp.abs(ravel_pytree(tree)[0]))


def _all_finite(tree):
    return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def lbfgs(fun: Callable[..., jax.Array], memory_size: int = 10):
    """Return ``(init, step)`` minimising ``fun(x, *args)``; both pure and jittable."""
    base = optax.scale_by_lbfgs(memory_size=memory_size)
    value_and_grad = jax.value_and_grad(fun)

    def init(position, *args) -> LBFGSState:
        value, grad = value_and_grad(position, *args)
        direction, memory = base.update(grad, base.init(position), position)
        # Before any curvature is known, cap the first step at unit length.
        step_size = jnp.minimum(1.0, 1.0 / jnp.maximum(_max_abs(grad), 1e-12))
        return LBFGSState(
            position, value, grad, direction, memory, step_size, jnp.asarray(0, jnp.int32)
        )

    def step(state: LBFGSState, *args) -> tuple[LBFGSState, LBFGSInfo]:
        slope = _vdot(state.grad, state.direction)
        # Fall back to steepest descent when the L-BFGS direction is not a descent one.
        direction = jax.tree_util.tree_map(
            lambda d, g: jnp.where(slope > 0, d, g), state.direction, state.grad
        )
        slope = jnp.where(slope > 0, slope, _vdot(state.grad, state.grad))
        proposal = jax.tree_util.tree_map(
            lambda x, d: x - state.step_size * d, state.position, direction
        )
        value, grad = value_and_grad(proposal, *args)
        accept = (
            jnp.isfinite(value)
            & _all_finite(grad)
            & (value <= state.value - _ARMIJO * state.step_size * slope)
        )
        new_direction, new_memory = base.update(grad, state.memory, proposal)

        def pick(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, old)

        new_state = LBFGSState(
            position=pick(proposal, state.position),
            value=jnp.where(accept, value, state.value),
            grad=pick(grad, state.grad),
            direction=pick(new_direction, direction),
            memory=pick(new_memory, state.memory),
            step_size=jnp.where(accept, 1.0, 0.25 * state.step_size),
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
        )
        info = LBFGSInfo(new_state.value, _max_abs(new_state.grad), accept)
        return new_state, info

    return init, step


def minimize(fun, position, *args, max_steps: int = 1000, tol: float = 1e-8, memory_size=10):
    """Run :func:`lbfgs` in a ``while_loop`` until max |∇| ≤ tol, the step size
    underflows, or ``max_steps``; returns the final state and the step count.
    Traceable: call it inside ``jax.jit``."""
    init, step = lbfgs(fun, memory_size)

    def cond(carry):
        state, k = carry
        return (
            (k < max_steps)
            & (_max_abs(state.grad) > tol)
            & (state.step_size > 1e-12)
            & (jnp.isfinite(state.value))
        )

    def body(carry):
        state, k = carry
        return step(state, *args)[0], k + 1

    return jax.lax.while_loop(cond, body, (init(position, *args), jnp.asarray(0)))
