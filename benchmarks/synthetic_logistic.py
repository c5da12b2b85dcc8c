"""Synthetic logistic regression, 10^6 (or 10^7) rows × 20 raw-scale predictors, written
to Parquet by benchmarks/make_synthetic_parquet.py: viax streaming from the file against
NumPyro SVI with the arrays in memory.

* ``viax-parquet``: ``viax.fit(model, viax.data.parquet(path, ...), batch_size=B)``;
* ``viax-memory``: the same fit from in-memory arrays (rows per second compared);
* ``numpyro``: SVI, AutoNormal, ``plate(subsample_size=1000)``, 10,000 Adam steps
  (rate 1e-2 decaying to 1e-3), arrays in memory.

Error: the means of q against the full-data Laplace answer (Newton's method on all rows,
float64), in units of the Laplace sd, and the ratio of sds (mean-field: q's sd is
1/sqrt(H_jj), the reference for it).  Each method runs in a fresh process (peak RSS is
its own).  Results: benchmarks/results/synthetic_logistic.json + .md.

    python benchmarks/synthetic_logistic.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import make_synthetic_parquet as synth
import numpy as np
from _common import RESULTS_DIR, command_line, machine, today, write_json

BATCH = 4096


def model(X, y):
    import numpyro
    import numpyro.distributions as dist

    a = numpyro.sample("a", dist.Normal(0, 10))
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ beta), obs=y)


def subsampled_model(X, y):
    import numpyro
    import numpyro.distributions as dist

    a = numpyro.sample("a", dist.Normal(0, 10))
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0], subsample_size=1000) as i:
        numpyro.sample("y", dist.Bernoulli(logits=a + X[i] @ beta), obs=y[i])


def laplace(path) -> dict:
    """Newton's method on every row (float64): mode, sd and the mean-field sd."""
    X, y = synth.read_arrays(path, dtype=np.float64)
    Z = np.column_stack([np.ones(len(y)), X])
    w = np.zeros(Z.shape[1])
    prior = np.full(Z.shape[1], 1 / 100)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(Z @ w)))
        grad = Z.T @ (y - p) - prior * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(prior)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.max(np.abs(step)) < 1e-12:
            break
    cov = np.linalg.inv(hess)
    return {"mean": w, "sd": np.sqrt(np.diag(cov)), "meanfield_sd": 1 / np.sqrt(np.diag(hess))}


def run_viax(kind: str, path) -> dict:
    start = time.perf_counter()
    import viax

    phases = {"import": time.perf_counter() - start}
    rss_import = _peak_rss_mb()
    t0 = time.perf_counter()
    names = synth.column_names(20)
    if kind == "viax-parquet":
        data = viax.data.parquet(path, columns={"X": names, "y": "y"})
    else:
        # float32 as in the file (the model's arithmetic is float64: x64 is on)
        X, y = synth.read_arrays(path, dtype=np.float32)
        data = {"X": X, "y": y}
    phases["read"] = time.perf_counter() - t0
    result = viax.fit(model, data, batch_size=BATCH, seed=0, progress=False)
    t0 = time.perf_counter()
    result.sample(1000, seed=0)
    phases["draws_1000"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    mean = np.concatenate([np.atleast_1d(result.params["loc"])])
    sd = np.exp(result.params["log_scale"])
    # The unconstrained vector is ordered by site name: a, then beta.
    return {
        "wall_seconds": wall,
        "fit_seconds": result.wall_time,
        "steps": result.num_steps,
        "epochs": result.info["epochs"],
        "converged": result.converged,
        "message": result.message,
        "rows_per_second": result.info["rows_per_second"],
        "wait_fraction": result.info["wait_fraction"],
        "setup_seconds": result.info["setup_seconds"],
        "mcse_max_relative": result.info.get("mcse_max_relative"),
        "khat": result.khat,
        "phases": phases,
        "timings": result.info.get("timings"),
        "rss_after_import_mb": rss_import,
        "mean": mean.tolist(),
        "sd": sd.tolist(),
    }


def run_numpyro(path, steps: int = 10_000) -> dict:
    import jax
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    X, y = synth.read_arrays(path, dtype=np.float32)  # as viax-memory gets them
    guide = AutoNormal(subsampled_model)
    svi = SVI(
        subsampled_model, guide, optax.adam(optax.exponential_decay(1e-2, steps, 0.1)), Trace_ELBO()
    )
    X, y = jax.numpy.asarray(X), jax.numpy.asarray(y)
    result = svi.run(jax.random.PRNGKey(0), steps, X, y, progress_bar=False)
    # svi.run returns before its loop has run (JAX's asynchronous dispatch): wait for it.
    jax.block_until_ready(result.params)
    wall = time.perf_counter() - start
    params = result.params
    mean = np.concatenate([np.atleast_1d(params["a_auto_loc"]), params["beta_auto_loc"]])
    sd = np.concatenate([np.atleast_1d(params["a_auto_scale"]), params["beta_auto_scale"]])
    return {"wall_seconds": wall, "steps": steps, "mean": mean.tolist(), "sd": sd.tolist()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(kind: str, path) -> dict:
    out = run_numpyro(path) if kind == "numpyro" else run_viax(kind, path)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--one", choices=("viax-parquet", "viax-memory", "numpyro"))
    parser.add_argument("--path", default=None)
    args = parser.parse_args()
    path = args.path or str(synth.ensure(args.rows, raw_scales=True))
    if args.one:
        print(json.dumps(one(args.one, path)))
        return
    reference = laplace(path)
    results = {}
    for kind in ("viax-parquet", "viax-memory", "numpyro"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind, "--path", path],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            results[kind] = {"error": out.stderr[-2000:]}
            print(kind, "failed:", out.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        err = (np.asarray(r["mean"]) - reference["mean"]) / reference["sd"]
        r["max_mean_error_sd"] = float(np.max(np.abs(err)))
        ratio = np.asarray(r["sd"]) / reference["meanfield_sd"]
        r["sd_ratio_range"] = [float(ratio.min()), float(ratio.max())]
        results[kind] = r
        print(kind, {k: v for k, v in r.items() if k not in ("mean", "sd")}, flush=True)
    payload = {
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "rows": args.rows,
        "batch_size": BATCH,
        "reference": {k: v.tolist() for k, v in reference.items()},
        "results": results,
    }
    write_json(f"synthetic_logistic_{args.rows}.json", payload)
    lines = [
        f"# Synthetic logistic regression, {args.rows:,} rows × 20 raw-scale predictors",
        "",
        f"`{payload['command']}` ({payload['date']}; each method in a fresh process; the "
        "machine was shared with other jobs).  Error against the full-data Laplace answer.",
        "",
        "| method | wall s | steps | rows/s | peak RSS MB | max |mean err|/sd | "
        "sd / mean-field sd | converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        if "error" in r:
            lines.append(f"| {kind} | failed | | | | | | |")
            continue
        rate = r.get("rows_per_second", r["steps"] * 1000 / r["wall_seconds"])
        lines.append(
            f"| {kind} | {r['wall_seconds']:.1f} | {r['steps']} | {rate:.3g} | "
            f"{r['peak_rss_mb']:.0f} | {r['max_mean_error_sd']:.3f} | "
            f"{r['sd_ratio_range'][0]:.2f}-{r['sd_ratio_range'][1]:.2f} | "
            f"{r.get('converged', '')} |"
        )
    (RESULTS_DIR / f"synthetic_logistic_{args.rows}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
