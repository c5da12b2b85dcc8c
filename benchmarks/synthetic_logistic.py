"""Synthetic logistic regression, 10^6 (or 10^7) rows × 20 raw-scale predictors, written
to Parquet by benchmarks/make_synthetic_parquet.py: viax streaming from the file against
NumPyro SVI with the arrays in memory.

* ``viax-parquet``: ``viax.fit(model, viax.data.parquet(path, ...), batch_size=B)``;
* ``viax-memory``: the same fit from in-memory arrays (float32, as in the file; the
  model's arithmetic is float64), rows per second compared with the Parquet run;
* ``viax-memory-4dev``: viax-memory on 4 CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=4``);
* ``viax-parquet-2proc``: viax-parquet in 2 processes on localhost
  (``jax.distributed``, gloo CPU collectives), each reading its share of the row groups;
* ``numpyro``: SVI, AutoNormal, ``plate(subsample_size=1000)``, 10,000 Adam steps
  (rate 1e-2 decaying to 1e-3), the same float32 arrays in memory, the plate drawing
  its own rows (``svi.run``);
* ``numpyro-given``: the same SVI with each batch's rows given to the plate
  (``handlers.substitute``, a permutation per epoch, one jitted ``svi.update`` per
  batch): NumPyro's plate draws its rows on CPU in O(N) a step, which this avoids;
* ``viax-memory-cached``, ``numpyro-given-cached``: the same runs a second time with
  JAX's persistent compilation cache in a fresh directory (viax's own cache, on by
  default for users: ``VIAX_CACHE_DIR``; for NumPyro, JAX's with the same settings),
  the first run filling it: a script run again.  Every other row compiles cold
  (benchmarks turn viax's cache off).

Error: the means of q against the full-data Laplace answer (Newton's method on all rows,
float64, cached beside the data file), in units of the Laplace sd, and the ratio of sds
(mean-field: q's sd is 1/sqrt(H_jj), the reference for it).  Each method runs in a fresh
process (peak RSS is its own; for 2 processes, the larger).  Rows per second: the
minibatch steps' (``result.info["rows_per_second"]``, first chunk's compile included)
and the steady rate with the compile taken out; rows per CPU-second: the steps' rows
over the process's CPU seconds in the steps phase (all threads, reading included; for 2
processes, process 0's), the number to compare on a shared machine.  CPU s: the
process's CPU seconds from start to end (all threads; for 2 processes, their sum).
Results: benchmarks/results/synthetic_logistic_<rows>.json + .md.

    python benchmarks/synthetic_logistic.py --rows 1000000
    python benchmarks/synthetic_logistic.py --rows 10000000 --methods viax-parquet viax-memory
    python benchmarks/synthetic_logistic.py --rows 10000000 --methods viax-parquet viax-memory \
        --steps 4000

``--steps N`` runs the viax methods for exactly N steps (the stopping rule's tolerance
out of reach; results ``synthetic_logistic_<rows>_steps<N>``): the rows per second of
the steps over more than an epoch, not over the few chunks of a converged fit, whose
first chunks are read while the set-up runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import make_synthetic_parquet as synth
import numpy as np
from _common import RESULTS_DIR, command_line, machine, peak_rss_mb, today, write_json

BATCH = 4096
METHODS = (
    "viax-parquet",
    "viax-memory",
    "viax-memory-4dev",
    "viax-parquet-2proc",
    "numpyro",
    "numpyro-given",
    "viax-memory-cached",
    "numpyro-given-cached",
)


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
    """Newton's method on every row (float64, sums over blocks of 10^6 rows): mode, sd
    and the mean-field sd.  Cached in ``<path>.laplace.json``."""
    cache = Path(str(path) + ".laplace.json")
    if cache.exists():
        return {k: np.asarray(v) for k, v in json.loads(cache.read_text()).items()}
    X, y = synth.read_arrays(path, dtype=np.float32)
    d = X.shape[1] + 1
    w = np.zeros(d)
    prior = np.full(d, 1 / 100)
    block = 1_000_000
    for _ in range(50):
        grad, hess = -prior * w, np.diag(prior)
        for lo in range(0, len(y), block):
            Z = np.column_stack([np.ones(len(y[lo : lo + block])), X[lo : lo + block]])
            p = 1 / (1 + np.exp(-(Z @ w)))
            grad += Z.T @ (y[lo : lo + block] - p)
            hess += (Z * (p * (1 - p))[:, None]).T @ Z
        step = np.linalg.solve(hess, grad)
        w += step
        if np.max(np.abs(step)) < 1e-12:
            break
    cov = np.linalg.inv(hess)
    out = {"mean": w, "sd": np.sqrt(np.diag(cov)), "meanfield_sd": 1 / np.sqrt(np.diag(hess))}
    cache.write_text(json.dumps({k: v.tolist() for k, v in out.items()}))
    return out


def run_viax(kind: str, path, process: tuple[int, int, str] | None = None) -> dict:
    start = time.perf_counter()
    cpu_start = time.process_time()
    import jax

    # Compiled programs and their seconds (XLA's compile, jaxpr tracing), every thread's.
    compiles: dict[str, list[float]] = {"compile": [], "trace": []}

    def on_event(name, seconds, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles["compile"].append(seconds)
        elif name == "/jax/core/compile/jaxpr_trace_duration":
            compiles["trace"].append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    if process is not None:
        pid, count, port = process
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=pid)
    import viax

    phases = {"import": time.perf_counter() - start}
    rss_import = peak_rss_mb()
    t0 = time.perf_counter()
    names = synth.column_names(20)
    if kind.startswith("viax-parquet"):
        data = viax.data.parquet(path, columns={"X": names, "y": "y"})
    else:
        # float32 as in the file (the model's arithmetic is float64: x64 is on)
        X, y = synth.read_arrays(path, dtype=np.float32)
        data = {"X": X, "y": y}
    phases["read"] = time.perf_counter() - t0
    from viax.infer.stopping import MCSEStop

    fixed = os.environ.get("BENCH_VIAX_STEPS")
    # --steps N: a fixed number of steps (the rule's tolerance out of reach), to measure
    # the steps' steady rate over epochs rather than over a converged fit's few chunks.
    budget = (
        {"num_steps": int(fixed), "stop_rule": MCSEStop(tol=1e-12, max_halvings=0)} if fixed else {}
    )
    result = viax.fit(model, data, batch_size=BATCH, seed=0, progress=False, **budget)
    cpu = time.process_time() - cpu_start
    t0 = time.perf_counter()
    result.sample(1000, seed=0)
    phases["draws_1000"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    mean = np.concatenate([np.atleast_1d(result.params["loc"])])
    sd = np.exp(result.params["log_scale"])
    timings = result.info.get("timings") or {}
    rows = (result.num_steps) * BATCH
    steady = timings.get("steps", 0.0) - timings.get("steps_compile", 0.0)
    # The unconstrained vector is ordered by site name: a, then beta.
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fit_seconds": result.wall_time,
        "steps": result.num_steps,
        "epochs": result.info["epochs"],
        "converged": result.converged,
        "message": result.message,
        "devices": result.info["devices"],
        "processes": result.info["processes"],
        "rows_per_second": result.info["rows_per_second"],
        "rows_per_second_steady": rows / steady if steady > 0 else float("nan"),
        # the steps' rows over the process's CPU seconds in the steps phase (all threads:
        # reading included); a shared machine's load barely moves it
        "rows_per_cpu_second": rows / timings["steps_cpu"] if timings.get("steps_cpu") else None,
        "wait_fraction": result.info["wait_fraction"],
        "setup_seconds": result.info["setup_seconds"],
        "mcse_max_relative": result.info.get("mcse_max_relative"),
        "khat": result.khat,
        "elbo": result.elbo,
        "elbo_se": result.elbo_se,
        "evaluation": result.info.get("evaluation"),
        "newton_start": result.info.get("newton_start"),
        "num_particles": result.info.get("num_particles"),
        "phases": phases,
        "timings": timings,
        "programs_compiled": len(compiles["compile"]),
        "compile_seconds": float(sum(compiles["compile"])),
        "trace_seconds": float(sum(compiles["trace"])),
        "rss_after_import_mb": rss_import,
        "mean": mean.tolist(),
        "sd": sd.tolist(),
    }


def run_numpyro(path, steps: int = 10_000, indices: str = "plate") -> dict:
    """NumPyro SVI, AutoNormal, Adam decaying 1e-2 -> 1e-3: ``indices="plate"`` lets
    ``plate(subsample_size=1000)`` draw the rows (``svi.run``); ``"epoch"`` gives them."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    import jax
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    jax.config.update("jax_enable_x64", True)
    cache = os.environ.get("BENCH_JAX_CACHE")
    if cache:  # the -cached rows: JAX's persistent cache as viax.cache sets it up
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    rss_import = peak_rss_mb()
    X, y = synth.read_arrays(path, dtype=np.float32)  # as viax-memory gets them
    guide = AutoNormal(subsampled_model)
    svi = SVI(
        subsampled_model, guide, optax.adam(optax.exponential_decay(1e-2, steps, 0.1)), Trace_ELBO()
    )
    X, y = jax.numpy.asarray(X), jax.numpy.asarray(y)
    if indices == "plate":
        result = svi.run(jax.random.PRNGKey(0), steps, X, y, progress_bar=False)
        params = result.params
    else:
        # The plate's rows given (handlers.substitute) from a permutation per epoch, one
        # jitted svi.update per batch: on CPU the plate's own draw is a B-step Fisher-Yates
        # lax.scan over arange(N) (benchmarks/numpyro_plate_cost.py: a step's CPU 5.8 ms
        # with that draw, 0.40 ms with the rows given); this is what a user avoiding it writes.
        from numpyro import handlers

        def given_model(idx, X, y):
            with handlers.substitute(data={"N": idx}):
                subsampled_model(X, y)

        def given_guide(idx, X, y):
            return guide(X, y)

        svi = SVI(
            given_model,
            given_guide,
            optax.adam(optax.exponential_decay(1e-2, steps, 0.1)),
            Trace_ELBO(),
        )
        update = jax.jit(svi.update)
        rng = np.random.default_rng(0)
        n = int(X.shape[0])
        state = svi.init(jax.random.PRNGKey(0), jax.numpy.arange(1000), X, y)
        done = 0
        while done < steps:
            order = rng.permutation(n).astype(np.int32)
            for i in range(min(n // 1000, steps - done)):
                state, _ = update(state, order[i * 1000 : (i + 1) * 1000], X, y)
                done += 1
        params = svi.get_params(state)
    # svi.run returns before its loop has run (JAX's asynchronous dispatch): wait for it.
    jax.block_until_ready(params)
    wall = time.perf_counter() - start
    mean = np.concatenate([np.atleast_1d(params["a_auto_loc"]), params["beta_auto_loc"]])
    sd = np.concatenate([np.atleast_1d(params["a_auto_scale"]), params["beta_auto_scale"]])
    return {
        "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu_start,
        "steps": steps,
        "rows_per_second": steps * 1000 / wall,
        "rss_after_import_mb": rss_import,
        "mean": mean.tolist(),
        "sd": sd.tolist(),
    }


def one(kind: str, path, process=None) -> dict:
    if kind.startswith("numpyro"):
        given = kind.startswith("numpyro-given")
        out = run_numpyro(path, indices="epoch" if given else "plate")
    else:
        out = run_viax(kind, path, process)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(kind: str, path: str) -> dict:
    """Run one method in fresh process(es); the parsed result or {"error": ...}."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if kind == "viax-memory-4dev":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    if kind == "viax-parquet-2proc":
        port = str(_free_port())
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    kind,
                    "--path",
                    path,
                    "--process",
                    f"{i},2,{port}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate() for p in procs]
        if any(p.returncode for p in procs):
            return {"error": "\n".join(err[-2000:] for _, err in outs)}
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        r = results[0]
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in results)
        r["wall_seconds"] = max(x["wall_seconds"] for x in results)
        r["cpu_seconds"] = sum(x["cpu_seconds"] for x in results)
        return r
    runs = 1
    if kind.endswith("-cached"):
        # A fresh cache, filled by a first run that is not reported.
        cache = tempfile.mkdtemp(prefix="viax-bench-cache-")
        env.update({"VIAX_CACHE_DIR": cache, "BENCH_JAX_CACHE": cache})
        runs = 2
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind, "--path", path],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if out.returncode != 0:
            return {"error": out.stderr[-2000:]}
    if runs == 2:
        shutil.rmtree(env["VIAX_CACHE_DIR"], ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(payload: dict) -> list[str]:
    rows = payload["rows"]
    lines = [
        f"# Synthetic logistic regression, {rows:,} rows × 20 raw-scale predictors",
        "",
        f"`{payload['command']}` ({payload['date']}; each method in a fresh process; "
        f"Parquet pages compressed with {payload.get('compression', 'zstd')}; 2 cores, "
        "1-minute load average at the start and the end: "
        f"{', '.join(f'{x:.1f}' for x in payload.get('load', []))}; under load times are "
        "inflated and only ratios within a run mean much).  "
        "Error against the full-data Laplace answer; "
        "batch 4096 for viax, 1000 for NumPyro.  Rows/s: the minibatch steps' rate (the "
        "first chunk's compile included) and, in brackets, without that compile; "
        "rows/CPU-s: the steps' rows over the process's CPU seconds (all threads) in the "
        "steps phase."
        + (
            f"  Fixed step count: every viax run takes exactly {payload['fixed_steps']:,} "
            "steps (the stopping rule's tolerance out of reach, so 'converged' is False), "
            "to measure the steps' rate over more than an epoch."
            if payload.get("fixed_steps")
            else ""
        ),
        "",
        "| method | wall s | CPU s | steps | rows/s (steady) | rows/CPU-s | wait | peak RSS MB | "
        "max \\|mean err\\|/sd | sd / mean-field sd | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in payload["results"].items():
        if "error" in r:
            lines.append(f"| {kind} | failed | | | | | | | | | |")
            continue
        steady = r.get("rows_per_second_steady")
        steady_text = f" ({steady:.3g})" if steady is not None else ""
        cpu_rate = r.get("rows_per_cpu_second")
        wait = r.get("wait_fraction")
        lines.append(
            f"| {kind} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['steps']} | "
            f"{r['rows_per_second']:.3g}{steady_text} | "
            f"{'' if cpu_rate is None else f'{cpu_rate:.3g}'} | "
            f"{'' if wait is None else f'{wait:.2f}'} | "
            f"{r['peak_rss_mb']:.0f} | {r['max_mean_error_sd']:.3f} | "
            f"{r['sd_ratio_range'][0]:.2f}-{r['sd_ratio_range'][1]:.2f} | "
            f"{r.get('converged', '')} |"
        )
    peers = {"numpyro-given": "numpyro-given", "numpyro-given-cached": "numpyro-given-cached"}
    ratios = []
    for kind, r in payload["results"].items():
        peer = "numpyro-given-cached" if kind.endswith("-cached") else "numpyro-given"
        p = payload["results"].get(peers[peer], {})
        if kind.startswith("viax") and "wall_seconds" in r and "wall_seconds" in p:
            ratios.append(
                f"{kind} / {peer}: wall {r['wall_seconds'] / p['wall_seconds']:.2f}x, "
                f"CPU {r['cpu_seconds'] / p['cpu_seconds']:.2f}x"
            )
    if ratios:
        lines += ["", "Against NumPyro with the rows given (same run): " + "; ".join(ratios) + "."]
    timed = {k: r for k, r in payload["results"].items() if r.get("timings")}
    if timed:
        names = list(next(iter(timed.values()))["timings"])
        lines += [
            "",
            "Phases of the viax runs (seconds; `result.info['timings']`; compiles inside "
            "their phase; import and reading before `viax.fit`, draws after it):",
            "",
            "| method | import | read | "
            + " | ".join(names)
            + " | 1000 draws | RSS after import MB | programs | XLA compile s | tracing s |",
            "|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|",
        ]
        for kind, r in timed.items():
            t = r["timings"]
            lines.append(
                f"| {kind} | {r['phases']['import']:.1f} | {r['phases']['read']:.1f} | "
                + " | ".join(f"{t.get(n, float('nan')):.1f}" for n in names)
                + f" | {r['phases']['draws_1000']:.1f} | {r['rss_after_import_mb']:.0f} | "
                f"{r.get('programs_compiled', '')} | "
                f"{r.get('compile_seconds', float('nan')):.2f} | "
                f"{r.get('trace_seconds', float('nan')):.2f} |"
            )
        lines += [
            "",
            "Programs: XLA programs compiled by the process (every thread's, the background "
            "compiles included; a cached run loads them instead); XLA compile s and "
            "tracing s: their seconds summed over threads (overlapping in wall time).",
        ]
    evaluated = {k: r for k, r in payload["results"].items() if r.get("evaluation")}
    if evaluated:
        lines += ["", "Final evaluation (`result.info['evaluation']`; 200 draws of q):", ""]
        for kind, r in evaluated.items():
            e = r["evaluation"]
            how = (
                f"difference estimator on {e['batches']} batches, largest row-sampling sd "
                f"of a log weight {e['max_log_weight_rows_sd']:.3g} nats (their spread "
                f"{e['log_weights_sd']:.3g}), ELBO row-sampling se {e['elbo_rows_se']:.3g}"
                if e.get("method") == "difference estimator"
                else f"exact: {e.get('reason', '')}"
            )
            lines.append(
                f"- {kind}: ELBO {r['elbo']:.2f} ± {r['elbo_se']:.2f}, k̂ {r['khat']:.2f}, "
                f"{r['timings'].get('evaluate', float('nan')):.1f} s; {how}"
            )
    for kind in ("viax-memory-4dev", "viax-parquet-2proc"):
        r = payload["results"].get(kind, {})
        ref = payload["results"].get(
            "viax-memory" if kind == "viax-memory-4dev" else "viax-parquet", {}
        )
        if "mean" in r and "mean" in ref:
            diff = np.max(np.abs(np.asarray(r["mean"]) - ref["mean"]) / np.asarray(ref["sd"]))
            lines.append(
                f"\n{kind} against its 1-device run: steps {r['steps']} vs {ref['steps']}, "
                f"max |mean difference| {diff:.2e} sd."
            )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--one", choices=METHODS)
    parser.add_argument("--path", default=None)
    parser.add_argument("--compression", default="snappy", help=synth.COMPRESSION_HELP)
    parser.add_argument("--process", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--steps", type=int, default=None, help="viax: exactly this many steps (rows/s)"
    )
    args = parser.parse_args()
    if args.steps:
        os.environ["BENCH_VIAX_STEPS"] = str(args.steps)  # inherited by --one processes
    path = args.path or str(synth.ensure(args.rows, raw_scales=True, compression=args.compression))
    if args.one:
        process = None
        if args.process:
            pid, count, port = args.process.split(",")
            process = (int(pid), int(count), port)
        print(json.dumps(one(args.one, path, process)))
        return
    methods = args.methods or (
        METHODS if args.rows <= 2_000_000 else ("viax-parquet", "viax-memory")
    )
    reference = laplace(path)
    load = [os.getloadavg()[0]]
    results = {}
    for kind in methods:
        r = _launch(kind, path)
        if "error" in r:
            results[kind] = r
            print(kind, "failed:", r["error"], file=sys.stderr)
            continue
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
        "compression": synth.read_truth(path).get("compression", "zstd"),
        "load": [*load, os.getloadavg()[0]],
        "batch_size": BATCH,
        "reference": {k: v.tolist() for k, v in reference.items()},
        "results": results,
    }
    name = f"synthetic_logistic_{args.rows}" + (f"_steps{args.steps}" if args.steps else "")
    payload["fixed_steps"] = args.steps
    write_json(f"{name}.json", payload)
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(_table(payload)) + "\n")


if __name__ == "__main__":
    main()
