"""Learning from a viax.data source against learning from arrays in memory: the MNIST VAE.

The VAE of benchmarks/vae_mnist.py (Burda et al. 2016: two tanh layers of 200 units in
the encoder and the decoder, 50 latents, Bernoulli likelihood, dynamic binarization,
float32), trained by ``fit_learn`` for the same epochs, batch size and optimiser from:

- ``memory``: the arrays in memory (each step gathers its rows on the device);
- ``memmap``: an ``np.memmap`` of the images, ``viax.data.as_source`` (the source's host
  loop: batches read and prefetched by a thread);
- ``parquet``: a Parquet file of the images (784 float32 columns, row groups of 8,192
  rows) written by this benchmark, ``viax.data.parquet``;
- ``parquet+ckpt``: the same, with a checkpoint every 5 seconds.

Reported per run: seconds per epoch (steady: the chunks after the first), the fraction
of the run's wall time spent waiting for the next chunk, and the last epoch's mean
objective per row.  The runs share seed and budget, but the source's batch order is not
the in-memory one, so their objectives agree statistically, not to rounding.

    python benchmarks/learn_source.py --epochs 2

Writes benchmarks/results/learn_source.json and .md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
from vae_mnist import HIDDEN, PIXELS, load_mnist, make_vae

import viax
from viax.infer.learn import dynamic_binarization, fit_learn


def _fit(data, args, **kwargs):
    vae = make_vae(np.float32)[0]
    start = time.perf_counter()
    result = fit_learn(
        vae,
        data,
        encoder=viax.MLPEncoder(hidden_sizes=(HIDDEN, HIDDEN), activation="tanh"),
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        optimizer=optax.adam(1e-3),
        transform_batch=dynamic_binarization,
        evaluate=False,
        progress=False,
        **kwargs,
    )
    info = result.info
    return {
        "seconds_per_epoch": info["seconds_per_step"] * info["steps_per_epoch"],
        "wall_seconds": time.perf_counter() - start,
        "wait_fraction": info.get("wait_fraction", 0.0),
        "last_epoch_objective_per_row": float(info["epoch_objective"][-1] / args.train_rows),
        "rows_in_memory": info.get("rows_in_memory"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=50_000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    x_train = load_mnist(np.float32)[0][: args.train_rows]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        memmap = np.lib.format.open_memmap(
            folder / "x.npy", mode="w+", dtype=np.float32, shape=x_train.shape
        )
        memmap[:] = x_train
        memmap.flush()
        names = [f"p{i}" for i in range(PIXELS)]
        t0 = time.perf_counter()
        pq.write_table(
            pa.table({name: x_train[:, i] for i, name in enumerate(names)}),
            folder / "x.parquet",
            row_group_size=8192,
        )
        write_seconds = time.perf_counter() - t0
        runs = {
            "memory": lambda: _fit({"x": x_train}, args),
            "memmap": lambda: _fit(
                viax.data.as_source({"x": np.load(folder / "x.npy", mmap_mode="r")}), args
            ),
            "parquet": lambda: _fit(viax.data.parquet(folder / "x.parquet", {"x": names}), args),
            "parquet+ckpt": lambda: _fit(
                viax.data.parquet(folder / "x.parquet", {"x": names}),
                args,
                checkpoint_path=folder / "run.npz",
                checkpoint_every=5.0,
            ),
        }
        for name, run in runs.items():
            rows[name] = run()
            print(name, rows[name], flush=True)
    base = rows["memory"]["seconds_per_epoch"]
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "note": "2-core machine shared with other jobs (load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after): ratios to the in-memory "
        "run of the same process, not absolute times, are the figures to read",
        "settings": vars(args),
        "parquet_write_seconds": write_seconds,
        "runs": rows,
    }
    _common.write_json("learn_source.json", payload)
    table = _common.markdown_table(
        ["data", "s/epoch", "× memory", "waiting", "last epoch objective / row", "rows in memory"],
        [
            [
                name,
                r["seconds_per_epoch"],
                r["seconds_per_epoch"] / base,
                f"{100 * r['wait_fraction']:.0f}%",
                r["last_epoch_objective_per_row"],
                r["rows_in_memory"] if r["rows_in_memory"] is not None else "all (arrays)",
            ]
            for name, r in rows.items()
        ],
    )
    text = (
        "# Learning from a viax.data source: MNIST VAE\n\n"
        f"`{payload['command']}`, {payload['date']}, commit "
        f"{payload['machine'].get('git_commit', '?')}. {payload['note']}.\n\n"
        f"{args.epochs} epochs of {args.train_rows} images, batch {args.batch_size}, Adam "
        "1e-3, dynamic binarization, float32.\n\n" + table + "\n"
    )
    (_common.RESULTS_DIR / "learn_source.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
