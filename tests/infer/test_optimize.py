"""The compiled L-BFGS: compact directions equal the two-loop recursion's; minima found;
the host loop takes the compiled loop's steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from viax.infer.optimize import lbfgs, lbfgs_direction, minimize, minimize_on_host


def test_compact_direction_equals_the_two_loop_recursion():
    # optax's scale_by_lbfgs is the textbook two-loop recursion on the same pairs.
    rng = np.random.default_rng(0)
    n, memory = 12, 5
    a = rng.standard_normal((n, n))
    hess = a @ a.T + np.eye(n)
    base = optax.scale_by_lbfgs(memory_size=memory)
    state = base.init(jnp.zeros(n))
    _, state = base.update(jnp.zeros(n), state, jnp.zeros(n))
    s, y, count = np.zeros((memory, n)), np.zeros((memory, n)), 0
    x_old = np.zeros(n)
    for num_pairs in range(1, 9):  # fewer pairs than the memory, then more
        x = rng.standard_normal(n)
        s = np.concatenate([s[1:], (x - x_old)[None]])
        y = np.concatenate([y[1:], (hess @ (x - x_old))[None]])
        count, x_old = count + 1, x
        expected, state = base.update(jnp.asarray(hess @ x), state, jnp.asarray(x))
        got = lbfgs_direction(jnp.asarray(s), jnp.asarray(y), jnp.asarray(count), hess @ x)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=f"{num_pairs}")


def test_minimize_rosenbrock_and_a_pytree_quadratic():
    def rosenbrock(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    state, steps = jax.jit(lambda x: minimize(rosenbrock, x, tol=1e-9))(jnp.full(5, -1.2))
    np.testing.assert_allclose(state.position, np.ones(5), atol=1e-6)
    assert 0 < int(steps) < 1000

    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6))
    hess, b = a @ a.T + 0.1 * np.eye(6), rng.standard_normal(6)

    def quadratic(p):
        x = jnp.concatenate([p["u"], p["v"].ravel()])
        return 0.5 * x @ hess @ x - b @ x

    state, _ = jax.jit(lambda p: minimize(quadratic, p, tol=1e-10))(
        {"u": jnp.zeros(2), "v": jnp.zeros((2, 2))}
    )
    x = np.concatenate([state.position["u"], np.ravel(state.position["v"])])
    np.testing.assert_allclose(x, np.linalg.solve(hess, b), atol=1e-8)


def test_a_non_finite_start_stops_without_moving():
    init, step = lbfgs(lambda x: jnp.sum(jnp.log(x)))  # log of negatives: NaN
    state = init(-jnp.ones(3))
    for _ in range(3):
        state, info = step(state)
        assert not bool(info.accepted)
    assert np.isinf(state.value) and np.all(np.asarray(state.position) == -1)
    state, steps = minimize(lambda x: jnp.sum(jnp.log(x)), -jnp.ones(3))
    assert int(steps) == 1 and np.isinf(state.value)


def test_host_loop_takes_the_compiled_loops_steps():
    # The same iteration in NumPy around a compiled gradient: same iterates to
    # round-off, same number of steps (rejected proposals included), also from a
    # start where proposals overflow to inf and are rejected.
    def rosenbrock(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    def steep(x):  # a wall: 20 of its 437 proposals overflow to inf and are rejected
        return jnp.sum(jnp.exp(1000.0 * (x - 1.0)) - 2.0 * x)

    for fun, start in ((rosenbrock, np.full(5, -1.2)), (steep, np.zeros(3))):
        state, steps = jax.jit(lambda x, f=fun: minimize(f, x, tol=1e-9))(jnp.asarray(start))
        value_and_grad = jax.jit(jax.value_and_grad(fun))
        x, value, grad, host_steps = minimize_on_host(value_and_grad, start, tol=1e-9)
        assert host_steps == int(steps)
        np.testing.assert_allclose(x, state.position, rtol=1e-8, atol=1e-10)
        assert np.isclose(value, float(fun(x)), rtol=1e-10, atol=1e-20)
        np.testing.assert_allclose(grad, state.grad, rtol=1e-8, atol=1e-10)

    # A start where the objective is not finite stops at once, unmoved.
    x, value, _, host_steps = minimize_on_host(
        jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.log(x)))), -np.ones(3)
    )
    assert host_steps == 1 and np.isinf(value) and np.all(x == -1)
