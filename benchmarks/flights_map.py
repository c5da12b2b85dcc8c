"""Flights (benchmarks/flights.py's model): the full-batch MAP search alone, with the
dense curvature read from a sample of the rows (the time budget's choice without
structure) or exactly from the arrowhead structure (K columns + the diagonal of the
plane effects, viax.infer.chunked.hessian_structure).  Prints every round of the
whitened search (steps, −log p̃, largest gradient) and the end: −log p̃, the Newton
decrement by the end point's own Hessian, whether that Hessian is positive definite,
and the group scales there.  A diagnostic, not a timed comparison.

    python benchmarks/flights_map.py --curvature sampled      # every 4th block of rows
    python benchmarks/flights_map.py --curvature structured
    python benchmarks/flights_map.py --rows 100000 --rounds 10

Writes benchmarks/results/flights_map_<curvature>_<rows>.json.
"""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np
from _common import command_line, machine, today, write_json
from flights import load_arrays, make_model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--curvature", choices=("sampled", "structured"), default="structured")
    parser.add_argument("--rows", type=int, default=0, help="the first rows only (0: all)")
    parser.add_argument("--rounds", type=int, default=None, help="whitened rounds at most")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    from viax.families import MeanField
    from viax.infer import dadvi
    from viax.infer.chunked import dense_curvature_plan, hessian_structure, plan_chunks
    from viax.model import build_target

    fit_module = importlib.import_module("viax.fit")
    if args.rounds:
        fit_module._WHITENED_ROUNDS = args.rounds
    data, sizes, _ = load_arrays()
    if args.rows:
        data = {k: v[: args.rows] for k, v in data.items()}
    start = time.perf_counter()
    target, arrays, init = build_target(make_model(sizes["C"], sizes["D"], sizes["T"]), data)
    chunked, _ = plan_chunks(target, arrays, 64, init)  # the blocks of a 64-draw fit
    blocked, rows = (chunked, chunked.blocked(arrays)) if chunked else (target, arrays)
    structure, stride = None, 1
    if args.curvature == "structured":
        structure, reason = hessian_structure(
            lambda u, d: -blocked.log_density(u, d), rows, init, target.sites
        )
    else:
        _, reason, sample = dense_curvature_plan(target.dim, arrays)
        if sample is not None and chunked is not None:
            stride = chunked.curvature_stride(sample)
    print(reason, flush=True)
    algo = dadvi.build_dadvi(
        blocked,
        MeanField(target.dim),
        dense=True,
        curvature_stride=stride,
        curvature_structure=structure,
    )
    rounds = []
    minimize = fit_module.minimize_on_host

    def logged(fn, x0, budget, tol):
        out = minimize(fn, x0, budget, tol)
        rounds.append(
            {
                "steps": int(out[3]),
                "budget": budget,
                "value": float(out[1]),
                "max_abs_grad": float(np.max(np.abs(out[2]))),
            }
        )
        print(rounds[-1], flush=True)
        return out

    fit_module.minimize_on_host = logged
    center, value, grad, hess, steps, hessians = fit_module._find_map(algo, rows, init)
    scale, factor, kind = dadvi.host_whitening(np.asarray(hess))
    grad_w = factor.T @ (scale * grad) if factor is not None else scale * grad
    sites = {s.name: s.start for s in target.sites}
    result = {
        "curvature": args.curvature,
        "reason": reason,
        "rows": int(len(data["y"])),
        "rounds": rounds,
        "lbfgs_steps": int(steps),
        "hessians": int(hessians),
        "value": float(value),
        "decrement": float(grad_w @ grad_w),
        "hessian_positive_definite": kind == "cholesky",
        "scales": {k: float(np.exp(center[sites[k]])) for k in ("s_carrier", "s_dest", "s_tail")},
        "seconds": time.perf_counter() - start,
    }
    print({k: v for k, v in result.items() if k != "rounds"}, flush=True)
    payload = {"command": command_line(), "date": today(), "machine": machine(), "result": result}
    write_json(f"flights_map_{args.curvature}_{args.rows or 'all'}.json", payload)


if __name__ == "__main__":
    main()
