"""Crossed random effects (each row touching a level of a and a level of b) on the
minibatch path: the set-up's Hessian has no arrowhead structure (the effects of a and b
are coupled through the rows), so it takes the block structure that drops the blocks
between the two sites (:func:`viax.infer.chunked.hessian_structure`, ``within_sites``),
resumes the mean-field fit on every row.  The stochastic phase that follows has been seen
to wander off the full-batch fit on such models: the result carries a caveat, which
viax.fit warns with."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from viax.batched import ROWS
from viax.data import as_source
from viax.fit import _warn_untrusted
from viax.infer import chunked, minibatch
from viax.infer.chunked import hessian_structure, structured_hessian


def crossed_data(n=1000, levels=(30, 25), seed=0):
    """Logistic rows with two crossed Zipf-sized groupings and an uncentred predictor."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(5, 23, n).round()
    eta = -1.0 + 0.06 * x
    data = {"x": x}
    for name, size, sigma in zip(("a", "b"), levels, (0.7, 0.5), strict=True):
        weights = 1.0 / np.arange(1, size + 1) ** 0.8
        level = rng.choice(size, n, p=weights / weights.sum()).astype(np.int32)
        data[name] = level
        eta = eta + sigma * rng.normal(size=size)[level]
    data["y"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    return data


def make_model(levels):
    def model(x, a, b, y):
        alpha = numpyro.sample("alpha", dist.Normal(0, 5))
        beta = numpyro.sample("beta", dist.Normal(0, 1))
        s_a = numpyro.sample("s_a", dist.HalfNormal(1))
        s_b = numpyro.sample("s_b", dist.HalfNormal(1))
        with numpyro.plate("A", levels[0]):
            z_a = numpyro.sample("z_a", dist.Normal(0, 1))
        with numpyro.plate("B", levels[1]):
            z_b = numpyro.sample("z_b", dist.Normal(0, 1))
        eta = alpha + beta * x + s_a * z_a[a] + s_b * z_b[b]
        with numpyro.plate("N", x.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)

    return model


def test_block_structure_of_crossed_effects():
    """The exact check refuses crossed effects and the within-site check (same batch of
    products) accepts them; the structured Hessian is then the exact one with the
    z_a × z_b block zeroed (the head's columns and each site's diagonal exact): against
    ``jax.hessian``."""
    levels = (6, 5)
    data = crossed_data(n=200, levels=levels)
    bm, constants = minibatch._analyse_cached(make_model(levels), as_source(data), 64)
    whole = {k: jnp.asarray(v) for k, v in {**constants, **data}.items()}
    whole[ROWS] = jnp.arange(200)
    negative = minibatch._negative_log_joint(bm)
    dim = bm.global_dim
    u = np.random.default_rng(0).normal(0, 0.3, dim)
    exact = np.asarray(jax.jit(jax.hessian(negative))(jnp.asarray(u), 1.0, whole))
    structure, reason = hessian_structure(
        lambda v, b: negative(v, 1.0, b),
        whole,
        u,
        bm.global_sites,
        max_columns=4,
        within_sites=True,
    )
    assert structure is not None, reason
    assert "between those sites dropped (coupled: check error" in reason, reason
    (za, na), (zb, nb) = sorted(structure.diagonal_sites)
    assert (na, nb) == levels
    probes = structure.probes(dim, np.float64)
    hess = np.asarray(structured_hessian(jnp.asarray(probes @ exact), structure, dim))
    expected = exact.copy()
    assert np.abs(exact[za : za + na, zb : zb + nb]).max() > 1e-3  # really coupled
    expected[za : za + na, zb : zb + nb] = 0.0
    expected[zb : zb + nb, za : za + na] = 0.0
    np.testing.assert_allclose(hess, expected, rtol=0, atol=1e-12 * np.abs(exact).max())


def test_crossed_set_up_resumes_on_every_row(monkeypatch):
    """The large-model set-up of a crossed model (the threshold lowered to 32 latents and
    the structure's columns to 4, so that its 59 latents take the path thousands would;
    the subsample is 256 of the 1,000 rows, each counted 4 times): whitened by the
    block-structured E_q Hessian over every row, the mean-field fit is resumed on every
    row and converges, and ends at the full data's mean-field fixed point: the decrement
    gᵀ|H̃|⁻¹g / D of the E_q gradient over every row (32 fresh draws) under 0.01
    posterior sd² per coordinate.  Measured: 0.0036 (30 passes).  Before (the
    subsample's dense Hessian, the fit resumed on the subsample) the same model's fit
    took 18,500 steps, with the resumption 8,520 (a session script); at 200,000 rows
    the old set-up left both scales about 3 sd off the full-batch fit
    (benchmarks/results/crossed_minibatch.md)."""
    levels = (30, 25)
    data = crossed_data(levels=levels)
    structure_fn = chunked.hessian_structure
    monkeypatch.setattr(
        chunked, "hessian_structure", lambda *a, **k: structure_fn(*a, max_columns=4, **k)
    )
    monkeypatch.setattr(minibatch, "_MAX_DENSE_DIM", 32)
    source = as_source(data)
    bm, constants = minibatch._analyse_cached(make_model(levels), source, 256)

    def put(batch):  # as fit_minibatch's put_batch (the padded batch's mask kept)
        return {k: jnp.asarray(v) for k, v in batch.items() if k != "_index"}

    constants = put(constants)
    sample = put(minibatch._rows_of(source, 256, 256, 0, (0, 1)))
    batch = {**constants, **{k: v for k, v in sample.items() if k != minibatch._MASK}}
    full = minibatch._full_data(bm, source, 256, 0, (0, 1), put, constants, batch)
    _, info = minibatch._whitening(
        bm, batch, 256, np.zeros(bm.global_dim), symmetric=True, full=full
    )
    assert "blocks between those sites dropped" in info["curvature_reason"], info
    assert info["curvature_reason"].endswith("over every row"), info
    assert "resumed on every row" in info["preconditioner"], info
    assert info["full_dadvi_converged"], info
    assert info["setup_decrement"] < 0.01, info
    # What the stochastic phase does next on such models is not yet trusted: said.
    assert info["caveat"].startswith("crossed effects"), info


def test_a_caveat_in_the_result_is_a_warning():
    """viax.fit turns ``info["caveat"]`` (the crossed-effects set-up's) into a warning
    naming it, beside the convergence and k̂ verdicts."""
    result = types.SimpleNamespace(
        info={"caveat": "crossed effects: check"}, converged=True, khat=0.1
    )
    with pytest.warns(RuntimeWarning, match="viax.fit: crossed effects: check"):
        _warn_untrusted(result)
