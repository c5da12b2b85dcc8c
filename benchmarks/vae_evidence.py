"""Held-out evidence of the MNIST VAE: ``result.log_evidence(data={"x": x_test},
num_samples=k)`` timed on the first R test images, with its peak memory.

The VAE of ``benchmarks/vae_mnist.py`` (float32, tanh 200-200, 50 latents, Bernoulli),
trained for one epoch on the first ``--train-rows`` images (the cost of the evidence
does not depend on how well the decoder is trained).  The test images are binarized
once (pixel > 0.5).  Per run: wall and CPU seconds, the peak resident memory above the
memory before the call (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``), the chunk plan, log p per row and the fraction of rows with
k̂ ≥ 0.7.  ``--numpyro`` also times ``vae_mnist.is_nll`` (the benchmark's importance
sampler for NumPyro's fit: 50 rows × 500 draws per jitted call, read back per call) on
the same trained networks.

To compare two versions of viax under the same load, alternate runs, the older from an
exported tree::

    git archive <commit> src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python benchmarks/vae_evidence.py --rows 1000 --label old
    python benchmarks/vae_evidence.py --rows 1000 --label new

Each run appends to benchmarks/results/vae_evidence.json and rewrites the .md table.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import _common
import jax
import numpy as np
import optax
import vae_mnist

import viax
from viax.infer import learn
from viax.infer.learn import dynamic_binarization, fit_learn


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _closure(fn) -> dict:
    cells = [c.cell_contents for c in fn.__closure__]
    return dict(zip(fn.__code__.co_freevars, cells, strict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--label", default="")
    parser.add_argument("--numpyro", action="store_true")
    parser.add_argument("--name", default="vae_evidence")
    args = parser.parse_args()
    x_train, x_test = vae_mnist.load_mnist(np.float32)
    vae = vae_mnist.make_vae(x_train.dtype)[0]
    with warnings.catch_warnings():  # a fixed budget warns that it is not converged
        warnings.simplefilter("ignore", RuntimeWarning)
        result = fit_learn(
            vae,
            {"x": x_train[: args.train_rows]},
            encoder=viax.MLPEncoder(hidden_sizes=(200, 200), activation="tanh"),
            objective=viax.ELBO(),
            batch_size=100,
            num_epochs=1,
            optimizer=optax.adam(1e-3),
            transform_batch=dynamic_binarization,
            seed=0,
            progress=False,
        )
    x = (x_test[: args.rows] > 0.5).astype(np.float32)
    plan = getattr(learn, "_row_plan", None)
    row = {
        "label": args.label,
        "viax": viax.__file__,
        "rows": args.rows,
        "k": args.k,
        "load_before": os.getloadavg()[0],
        "plan (D, R, n, B)": str(plan(args.rows, args.k)) if plan else "128 rows x 256 draws",
    }
    rss = _memory_kb("VmRSS")
    _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    evidence = result.log_evidence(data={"x": x}, num_samples=args.k, seed=0)
    row.update(
        wall_s=time.perf_counter() - wall,
        cpu_s=time.process_time() - cpu,
        peak_rise_mb=(_memory_kb("VmHWM") - rss) / 1024,
        log_p_per_row=evidence.log_p / args.rows,
        iwae_per_row=evidence.iwae / args.rows,
        fraction_khat_over_07=evidence.fraction_untrusted,
    )
    row["us_per_row_draw"] = 1e6 * row["wall_s"] / (args.rows * args.k)
    if args.numpyro:
        env = _closure(result.evidence_fn)
        q, theta, phi = env["q"], env["theta"], env["phi"]
        decoder_net = vae_mnist.make_vae(x_train.dtype)[2]

        def encode(rows):
            loc, log_scale, _ = q._gaussian(phi, {"x": rows})
            return loc, log_scale

        _reset_peak()
        rss = _memory_kb("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        nll, nll_se = vae_mnist.is_nll(theta["decoder$params"], decoder_net, encode, x, args.k)
        row.update(
            is_nll_wall_s=time.perf_counter() - wall,
            is_nll_cpu_s=time.process_time() - cpu,
            is_nll_peak_rise_mb=(_memory_kb("VmHWM") - rss) / 1024,
            is_nll_per_row=-nll,
        )
    row["load_after"] = os.getloadavg()[0]
    print(row, flush=True)
    payload = _common.read_json(f"{args.name}.json") or {"runs": []}
    payload["runs"].append(
        {**row, "command": _common.command_line(), "date": _common.today(), "jax": jax.__version__}
    )
    payload["machine"] = _common.machine()
    _common.write_json(f"{args.name}.json", payload)
    header = [
        "date",
        "label",
        "rows",
        "k",
        "plan",
        "wall s",
        "CPU s",
        "µs / row-draw (wall)",
        "peak RSS rise MB",
        "log p / row",
        "is_nll wall s",
        "load before/after",
    ]
    table = _common.markdown_table(
        header,
        (
            [
                r["date"],
                r["label"],
                r["rows"],
                r["k"],
                r["plan (D, R, n, B)"],
                r["wall_s"],
                r["cpu_s"],
                r["us_per_row_draw"],
                r["peak_rise_mb"],
                r["log_p_per_row"],
                r.get("is_nll_wall_s"),
                f"{r['load_before']:.1f} / {r['load_after']:.1f}",
            ]
            for r in payload["runs"]
        ),
    )
    text = (
        "# Held-out evidence of the MNIST VAE\n\n"
        "`benchmarks/vae_evidence.py`; each row one process, commands in the JSON. "
        "2-core machine shared with other jobs: compare rows taken alternately.\n\n" + table + "\n"
    )
    (_common.RESULTS_DIR / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
