"""Dense curvature of the full-batch set-up chosen by a memory and time budget
(viax.infer.chunked.dense_curvature_plan): the batched Hessian-vector-product Hessian
equals jax.hessian, the row-sampled one is the scaled Hessian of its rows, the host
whitening turns H into I, the arrowhead structure gives the exact Hessian from few
products (and refuses coupled sites), and the large-D MAP search (whitened L-BFGS rounds,
structured Hessians) finds the same fit as the small-D Newton path on a nested
hierarchical logistic regression."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax
from viax.families import FullRank, MeanField
from viax.infer import chunked, dadvi
from viax.model import build_target

CARRIERS, PLANES = 3, 12


def nested(hour, carrier, tail, y):
    """Flights' shape in small: raw-scale hour, planes nested in carriers, non-centred."""
    a = numpyro.sample("a", dist.Normal(0, 5))
    b = numpyro.sample("b", dist.Normal(0, 1))
    s_c = numpyro.sample("s_c", dist.HalfNormal(1))
    s_t = numpyro.sample("s_t", dist.HalfNormal(1))
    with numpyro.plate("carriers", CARRIERS):
        z_c = numpyro.sample("z_c", dist.Normal(0, 1))
    with numpyro.plate("planes", PLANES):
        z_t = numpyro.sample("z_t", dist.Normal(0, 1))
    with numpyro.plate("N", hour.shape[0]):
        logit = a + b * hour + s_c * z_c[carrier] + s_t * z_t[tail]
        numpyro.sample("y", dist.Bernoulli(logits=logit), obs=y)


def _data(num_rows=600, seed=0):
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, PLANES + 1)  # Zipf: a few busy planes, many rare ones
    tail = rng.choice(PLANES, num_rows, p=weights / weights.sum()).astype(np.int32)
    plane_carrier = np.arange(PLANES) % CARRIERS
    hour = rng.integers(5, 24, num_rows).astype(float)
    logit = -2.0 + 0.1 * hour + 0.4 * rng.normal(size=CARRIERS)[plane_carrier[tail]]
    logit += 0.6 * rng.normal(size=PLANES)[tail]
    y = (rng.random(num_rows) < 1 / (1 + np.exp(-logit))).astype(float)
    return {"hour": hour, "carrier": plane_carrier[tail].astype(np.int32), "tail": tail, "y": y}


def test_dense_plan_by_memory_and_time(monkeypatch):
    rows = {"x": np.zeros((327_346, 6))}
    dense, reason, sample = chunked.dense_curvature_plan(4170, rows)
    assert dense and reason.startswith("dense Hessian from about") and 16384 <= sample < 327_346
    dense, reason, sample = chunked.dense_curvature_plan(300, {"x": np.zeros((1000, 6))})
    assert dense and sample is None and reason.startswith("dense Hessian: 300 x 300")
    monkeypatch.setattr(chunked, "_available_memory", lambda: 1e9)  # 8 copies of 4170²: 1.1 GB
    dense, reason, _ = chunked.dense_curvature_plan(4170, rows)
    assert not dense and "over 25% of the 1 GB available" in reason
    monkeypatch.setattr(chunked, "DENSE_CURVATURE_SECONDS", 1e-6)
    dense, reason, _ = chunked.dense_curvature_plan(30, None)
    assert not dense and reason.endswith("over its 1e-06 s budget")


def test_batched_and_row_sampled_hessians(monkeypatch):
    """Forward-over-reverse columns a few at a time (lax.map) == jax.hessian; every 2nd
    block of rows, scaled by N / rows read, == the Hessian of those rows so scaled."""
    data = _data()
    target, arrays, _ = build_target(nested, data)
    u = jnp.asarray(np.random.default_rng(1).normal(size=target.dim) * 0.3)
    exact = jax.jit(jax.hessian(lambda v: -target.log_density(v, arrays)))(u)
    monkeypatch.setattr(chunked, "WHOLE_ELEMENTS", 0)  # lax.map over groups of columns
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4 * 600 * 12)  # 4 columns at a time
    assert chunked.hvp_group(target, arrays, target.dim) == 4
    algo = dadvi.build_dadvi(target, MeanField(target.dim), dense=True)
    np.testing.assert_allclose(algo.hessian(u, arrays), exact, rtol=1e-10, atol=1e-10)
    # 600 rows in 6 blocks of 100; the Hessian from blocks 0, 2, 4 (300 rows) x 2.
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 100 * 4 * (4 + 8))
    monkeypatch.setattr(chunked, "_PLANS", {})
    plan, reason = chunked.plan_chunks(target, arrays, 4, u)
    assert plan is not None and plan.num_blocks == 6, reason
    assert plan.curvature_stride(300) == 2
    sampled = dadvi.build_dadvi(plan, FullRank(target.dim), dense=True, curvature_stride=2)
    hess = sampled.hessian(u, plan.blocked(arrays))
    keep = (np.arange(600) // 100) % 2 == 0
    part = {k: (v[keep] if np.ndim(v) else v) for k, v in arrays.items()}
    rest = {k: (v[~keep] if np.ndim(v) else v) for k, v in arrays.items()}

    def estimate(v):  # prior + 2 x (rows read) = lp(read) - lp(rest) + lp(all)
        lp = target.log_density
        return -(lp(v, part) - lp(v, rest) + lp(v, arrays))

    np.testing.assert_allclose(hess, jax.jit(jax.hessian(estimate))(u), rtol=1e-9, atol=1e-9)


def test_host_whitening_turns_the_hessian_into_identity():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(5, 5))
    units = np.array([1e-3, 1.0, 1e2, 1e4, 1.0])  # raw scales: Jacobi first
    hess = units[:, None] * (basis @ basis.T + 0.1 * np.eye(5)) * units[None, :]
    scale, factor, kind = dadvi.host_whitening(hess)
    whitened = factor.T @ (scale[:, None] * hess * scale[None, :]) @ factor
    assert kind == "cholesky"
    np.testing.assert_allclose(whitened, np.eye(5), atol=1e-9)
    scale, factor, kind = dadvi.host_whitening(np.diag([4.0, -1.0, 9.0]))  # a saddle
    assert kind == "diagonal" and factor is None
    np.testing.assert_allclose(scale, [0.5, 1.0, 1 / 3])


