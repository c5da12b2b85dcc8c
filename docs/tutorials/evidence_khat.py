# %% [markdown]
# # Can I trust it? Evidence and k̂
#
# A variational fit always returns an answer. Two numbers say how much to believe it:
#
# * **k̂** (Yao, Vehtari, Simpson & Gelman 2018), the shape of the generalised Pareto
#   distribution fitted to the largest importance ratios p(x, z)/q(z) on q's draws:
#   below 0.5 q is good, 0.5–0.7 usable (importance resampling corrects it), above 0.7
#   do not trust q, its draws or its ELBO;
# * **the evidence** log p(x): the ELBO is a lower bound on it, the importance-weighted
#   bounds L_K tighten the bound as K grows, and an importance-sampling estimate
#   approaches log p(x) itself. The gap between the ELBO and log p(x) is KL(q ‖ p).

# %%
import json
import warnings

import numpy as np

import viax
from eight_schools import model  # examples/eight_schools.py

with open("examples/data/eight_schools.json") as file:
    data = json.load(file)
fits = {
    family: viax.fit(model, data, family=family, seed=0, progress=False)
    for family in ("meanfield", "fullrank")
}
for family, result in fits.items():
    ev = result.log_evidence(num_samples=10_000, seed=0)
    print(
        f"{family:9s}  k-hat {result.khat:.2f} ({result.khat_verdict:12s})  ELBO {ev.elbo:8.3f} ± {ev.elbo_se:.3f}"
        f"  L_100 {ev.iwae[100][0]:8.3f}  log p(x) {ev.log_p:8.3f} ± {ev.log_p_se:.3f}"
    )

# %% [markdown]
# Both families reach about the same log p(x), as they must (it is a property of the
# model and the data, not of q); the full-rank q has the higher ELBO, so the smaller KL
# to the posterior. `result.diagnostics()` puts all of it in one table:

# %%
print(fits["fullrank"].diagnostics())

# %% [markdown]
# ## The plots
#
# `result.plot()` draws the ELBO trace and a histogram of q's marginal for each element
# (the first 16). `reference=` overlays moments or draws of a reference posterior; here
# the importance-resampled draws of the same fit, which correct q towards the posterior
# where k̂ allows:

# %%
result = fits["fullrank"]
reference = result.sample(4000, seed=3, importance_resample=True)
figure = result.plot(reference={k: reference[k] for k in ("mu", "tau", "theta")}, max_panels=8)

# %% [markdown]
# ## A fit not to trust
#
# A mean-field q cannot represent correlation. On a Gaussian posterior with correlation
# 0.99 it is far too narrow in the direction of the ridge, its ELBO is far below log p(x),
# and k̂ says so: `viax.fit` warns, and the verdict is "do not trust".

# %%
import jax.numpy as jnp
from numpyro.distributions import constraints

rho = 0.99
precision = np.linalg.inv(np.array([[1.0, rho], [rho, 1.0]]))
correlated = viax.Model(
    lambda v: -0.5 * jnp.stack([v["a"], v["b"]]) @ precision @ jnp.stack([v["a"], v["b"]]),
    latents={"a": constraints.real, "b": constraints.real},
)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    narrow = viax.fit(correlated, {}, family="meanfield", seed=0, progress=False)
for warning in caught:
    print(f"{warning.category.__name__}: {warning.message}")
exact = viax.fit(correlated, {}, family="fullrank", seed=0, progress=False)
for name, fit in (("meanfield", narrow), ("fullrank", exact)):
    draws = fit.sample(10_000, seed=1)
    print(
        f"{name:9s}  k-hat {fit.khat:6.2f} ({fit.khat_verdict:12s})  sd of a {np.std(draws['a']):.3f} (exact 1)"
    )
exact_log_p = 0.5 * np.log(np.linalg.det(np.linalg.inv(precision))) + np.log(2 * np.pi)
assert narrow.khat_verdict == "do not trust" and exact.khat_verdict == "good"
print(
    f"log p(x): exact {exact_log_p:.3f}; mean-field ELBO {narrow.elbo:.3f}, full-rank ELBO {exact.elbo:.3f}"
)

# %% [markdown]
# The full-rank q is the exact posterior here (k̂ is −∞ when every importance ratio is
# equal), and its ELBO equals the exact log normaliser. The
# [k̂ benchmark](../benchmarks/posteriordb_diagnostics.md) runs the same check on seven
# posteriordb posteriors: every fit whose marginal sds are badly shrunk gets "do not
# trust", the others "good" or "usable".
