"""viax's MNIST VAE step with one draw: the model evaluated directly against a vmap over
a draw axis of size 1, compiled side by side and timed interleaved.

``_AmortizedQ.log_p`` maps the model's log density over the S draws of a step; with the
ELBO's single draw that was a ``jax.vmap`` over an axis of size 1, which leaves a unit
batch dimension in the model's products and their gradients.  ``learn._over_draws`` now
calls the model on the one draw directly.  This benchmark compiles ``fit_learn``'s chunk
(``vae_mnist_step.viax_chunk``: ELBO, Adam 1e-3, batch 100, dynamic binarization,
float32) both ways, checks that the two give the same objective trace, and times rounds
of ``--steps`` steps of each in turn (CPU and wall time per step, the ratio paired by
round).

    taskset -c 0 python benchmarks/vae_step_one_draw.py --rounds 9   # one CPU: the work

Writes benchmarks/results/vae_step_one_draw.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import os

import _common
import jax
import numpy as np
from vae_mnist import load_mnist
from vae_mnist_step import viax_chunk

import viax.infer.learn as learn


def compiled_chunk(x_train, steps, vmap_one_draw: bool):
    """viax's compiled chunk, with the model vmapped over the size-1 draw axis (the old
    code) or called on the draw directly (the new)."""
    current = learn._over_draws
    if vmap_one_draw:
        learn._over_draws = lambda fn, z: jax.vmap(fn)(z)
    try:
        chunk, state, key = viax_chunk(x_train, steps)
        program = chunk.lower(state, key).compile()
    finally:
        learn._over_draws = current
    return program, state, key


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=10_000)
    parser.add_argument("--name", default="vae_step_one_draw")
    args = parser.parse_args()
    x_train = load_mnist(np.float32)[0][: args.train_rows]
    runs = {
        "vmap over the one draw (before)": compiled_chunk(x_train, args.steps, True),
        "model on the one draw (now)": compiled_chunk(x_train, args.steps, False),
    }
    traces = {}
    for label, (program, state, key) in runs.items():
        _, info = program(state, key)
        traces[label] = np.asarray(info.objective, dtype=np.float64)
    before, now = traces.values()
    max_rel = float(np.max(np.abs(now - before) / np.abs(before)))
    wall, cpu, load_start, load_end = _common.interleaved(
        {
            label: functools.partial(lambda p, s, k: jax.block_until_ready(p(s, k)), *run)
            for label, run in runs.items()
        },
        args.rounds,
        args.steps,
    )
    first = next(iter(runs))
    rows = [
        {
            "run": label,
            "cpu_ms_median": float(np.median(cpu[label])),
            "cpu_ms_min": float(np.min(cpu[label])),
            "wall_ms_median": float(np.median(wall[label])),
            "paired_cpu_ratio": float(np.median(np.asarray(cpu[label]) / np.asarray(cpu[first]))),
        }
        for label in runs
    ]
    for row in rows:
        print(row, flush=True)
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "cpus_in_affinity": len(os.sched_getaffinity(0)),
        "args": vars(args),
        "load_average": f"{load_start:.1f}, {load_end:.1f}",
        "objective_trace_max_relative_difference": max_rel,
        "rows": rows,
    }
    _common.write_json(f"{args.name}.json", payload)
    text = (
        "# MNIST VAE step with one draw: vmap over the draw axis against the model on the "
        "draw\n\n"
        f"viax's compiled chunk both ways, {args.rounds} rounds of {args.steps} steps in "
        f"turn; {payload['cpus_in_affinity']} CPU(s) in the process's affinity. "
        f"{payload['date']}, jax {payload['machine'].get('jax', '?')}; command: "
        f"`{payload['command']}` (`taskset -c 0` in front for one CPU). 1-minute load "
        f"average at the start and end: {payload['load_average']} on "
        f"{payload['machine'].get('cpu_count', '?')} cores (shared with other jobs when "
        "above ~1: read the CPU times and the paired ratio). The two objective traces over "
        f"the {args.steps} steps differ by at most {max_rel:.1e} relative (float32).\n\n"
    )
    text += _common.markdown_table(
        [
            "run",
            "CPU ms/step (median)",
            "CPU (min)",
            "wall ms/step (median)",
            "× before (CPU, paired)",
        ],
        [
            [
                r["run"],
                f"{r['cpu_ms_median']:.3f}",
                f"{r['cpu_ms_min']:.3f}",
                f"{r['wall_ms_median']:.3f}",
                f"{r['paired_cpu_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    (_common.RESULTS_DIR / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
