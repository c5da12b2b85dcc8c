"""Synthetic logistic-regression data written to Parquet, streamed row group by row group
so memory stays flat in the number of rows (about 6 MB per 65,536-row group of 20
float32 predictors).

    y_n ~ Bernoulli(sigmoid(alpha + x_n . beta)),   x_n = mu + s * z_n,  z_n ~ N(0, I_20)

``beta ~ N(0, 0.5^2)`` and ``alpha = -0.5`` are drawn once from the seed; with
``--raw-scales`` each predictor gets its own location ``mu_j`` and scale
``s_j = 10^U(-1, 2)`` (an unscaled regression, the ridge that slows first-order steps),
otherwise ``mu = 0, s = 1``.  Columns ``x00 ... x19`` and ``y`` (float32, 0 or 1); the
truth is stored in the file's key-value metadata (``viax.synthetic``, JSON) and in a
sidecar ``<file>.json``.  Row group ``g`` is drawn from ``SeedSequence([seed, g])``,
so a file is reproducible from its arguments.  Pages are compressed with snappy, pyarrow's
default: on these random floats zstd saves 7% of the bytes but costs 0.21 CPU-µs per row
to decode against 0.09 (1e6 rows, `read_row_group`, one thread, 2026-12-06), and that
decoding competes with the fit for the same cores.

    python benchmarks/make_synthetic_parquet.py --rows 1000000 --out /tmp/logistic_1e6.parquet
    python benchmarks/make_synthetic_parquet.py --rows 10000000 --out /tmp/logistic_1e7.parquet

From Python: ``ensure(10**6)`` returns the path of a cached file, writing it first if it
is missing (under ``$VIAX_BENCH_DATA``, default ``<tmp>/viax-synthetic``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"viax.synthetic"


def truth(num_predictors: int = 20, *, seed: int = 0, raw_scales: bool = False) -> dict:
    """The true coefficients and predictor scales for ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31]))
    beta = rng.normal(0.0, 0.5, num_predictors)
    if raw_scales:
        scale = 10.0 ** rng.uniform(-1.0, 2.0, num_predictors)
        loc = rng.normal(0.0, 2.0, num_predictors) * scale
        # keep the linear predictor O(1): the coefficient of a wide predictor is small
        beta = beta / scale
        alpha = -0.5 - float(loc @ beta)
    else:
        scale = np.ones(num_predictors)
        loc = np.zeros(num_predictors)
        alpha = -0.5
    return {
        "alpha": alpha,
        "beta": beta.tolist(),
        "loc": loc.tolist(),
        "scale": scale.tolist(),
        "seed": seed,
        "raw_scales": raw_scales,
    }


def column_names(num_predictors: int = 20) -> list[str]:
    return [f"x{j:02d}" for j in range(num_predictors)]


COMPRESSION_HELP = "Parquet page compression (snappy, pyarrow's default; zstd, lz4, none)"


def write_synthetic(
    path: str | os.PathLike,
    num_rows: int,
    *,
    num_predictors: int = 20,
    row_group_size: int = 65536,
    seed: int = 0,
    raw_scales: bool = False,
    compression: str = "snappy",
) -> dict:
    """Write the data set to ``path`` (atomically: a temporary file, then a rename) and
    return its description (the truth, rows, seconds taken)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = truth(num_predictors, seed=seed, raw_scales=raw_scales)
    info.update(num_rows=int(num_rows), row_group_size=int(row_group_size), compression=compression)
    beta, loc, scale = (np.asarray(info[k]) for k in ("beta", "loc", "scale"))
    names = column_names(num_predictors)
    schema = pa.schema(
        [pa.field(n, pa.float32()) for n in [*names, "y"]],
        metadata={METADATA_KEY: json.dumps(info).encode()},
    )
    start = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema, compression=compression) as writer:
        for g, first in enumerate(range(0, num_rows, row_group_size)):
            n = min(row_group_size, num_rows - first)
            rng = np.random.default_rng(np.random.SeedSequence([seed, g]))
            x = loc + scale * rng.standard_normal((n, num_predictors))
            p = 1.0 / (1.0 + np.exp(-(info["alpha"] + x @ beta)))
            y = (rng.random(n) < p).astype(np.float32)
            x = x.astype(np.float32)
            arrays = [pa.array(x[:, j]) for j in range(num_predictors)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size)
    os.replace(tmp, path)
    info["seconds"] = time.perf_counter() - start
    Path(str(path) + ".json").write_text(json.dumps(info, indent=1))
    return info


def read_truth(path: str | os.PathLike) -> dict:
    """The description stored in a file written by :func:`write_synthetic`."""
    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    return json.loads(meta[METADATA_KEY])


def read_arrays(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The whole file in memory as ``(X (N, D), y (N,))``, for peers that need arrays.

    Read one row group at a time into arrays allocated once: the peak is the arrays
    plus one row group, not twice the data (an Arrow table, then its copy)."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    names = [n for n in pf.schema_arrow.names if n != "y"]
    num_rows = pf.metadata.num_rows
    x = np.empty((num_rows, len(names)), dtype)
    y = np.empty(num_rows, dtype)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(g, use_threads=False)
        n = table.num_rows
        for j, name in enumerate(names):
            x[first : first + n, j] = table.column(name).to_numpy()
        y[first : first + n] = table.column("y").to_numpy()
        first += n
        del table
    return x, y


def ensure(
    num_rows: int,
    *,
    seed: int = 0,
    raw_scales: bool = False,
    compression: str = "snappy",
    directory: str | None = None,
) -> Path:
    """The path of the cached file for these arguments, written first if missing."""
    directory = directory or os.environ.get(
        "VIAX_BENCH_DATA", str(Path(tempfile.gettempdir()) / "viax-synthetic")
    )
    tag = "raw" if raw_scales else "std"
    path = Path(directory) / f"logistic_{num_rows}_{tag}_seed{seed}_{compression}.parquet"
    if path.exists():
        try:
            info = read_truth(path)
            if info["num_rows"] == num_rows and info["seed"] == seed:
                return path
        except (OSError, KeyError, ValueError, pa.ArrowException):
            pass
    write_synthetic(path, num_rows, seed=seed, raw_scales=raw_scales, compression=compression)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, required=True, help="number of rows, e.g. 1e6")
    parser.add_argument("--out", required=True, help="the Parquet file to write")
    parser.add_argument("--predictors", type=int, default=20)
    parser.add_argument("--row-group-size", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-scales", action="store_true", help="unscaled predictors")
    parser.add_argument("--compression", default="snappy", help=COMPRESSION_HELP)
    args = parser.parse_args(argv)
    info = write_synthetic(
        args.out,
        int(args.rows),
        num_predictors=args.predictors,
        row_group_size=args.row_group_size,
        seed=args.seed,
        raw_scales=args.raw_scales,
        compression=args.compression,
    )
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out}: {info['num_rows']} rows, {size:.1f} MiB, {info['seconds']:.1f} s")


if __name__ == "__main__":
    main()
