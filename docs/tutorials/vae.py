# %% [markdown]
# # A variational autoencoder
#
# A VAE is a latent-variable model with parameters θ (the decoder's weights) and one
# latent z_n per row, fitted with an amortized q: one network (the encoder) maps each
# row x_n to the mean and sd of q(z_n | x_n). In viax the decoder is a `numpyro.param`
# site (here an equinox MLP registered with `eqx_module`), `encoder=` gives the
# encoder, and `objective=viax.IWAE(num_samples=K)` the importance-weighted bound.
# `viax.fit` learns θ and the encoder together; `result.log_evidence(data=...)`
# estimates the held-out log-likelihood by importance sampling, with its standard error.
#
# The data are scikit-learn's 8×8 digits, binarized (no download); a few epochs keep the
# page's build short. `examples/vae.py` trains the same model longer, and
# `benchmarks/vae_mnist.py` trains the VAE of Burda et al. (2016) on MNIST
# (see the [learning guide](../guide/learning.md)).

# %%
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import eqx_module
from sklearn.datasets import load_digits

import viax

# A pixel is on when its grey level is above 8 of 16.  float32 data: the minibatch
# path then trains the networks in float32 (float64 data would train in float64).
x_all = (load_digits().data > 8).astype(np.float32)
order = np.random.default_rng(0).permutation(len(x_all))
x_train, x_test = x_all[order[300:]], x_all[order[:300]]
print("train", x_train.shape, "test", x_test.shape, f"pixels on: {x_train.mean():.0%}")

# %% [markdown]
# ## The model
#
# z_n ~ N(0, I₄), and the 64 pixels of x_n are independent Bernoullis whose logits the
# decoder computes from z_n. The rows' plate tells viax which latents are local.

# %%
LATENT = 4
decoder_net = eqx.nn.MLP(LATENT, 64, 64, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(1))


def vae(x):
    decoder = eqx_module("decoder", decoder_net)
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=jax.vmap(decoder)(z)).to_event(1), obs=x)


# %% [markdown]
# ## The fit
#
# An MLP encoder with one hidden layer of 64 units, the IWAE bound with K = 5 importance
# samples (with the doubly reparameterised gradient for the encoder), minibatches of
# 100 rows, Adam.

# %%
start = time.perf_counter()
result = viax.fit(
    vae,
    {"x": x_train},
    encoder=viax.MLPEncoder(hidden_sizes=(64,), activation="tanh"),
    objective=viax.IWAE(num_samples=5),
    batch_size=100,
    num_epochs=30,
    seed=0,
    progress=False,
)
print(f"{time.perf_counter() - start:.1f} s including compilation")
per_epoch = result.info["epoch_objective"] / len(x_train)
print("IWAE bound per row, every 5th epoch:", per_epoch[::5].round(2))
print(
    "learned θ:",
    {
        name: [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(value)]
        for name, value in result.model_params.items()
    },
)

# %% [markdown]
# ## Held-out log-likelihood
#
# For each test row, `log_evidence(data=...)` draws z from the encoder's q(z | x) and
# returns the Pareto-smoothed importance-sampling estimate of log p_θ(x), its standard
# error and k̂; also the ELBO of the same draws. log p(x) ≥ ELBO for every row, so the
# estimate must be above the ELBO, by more than its error.

# %%
evidence = result.log_evidence(data={"x": x_test}, num_samples=1000)
rows = len(x_test)
print(f"held-out log p(x) per row: {evidence.log_p / rows:.3f} ± {evidence.log_p_se / rows:.3f}")
print(f"ELBO per row:              {evidence.elbo / rows:.3f}")
print(f"IWAE bound (K = 1000):     {evidence.iwae / rows:.3f}")
print(f"rows with k-hat ≥ 0.7: {100 * evidence.fraction_untrusted:.1f}%")

# The claims above, checked at every build of this page.
assert np.isfinite(evidence.log_p) and evidence.log_p_se > 0
assert evidence.log_p - 3 * evidence.log_p_se > evidence.elbo
assert per_epoch[-1] > per_epoch[0]  # training raised the bound

# %% [markdown]
# ## Digits from the model
#
# Left: test digits. Right: the decoder's pixel probabilities at draws z ~ N(0, I) from
# the prior, read off the model's own trace with the learned θ substituted (NumPyro's
# `handlers`), so nothing here depends on how the decoder is stored.

# %%
import matplotlib.pyplot as plt

z = jax.random.normal(jax.random.PRNGKey(2), (16, LATENT))
learned = handlers.substitute(vae, data=result.model_params)
trace = handlers.trace(handlers.condition(learned, data={"z": z})).get_trace(
    x=np.zeros((16, 64), np.float32)
)
probabilities = np.asarray(jax.nn.sigmoid(trace["x"]["fn"].base_dist.logits))

fig, axes = plt.subplots(4, 9, figsize=(7.2, 3.6), gridspec_kw={"wspace": 0.08, "hspace": 0.08})
for i, ax in enumerate(axes[:, :4].ravel()):
    ax.imshow(x_test[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
for i, ax in enumerate(axes[:, 5:].ravel()):
    ax.imshow(probabilities[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
for ax in axes[:, 4]:
    ax.set_axis_off()
fig.text(0.31, 0.93, "test digits", ha="center")
fig.text(0.73, 0.93, "samples: p(x | z), z ~ N(0, I)", ha="center")

# %% [markdown]
# ## What to take away
#
# * `numpyro.param` sites (or a network through `eqx_module`) are learned with q:
#   `result.model_params` holds them.
# * `encoder=viax.MLPEncoder(...)` amortizes the per-row q; `objective=viax.IWAE(K)`
#   tightens the bound; `batch_size=`/`num_epochs=` train on minibatches.
# * `result.log_evidence(data=...)` gives the held-out log-likelihood with its standard
#   error and k̂ per row: a number to compare models by, unlike the training objective.
