"""Accuracy on seven posteriordb posteriors: viax against well-tuned NumPyro SVI.

For every posterior in ``shared/data/posteriordb`` and each Gaussian family
(mean-field, full-rank) this fits

- ``viax``: ``viax.fit`` with the default optimizer (MAP + Laplace preconditioning +
  deterministic ADVI);
- ``viax-stan``: ``viax.fit(optimizer="stan")``, Stan's stochastic ADVI;
- ``numpyro``: NumPyro SVI, ``AutoNormal`` / ``AutoMultivariateNormal``,
  ``Trace_ELBO`` with several particles, Adam with an exponentially decaying rate,
  20,000 steps,

and scores the draws against the NUTS reference moments: ``|mean_q - mean_ref| /
sd_ref`` (worst parameter and median) and ``sd_q / sd_ref``.  Targets: viax full-rank
within 0.2 reference sd of every posterior mean on all seven, mean-field within 0.3.

    python benchmarks/posteriordb_accuracy.py                 # everything
    python benchmarks/posteriordb_accuracy.py --tool viax     # viax only (both optimizers)
    python benchmarks/posteriordb_accuracy.py --tool viax --optimizer dadvi \
        --posterior kidiq-kidscore_interaction --family fullrank

Writes ``benchmarks/results/posteriordb_accuracy.json`` (records of other tools already
there are kept, so ``--tool viax`` refreshes only viax) and prints markdown tables.
Everything runs in float64 (importing viax turns it on for NumPyro too).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts examples/ on sys.path)
import posteriordb_models as pdb  # noqa: E402

RESULT_FILE = "posteriordb_accuracy.json"
FAMILIES = ("meanfield", "fullrank")
METHODS = ("viax", "viax-stan", "numpyro")
TARGETS = {"fullrank": 0.2, "meanfield": 0.3}
NUM_DRAWS = 4000

# NumPyro's SVI, tuned by hand once for these posteriors and then left alone: a rate
# that starts high enough to cross the unscaled regressions and decays 50-fold so the
# last iterates average out the gradient noise.
NUMPYRO_STEPS = 20_000
NUMPYRO_PARTICLES = 8
NUMPYRO_LR = 0.05
NUMPYRO_DECAY = 0.02


def fit_viax(model_fn, data, family, optimizer, seed):
    import viax

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = viax.fit(
            model_fn, data, family=family, optimizer=optimizer, seed=seed, progress=False
        )
        draws = result.sample(NUM_DRAWS, seed)
        elapsed = time.perf_counter() - start
    return draws, {
        "wall_time": elapsed,
        "fit_wall_time": float(result.wall_time),
        "compile_time": float(result.compile_time),
        "num_steps": int(result.num_steps),
        "converged": bool(result.converged),
        "message": result.message,
        "elbo": float(result.elbo),
        "warnings": [str(w.message) for w in caught],
    }


def fit_numpyro(model_fn, data, family, seed, sites, num_steps=NUMPYRO_STEPS):
    """NumPyro SVI; ``sites``: the sites to draw (latent or deterministic)."""
    import jax
    import numpy as np
    import numpyro
    import optax
    from numpyro.infer import SVI, Predictive, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
    from numpyro.infer.initialization import init_to_median

    arrays = _common.as_arrays(data)
    guide_class = AutoNormal if family == "meanfield" else AutoMultivariateNormal
    guide = guide_class(model_fn, init_loc_fn=init_to_median)
    schedule = optax.exponential_decay(NUMPYRO_LR, num_steps, NUMPYRO_DECAY)
    optim = numpyro.optim.optax_to_numpyro(optax.adam(schedule))
    svi = SVI(model_fn, guide, optim, Trace_ELBO(num_particles=NUMPYRO_PARTICLES))
    start = time.perf_counter()
    run = svi.run(jax.random.PRNGKey(seed), num_steps, progress_bar=False, **arrays)
    losses = np.asarray(run.losses)
    predictive = Predictive(
        model_fn, guide=guide, params=run.params, num_samples=NUM_DRAWS, return_sites=sites
    )
    draws = predictive(jax.random.PRNGKey(seed + 1), **arrays)
    draws = {k: np.asarray(v) for k, v in draws.items()}
    elapsed = time.perf_counter() - start
    tail = losses[-1000:]
    return draws, {
        "wall_time": elapsed,
        "num_steps": num_steps,
        "num_particles": NUMPYRO_PARTICLES,
        "converged": bool(np.all(np.isfinite(tail))),
        "elbo": float(-tail.mean()) if np.all(np.isfinite(tail)) else float("-inf"),
        "message": f"Adam, exponential decay {NUMPYRO_LR} -> {NUMPYRO_LR * NUMPYRO_DECAY}",
    }


def run_one(name, family, method, seed):
    model_fn, data, reference = pdb.load(name, _common.POSTERIORDB_DIR)
    record = {
        "posterior": name,
        "family": family,
        "method": method,
        "seed": seed,
        "command": _common.command_line(),
        "date": _common.today(),
    }
    try:
        if method == "numpyro":
            sites = sorted({pdb.site_of(stan_name) for stan_name in reference})
            draws, info = fit_numpyro(model_fn, data, family, seed, sites)
        else:
            optimizer = "stan" if method == "viax-stan" else None
            draws, info = fit_viax(model_fn, data, family, optimizer, seed)
        scores = pdb.score(draws, reference)
    except Exception as err:  # recorded in the table, never hidden
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        print(f"  ERROR {name} {family} {method}: {record['error']}", flush=True)
        return record
    record.update(info)
    record.update(scores)
    print(
        f"  {method:9s} {family:9s} {name:42s} worst {scores['mean_error_worst']:.3f} "
        f"({scores['worst_parameter']}) median {scores['mean_error_median']:.3f} "
        f"sd ratio {scores['sd_ratio_min']:.2f}-{scores['sd_ratio_max']:.2f} "
        f"{info['wall_time']:.1f}s",
        flush=True,
    )
    return record


def _cell(record, key):
    if record is None:
        return "–"
    if "error" in record:
        return "error"
    return _common.fmt(record[key])


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.1e}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _sd_cell(record):
    if record is None:
        return "–"
    if "error" in record:
        return "error"
    return f"{_num(record['sd_ratio_min'], 2)}–{_num(record['sd_ratio_max'], 2)}"


def targets(records) -> list[dict]:
    """Pass/fail for the viax (default optimizer) targets."""
    out = []
    for family, limit in TARGETS.items():
        mine = [r for r in records if r["method"] == "viax" and r["family"] == family]
        names = sorted({r["posterior"] for r in mine})
        worst = {}
        for name in names:
            rs = [r for r in mine if r["posterior"] == name]
            worst[name] = max(
                (r["mean_error_worst"] if "error" not in r else float("inf")) for r in rs
            )
        met = len(names) == len(pdb.MODELS) and all(v <= limit for v in worst.values())
        out.append(
            {
                "target": f"viax {family}: every posterior mean within {limit} reference sd "
                f"on all {len(pdb.MODELS)} posteriors",
                "family": family,
                "limit": limit,
                "posteriors_run": len(names),
                "worst": max(worst.values()) if worst else None,
                "worst_posterior": max(worst, key=worst.get) if worst else None,
                "met": met,
            }
        )
    return out


def markdown(payload) -> str:
    records = payload["records"]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    commands = sorted({(r.get("command", payload["command"]), r.get("date", "")) for r in records})
    lines = [
        "### Accuracy on posteriordb (|mean error| / reference sd; sd ratio)",
        "",
        "Commands: "
        + "; ".join(f"`{command}` ({date})" for command, date in commands)
        + f" — {payload['machine'].get('cpu_count')} CPU cores, float64, seed "
        f"{records[0]['seed'] if records else 0}.",
        "",
        "Cells: worst / median over the parameters of `|mean_q − mean_ref| / sd_ref`; "
        "`sd_q / sd_ref` (min–max); seconds for the fit and the draws, compile "
        "included, on a shared machine (a rough cost, not a speed benchmark: see the speed "
        "tables). NumPyro: "
        f"{NUMPYRO_STEPS:,} Adam steps, rate {NUMPYRO_LR} decaying exponentially to "
        f"{NUMPYRO_LR * NUMPYRO_DECAY:g}, {NUMPYRO_PARTICLES} particles.",
    ]
    for family in FAMILIES:
        header = ["posterior"]
        for m in methods:
            header += [f"{m} worst / median", f"{m} sd ratio", f"{m} s"]
        rows = []
        for name in pdb.MODELS:
            row = [name]
            for m in methods:
                rs = [
                    r
                    for r in records
                    if r["posterior"] == name and r["family"] == family and r["method"] == m
                ]
                r = rs[0] if rs else None
                if r is None or "error" in r:
                    row += [_cell(r, "x"), _cell(r, "x"), _cell(r, "x")]
                else:
                    row += [
                        f"{_num(r['mean_error_worst'])} / {_num(r['mean_error_median'])}",
                        _sd_cell(r),
                        f"{r['wall_time']:.1f}",
                    ]
            rows.append(row)
        lines += ["", f"**{family}**", "", _common.markdown_table(header, rows)]
    lines += ["", "Targets (viax, default optimizer):", ""]
    for t in payload["targets"]:
        verdict = "**met**" if t["met"] else "**missed**"
        worst = "–" if t["worst"] is None else f"{t['worst']:.3f}"
        lines.append(
            f"- {t['target']}: {verdict} (worst {worst} on {t['worst_posterior']}, "
            f"{t['posteriors_run']} run)"
        )
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {r['method']} {r['family']} {r['posterior']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("viax", "numpyro", "all"), default="all")
    parser.add_argument(
        "--optimizer",
        choices=("dadvi", "stan", "both"),
        default="both",
        help="viax optimizers to run (dadvi is the default optimizer)",
    )
    parser.add_argument("--posterior", action="append", choices=list(pdb.MODELS))
    parser.add_argument("--family", action="append", choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    if not _common.POSTERIORDB_DIR.is_dir():
        raise SystemExit(f"posteriordb data not found at {_common.POSTERIORDB_DIR}")
    methods = []
    if args.tool in ("viax", "all"):
        methods += {"dadvi": ["viax"], "stan": ["viax-stan"], "both": ["viax", "viax-stan"]}[
            args.optimizer
        ]
    if args.tool in ("numpyro", "all"):
        methods.append("numpyro")
    names = args.posterior or list(pdb.MODELS)
    families = args.family or list(FAMILIES)

    import viax  # noqa: F401  (float64 for every tool, as Stan's reference)

    records = []
    for name in names:
        for family in families:
            for method in methods:
                records.append(run_one(name, family, method, args.seed))

    previous = _common.read_json(RESULT_FILE) if not args.no_write else None
    if previous is not None:
        done = {(r["posterior"], r["family"], r["method"]) for r in records}
        kept = [
            r
            for r in previous.get("records", [])
            if (r["posterior"], r["family"], r["method"]) not in done
        ]
        records = kept + records
    payload = {
        "benchmark": "posteriordb_accuracy",
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "numpyro_settings": {
            "num_steps": NUMPYRO_STEPS,
            "num_particles": NUMPYRO_PARTICLES,
            "learning_rate": NUMPYRO_LR,
            "decay_rate": NUMPYRO_DECAY,
            "optimizer": "optax.adam(optax.exponential_decay(lr, num_steps, decay_rate))",
        },
        "records": records,
    }
    payload["targets"] = targets(records)
    text = markdown(payload)
    payload["markdown"] = text
    if not args.no_write:
        path = _common.write_json(RESULT_FILE, payload)
        print(f"wrote {path}")
    print(text)
    return payload


if __name__ == "__main__":
    main()