@pytest.mark.filterwarnings("ignore:viax.fit. PSIS k-hat")
def test_whitened_map_search_equals_newton_path(monkeypatch):
    """The large-D route (dense Hessian, whitened L-BFGS rounds for the MAP, the means
    whitened by the Laplace factor, q re-whitened at its mean) on a model small enough
    for the Newton route: the same MAP and the same DADVI optimum."""
    data = _data()
    newton = viax.fit(nested, data, num_draws=32, seed=0, progress=False)
    assert newton.info["curvature"] == "dense Hessian" and newton.converged
    fit_module = sys.modules["viax.fit"]
    monkeypatch.setattr(fit_module, "_NEWTON_MAX_DIM", 4)
    # and q re-whitened at its mean after 5 DADVI steps (as above 100 latents after 50)
    monkeypatch.setattr(fit_module, "_REWHITEN_MIN_DIM", 1)
    monkeypatch.setattr(fit_module, "_REWHITEN_STEPS", 5)
    # and its Hessians from the arrowhead structure (7 columns + z_t's diagonal), as
    # above 500 latents
    monkeypatch.setattr(dadvi, "DENSE_HESSIAN_MAX_DIM", 10)
    rounds = viax.fit(nested, data, num_draws=32, seed=0, progress=False)
    assert rounds.converged and rounds.info["map_ok"], rounds.info
    assert rounds.info["map_newton_steps"] >= 2  # Hessians of the whitened rounds
    assert rounds.info["rewhitened_after"] == 5
    reason = rounds.info["curvature_reason"]
    assert reason.startswith("exact Hessian from 7 columns and the diagonal of 1"), reason
    assert "dense Hessian: 19 x 19" in reason
    sd = np.asarray(newton.family.stddev(newton.params))
    mean = np.asarray(newton.family.mean(newton.params))
    # The same fixed-draw optimum, L-BFGS stopped at gradient 1e-7 through another
    # preconditioner: agreement to ~1e-6 sd.
    assert np.max(np.abs(rounds.family.mean(rounds.params) - mean) / sd) < 1e-4
    np.testing.assert_allclose(rounds.family.stddev(rounds.params), sd, rtol=1e-4)


def test_structured_hessian_is_exact_and_coupling_is_refused():
    """The arrowhead structure (z_t's block diagonal: each row touches one plane) gives
    jax.hessian from 7 columns + 1 indicator product; taking z_c diagonal too (coupled
    to z_t through the rows of each plane) fails the check and is refused."""
    data = _data()
    target, arrays, init = build_target(nested, data)

    def negative(u, d):
        return -target.log_density(u, d)

    structure, why = chunked.hessian_structure(negative, arrays, np.asarray(init), target.sites)
    assert structure is not None and structure.products == 8, why
    assert structure.diagonal_sites == ((7, PLANES),) and "z_t (12)" in why
    u = jnp.asarray(np.random.default_rng(2).normal(size=target.dim) * 0.3)
    exact = jax.jit(jax.hessian(lambda v: negative(v, arrays)))(u)
    algo = dadvi.build_dadvi(
        target, MeanField(target.dim), dense=True, curvature_structure=structure
    )
    np.testing.assert_allclose(algo.hessian(u, arrays), exact, rtol=1e-12, atol=1e-12)
    coupled, why = chunked.hessian_structure(
        negative, arrays, np.asarray(init), target.sites, max_columns=4
    )
    assert coupled is None and why.startswith("no structure: the sites (z_t (12), z_c (3))"), why
