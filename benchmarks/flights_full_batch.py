"""Flights (benchmarks/flights.py's model and data): the full-batch default fit, the
sums over the 327,346 rows taken in blocks (viax.infer.chunked) and the set-up's dense
curvature formed exactly from the Hessian's arrowhead structure (127 columns and the
diagonal of the 4,043 plane effects: viax.infer.chunked.hessian_structure).

Writes benchmarks/results/flights_full_batch.json: per-site posterior means and sds
(the same "summary" layout as flights.py, the reference its minibatch runs are compared
with), wall time, peak RSS of the fitting process (a fresh one), steps, converged.

    python benchmarks/flights_full_batch.py                  # mean-field, default draws
    python benchmarks/flights_full_batch.py --num-draws 64   # fewer fixed draws
    python benchmarks/flights_full_batch.py --num-draws 64 --seed 1 --name flights_full_batch_seed1
                                                 # other fixed draws: the reference's precision

``--synthetic 1000000`` fits instead benchmarks/synthetic_logistic.py's model to its
10^6-row raw-scale data (benchmarks/make_synthetic_parquet.py, read into memory as
float32), full batch, and writes benchmarks/results/full_batch_synthetic_<rows>.json:
wall time, peak RSS, and the error of the means against the full-data Laplace answer
(synthetic_logistic.laplace) in Laplace sds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from _common import command_line, machine, peak_rss_mb, today, write_json
from flights import GLOBALS, _summary, load_arrays, make_model


def run(num_draws: int | None, num_steps: int | None, family: str, seed: int = 0) -> dict:
    import viax

    start = time.perf_counter()
    data, sizes, _ = load_arrays()
    model = make_model(sizes["C"], sizes["D"], sizes["T"])
    result = viax.fit(
        model,
        data,
        family=family,
        num_draws=num_draws,
        num_steps=num_steps,
        path="full-batch",
        seed=seed,
        progress=False,
    )
    wall = time.perf_counter() - start
    draws = result.sample(4000, seed=1)
    info = result.info
    return {
        **_fit_record(result, wall, int(len(data["y"]))),
        "latents": int(result.family.dim),
        "map_ok": info["map_ok"],
        "path": info.get("path"),
        "path_reason": info.get("path_reason"),
        "elbo": result.elbo,
        "khat": result.khat,
        "seed": seed,
        "summary": _summary({k: draws[k] for k in draws if k in GLOBALS or k.startswith("z_")}),
        # q's own means and sds (the summary's 4,000 draws add 1.6% sd noise to them)
        "q": {
            "mean": np.asarray(result.family.mean(result.params)).tolist(),
            "sd": np.asarray(result.family.stddev(result.params)).tolist(),
        },
        "peak_rss_mb": peak_rss_mb(),
    }


def _fit_record(result, wall: float, num_rows: int) -> dict:
    """The fields both runs report of a full-batch fit."""
    info = result.info
    return {
        "wall_seconds": wall,
        "fit_seconds": result.wall_time,
        "compile_seconds": result.compile_time,
        "steps": result.num_steps,
        "converged": result.converged,
        "message": result.message,
        "num_rows": num_rows,
        "num_draws": info["num_draws"],
        "chunks": info["chunks"],
        "curvature": info["curvature"],
        "curvature_reason": info.get("curvature_reason"),
        "map_hessians": info.get("map_newton_steps"),
        "map_decrement": info.get("map_decrement"),
        "rewhitened_after": info.get("rewhitened_after"),
        "rewhitenings": info.get("rewhitenings"),
        "preconditioner": info["preconditioner"],
        "map_steps": info["map_steps"],
    }


def run_synthetic(num_rows: int, num_draws: int | None, family: str) -> dict:
    import make_synthetic_parquet as synth
    import numpy as np
    from synthetic_logistic import laplace, model

    import viax

    path = synth.ensure(num_rows, raw_scales=True)
    reference = laplace(path)
    start = time.perf_counter()
    X, y = synth.read_arrays(path, dtype=np.float32)
    result = viax.fit(
        model,
        {"X": X, "y": y},
        family=family,
        num_draws=num_draws,
        path="full-batch",
        seed=0,
        progress=False,
    )
    wall = time.perf_counter() - start
    mean = np.asarray(result.family.mean(result.params))  # a, then beta (site order)
    sd = np.asarray(result.family.stddev(result.params))
    return {
        **_fit_record(result, wall, num_rows),
        "khat": result.khat,
        "max_abs_mean_error_in_laplace_sd": float(
            np.max(np.abs(mean - reference["mean"]) / reference["sd"])
        ),
        "sd_over_meanfield_sd": [
            float(np.min(sd / reference["meanfield_sd"])),
            float(np.max(sd / reference["meanfield_sd"])),
        ],
        "sd_over_laplace_sd": [
            float(np.min(sd / reference["sd"])),
            float(np.max(sd / reference["sd"])),
        ],
        "peak_rss_mb": peak_rss_mb(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-draws", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--family", default="meanfield")
    parser.add_argument("--seed", type=int, default=0, help="the fixed draws' seed")
    parser.add_argument("--name", default=None, help="results file name (no .json)")
    parser.add_argument("--synthetic", type=int, default=None, help="rows of the synthetic data")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.synthetic:
        print(json.dumps(run_synthetic(args.synthetic, args.num_draws, args.family)))
        return
    if args.child:
        print(json.dumps(run(args.num_draws, args.steps, args.family, args.seed)))
        return
    argv = [sys.executable, __file__, "--child", "--family", args.family, "--seed", str(args.seed)]
    if args.synthetic:
        argv += ["--synthetic", str(args.synthetic)]
    if args.num_draws:
        argv += ["--num-draws", str(args.num_draws)]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(out.returncode)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: v for k, v in result.items() if k not in ("summary", "q")}, flush=True)
    payload = {
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "note": "shared 2-core machine (other jobs running): times are inflated",
        "family": args.family,
        "result": result,
    }
    name = f"full_batch_synthetic_{args.synthetic}" if args.synthetic else "flights_full_batch"
    name = args.name or name
    write_json(f"{name}.json", payload)


if __name__ == "__main__":
    main()
