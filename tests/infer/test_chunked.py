"""Full-batch sums over row blocks (viax.infer.chunked): the same density, gradient and
fit as the whole data; the exact Hessian diagonal; refusals by name."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax
from viax.infer import chunked, dadvi
from viax.infer.dadvi import laplace_diagonal
from viax.model import build_target

NUM_GROUPS = 6
# 16 draws x (3 numbers per row + 8) x 72 rows: 500 rows in 7 blocks of 72, 4 padded.
SMALL_BLOCKS = 16 * 11 * 72


def hierarchical(x, g, y, w):
    """Group effects (their own plate, global), a row plate, and a second data plate
    (one number per group: a constant of another length than the rows)."""
    a = numpyro.sample("a", dist.Normal(0, 5))
    b = numpyro.sample("b", dist.Normal(0, 1))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    with numpyro.plate("groups", NUM_GROUPS):
        z = numpyro.sample("z", dist.Normal(0, 1))
        numpyro.sample("w", dist.Normal(z, 1), obs=w)
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + b * x + tau * z[g]), obs=y)


def _data(num_rows=500, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, NUM_GROUPS, num_rows).astype(np.int32)
    x = rng.normal(size=num_rows) * 3.0
    y = (rng.random(num_rows) < 1 / (1 + np.exp(-(0.5 * x + 0.4 * (g - 2))))).astype(float)
    return {"x": x, "g": g, "y": y, "w": rng.normal(size=NUM_GROUPS)}


@pytest.fixture
def small_blocks(monkeypatch):
    # 500 rows x 16 draws in 7 blocks of 72 rows (the last one padded).
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", SMALL_BLOCKS)
    monkeypatch.setattr(chunked, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(chunked, "_PLANS", {})


def test_chunked_density_and_gradient_equal_whole(small_blocks):
    target, arrays, u0 = build_target(hierarchical, _data())
    plan, reason = chunked.plan_chunks(target, arrays, 16, u0)
    assert plan is not None, reason
    assert plan.num_blocks > 1 and plan.num_blocks * plan.block_size > plan.num_rows  # padded
    assert plan.row_names == ("g", "x", "y")  # w (one per group) stays whole
    blocked = plan.blocked(arrays)
    u = jnp.asarray(np.random.default_rng(1).normal(size=target.dim))
    whole_vg = jax.jit(jax.value_and_grad(lambda v: target.log_density(v, arrays)))
    part_vg = jax.jit(jax.value_and_grad(lambda v: plan.log_density(v, blocked)))
    (whole, whole_grad), (part, part_grad) = whole_vg(u), part_vg(u)
    assert abs(float(part - whole)) <= 1e-10 * abs(float(whole))
    np.testing.assert_allclose(part_grad, whole_grad, rtol=1e-10, atol=1e-10)
    # Many draws at once, in groups of draw_group (lax.map), as the final ELBO takes them.
    positions = jnp.asarray(np.random.default_rng(2).normal(size=(40, target.dim)))
    many = jax.jit(lambda z: chunked.log_density_many(plan, z, blocked))(positions)
    whole_many = jax.jit(jax.vmap(lambda v: target.log_density(v, arrays)))(positions)
    np.testing.assert_allclose(many, whole_many, rtol=1e-10)


def test_small_data_are_not_chunked():
    target, arrays, u0 = build_target(hierarchical, _data())
    plan, reason = chunked.plan_chunks(target, arrays, 64, u0)
    assert plan is None and reason == "500 rows x 64 draws fit in one block"
    # More than a block, within WHOLE_ELEMENTS: whole, as the 569-row x 1024-draw
    # logistic regression of the speed benchmark (a chunked plan costs a compile there).
    assert chunked.block_size_for(500, 3, 1024) < 500
    plan, reason = chunked.plan_chunks(target, arrays, 1024, u0)
    assert plan is None and reason.startswith("500 rows x 1024 draws evaluated whole")


def per_row_latent(x, y):
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    with numpyro.plate("N", x.shape[0]):
        e = numpyro.sample("e", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu + x + e, 1), obs=y)


def rows_outside_plate(x, y):
    # The prior's location is a statistic of all rows: a block sees other numbers.
    mu = numpyro.sample("mu", dist.Normal(jnp.mean(y), 1))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Normal(mu + x, 1), obs=y)


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (per_row_latent, "per-row latent(s) e"),
        (rows_outside_plate, "is not the whole one"),
    ],
)
def test_models_that_cannot_be_cut_are_evaluated_whole(small_blocks, model, says):
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=500), "y": rng.normal(size=500) + 3.0}
    target, arrays, u0 = build_target(model, data)
    plan, reason = chunked.plan_chunks(target, arrays, 16, u0)
    assert plan is None and reason.startswith("not chunked") and says in reason


def test_hessian_diagonal_is_exact():
    """Probed diagonal == diagonal of the dense Hessian: an uncoupled site (group effects,
    two probes), a coupled one (a correlated prior: probed per coordinate), scalars."""
    cov = 0.5 * np.eye(3) + 0.5

    def model(x, g, y):
        a = numpyro.sample("a", dist.Normal(0, 5))
        v = numpyro.sample("v", dist.MultivariateNormal(jnp.zeros(3), cov))
        with numpyro.plate("groups", NUM_GROUPS):
            z = numpyro.sample("z", dist.Normal(0, 1))
        with numpyro.plate("N", x.shape[0]):
            logit = a + v[0] * x + v[1] * x**2 + v[2] + z[g]
            numpyro.sample("y", dist.Bernoulli(logits=logit), obs=y)

    data = {k: v for k, v in _data(200).items() if k != "w"}
    target, arrays, _ = build_target(model, data)
    u = jnp.asarray(np.random.default_rng(3).normal(size=target.dim) * 0.3)

    def negative(v):
        return -target.log_density(v, arrays)

    sites = tuple((s.start, s.size) for s in target.sites)
    diag = jax.jit(lambda v: chunked.hessian_diagonal(negative, v, sites))(u)
    dense = jax.jit(jax.hessian(negative))(u)
    np.testing.assert_allclose(diag, np.diag(dense), rtol=1e-10, atol=1e-12)
    _, scale, decrement, _, positive = laplace_diagonal(diag, jnp.ones(target.dim))
    np.testing.assert_allclose(scale, 1 / np.sqrt(diag))
    assert bool(positive) and np.isclose(float(decrement), float(np.sum(1 / diag)))


@pytest.mark.filterwarnings("ignore:viax.fit. PSIS k-hat")  # 6 groups, mean-field: k-hat 0.8
def test_chunked_fit_with_diagonal_curvature_equals_whole_fit(monkeypatch):
    """The large-data path on a small model: rows in blocks, and the set-up's curvature
    by the Hessian diagonal plus the dense block of the scalar sites (as for D > 500)."""
    data = _data()
    whole = viax.fit(hierarchical, data, num_draws=16, seed=0, progress=False)
    assert whole.info["chunks"] == "500 rows x 16 draws fit in one block"
    assert whole.info["curvature"] == "dense Hessian" and whole.info["path"] == "full-batch"
    assert whole.info["path_reason"].startswith("500 rows x 64 draws: about")
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", SMALL_BLOCKS)
    monkeypatch.setattr(chunked, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(chunked, "_PLANS", {})
    monkeypatch.setattr(chunked, "DENSE_CURVATURE_SECONDS", 0.0)  # no dense Hessian
    monkeypatch.setattr(dadvi, "_BLOCK_SITE_SIZE", 1)  # a, b, tau: z stays diagonal
    parts = viax.fit(hierarchical, data, num_draws=16, seed=0, progress=False, path="full-batch")
    assert parts.info["chunks"] == "500 rows in 7 blocks of 72 (16 draws)"
    assert parts.info["curvature"] == "Hessian diagonal + dense block of 3 coordinates"
    assert parts.info["curvature_reason"].startswith("Hessian diagonal: the dense curvature")
    assert parts.info["path_reason"] == "asked for (path='full-batch')"
    # The same optimum of the same fixed-draw objective, reached through another
    # preconditioner: L-BFGS stops within ~1e-6 of it (posterior sds here are 0.1-1).
    np.testing.assert_allclose(
        parts.family.mean(parts.params), whole.family.mean(whole.params), atol=1e-5
    )
    np.testing.assert_allclose(
        parts.family.stddev(parts.params), whole.family.stddev(whole.params), atol=1e-5
    )


def test_path_is_chosen_from_a_time_budget(monkeypatch):
    from viax.infer.minibatch import minibatch_route

    data = _data()
    assert minibatch_route(hierarchical, data, None, None, "auto") is None
    fits, reason = chunked.full_batch_estimate(data)
    assert fits and reason.startswith("500 rows x 64 draws: about") and "(one block)" in reason
    # 500 x 64 x (3 + 8) numbers, 200 passes at 5e-9 s: 0.35 s, over a budget of 0.1 s.
    monkeypatch.setattr(chunked, "FULL_BATCH_SECONDS", 0.1)
    reason = minibatch_route(hierarchical, data, None, None, "auto")
    assert reason.startswith("a full-batch fit would take about 0.352 s")
    assert reason.endswith("over its 0.1 s budget")
    assert minibatch_route(hierarchical, data, None, None, "full-batch") is None  # forced
