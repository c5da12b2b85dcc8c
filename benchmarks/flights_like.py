"""Hierarchical logistic regressions of the flights kind, generated: does the full-batch
default converge on all of them, and in what time?

benchmarks/flights.py's model (intercept, two slopes on raw scales, non-centred effects
of carriers, destinations and planes) on synthetic data with its difficulties: planes
nested in carriers, unbalanced group sizes (Zipf: a few large groups, many with one or
two rows), hour in 5..23 and distance in 80..5000 miles, uncentred.  Each case is fitted
by ``viax.fit(..., path="full-batch")`` in a fresh process; the table reports the
curvature chosen, MAP and DADVI steps, converged, k̂ and the time.  ``--check`` also
fits a case by full-rank DADVI and NUTS (NumPyro) and reports the largest difference of
the means in posterior sds (small cases only).

    python benchmarks/flights_like.py                       # the default cases
    python benchmarks/flights_like.py --case 20000,8,40,300
    python benchmarks/flights_like.py --check 10000,4,20,60

Writes benchmarks/results/flights_like.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import RESULTS_DIR, command_line, machine, run_child, today, write_json

CASES = ("10000,4,20,150", "30000,8,60,600", "100000,16,105,2000")


def make_data(num_rows: int, carriers: int, dests: int, planes: int, seed: int = 0) -> dict:
    """Rows of the flights kind: ``{"hour", "distance", "carrier", "dest", "tail", "y"}``
    with planes nested in carriers and Zipf-sized groups (sizes ∝ 1/rank)."""
    rng = np.random.default_rng(seed)

    def zipf(count, size):
        weights = 1.0 / np.arange(1, count + 1)
        return rng.choice(count, size=size, p=weights / weights.sum())

    plane_carrier = zipf(carriers, planes)  # each plane belongs to one carrier
    plane_carrier[:carriers] = np.arange(carriers)  # every carrier has a plane
    tail = zipf(planes, num_rows)
    carrier = plane_carrier[tail]
    dest = zipf(dests, num_rows)
    hour = rng.integers(5, 24, num_rows).astype(float)
    distance = np.exp(rng.uniform(np.log(80), np.log(5000), dests))[dest].round()
    logit = (
        -2.0
        + 0.08 * hour
        - 1e-4 * distance
        + 0.3 * rng.standard_normal(carriers)[carrier]
        + 0.3 * rng.standard_normal(dests)[dest]
        + 0.5 * rng.standard_normal(planes)[tail]
    )
    y = (rng.uniform(size=num_rows) < 1 / (1 + np.exp(-logit))).astype(float)
    return {
        "hour": hour,
        "distance": distance,
        "carrier": carrier.astype(np.int32),
        "dest": dest.astype(np.int32),
        "tail": tail.astype(np.int32),
        "y": y,
    }


def _parse(case: str) -> tuple[int, int, int, int]:
    rows, carriers, dests, planes = (int(x) for x in case.split(","))
    return rows, carriers, dests, planes


def run_case(case: str, family: str = "meanfield", num_draws: int | None = None) -> dict:
    from flights import make_model

    import viax

    rows, carriers, dests, planes = _parse(case)
    data = make_data(rows, carriers, dests, planes)
    model = make_model(carriers, dests, planes)
    start = time.perf_counter()
    result = viax.fit(
        model, data, family=family, num_draws=num_draws, path="full-batch", seed=0, progress=False
    )
    wall = time.perf_counter() - start
    info = result.info
    return {
        "case": case,
        "family": family,
        "latents": int(result.family.dim),
        "wall_seconds": wall,
        "setup_seconds": info.get("setup_time"),
        "curvature": info.get("curvature"),
        "map_ok": info.get("map_ok"),
        "map_steps": info.get("map_steps"),
        "map_hessians": info.get("map_newton_steps"),
        "map_decrement": info.get("map_decrement"),
        "curvature_reason": info.get("curvature_reason"),
        "rewhitenings": info.get("rewhitenings"),
        "num_draws": info.get("num_draws"),
        "steps": result.num_steps,
        "converged": result.converged,
        "message": result.message,
        "khat": result.khat,
        "mean": np.asarray(result.family.mean(result.params)).tolist(),
        "sd": np.asarray(result.family.stddev(result.params)).tolist(),
    }


def run_nuts(case: str, num_samples: int = 2000) -> dict:
    import jax
    from flights import make_model
    from numpyro.infer import MCMC, NUTS

    import viax

    rows, carriers, dests, planes = _parse(case)
    data = make_data(rows, carriers, dests, planes)
    model = make_model(carriers, dests, planes)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=num_samples, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), **data)
    samples = mcmc.get_samples()
    wall = time.perf_counter() - start
    # The same flat unconstrained layout as viax's q (log of the scales).
    target = viax.model.build_target(model, data)[0]
    flat = []
    for site in sorted(target.sites, key=lambda s: s.start):
        value = np.asarray(samples[site.name]).reshape(num_samples, -1)
        flat.append(np.log(value) if site.name.startswith("s_") else value)
    flat = np.concatenate(flat, axis=1)
    return {"mean": flat.mean(0).tolist(), "sd": flat.std(0).tolist(), "wall_seconds": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", action="append", help="rows,carriers,dests,planes")
    parser.add_argument("--check", default=None, help="a small case: full-rank DADVI vs NUTS")
    parser.add_argument("--family", default="meanfield")
    parser.add_argument("--num-draws", type=int, default=None, help="DADVI's fixed draws")
    parser.add_argument("--name", default="flights_like", help="results file name")
    parser.add_argument("--nuts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = (args.case or [args.check])[0]
        out = run_nuts(case) if args.nuts else run_case(case, args.family, args.num_draws)
        print(json.dumps(out))
        return
    rows = []
    for case in args.case or ([] if args.check else CASES):
        draws = ["--num-draws", str(args.num_draws)] if args.num_draws else []
        result = run_child(__file__, ["--case", case, "--family", args.family, *draws])
        print({k: v for k, v in result.items() if k not in ("mean", "sd")}, flush=True)
        rows.append(result)
    check = None
    if args.check:
        fit = run_child(__file__, ["--case", args.check, "--family", "fullrank"])
        nuts = run_child(__file__, ["--case", args.check, "--nuts"])
        mean, sd = np.asarray(fit["mean"]), np.asarray(fit["sd"])
        ref_mean, ref_sd = np.asarray(nuts["mean"]), np.asarray(nuts["sd"])
        check = {
            "case": args.check,
            "fit": {k: v for k, v in fit.items() if k not in ("mean", "sd")},
            "nuts_seconds": nuts["wall_seconds"],
            "max_mean_error_in_nuts_sd": float(np.max(np.abs(mean - ref_mean) / ref_sd)),
            "sd_ratio_range": [float(np.min(sd / ref_sd)), float(np.max(sd / ref_sd))],
        }
        print(check, flush=True)
    payload = {
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "note": "shared 2-core machine (other jobs running): times are inflated",
        "cases": [{k: v for k, v in r.items() if k not in ("mean", "sd")} for r in rows],
        "check": check,
    }
    write_json(f"{args.name}.json", payload)
    lines = [
        "# Flights-like hierarchical logistic regressions, full batch",
        "",
        f"`{payload['command']}` ({payload['date']}; {payload['note']})",
        "",
        "| rows,carriers,dests,planes | D | curvature | MAP steps (Hessians) | DADVI steps "
        "| converged | k̂ | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['latents']} | {r['curvature']} | {r['map_steps']} "
            f"({r['map_hessians']}) | {r['steps']} | {r['converged']} | {r['khat']:.2f} "
            f"| {r['wall_seconds']:.0f} |"
        )
    if check:
        lines += [
            "",
            f"Check on {check['case']}: full-rank DADVI against NUTS (1,000 + 2,000 draws): "
            f"means within {check['max_mean_error_in_nuts_sd']:.3f} NUTS sd, sds "
            f"{check['sd_ratio_range'][0]:.3f}-{check['sd_ratio_range'][1]:.3f} of NUTS's.",
        ]
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
