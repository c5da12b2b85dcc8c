"""viax's MNIST VAE step compiled with XLA CPU options, one compilation each, interleaved.

Each option set is passed per compilation (``jax.jit(...).lower(...).compile(
compiler_options=...)``), so it changes that one program and nothing else in the
process: the way a library could use an option without touching its user's other
computations.  The step is the one ``vae_mnist_step.py`` times (``fit_learn``'s compiled
chunk: ELBO, Adam 1e-3, batch 100, dynamic binarization, float32).  Rounds of
``--steps`` steps of every compiled variant in turn; CPU and wall time per step.

    taskset -c 0 python benchmarks/vae_step_xla_options.py --rounds 7   # one CPU
    python benchmarks/vae_step_xla_options.py --rounds 7                 # every CPU

Restricting the process to one CPU before it starts (``taskset``) gives XLA a thread
pool of one thread: the CPU time is then the work of the step, the measure least
disturbed by other jobs.  Writes benchmarks/results/<name>.json and .md.
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

_YNN = "xla_cpu_experimental_ynn_fusion_type"
OPTIONS = {
    "default": {},
    "Eigen dots single-threaded": {"xla_cpu_multi_thread_eigen": False},
    "no YNN fusions (Eigen dots)": {_YNN: ""},
    "YNN: individual dots only": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "YNN: dot fusions + reductions": {
        _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    },
    "YNN: dot + elementwise + reductions": {
        _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    },
    "XNNPACK on": {"xla_cpu_use_xnnpack": True},
    "concurrency-optimised scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "prefer vector width 512": {"xla_cpu_prefer_vector_width": 512},
    "legacy emitters (no fusion emitters)": {"xla_cpu_use_fusion_emitters": False},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=10_000)
    parser.add_argument("--name", default=None, help="default: vae_step_xla_options_<n>cpu")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    name = args.name or f"vae_step_xla_options_{cpus}cpu"
    x_train = load_mnist(np.float32)[0][: args.train_rows]
    chunk, state, key = viax_chunk(x_train, args.steps)
    lowered = chunk.lower(state, key)
    compiled = {label: lowered.compile(compiler_options=opts) for label, opts in OPTIONS.items()}
    for program in compiled.values():
        jax.block_until_ready(program(state, key))
    wall, cpu, load_start, load_end = _common.interleaved(
        {
            label: functools.partial(lambda p: jax.block_until_ready(p(state, key)), program)
            for label, program in compiled.items()
        },
        args.rounds,
        args.steps,
    )
    reference = np.asarray(cpu["default"])
    rows = []
    for label in compiled:
        rows.append(
            {
                "options": label,
                "compiler_options": {k: str(v) for k, v in OPTIONS[label].items()},
                "cpu_ms_median": float(np.median(cpu[label])),
                "cpu_ms_min": float(np.min(cpu[label])),
                "wall_ms_median": float(np.median(wall[label])),
                "wall_ms_min": float(np.min(wall[label])),
                "paired_cpu_ratio": float(np.median(np.asarray(cpu[label]) / reference)),
            }
        )
        print(rows[-1], flush=True)
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "cpus_in_affinity": cpus,
        "args": vars(args),
        "load_average": f"{load_start:.1f}, {load_end:.1f}",
        "rows": rows,
    }
    _common.write_json(f"{name}.json", payload)
    text = (
        f"# viax's MNIST VAE step under XLA CPU options ({cpus} CPU"
        f"{'s' if cpus > 1 else ''} in the process's affinity)\n\n"
        "Each row compiles the same step with its options (per compilation, nothing else "
        f"changed) and times {args.rounds} rounds of {args.steps} steps, the variants "
        f"interleaved. {payload['date']}, jax {payload['machine'].get('jax', '?')}; command: "
        f"`{payload['command']}` (prefix `taskset -c 0` for one CPU). 1-minute load average "
        f"at the start and end: {payload['load_average']} on "
        f"{payload['machine'].get('cpu_count', '?')} cores (shared with other jobs when "
        "above ~1: read the CPU times).\n\n"
    )
    text += _common.markdown_table(
        [
            "options",
            "CPU ms/step (median)",
            "CPU (min)",
            "wall ms/step (median)",
            "wall (min)",
            "× default (CPU, paired)",
        ],
        [
            [
                r["options"],
                f"{r['cpu_ms_median']:.2f}",
                f"{r['cpu_ms_min']:.2f}",
                f"{r['wall_ms_median']:.2f}",
                f"{r['wall_ms_min']:.2f}",
                f"{r['paired_cpu_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    (_common.RESULTS_DIR / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
