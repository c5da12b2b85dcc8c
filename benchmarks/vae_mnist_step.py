"""Time per training step of the MNIST VAE, viax against NumPyro, interleaved.

The whole-run benchmark (vae_mnist.py) times epochs one run after another, so on a
shared machine its ratios carry the load's drift.  This one times blocks of ``--steps``
steps of each contender in turn, ``--rounds`` times, and reports the median and the
minimum per step, in wall time and in process CPU time (less sensitive to other jobs):

* **viax step**: the compiled chunk (``lax.scan``) of the step that ``fit_learn`` runs
  (ELBO, one draw, Adam 1e-3, batch 100, dynamic binarization, float32), taken from a
  real ``fit_learn`` call;
* **NumPyro per batch**: ``svi.update`` jitted with the binarization and called once per
  batch with a host-side permutation, as NumPyro's examples and vae_mnist.py run it;
* **NumPyro per batch, no sync**: the same loop summing the losses on the device
  instead of reading each one (``float(loss)``) back per step, so the host can queue the
  next batch while the update runs;
* **NumPyro in scan**: the same jitted update inside a ``lax.scan`` (its compiled work
  without the per-batch dispatch; NumPyro's own VAE example runs its epochs this way,
  in a ``lax.fori_loop``);
* **bare JAX loop**: the same networks and objective written directly in JAX + optax
  (jax.random draws, no guard), a reference floor.

    python benchmarks/vae_mnist_step.py --rounds 9 --steps 100

Writes benchmarks/results/vae_mnist_step.json and .md.
"""

from __future__ import annotations

import argparse

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from vae_mnist import HIDDEN, LATENT, PIXELS, load_mnist, make_vae

import viax
import viax.infer.learn as learn

BATCH = 100


def viax_chunk(x_train, steps):
    """viax's own minibatch step, taken from a real ``fit_learn`` call, as a jitted
    ``lax.scan`` of ``steps`` steps: (chunk, state, key), ``chunk(state, key)``."""
    captured = {}
    original = learn.run

    def spy(step, state, data, key, total, chunk, **kwargs):
        captured.update(step=step, state=state, data=data, key=key)
        return original(step, state, data, key, 2, 1, **kwargs)

    learn.run = spy
    try:
        learn.fit_learn(
            make_vae(x_train.dtype)[0],
            {"x": x_train},
            encoder=viax.MLPEncoder(hidden_sizes=(HIDDEN, HIDDEN), activation="tanh"),
            objective=viax.ELBO(),
            batch_size=BATCH,
            num_epochs=2,
            optimizer=optax.adam(1e-3),
            transform_batch=learn.dynamic_binarization,
            seed=0,
            progress=False,
        )
    finally:
        learn.run = original
    step, data = captured["step"], captured["data"]
    chunk = jax.jit(
        lambda s, k: jax.lax.scan(lambda s, k: step(s, k, data), s, jax.random.split(k, steps))
    )
    return chunk, captured["state"], captured["key"]


def viax_step(x_train, steps):
    """A function running ``steps`` steps of viax's own compiled minibatch step."""
    chunk, state0, key = viax_chunk(x_train, steps)

    def run():
        state, _ = chunk(state0, key)
        jax.block_until_ready(state)

    return run


