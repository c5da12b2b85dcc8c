"""How fast viax.data hands out batches, and in how much memory: one epoch of the
synthetic logistic-regression data (20 float32 predictors + y) from in-memory arrays
and streamed from Parquet, through ``viax.data.prefetch`` (stacks of 16 batches placed
on the default device), each configuration in a fresh process so its peak RSS is its
own.  Also: the time to the first batch when resuming mid-epoch.

    python benchmarks/data_reading.py --rows 1e6 1e7 --batch-size 4096

The files come from ``make_synthetic_parquet.ensure`` (written once, then cached).
Rows per CPU-second (all threads of the process) is the number to compare across
machines that are shared with other jobs; rows per second is the wall-clock view.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import command_line, peak_rss_mb, today  # noqa: E402  (stdlib only)


def one(kind: str, path: str, batch_size: int, threads: int | None) -> dict:
    """One configuration, in this process."""
    import numpy as np
    from make_synthetic_parquet import column_names, read_arrays

    import viax

    rss_import = peak_rss_mb()
    if kind == "arrays":
        x, y = read_arrays(path)
        source = viax.data.as_source({"X": x, "y": y})
    else:
        source = viax.data.parquet(path, {"X": column_names(), "y": "y"}, num_threads=threads)
    wall, cpu = time.perf_counter(), time.process_time()
    rows = 0
    with viax.data.prefetch(source.batches(batch_size, seed=0, epoch=0), stack=16) as chunks:
        for chunk in chunks:
            rows += int(np.prod(chunk["y"].shape))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {
        "source": kind,
        "path": path,
        "threads": threads,
        "rows": rows,
        "rows_per_second": rows / wall,
        "rows_per_cpu_second": rows / cpu,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_import,
    }
    if kind == "parquet":
        middle = source.num_batches(batch_size) // 2
        start, start_cpu = time.perf_counter(), time.process_time()
        next(source.batches(batch_size, seed=0, epoch=0, start_batch=middle))
        out["resume_mid_epoch_seconds"] = time.perf_counter() - start
        out["resume_mid_epoch_cpu_seconds"] = time.process_time() - start_cpu
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e6])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--one", nargs=3, metavar=("KIND", "PATH", "THREADS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", default=str(HERE / "results" / "data_reading.json"))
    args = parser.parse_args()
    if args.one:
        kind, path, threads = args.one
        print(json.dumps(one(kind, path, args.batch_size, int(threads) or None)))
        return
    from make_synthetic_parquet import ensure

    results = []
    for n in args.rows:
        path = str(ensure(int(n)))
        configs = [("parquet", 1), ("parquet", 2)]
        if n <= 2e6:  # the in-memory peer: the whole file as arrays
            configs.insert(0, ("arrays", 0))
        for kind, threads in configs:
            command = [sys.executable, __file__, "--one", kind, path, str(threads)]
            command += ["--batch-size", str(args.batch_size)]
            line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(line.strip().splitlines()[-1])
            results.append(result)
            print(
                f"{int(n):>9} {kind:8} threads={threads or '-'}: "
                f"{result['rows_per_second']:>11,.0f} rows/s "
                f"{result['rows_per_cpu_second']:>11,.0f} rows/CPU-s "
                f"peak RSS {result['peak_rss_mb']:6.0f} MB "
                f"(import {result['rss_after_import_mb']:.0f})"
                + (
                    f", resume mid-epoch {result['resume_mid_epoch_seconds']:.1f} s "
                    f"({result['resume_mid_epoch_cpu_seconds']:.1f} CPU-s)"
                    if "resume_mid_epoch_seconds" in result
                    else ""
                ),
                flush=True,
            )
    payload = {"command": command_line(), "date": today(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    lines = [
        "# Reading speed and memory of viax.data",
        "",
        f"`{payload['command']}` ({payload['date']}; each configuration in a fresh process; "
        "the machine (2 cores) was shared with other jobs: rows per CPU-second is the "
        "steadier number).",
        "",
        "| rows | source | threads | rows/s | rows per CPU-s | peak RSS MB | "
        "RSS after import MB | resume mid-epoch s (CPU-s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        resume = (
            f"{r['resume_mid_epoch_seconds']:.1f} ({r['resume_mid_epoch_cpu_seconds']:.1f})"
            if "resume_mid_epoch_seconds" in r
            else "-"
        )
        lines.append(
            f"| {r['rows']:,} | {r['source']} | {r['threads'] or '-'} | "
            f"{r['rows_per_second']:,.0f} | {r['rows_per_cpu_second']:,.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | {resume} |"
        )
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
