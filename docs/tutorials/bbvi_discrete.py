# %% [markdown]
# # Discrete latents with black-box VI, and why the variance matters
#
# A mixture written with explicit assignments `z` has discrete latent sites, which no
# reparameterisation gradient can reach. `method="bbvi"` fits such models as they are
# (Ranganath, Gerrish & Blei 2014): q is mean-field, with a Bernoulli or Categorical
# factor per discrete site and a Gaussian one per continuous site, and the gradient of
# the discrete factors is the score-function estimator. Plain, that estimator is far
# too noisy to use; Rao-Blackwellisation and control variates make it usable. This
# tutorial measures by how much. ([How it works](../how-it-works.md#score-function-gradients)
# has the maths.)

# %%
import time

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import viax


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 5).expand([2]).to_event(1))
    with numpyro.plate("n", len(y)):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(jnp.where(z > 0.5, mu[1], mu[0]), 1.0), obs=y)


rng = np.random.default_rng(0)
data = {"y": np.concatenate([rng.normal(-2, 1, 40), rng.normal(2, 1, 40)])}

start = time.perf_counter()
result = viax.fit(
    model, data, method="bbvi", num_particles=16, num_steps=1500, seed=0, progress=False
)
print(result)
print(f"({time.perf_counter() - start:.1f} s incl. compile)")
print(result.summary().round(2).loc[["mu[0]", "mu[1]"]])
print("Rao-Blackwellisation:", result.info["rao_blackwell"])
print("stopped by:", result.info["stop_rule"], "-", result.info["stop_reason"])
# The text below says the means are found and the run stopped, converged, before its
# 1500 steps; checked at every build of this page:
assert np.allclose(
    np.sort(np.asarray(result.sample(4000, seed=9)["mu"]).mean(0)), [-2, 2], atol=0.6
)
assert result.converged and result.num_steps < 1500

# %% [markdown]
# The two component means are found (the data were drawn around −2 and 2), and the
# assignments come with them: `result.sample(n)["z"]` draws the discrete sites too.
#
# The run stopped before its 1500 allowed steps, and says why. Like every stochastic
# path of viax, BBVI stops by default once its iterates have become stationary and the
# Monte Carlo error of their average is under 0.1 posterior scales (Adam at a constant
# rate; see the [stopping guide](../guide/stopping.md)), and `result.params` is that
# average, not the last, noisy iterate. The rule would then halve the step size and
# average again for at least as many steps; `stop_reason` "budget" means that this next
# level would not have fitted in `num_steps`, so the run ended with the precise average
# it had (converged) rather than starting a level it could not finish.

# %%
z = np.asarray(result.sample(2000, seed=1)["z"])
first, last = z[:, :40].mean(), z[:, 40:].mean()
print(f"mean of z over the first 40 points {first:.2f}, over the last 40 {last:.2f}")

# %% [markdown]
# ## The variance of the gradient
#
# `viax.gradient_variance` draws many independent gradients at the same q and returns
# the trace of their covariance, for each estimator: the plain score function, with
# Rao-Blackwellisation (each factor keeps only the terms of the joint in its Markov
# blanket), with control variates on top, and `auto` (reparameterisation for the
# continuous `mu`, the score function for `z`). We measure at q's starting point and at
# the fitted q.

# %%
estimators = ["score", "score+rb", "score+rb+cv", "auto+rb+cv"]
start = time.perf_counter()
at_start = viax.gradient_variance(model, data, estimators=estimators, num_repeats=100, seed=0)
at_fit = viax.gradient_variance(
    model, data, params=result.params, estimators=estimators, num_repeats=100, seed=0
)
print(f"({time.perf_counter() - start:.1f} s)")
for name in estimators:
    print(
        f"{name:12s} start {at_start[name]:10.3g}   fitted q {at_fit[name]:10.3g}   "
        f"plain / this at the fitted q: {at_fit['score'] / at_fit[name]:8.1f}x"
    )
# The ordering the text below describes, checked at every build of this page:
assert at_fit["score"] > at_fit["score+rb"] > at_fit["score+rb+cv"] > at_fit["auto+rb+cv"]

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6.5, 3.8))
positions = np.arange(len(estimators))
ax.bar(positions - 0.2, [at_start[n] for n in estimators], 0.4, label="at q's start")
ax.bar(positions + 0.2, [at_fit[n] for n in estimators], 0.4, label="at the fitted q")
ax.set_xticks(positions, estimators)
ax.set_yscale("log")
ax.set_ylabel("trace of the gradient's covariance")
ax.set_title("Score-function gradient variance, S = 16 draws")
ax.legend()

# %% [markdown]
# Every factor of a plated `z_n` sees only its own data point's term once
# Rao-Blackwellised, instead of the whole joint, and the control variate (a
# leave-one-out estimate of the optimal coefficient, so the gradient stays unbiased)
# removes most of what is left. The step size of a stochastic optimiser has to be small
# enough for the noisiest gradient, so each factor of ten in variance is a factor of
# ten in steps.
#
# The [BBVI benchmark](../benchmarks/bbvi_variance.md) runs the same measurement on
# posteriordb's mixture with 1000 discrete assignments, along an optimisation path and
# against NumPyro's `TraceGraph_ELBO`.
