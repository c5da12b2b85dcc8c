"""Minibatch VI on a hierarchical logistic regression (raw-scale predictor, a few large
groups and many small ones, as in the flights benchmark) against viax's full-batch
mean-field fit of the same model: the minibatch default either agrees with it (means
within 0.1 posterior sd, sds within 10%) or says it did not converge."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax
from viax import data as vdata
from viax.batched import ROWS
from viax.infer import minibatch
from viax.infer.chunked import hessian_structure, structured_hessian
from viax.infer.minibatch import fit_minibatch


def hierarchical_data(n=1000, groups=(4, 50), seed=0):
    rng = np.random.default_rng(seed)
    hour = rng.uniform(5, 23, n).round()
    eta = -1.5 + 0.08 * hour
    data = {"hour": hour}
    for k, (size, sigma, skew) in enumerate(zip(groups, (0.5, 0.8), (0.5, 2.0), strict=True)):
        weights = np.exp(rng.normal(0, skew, size))  # skewed: many groups of 1-5 rows
        g = rng.choice(size, n, p=weights / weights.sum()).astype(np.int32)
        data[f"g{k}"] = g
        eta = eta + sigma * rng.normal(size=size)[g]
    data["y"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    return data, groups


def make_model(groups):
    def model(hour, g0, g1, y):
        a = numpyro.sample("a", dist.Normal(0, 5))
        b = numpyro.sample("b", dist.Normal(0, 1))
        eta = a + b * hour
        for k, (size, g) in enumerate(zip(groups, (g0, g1), strict=True)):
            s = numpyro.sample(f"s{k}", dist.HalfNormal(1))
            with numpyro.plate(f"groups{k}", size):
                z = numpyro.sample(f"z{k}", dist.Normal(0, 1))
            eta = eta + s * z[g]
        with numpyro.plate("N", hour.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)

    return model


def moments(result, num=20_000):
    """Mean and sd of every latent from draws of q; scales on the log scale (q's own)."""
    out = {}
    for name, value in result.sample(num, seed=1).items():
        value = np.asarray(value).reshape(num, -1)
        value = np.log(value) if name.startswith("s") else value
        out[name] = value.mean(0), value.std(0)
    return out


@pytest.fixture(scope="module")
def reference():
    """The model, its data and viax's full-batch mean-field fit's moments.  256 fixed
    draws: the reference's own Monte Carlo error on the sds is then ~2% (128 draws put
    sd(log s0) 12% off the 1024-draw fit)."""
    data, groups = hierarchical_data()
    model = make_model(groups)
    full = viax.fit(model, data, path="full-batch", num_draws=256, seed=0, progress=False)
    return model, data, moments(full)


def agree(ref, mini):
    got = moments(mini)
    for name, (mean, sd) in ref.items():
        m, s = got[name]
        assert np.max(np.abs(m - mean) / sd) < 0.1, name
        assert np.max(np.abs(s / sd - 1)) < 0.1, name


# Mean-field q of a hierarchical posterior: k̂ above 0.7 is expected, and not the test.
@pytest.mark.filterwarnings("ignore:viax.fit. PSIS k-hat")
def test_hierarchical_minibatch_agrees_with_the_full_batch_fit(reference):
    """The whitening is a mean-field DADVI fit on the subsample (the joint MAP of a
    hierarchical model is degenerate), then averaged Adam steps on batches of 256 rows.
    Tolerances: the issue's 0.1 sd and 10%, less the Monte Carlo error of 20,000 draws
    (0.007 sd on a mean, 0.5% on an sd).  Measured: worst 0.033 sd and 2.3%."""
    model, data, ref = reference
    # evaluate=False: the final ELBO/k̂ pass is not what is tested (and costs a compile).
    mini = fit_minibatch(model, data, batch_size=256, evaluate=False, seed=0, progress=False)
    assert "DADVI" in mini.info["preconditioner"]
    assert mini.converged, mini.message
    agree(ref, mini)


@pytest.mark.filterwarnings("ignore:viax.fit. PSIS k-hat")
def test_large_hierarchical_set_up_uses_every_row(reference, monkeypatch):
    """Above 256 global latents (flights: 4,170) the set-up resumes the subsample's
    mean-field fit on every row and whitens by the ELBO's Hessian in the means over
    every row: the exact Hessian from its arrowhead structure with the diagonal
    E_q[diag] (:func:`viax.infer.minibatch._full_whitening`, :func:`_full_dadvi`); here
    the threshold is lowered to 32 so that this 58-latent model takes that path, and
    the subsample is 256 of the 1,000 rows, so that its fit (each row counted 4 times)
    is not the full data's.  As for flights, the steps apply the dense whitening in
    float32 (``_F32_WHITENING_DIM`` lowered alike).  Same tolerances as above."""
    model, data, ref = reference
    monkeypatch.setattr(minibatch, "_MAX_DENSE_DIM", 32)
    monkeypatch.setattr(minibatch, "_F32_WHITENING_DIM", 32)
    mini = fit_minibatch(
        model,
        data,
        batch_size=256,
        num_precondition_rows=256,
        evaluate=False,
        seed=0,
        progress=False,
    )
    assert mini.info["curvature_reason"].startswith("exact Hessian from 8 columns"), mini.info
    assert "E_q[Hessian] over every row" in mini.info["preconditioner"]
    assert "resumed on every row" in mini.info["preconditioner"]
    assert mini.info["full_dadvi_converged"], mini.info
    # The set-up ends at the full data's mean-field fixed point (up to its 16 draws).
    assert mini.info["setup_decrement"] < 0.01, mini.info
    assert mini.converged, mini.message
    agree(ref, mini)


def test_full_data_passes_are_exact():
    """The set-up's passes over every row of a large hierarchical model (products, the
    gradient and the Hessian's diagonal averaged over draws, the fixed-draw ELBO and its
    gradient in (m, log s)), summed over padded, masked
    batches, and the arrowhead structure (:func:`viax.infer.chunked.hessian_structure`)
    that gives the whole Hessian from K + 1 products: against ``jax.hessian`` and
    ``jax.grad`` of the whole data's log density."""
    rows, batch_size = 300, 64  # 4 batches and a padded fifth: the mask is exercised
    data, groups = hierarchical_data(n=rows, groups=(3, 20))
    model = make_model(groups)
    source = vdata.as_source(data)
    bm, constants = minibatch._analyse_cached(model, source, batch_size)

    def put(batch):
        return {k: jnp.asarray(v) for k, v in batch.items() if k != "_index"}

    constants = put(constants)
    first = put(next(iter(minibatch._first_epoch(source, batch_size, 0, (0, 1)))))
    full = minibatch._full_data(
        bm, source, batch_size, 0, (0, 1), put, constants, {**constants, **first}
    )
    dim = bm.global_dim
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(0, 0.3, dim))
    draws = jnp.asarray(rng.normal(0, 0.3, (2, dim)))
    whole = {**constants, **put(data), ROWS: jnp.arange(rows)}
    negative = minibatch._negative_log_joint(bm)
    hessian = jax.jit(jax.hessian(negative))
    exact = hessian(u, 1.0, whole)
    scale = float(jnp.max(jnp.abs(exact)))

    structure, reason = hessian_structure(
        lambda v, b: negative(v, 1.0, b), whole, np.asarray(u), bm.global_sites
    )
    assert structure is not None, reason
    assert structure.diagonal_sites == ((dim - 20, 20),)  # z1, the largest site
    probes = jnp.asarray(structure.probes(dim, np.float64))
    hess = structured_hessian(full.products(u, probes), structure, dim)
    assert float(jnp.max(jnp.abs(hess - exact))) < 1e-12 * scale

    grad = np.mean([-jax.grad(negative)(z, 1.0, whole) for z in draws], axis=0)
    np.testing.assert_allclose(full.gradient(draws), grad, rtol=1e-10, atol=1e-10 * scale)
    diag = np.mean([jnp.diagonal(hessian(z, 1.0, whole)) for z in draws], axis=0)
    np.testing.assert_allclose(full.diagonal(draws), diag, rtol=1e-10, atol=1e-12 * scale)

    x = jnp.concatenate([u, jnp.log(jnp.full(dim, 0.2))])

    def negative_elbo(x):
        z = x[:dim] + jnp.exp(x[dim:]) * draws
        return jnp.mean(jax.vmap(lambda v: negative(v, 1.0, whole))(z)) - jnp.sum(x[dim:])

    value, grad = full.dadvi(x, draws)
    np.testing.assert_allclose(value, negative_elbo(x), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(negative_elbo)(x), rtol=1e-10, atol=1e-10 * scale)
