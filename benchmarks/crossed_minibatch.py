"""Crossed random effects with many levels on both sides, on the minibatch path.

Rows indexed by two crossed groupings (a in 0..A-1, b in 0..B-1, both Zipf-unbalanced and
drawn independently, so most pairs (a, b) are seen once or never), a raw-scale predictor
(x in 5..23, uncentred) and non-centred effects:

    logit_i (or mean_i) = α + β x_i + σ_a z_a[a_i] + σ_b z_b[b_i],  z ~ N(0, 1).

Unlike the flights model's nested effects, every row couples one z_a with one z_b, so the
Hessian of the log density has no arrowhead structure (no large site whose coordinates no
term couples) once both sides are larger than the structured Hessian's 1,024 columns.

Each case is fitted by ``viax.fit(model, data, batch_size=4096, path="minibatch", seed=0)``
and, as the reference, by ``viax.fit(model, data, path="full-batch", num_draws=64, seed=0)``,
each in a fresh process; the table reports the minibatch set-up chosen
(``result.info``), converged, steps, wall time and the agreement of q's means and sds in
the unconstrained space with the reference's (|Δmean| / reference sd, sd ratio).

    python benchmarks/crossed_minibatch.py                        # the default cases
    python benchmarks/crossed_minibatch.py --case logistic,50000,1200,1200
    python benchmarks/crossed_minibatch.py --cache /tmp/crossed   # reuse reference fits

Writes benchmarks/results/crossed_minibatch.json and .md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, command_line, machine, run_child, today, write_json

CASES = ("logistic,100000,1500,1500", "gaussian,100000,1500,1500")
BATCH = 4096


def make_data(kind: str, num_rows: int, num_a: int, num_b: int, seed: int = 0) -> dict:
    """``{"x", "a", "b", "y"}``: crossed Zipf-sized groupings (sizes ∝ 1/rank^0.8) drawn
    independently, x in 5..23 (raw scale), y Bernoulli (logistic) or Normal (gaussian,
    noise sd 1)."""
    rng = np.random.default_rng(seed)

    def zipf(count, size):
        weights = 1.0 / np.arange(1, count + 1) ** 0.8
        return rng.permutation(count)[rng.choice(count, size=size, p=weights / weights.sum())]

    a = zipf(num_a, num_rows)
    b = zipf(num_b, num_rows)
    x = rng.integers(5, 24, num_rows).astype(float)
    eta = (
        -1.0 + 0.06 * x + 0.6 * rng.standard_normal(num_a)[a] + 0.4 * rng.standard_normal(num_b)[b]
    )
    if kind == "logistic":
        y = (rng.uniform(size=num_rows) < 1 / (1 + np.exp(-eta))).astype(float)
    else:
        y = eta + rng.standard_normal(num_rows)
    return {"x": x, "a": a.astype(np.int32), "b": b.astype(np.int32), "y": y}


def make_model(kind: str, num_a: int, num_b: int):
    import numpyro
    import numpyro.distributions as dist

    def model(x, a, b, y):
        alpha = numpyro.sample("alpha", dist.Normal(0, 5))
        beta = numpyro.sample("beta", dist.Normal(0, 1))
        s_a = numpyro.sample("s_a", dist.HalfNormal(1))
        s_b = numpyro.sample("s_b", dist.HalfNormal(1))
        noise = numpyro.sample("noise", dist.HalfNormal(2)) if kind == "gaussian" else None
        with numpyro.plate("A", num_a):
            z_a = numpyro.sample("z_a", dist.Normal(0, 1))
        with numpyro.plate("B", num_b):
            z_b = numpyro.sample("z_b", dist.Normal(0, 1))
        eta = alpha + beta * x + s_a * z_a[a] + s_b * z_b[b]
        with numpyro.plate("N", x.shape[0]):
            if kind == "logistic":
                numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)
            else:
                numpyro.sample("y", dist.Normal(eta, noise), obs=y)

    return model


def _parse(case: str) -> tuple[str, int, int, int]:
    kind, rows, num_a, num_b = case.split(",")
    assert kind in ("logistic", "gaussian"), kind
    return kind, int(rows), int(num_a), int(num_b)


INFO_KEYS = (
    "path",
    "preconditioner",
    "curvature_reason",
    "dadvi_steps",
    "dadvi_dense_steps",
    "full_dadvi_steps",
    "full_dadvi_converged",
    "full_dadvi_seconds",
    "setup_decrement",
    "setup_seconds",
    "hessian_negative_eigenvalues",
    "rhat",
    "mcse_max_relative",
    "curvature",
    "map_steps",
    "num_draws",
)


def run_fit(case: str, path: str, num_steps: int | None = None, seed: int = 0) -> dict:
    import jax

    import viax

    jax.config.update("jax_enable_x64", True)
    kind, rows, num_a, num_b = _parse(case)
    data = make_data(kind, rows, num_a, num_b)
    model = make_model(kind, num_a, num_b)
    captured: dict = {}
    if path == "minibatch" and os.environ.get("CROSSED_SETUP"):
        # Record where the set-up ends (the stochastic phase's start).
        from viax.infer import minibatch

        whitening_fn = minibatch._whitening

        def whitening(*args, **kwargs):
            out = whitening_fn(*args, **kwargs)
            captured["setup_mean"] = np.asarray(out[0].center).tolist()
            captured["setup_sd"] = np.asarray(out[0].scale).tolist()
            return out

        minibatch._whitening = whitening
    start = time.perf_counter()
    if path == "minibatch":
        result = viax.fit(
            model,
            data,
            batch_size=BATCH,
            path="minibatch",
            num_steps=num_steps,
            seed=seed,
            progress=False,
        )
    else:
        result = viax.fit(model, data, path="full-batch", num_draws=64, seed=seed, progress=False)
    wall = time.perf_counter() - start
    info = result.info
    target = viax.model.build_target(model, {k: v[:10] for k, v in data.items()})[0]
    layout = [(s.name, s.start, s.size) for s in sorted(target.sites, key=lambda s: s.start)]
    return {
        "case": case,
        "path": path,
        "latents": int(result.family.dim),
        "wall_seconds": wall,
        "steps": int(result.num_steps),
        "converged": bool(result.converged),
        "message": result.message,
        "elbo": float(result.elbo),
        "khat": float(result.khat),
        "info": {k: info.get(k) for k in INFO_KEYS if k in info},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "layout": layout,
        "mean": np.asarray(result.params["loc"]).tolist(),
        "sd": np.exp(np.asarray(result.params["log_scale"])).tolist(),
        **captured,
    }


def compare(fit: dict, ref: dict) -> dict:
    """Per site: max |Δmean|/sd_ref, the fraction beyond 0.1, the sd ratios' range and the
    fraction beyond 10%."""
    z = np.abs(np.asarray(fit["mean"]) - ref["mean"]) / np.asarray(ref["sd"])
    ratio = np.asarray(fit["sd"]) / np.asarray(ref["sd"])
    out = {}
    for name, start, size in ref["layout"]:
        sl = slice(start, start + size)
        out[name] = {
            "max_mean_sd": float(z[sl].max()),
            "mean_off": float(np.mean(z[sl] > 0.1)),
            "sd_ratio": [float(ratio[sl].min()), float(ratio[sl].max())],
            "sd_off": float(np.mean(np.abs(ratio[sl] - 1) > 0.1)),
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", action="append", help="kind,rows,A,B (kind: logistic|gaussian)")
    parser.add_argument("--cache", default=None, help="a folder keeping the reference fits")
    parser.add_argument("--steps", type=int, default=None, help="minibatch steps (default: rule)")
    parser.add_argument("--name", default="crossed_minibatch", help="results file name")
    parser.add_argument(
        "--second-reference",
        action="store_true",
        help="also fit the reference with seed 1 (other fixed draws): its own spread",
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_fit(args.case[0], args.path, args.steps, args.seed)))
        return

    def reference(case, seed):
        name = f"{case.replace(',', '_')}{'' if seed == 0 else f'_seed{seed}'}.json"
        cached = Path(args.cache) / name if args.cache else None
        if cached is not None and cached.exists():
            return json.loads(cached.read_text())
        ref = run_child(__file__, ["--case", case, "--path", "full-batch", "--seed", str(seed)])
        if cached is not None:
            os.makedirs(cached.parent, exist_ok=True)
            cached.write_text(json.dumps(ref))
        return ref

    rows = []
    for case in args.case or CASES:
        ref = reference(case, 0)
        print(
            f"reference {case}: {ref['wall_seconds']:.0f} s, {ref['steps']} steps, "
            f"converged {ref['converged']}, {ref['info']}",
            flush=True,
        )
        steps = ["--steps", str(args.steps)] if args.steps else []
        os.environ["CROSSED_SETUP"] = "1"  # the children record the set-up's end
        fit = run_child(__file__, ["--case", case, "--path", "minibatch", *steps])
        agreement = compare(fit, ref)
        setup = {"mean": fit.pop("setup_mean", None), "sd": fit.pop("setup_sd", None)}
        row = {
            "case": case,
            "latents": fit["latents"],
            "reference": {k: v for k, v in ref.items() if k not in ("mean", "sd", "layout")},
            "minibatch": {k: v for k, v in fit.items() if k not in ("mean", "sd", "layout")},
            "agreement": agreement,
        }
        if setup["mean"] is not None:
            row["setup_agreement"] = compare(setup, ref)
        if args.second_reference:
            row["reference_seed1_agreement"] = compare(reference(case, 1), ref)
        print(json.dumps(row, indent=1, default=str), flush=True)
        rows.append(row)
    payload = {
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "note": "shared 2-core machine (another job running): times are inflated",
        "cases": rows,
    }
    write_json(f"{args.name}.json", payload)
    lines = [
        "# Crossed random effects on the minibatch path",
        "",
        f"`{payload['command']}` ({payload['date']}; {payload['note']})",
        "",
        "Agreement: q's means and sds (unconstrained) against the full-batch fit "
        '(`path="full-batch"`, 64 draws); per site, the largest |Δmean| in reference sds '
        "and the sd ratios' range.",
        "",
        "| case | D | reference s (steps) | minibatch s | steps | converged | set-up "
        "| worst mean (sd) | sd ratios | ELBO mini − ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref, fit, agree = r["reference"], r["minibatch"], r["agreement"]
        worst = max(agree.items(), key=lambda kv: kv[1]["max_mean_sd"])
        low = min(v["sd_ratio"][0] for v in agree.values())
        high = max(v["sd_ratio"][1] for v in agree.values())
        setup = str(fit["info"].get("preconditioner", ""))
        lines.append(
            f"| {r['case']} | {r['latents']} | {ref['wall_seconds']:.0f} ({ref['steps']}) "
            f"| {fit['wall_seconds']:.0f} | {fit['steps']} | {fit['converged']} | {setup} "
            f"| {worst[1]['max_mean_sd']:.3f} ({worst[0]}) | {low:.3f}-{high:.3f} "
            f"| {fit['elbo'] - ref['elbo']:+.1f} |"
        )
    for r in rows:
        lines += ["", f"Per site, {r['case']} (max \\|Δmean\\|/sd, share > 0.1 sd; sd ratios):", ""]
        second = r.get("reference_seed1_agreement")
        for name, v in r["agreement"].items():
            cell = (
                f"- {name}: minibatch {v['max_mean_sd']:.3f} ({v['mean_off']:.0%}), "
                f"{v['sd_ratio'][0]:.3f}-{v['sd_ratio'][1]:.3f}"
            )
            if "setup_agreement" in r:
                w = r["setup_agreement"][name]
                cell += (
                    f"; set-up's end {w['max_mean_sd']:.3f} ({w['mean_off']:.0%}), "
                    f"{w['sd_ratio'][0]:.3f}-{w['sd_ratio'][1]:.3f}"
                )
            if second:
                w = second[name]
                cell += (
                    f"; reference seed 1 vs seed 0 {w['max_mean_sd']:.3f} ({w['mean_off']:.0%}), "
                    f"{w['sd_ratio'][0]:.3f}-{w['sd_ratio'][1]:.3f}"
                )
            lines.append(cell)
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
