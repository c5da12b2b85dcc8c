# %% [markdown]
# # A minibatch fit from Parquet
#
# When the data live in a file, `viax.fit` does not need them in memory: a
# `viax.data.parquet` source streams the file's row groups through a shuffle buffer, and
# each optimisation step sees one minibatch, its likelihood scaled by N/B. This tutorial
# writes a synthetic logistic regression with raw-scale predictors to a Parquet file,
# fits it streamed from disk, and checks the answer against the exact large-sample
# posterior (a Newton solve for the MAP and the Hessian there: the Laplace
# approximation, which at this many rows is the posterior to well under a tenth of a
# posterior sd).
#
# The sizes are small so that the page builds in seconds; `benchmarks/synthetic_logistic.py`
# runs the same comparison at 10⁶ rows (see the [scale guide](../guide/scale.md)).

# %%
import tempfile
import time
from pathlib import Path

import numpy as np
import numpyro
import numpyro.distributions as dist
import pyarrow as pa
import pyarrow.parquet as pq

import viax

rng = np.random.default_rng(0)
n = 100_000
# Raw scales, as they come in a table: age in years, income in thousands, a 0/1 flag.
age = rng.normal(45.0, 12.0, n)
income = rng.lognormal(np.log(50.0), 0.4, n)
member = (rng.random(n) < 0.3).astype(float)
true = {"a": -3.0, "b": np.array([0.04, 0.01, 0.8])}
logit = true["a"] + true["b"][0] * age + true["b"][1] * income + true["b"][2] * member
y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)

scratch = Path(tempfile.mkdtemp(prefix="viax-tutorial-"))
table = pa.table({"age": age, "income": income, "member": member, "bought": y})
pq.write_table(table, scratch / "customers.parquet", row_group_size=10_000)
meta = pq.ParquetFile(scratch / "customers.parquet").metadata
print(
    f"{meta.num_rows} rows in {meta.num_row_groups} row groups, "
    f"{(scratch / 'customers.parquet').stat().st_size / 1e6:.1f} MB"
)

# %% [markdown]
# ## The model and the source
#
# The model is written for any number of rows: called with a batch, its plate over the
# rows has the batch's size. The source names the batch's entries: a list of columns is
# stacked into a matrix `X`, a single column is taken as is.


# %%
def model(X, y):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with numpyro.plate("rows", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ b), obs=y)


source = viax.data.parquet(
    scratch / "customers.parquet", columns={"X": ["age", "income", "member"], "y": "bought"}
)
print(source)

# %% [markdown]
# ## The minibatch fit
#
# `batch_size=` chooses the minibatch path (a Parquet source alone would too).
# `family="fullrank"` because raw-scale predictors make the intercept and the slopes
# strongly correlated. The fit whitens the problem with the MAP and curvature of a
# subsample, uses a control variate anchored there, and stops when the iterate average's
# Monte Carlo standard error (`info["mcse"]`, in posterior sds) is under 0.1.

# %%
start = time.perf_counter()
result = viax.fit(model, source, batch_size=1024, family="fullrank", seed=0, progress=False)
seconds = time.perf_counter() - start
info = result.info
print(f"path: {info['path']} ({info['path_reason']})")
print(
    f"converged: {result.converged} after {result.num_steps} steps, "
    f"{info['epochs']:.2f} epochs, {seconds:.1f} s including compilation"
)
print(
    f"{info['rows_per_second']:,.0f} rows/s; waited for data "
    f"{info['wait_fraction']:.0%} of the time"
)
# The MCSE of each variational parameter, in the whitened coordinates the fit works in
# (about N(0, I) under the posterior): "loc" is that of the posterior means.
print("MCSE of the means (posterior sds):", info["mcse"]["loc"].round(3))
print(f"ELBO {result.elbo:.2f} ± {result.elbo_se:.2f}, k-hat {result.khat:.2f}")

# %% [markdown]
# ## The reference: Newton's method on all rows
#
# For a logistic regression the log posterior is concave; Newton's method finds its
# maximum in a few iterations, and the inverse Hessian there is the Laplace covariance.

# %%
D = np.column_stack([np.ones(n), age, income, member])
prior_precision = np.diag([1 / 10.0**2, 1.0, 1.0, 1.0])
w = np.zeros(4)
for _ in range(30):
    p = 1 / (1 + np.exp(-(D @ w)))
    gradient = D.T @ (y - p) - prior_precision @ w
    hessian = D.T @ (D * (p * (1 - p))[:, None]) + prior_precision
    step = np.linalg.solve(hessian, gradient)
    w += step
    if np.abs(step).max() < 1e-10:
        break
laplace_cov = np.linalg.inv(hessian)
laplace_sd = np.sqrt(np.diag(laplace_cov))
corr = laplace_cov / np.outer(laplace_sd, laplace_sd)
print("Laplace mean", w.round(4), "sd", laplace_sd.round(5))
print(f"largest posterior correlation: {np.abs(corr - np.eye(4)).max():.3f}")

summary = result.summary(20_000)
viax_mean = summary["mean"].to_numpy()
viax_sd = summary["sd"].to_numpy()
error = (viax_mean - w) / laplace_sd
# A mean's error in its own sd units is a combination of the whitened errors with
# weights of unit norm, so its MCSE is at most the largest whitened one.
mcse = np.full(4, info["mcse"]["loc"].max())
print(
    summary[["mean", "sd"]].assign(
        laplace_mean=w, laplace_sd=laplace_sd, error_in_sd=error.round(3)
    )
)

# %% [markdown]
# The claims of this page, checked at every build: the fit took the minibatch path,
# converged, and every posterior mean is within the reported Monte Carlo error (3 MCSE,
# plus 0.05 sd for what separates q from the Laplace approximation and the final sample
# of 20,000 draws) of the Newton/Laplace answer; the sds agree to 10%.

# %%
assert info["path"] == "minibatch" and result.converged
assert np.all(np.abs(error) < 3 * mcse + 0.05), (error, mcse)
assert np.all(np.abs(viax_sd / laplace_sd - 1) < 0.1), viax_sd / laplace_sd

# %% [markdown]
# ## The picture
#
# Left, the ELBO estimate of each step (noisy: each is one minibatch's estimate, scaled
# to all rows); right, each posterior mean's distance from the exact one, in posterior
# sds, with the ± 3 MCSE band the fit reports (the largest whitened MCSE).

# %%
import matplotlib.pyplot as plt

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
result.plot_elbo(ax=left)
left.set_title("ELBO per step")
names = ["a", "b[age]", "b[income]", "b[member]"]
right.errorbar(range(4), error, yerr=3 * mcse, fmt="o", capsize=4)
right.axhline(0, color="black", lw=0.8)
right.set_xticks(range(4), names)
right.set_ylabel("(viax − Laplace mean) / Laplace sd")
right.set_title("minibatch fit from Parquet vs Newton/Laplace")
fig.tight_layout()

# %% [markdown]
# ## What to take away
#
# * `viax.fit(model, viax.data.parquet(path, columns=...), batch_size=B)` fits from disk
#   with memory flat in the number of rows; `transform=` computes derived columns and drops
#   rows on the fly ([data guide](../guide/data.md)).
# * The stopping rule is statistical: `info["mcse"]` says how far the answer may be from
#   the optimum of the ELBO, in posterior sds.
# * `info["wait_fraction"]` is the share of the run spent waiting for the reader: near 0
#   when reading keeps up with the steps. With four parameters a step costs next to nothing,
#   so here reading the file is a visible share; a larger model hides it.
