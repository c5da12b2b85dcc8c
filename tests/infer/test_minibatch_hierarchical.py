"""Minibatch VI on a hierarchical logistic regression (raw-scale predictor, a few large
groups and many small ones, as in the flights benchmark) against viax's full-batch
mean-field fit of the same model: the minibatch default either agrees with it (means
within 0.1 posterior sd, sds within 10%) or says it did not converge."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax
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


# Mean-field q of a hierarchical posterior: k̂ above 0.7 is expected, and not the test.
@pytest.mark.filterwarnings("ignore:viax.fit. PSIS k-hat")
def test_hierarchical_minibatch_agrees_with_the_full_batch_fit():
    """The whitening is a mean-field DADVI fit on the subsample (the joint MAP of a
    hierarchical model is degenerate), then averaged Adam steps on batches of 256 rows.
    Tolerances: the issue's 0.1 sd and 10%, less the Monte Carlo error of 20,000 draws
    (0.007 sd on a mean, 0.5% on an sd).  Measured: worst 0.033 sd and 2.3%."""
    data, groups = hierarchical_data()
    model = make_model(groups)
    # 256 fixed draws: the reference's own Monte Carlo error on the sds is then ~2%
    # (128 draws put sd(log s0) 12% off the 1024-draw fit).
    full = viax.fit(model, data, path="full-batch", num_draws=256, seed=0, progress=False)
    # evaluate=False: the final ELBO/k̂ pass is not what is tested (and costs a compile).
    mini = fit_minibatch(model, data, batch_size=256, evaluate=False, seed=0, progress=False)
    assert "DADVI" in mini.info["preconditioner"]
    assert mini.converged, mini.message
    ref, got = moments(full), moments(mini)
    for name, (mean, sd) in ref.items():
        m, s = got[name]
        assert np.max(np.abs(m - mean) / sd) < 0.1, name
        assert np.max(np.abs(s / sd - 1)) < 0.1, name
