"""A variational autoencoder on binarized scikit-learn digits, with viax.

The decoder p_θ(x | z) is an equinox MLP registered with ``numpyro.contrib.module``
(``eqx_module``): its weights are a ``numpyro.param`` site that viax learns.  The
encoder q_φ(z | x) is ``viax.MLPEncoder``; the objective is the importance-weighted
bound with DReG gradients.  The held-out log-likelihood is estimated per row by
importance sampling with PSIS k̂.

    python examples/vae.py            # ~1 minute on a laptop core
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

import viax

LATENT_DIM = 4
HIDDEN = 64


def load_digits(seed: int = 0):
    """Binarized 8×8 digits (a pixel is on when its grey level is above 8 of 16):
    (train, test) arrays of 0/1 floats, 1497 and 300 rows of 64 pixels."""
    from sklearn.datasets import load_digits as sklearn_digits

    x = (sklearn_digits().data > 8).astype(float)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order[300:]], x[order[:300]]


decoder_net = eqx.nn.MLP(
    LATENT_DIM, 64, HIDDEN, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(1)
)


def vae(x):
    """x (N, 64) in {0, 1}: z_n ~ N(0, I), x_n | z_n ~ Bernoulli(sigmoid(decoder(z_n)))."""
    decoder = eqx_module("decoder", decoder_net)
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT_DIM]).to_event(1))
        logits = jax.vmap(decoder)(z)
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def main(
    num_epochs: int = 100,
    batch_size: int = 100,
    num_samples: int = 5,
    num_test_samples: int = 1000,
    seed: int = 0,
):
    x_train, x_test = load_digits(seed)
    result = viax.fit(
        vae,
        {"x": x_train},
        encoder=viax.MLPEncoder(hidden_sizes=(HIDDEN,), activation="tanh"),
        objective=viax.IWAE(num_samples=num_samples),
        batch_size=batch_size,
        num_epochs=num_epochs,
        seed=seed,
    )
    print(result)
    epochs = result.info["epoch_objective"]
    if epochs.size:
        print(
            f"IWAE bound per row: first epoch {epochs[0] / len(x_train):.3f}, "
            f"last {epochs[-1] / len(x_train):.3f}"
        )
    evidence = result.log_evidence(data={"x": x_test}, num_samples=num_test_samples)
    rows = len(x_test)
    print(
        f"held-out log p(x) per row: {evidence.log_p / rows:.3f} ± {evidence.log_p_se / rows:.3f} "
        f"(ELBO {evidence.elbo / rows:.3f}); rows with k-hat > 0.7: "
        f"{100 * evidence.fraction_untrusted:.1f}%"
    )
    print(result.summary(num_samples=20).query("kind == 'param'"))
    return result, evidence


if __name__ == "__main__":
    main()
