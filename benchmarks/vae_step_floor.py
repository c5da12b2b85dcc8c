"""How far the MNIST VAE step is from its floor: the matrix products alone, on one core and on all.

The issue's target is viax's training step at ≤ 0.5× NumPyro's time (batch 100, same
model, Adam 1e-3, dynamic binarization).  This benchmark measures what bounds it:

* **matrix products + SGD**: the 17 products that one step of this VAE must compute
  (forward of encoder 784-200-200-100 and decoder 50-200-200-784, the weight gradients
  of all six layers and the input gradients of all but the first), 222.8 MFLOP at batch
  100, with nothing else but a plain SGD update, in a ``lax.scan`` (so it is the floor
  for any library on this machine, not a VAE);
* **viax step**, **bare JAX + optax**, **NumPyro svi.update per batch**: the contenders of
  ``vae_mnist_step.py`` (the same functions);
* **parts**: three necessary parts of the step beside the products, each alone: the optax
  Adam update of the 425,284 weights, the binarization's 78,400 uniforms, and NumPyro's
  Bernoulli log density of the 78,400 logits with its gradient.

Each is timed in two child processes: one restricted to a single CPU before JAX starts
(``os.sched_setaffinity``, so XLA's thread pool has one thread: the pure work of a step)
and one with every CPU (XLA splits each operation over its intra-op threads), with the
contenders interleaved in rounds within each child.  The report gives the CPU and wall
time per step, the achieved GFLOP/s (222.8 MFLOP over the wall time), and each step's
wall time over NumPyro's per-batch step in the same round.

    python benchmarks/vae_step_floor.py --rounds 7 --steps 100

Writes benchmarks/results/vae_step_floor.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import _common
import numpy as np

HIDDEN, LATENT, PIXELS, BATCH = 200, 50, 784, 100
_LAYERS = (
    ((PIXELS, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2 * LATENT)),
    (
        (LATENT, HIDDEN),
        (HIDDEN, HIDDEN),
        (HIDDEN, PIXELS),
    ),
)
# Forward, weight gradient and input gradient of every layer, less the first layer's input
# gradient (the data needs none): 2 FLOPs per multiply-add.
_MACS = sum(a * b for net in _LAYERS for a, b in net)
FLOPS = 2 * BATCH * (3 * _MACS - PIXELS * HIDDEN)

FLOOR = "matrix products + SGD (the floor)"
VIAX = "viax step (fit_learn's compiled chunk)"
BARE = "bare JAX + optax loop (lax.scan)"
NUMPYRO = "NumPyro svi.update per batch"
ADAM = "part: optax Adam update of the 425,284 weights"
BINARIZE = "part: binarization, 78,400 uniforms (threefry)"
BERNOULLI = "part: NumPyro Bernoulli log density + gradient"


def floor_steps(steps):
    """``steps`` steps of the VAE's 17 matrix products and an SGD update, nothing else."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    f32 = jnp.float32
    x_all = (jax.random.uniform(keys[0], (steps, BATCH, PIXELS), f32) < 0.3).astype(f32)
    weights = tuple(
        (jax.random.normal(k, shape, f32) / np.sqrt(shape[0])).astype(f32)
        for k, shape in zip(keys[1:], _LAYERS[0] + _LAYERS[1], strict=True)
    )

    def body(weights, x):
        w1, w2, w3, v1, v2, v3 = weights
        h1 = x @ w1
        h2 = h1 @ w2
        out = h2 @ w3
        z = out[:, :LATENT]
        d1 = z @ v1
        d2 = d1 @ v2
        logits = d2 @ v3
        g_logits = logits - x
        g_v3, g_d2 = d2.T @ g_logits, g_logits @ v3.T
        g_v2, g_d1 = d1.T @ g_d2, g_d2 @ v2.T
        g_v1, g_z = z.T @ g_d1, g_d1 @ v1.T
        g_out = jnp.concatenate([g_z, g_z], axis=1)
        g_w3, g_h2 = h2.T @ g_out, g_out @ w3.T
        g_w2, g_h1 = h1.T @ g_h2, g_h2 @ w2.T
        g_w1 = x.T @ g_h1
        grads = (g_w1, g_w2, g_w3, g_v1, g_v2, g_v3)
        return tuple(w - 1e-9 * g for w, g in zip(weights, grads, strict=True)), None

    chunk = jax.jit(lambda w, x: jax.lax.scan(body, w, x)[0])

    def run():
        jax.block_until_ready(chunk(weights, x_all))

    return run


def part_steps(steps, part):
    """``steps`` repetitions of one necessary non-product part of the step, alone: the
    optax Adam update of the VAE's weights, the binarization's uniforms
    (:mod:`viax.infer.threefry`, as ``dynamic_binarization`` draws them), or NumPyro's
    Bernoulli log density of 100 × 784 logits with its gradient."""
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    import optax

    from viax.infer import threefry

    f32 = jnp.float32
    key = jax.random.PRNGKey(0)
    if part == "adam":
        shapes = [s for net in _LAYERS for a, b in net for s in ((a, b), (b,))]
        params = [jnp.full(s, 0.01, f32) for s in shapes]
        grads = [jnp.full(s, 0.1, f32) for s in shapes]
        optimizer = optax.adam(1e-3)

        def body(carry, _):
            params, state = carry
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        chunk = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps)[0])
        args = ((params, optimizer.init(params)),)
    elif part == "binarization":
        x = jax.random.uniform(key, (BATCH, PIXELS), f32)

        def body(total, k):
            draw = (threefry.uniform(k, x.shape, f32) < x).astype(f32)
            return total + jnp.sum(draw), None  # every draw used, none optimised away

        chunk = jax.jit(lambda k: jax.lax.scan(body, f32(0), jax.random.split(k, steps))[0])
        args = (key,)
    else:
        logits = jax.random.normal(key, (steps, BATCH, PIXELS), f32)
        x = (jax.random.uniform(key, (BATCH, PIXELS), f32) < 0.3).astype(f32)

        def log_lik(z):
            return jnp.sum(dist.Bernoulli(logits=z).log_prob(x))

        def body(total, z):
            value, grad = jax.value_and_grad(log_lik)(z)
            return total + value + jnp.sum(grad), None  # the whole gradient is computed

        chunk = jax.jit(lambda z: jax.lax.scan(body, f32(0), z)[0])
        args = (logits,)

    def run():
        jax.block_until_ready(chunk(*args))

    return run


