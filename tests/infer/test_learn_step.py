"""The minibatch learning step's shortcuts compute what the plain code computes.

* viax.infer.threefry (the unrolled hash the step draws with) returns jax.random's
  numbers bit for bit;
* ``draw_and_log_q`` (one pass of the encoder) gives the same objective and the same
  gradient as ``draw`` followed by ``log_q`` (two passes), for diagonal and full-rank
  encoders: the residual (z − m)/L is ε up to rounding, and the gradient terms through
  z and through (m, L) cancel exactly;
* for the estimators that hold q's parameters fixed in log q (IWAE's DReG, sticking
  the landing), ``draw_with_gaussian`` + ``log_q_from`` (log q from the draw's own
  encoder pass) give what ``draw`` + ``log_q`` (a second pass) give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppca import ppca  # examples/ppca.py

import viax
from viax.estimators.objectives import ELBO, IWAE, objective_value_and_grad
from viax.infer import threefry
from viax.infer.learn import _constrain_theta, _make_q, _structure, _unconstrained_theta
from viax.model import build_target


def test_threefry_draws_are_jax_random_bit_for_bit():
    key = jax.random.PRNGKey(20261206)

    @jax.jit
    def both(key):
        k1, k2 = threefry.split(key)
        out = [(threefry.split(key, 5), jax.random.split(key, 5))]
        for dtype in (jnp.float32, jnp.float64):
            out.append(
                (threefry.uniform(k1, (7, 13), dtype), jax.random.uniform(k1, (7, 13), dtype))
            )
            out.append(
                (threefry.normal(k2, (3, 11, 5), dtype), jax.random.normal(k2, (3, 11, 5), dtype))
            )
        return out

    for ours, theirs in both(key):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_threefry_falls_back_to_jax_random_for_typed_keys():
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        threefry.uniform(key, (4,), jnp.float32), jax.random.uniform(key, (4,), jnp.float32)
    )


@pytest.mark.parametrize("covariance", ["diagonal", "fullrank"])
@pytest.mark.parametrize(
    "objective",
    [ELBO(num_samples=3), ELBO(num_samples=3, stick_the_landing=True), IWAE(num_samples=3)],
    ids=["elbo", "stl", "dreg"],
)
def test_one_encoder_pass_matches_draw_then_log_q_in_value_and_gradient(covariance, objective):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    data = {"x": x, "q": 2}
    target, arrays, init_position = build_target(ppca, data, seed=0)
    structure = _structure(target, arrays, True, "encoder=")
    encoder = viax.MLPEncoder(hidden_sizes=(5,), covariance=covariance, init_log_scale=-0.5)
    q = _make_q(target, arrays, structure, encoder, "meanfield", None)
    theta = _unconstrained_theta(target)
    phi = q.init(jax.random.PRNGKey(1), init_position)
    # Move the output layer off its near-zero start so that L is far from the identity.
    phi["encoder"][-1]["w"] = phi["encoder"][-1]["w"] * 50.0
    batch = {"x": jnp.asarray(x[:6])}
    eps = q.normal_noise(jax.random.PRNGKey(2), 3, 6)
    row_scale = 2.0

    def log_p_fn(theta_u, z):
        return q.log_p(_constrain_theta(target, theta_u), z, batch, row_scale)

    @jax.jit
    def both(theta, phi):
        common = (
            objective,
            log_p_fn,
            lambda p: q.draw(p, eps, batch),
            lambda p, z: q.log_q(p, z, batch, row_scale),
            theta,
            phi,
            row_scale,
        )
        fused = objective_value_and_grad(
            *common,
            draw_and_log_q_fn=lambda p: q.draw_and_log_q(p, eps, batch, row_scale),
            draw_with_aux_fn=lambda p: q.draw_with_gaussian(p, eps, batch),
            log_q_at_fn=lambda gaussian, p, z: q.log_q_from(gaussian, p, z, row_scale),
        )
        return objective_value_and_grad(*common), fused

    (value, grads), (value_fused, grads_fused) = both(theta, phi)
    np.testing.assert_allclose(value_fused, value, rtol=1e-12)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads_fused), jax.tree_util.tree_leaves(grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_one_draw_is_mapped_without_vmap_and_gives_vmaps_numbers():
    """``_over_draws`` (the model's log density over a step's draws) calls the function
    on the draw directly when there is one, the same values, gradients and shapes as
    ``jax.vmap``; with more draws it is ``jax.vmap``."""
    from viax.infer.learn import _over_draws

    weights = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def fn(z):
        rows = jnp.tanh(z["local"] @ weights)  # (B, 3)
        return {"rows": rows.sum(axis=1), "rest": jnp.sum(z["global"] ** 2)}

    for draws in (1, 3):
        z = {
            "local": jnp.linspace(0.0, 2.0, draws * 5 * 4).reshape(draws, 5, 4),
            "global": jnp.linspace(-1.0, 1.0, draws * 2).reshape(draws, 2),
        }
        out, expected = _over_draws(fn, z), jax.vmap(fn)(z)
        for key in expected:
            assert out[key].shape == expected[key].shape
            np.testing.assert_allclose(out[key], expected[key], rtol=1e-14)

        def total(w, z=z, mapper=_over_draws):
            return jnp.sum(mapper(lambda u: fn({**u, "local": u["local"] * w}), z)["rows"])

        np.testing.assert_allclose(
            jax.grad(total)(1.5),
            jax.grad(lambda w: total(w, mapper=lambda f, draws_z: jax.vmap(f)(draws_z)))(1.5),
            rtol=1e-13,
        )
