"""The fixed costs of a minibatch learning fit: the initial point checked on a sample of
the rows, and the final estimates' one program (rows filled with copies of fewer rows)."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import viax
from viax.infer import learn, threefry


def _exponential_rows(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    rate = numpyro.param("rate", 1.0, constraint=constraints.positive)
    with numpyro.plate("rows", y.shape[0]):
        numpyro.sample("y", dist.Exponential(rate + mu**2), obs=y)


def test_minibatch_initial_point_checked_on_a_sample_still_names_the_site(monkeypatch):
    # More rows than the sample: the check reads 4 of the 40 rows, all outside the
    # likelihood's support, and refuses by name before compiling, as the full check did.
    monkeypatch.setattr(learn, "_CHECK_ROWS", 4)
    y = -np.ones(40)
    with pytest.raises(viax.ModelError, match=r"not finite at the initial point; site\(s\): y"):
        viax.fit(_exponential_rows, {"y": y}, batch_size=10, num_epochs=1, progress=False)


class _RowsQ:
    """A stand-in q whose log weight for row n and noise ε is 10⁶·x_n − ε²/2: which row a
    column read is exact, and the draws are N(0, 1)."""

    structure = SimpleNamespace(batch_keys=("x",))
    input_keys = ("x",)
    local_dim = 1

    def row_noise(self, key, rows, draws):
        high = jnp.broadcast_to(rows[None, :], draws.shape)
        return threefry.normal_at(key, high, draws, jnp.float64)

    def draw_and_log_q(self, phi, eps, batch, scale):
        return eps, jnp.zeros_like(eps)

    def log_p(self, theta, z, batch, scale):
        return 1e6 * batch["x"][None, :] - 0.5 * z**2


def test_final_estimates_fill_the_program_with_copies_of_few_rows():
    x = np.array([0.0, 1.0, 2.0])
    # 3 rows in a program of 8 row slots × 16 draws: each slot reads one row's block of
    # 16 draws, so one call holds several blocks of each row.
    weights = learn._row_log_weights(_RowsQ(), None, None, {"x": x}, {}, 500, 0, (8, 16))
    assert weights.shape == (500, 3)
    np.testing.assert_array_equal(np.round(weights / 1e6), np.broadcast_to(x, weights.shape))
    noise = 1e6 * x - weights  # ε²/2: χ²₁/2, mean 1/2, sd 1/√2
    assert np.all(np.abs(noise.mean(axis=0) - 0.5) < 4 * np.sqrt(0.5 / 500))
    # The copies are independent draws, not repeats.
    assert all(np.unique(noise[:, n]).size == 500 for n in range(3))


def test_full_batch_folds_draws_into_rows_only_where_the_model_allows():
    # A plate whose size is an argument does not trace on S·N rows: the objective keeps
    # one evaluation per draw and the fit is what it was.  Type-II ML of s in
    # x_n ~ N(z_n, s²), z_n ~ N(0, 1): s² = mean(x²) − 1.
    def static_rows(x, n):
        s = numpyro.param("s", 1.0, constraint=constraints.positive)
        with numpyro.plate("rows", n):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, s), obs=x)

    x = np.random.default_rng(0).normal(size=30) * 2.0
    encoder = viax.MLPEncoder(hidden_sizes=())
    result = viax.fit(static_rows, {"x": x, "n": 30}, encoder=encoder, progress=False)
    np.testing.assert_allclose(result.model_params["s"], np.sqrt(np.mean(x**2) - 1.0), rtol=1e-6)