def child(args):
    """Time every contender in this process (its CPU affinity set by the parent)."""
    import vae_mnist_step as step_bench
    from vae_mnist import load_mnist

    import viax  # noqa: F401  (as in the contenders: float64 enabled; started after the affinity is set)

    x_train = load_mnist(np.float32)[0][: args.train_rows]
    per_batch = step_bench.numpyro_steps(x_train, args.steps)[0]
    contenders = {
        FLOOR: floor_steps(args.steps),
        VIAX: step_bench.viax_step(x_train, args.steps),
        BARE: step_bench.bare_steps(x_train, args.steps),
        NUMPYRO: per_batch,
        ADAM: part_steps(args.steps, "adam"),
        BINARIZE: part_steps(args.steps, "binarization"),
        BERNOULLI: part_steps(args.steps, "bernoulli"),
    }
    for run in contenders.values():
        run()  # compile
    wall, cpu, load_start, _ = _common.interleaved(contenders, args.rounds, args.steps)
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "load": [load_start, os.getloadavg()[0]],
                "threads_cpus": len(os.sched_getaffinity(0)),
            }
        ),
        flush=True,
    )


def run_child(args, cpus) -> dict:
    def pin():
        os.sched_setaffinity(0, cpus)

    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--rounds",
            str(args.rounds),
            "--steps",
            str(args.steps),
            "--train-rows",
            str(args.train_rows),
        ],
        preexec_fn=pin,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=10_000)
    parser.add_argument("--name", default="vae_step_floor")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    every = sorted(os.sched_getaffinity(0))
    modes = {"one CPU": {every[0]}, f"all {len(every)} CPUs": set(every)}
    rows = []
    loads = {}
    for mode, cpus in modes.items():
        out = run_child(args, cpus)
        loads[mode] = out["load"]
        reference = np.asarray(out["wall"][NUMPYRO])
        for name in out["wall"]:
            wall, cpu = np.asarray(out["wall"][name]), np.asarray(out["cpu"][name])
            rows.append(
                {
                    "mode": mode,
                    "run": name,
                    "wall_ms_median": float(np.median(wall)),
                    "wall_ms_min": float(np.min(wall)),
                    "cpu_ms_median": float(np.median(cpu)),
                    "gflops_per_wall_s": float(FLOPS / np.median(wall) / 1e6),
                    "gflops_per_cpu_s": float(FLOPS / np.median(cpu) / 1e6),
                    "paired_wall_ratio": float(np.median(wall / reference)),
                }
            )
            print(rows[-1], flush=True)
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "args": vars(args),
        "flops_per_step": FLOPS,
        "load_average": {m: f"{a:.1f}, {b:.1f}" for m, (a, b) in loads.items()},
        "rows": rows,
    }
    _common.write_json(f"{args.name}.json", payload)
    write_markdown(payload)


def write_markdown(payload: dict) -> None:
    """The results table (benchmarks/results/<name>.md) from the JSON payload."""
    load_text = "; ".join(f"{m}: {v}" for m, v in payload["load_average"].items())
    text = (
        "# MNIST VAE step against its floor, on one CPU and on all\n\n"
        f"Batch {BATCH}, float32; one step needs 17 matrix products, {FLOPS / 1e6:.1f} MFLOP "
        "(forward, weight and input gradients; none for the data). Each row is the median "
        f"over {payload['args']['rounds']} rounds of {payload['args']['steps']} steps, the "
        "contenders interleaved, in a "
        "child process whose CPU affinity was set before JAX started (one CPU: XLA's thread "
        f"pool has one thread). {payload['date']}, {payload['machine'].get('cpu_count', '?')} "
        f"CPUs, jax {payload['machine'].get('jax', '?')}; command: `{payload['command']}`. "
        f"1-minute load average at the start and end of each child ({load_text}; the machine "
        "is shared with other jobs when it exceeds ~1): read the CPU times and the paired "
        "ratios (each round's wall time over NumPyro's in the same round and mode).\n\n"
    )
    text += _common.markdown_table(
        [
            "CPUs",
            "run",
            "wall ms/step (median)",
            "wall (min)",
            "CPU ms/step",
            "GFLOP/s (wall)",
            "GFLOP/s (CPU)",
            "× NumPyro (wall, paired)",
        ],
        [
            [
                r["mode"],
                r["run"],
                f"{r['wall_ms_median']:.2f}",
                f"{r['wall_ms_min']:.2f}",
                f"{r['cpu_ms_median']:.2f}",
                # GFLOP/s of the whole step's 222.8 MFLOP: not a part's
                "" if r["run"].startswith("part:") else f"{r['gflops_per_wall_s']:.1f}",
                "" if r["run"].startswith("part:") else f"{r['gflops_per_cpu_s']:.1f}",
                f"{r['paired_wall_ratio']:.3f}",
            ]
            for r in payload["rows"]
        ],
    )
    (_common.RESULTS_DIR / f"{payload['args']['name']}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