def numpyro_steps(x_train, steps):
    """(per batch, per batch without a per-step sync, in scan) functions running
    ``steps`` NumPyro SVI updates."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import optax_to_numpyro

    vae, guide, _, _ = make_vae(x_train.dtype)
    svi = SVI(vae, guide, optax_to_numpyro(optax.adam(1e-3)), Trace_ELBO())
    state0 = svi.init(jax.random.PRNGKey(0), x=jnp.asarray(x_train[:BATCH] > 0.5, x_train.dtype))

    @jax.jit
    def update(state, x, key):
        x = (jax.random.uniform(key, x.shape, x.dtype) < x).astype(x.dtype)
        return svi.update(state, x=x)

    order = np.random.default_rng(0).permutation(len(x_train))
    per_epoch = len(x_train) // BATCH

    def per_batch(sync=True):
        key, state = jax.random.PRNGKey(1), state0
        total = 0.0
        for i in range(steps):
            j = i % per_epoch
            key, sub = jax.random.split(key)
            rows = order[j * BATCH : (j + 1) * BATCH]
            state, loss = update(state, jnp.asarray(x_train[rows]), sub)
            if sync:
                float(loss)
            else:
                total = total + loss
        jax.block_until_ready((state, total))

    x_all = jnp.asarray(x_train)

    @jax.jit
    def scanned(state, key):
        def body(state, index_key):
            i, k = index_key
            start = (i % per_epoch) * BATCH
            x = jax.lax.dynamic_slice(x_all, (start, jnp.int32(0)), (BATCH, PIXELS))
            return update(state, x, k)

        xs = (jnp.arange(steps, dtype=jnp.int32), jax.random.split(key, steps))
        return jax.lax.scan(body, state, xs)

    def in_scan():
        state, _ = scanned(state0, jax.random.PRNGKey(1))
        jax.block_until_ready(state)

    return per_batch, lambda: per_batch(sync=False), in_scan


def bare_steps(x_train, steps):
    """The same VAE step written directly in JAX and optax (a reference floor)."""

    def init(key, sizes):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {
                "w": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(jnp.float32),
                "b": jnp.zeros(b, jnp.float32),
            }
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]

    def mlp(params, h):
        for layer in params[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    params = {
        "encoder": init(jax.random.PRNGKey(0), (PIXELS, HIDDEN, HIDDEN, 2 * LATENT)),
        "decoder": init(jax.random.PRNGKey(1), (LATENT, HIDDEN, HIDDEN, PIXELS)),
    }
    optimizer = optax.adam(1e-3)
    x_all = jnp.asarray(x_train)
    per_epoch = len(x_train) // BATCH

    def loss(params, x, eps):
        out = mlp(params["encoder"], x)
        loc, log_scale = out[:, :LATENT], out[:, LATENT:]
        z = loc + jnp.exp(log_scale) * eps
        logits = mlp(params["decoder"], z)
        log_lik = jnp.sum(x * logits - jnp.logaddexp(0.0, logits))
        return -(log_lik + jnp.sum(-0.5 * z**2) - jnp.sum(-0.5 * eps**2 - log_scale))

    def step(carry, key):
        params, opt_state, i = carry
        k1, k2 = jax.random.split(key)
        x = jax.lax.dynamic_slice(x_all, (i * BATCH, jnp.int32(0)), (BATCH, PIXELS))
        x = (jax.random.uniform(k1, x.shape, jnp.float32) < x).astype(jnp.float32)
        eps = jax.random.normal(k2, (BATCH, LATENT), jnp.float32)
        value, grads = jax.value_and_grad(loss)(params, x, eps)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, (i + 1) % per_epoch), value

    chunk = jax.jit(lambda c, k: jax.lax.scan(step, c, jax.random.split(k, steps)))
    carry = (params, optimizer.init(params), jnp.int32(0))

    def run():
        out, _ = chunk(carry, jax.random.PRNGKey(3))
        jax.block_until_ready(out)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=10_000)
    parser.add_argument("--name", default="vae_mnist_step")
    args = parser.parse_args()
    x_train = load_mnist(np.float32)[0][: args.train_rows]
    per_batch, per_batch_no_sync, in_scan = numpyro_steps(x_train, args.steps)
    contenders = {
        "viax step (fit_learn's compiled chunk)": viax_step(x_train, args.steps),
        "NumPyro svi.update per batch": per_batch,
        "NumPyro svi.update per batch, no per-step sync": per_batch_no_sync,
        "NumPyro svi.update in lax.scan": in_scan,
        "bare JAX + optax loop (lax.scan)": bare_steps(x_train, args.steps),
    }
    for run in contenders.values():
        run()  # compile
    wall, cpu, load_start, load_end = _common.interleaved(contenders, args.rounds, args.steps)
    reference = "NumPyro svi.update per batch"
    rows = []
    for name in contenders:
        rows.append(
            {
                "run": name,
                "wall_ms_median": float(np.median(wall[name])),
                "wall_ms_min": float(np.min(wall[name])),
                "cpu_ms_median": float(np.median(cpu[name])),
                "cpu_ms_min": float(np.min(cpu[name])),
                "wall_ratio": float(np.median(wall[name]) / np.median(wall[reference])),
                "cpu_ratio": float(np.median(cpu[name]) / np.median(cpu[reference])),
                "paired_wall_ratio": float(
                    np.median(np.asarray(wall[name]) / np.asarray(wall[reference]))
                ),
            }
        )
        print(rows[-1], flush=True)
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "args": vars(args),
        "load_average": f"{load_start:.1f}, {load_end:.1f}",
        "rows": rows,
    }
    _common.write_json(f"{args.name}.json", payload)
    text = (
        "# MNIST VAE: time per training step, interleaved\n\n"
        f"Batch {BATCH}, ELBO with one draw, Adam 1e-3, float32, dynamic binarization, "
        f"encoder and decoder 2×{HIDDEN} tanh, {LATENT} latents; {args.rounds} rounds of "
        f"{args.steps} steps of each contender in turn. {payload['date']}, "
        f"{payload['machine'].get('cpu_count', '?')} CPUs, jax "
        f"{payload['machine'].get('jax', '?')}; command: `{payload['command']}`. The "
        "machine was shared with other jobs (1-minute load average at the start and end: "
        f"{payload['load_average']} on 2 cores): the CPU-time columns and the paired "
        "ratios (each round's time over NumPyro's in the same round) are the ones to "
        "read.\n\n"
    )
    text += _common.markdown_table(
        [
            "run",
            "wall ms/step (median)",
            "wall (min)",
            "CPU ms/step (median)",
            "CPU (min)",
            "× NumPyro (wall, paired median)",
            "× NumPyro (CPU, medians)",
        ],
        [
            [
                r["run"],
                f"{r['wall_ms_median']:.2f}",
                f"{r['wall_ms_min']:.2f}",
                f"{r['cpu_ms_median']:.2f}",
                f"{r['cpu_ms_min']:.2f}",
                f"{r['paired_wall_ratio']:.3f}",
                f"{r['cpu_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    (_common.RESULTS_DIR / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
