"""Flights' minibatch path, measured against the full-batch reference: where the set-up's
time goes, how far each site is after the set-up and after N stochastic steps.

benchmarks/flights.py's model and data (327,346 rows, 4,170 latents) fitted by
``viax.fit(model, arrays, batch_size=4096)``; the answer (q's means and sds in the
unconstrained space) compared coordinate by coordinate with the full-batch fit
(benchmarks/results/flights_full_batch.json, its ``q``): |Δmean| / reference sd and the
sd ratio, per site, at the set-up's point and along the run (every ``--every`` steps).

    python benchmarks/flights_minibatch.py --steps 4000            # one run, one process
    python benchmarks/flights_minibatch.py --like 60000,16,105,4000 --steps 4000
        # generated data of the flights kind (benchmarks/flights_like.py); the reference
        # is then a full-batch fit of the same data in this process
    python benchmarks/flights_minibatch.py --steps 40000 --store
        # also writes benchmarks/results/flights_minibatch_<steps>.json in the layout
        # benchmarks/flights.py --stored reads
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from _common import RESULTS_DIR, command_line, machine, today, write_json
from flights import BATCH, GLOBALS, _summary, load_arrays, make_model

SITES = ("a", "b_hour", "b_dist", "s_carrier", "s_dest", "s_tail", "z_carrier", "z_dest", "z_tail")


def compare(mean, sd, ref_mean, ref_sd, layout) -> dict:
    """Per site: max and median |Δmean|/sd_ref, fraction > 0.1, sd ratio range."""
    z = np.abs(mean - ref_mean) / ref_sd
    ratio = sd / ref_sd
    out = {}
    for name, start, size in layout:
        sl = slice(start, start + size)
        out[name] = {
            "max": float(z[sl].max()),
            "median": float(np.median(z[sl])),
            "off": float(np.mean(z[sl] > 0.1)),
            "sd_ratio": [float(ratio[sl].min()), float(ratio[sl].max())],
            "sd_off": float(np.mean(np.abs(ratio[sl] - 1) > 0.1)),
        }
    return out


def show(label, table) -> None:
    cells = " ".join(
        f"{k}:{v['max']:.2f}/{v['off']:.0%}/{v['sd_ratio'][0]:.2f}-{v['sd_ratio'][1]:.2f}"
        for k, v in table.items()
    )
    print(f"{label}: {cells}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=2000)
    parser.add_argument("--like", default=None)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--store", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--save-setup", default=None, help="write the whitening to this .npz")
    parser.add_argument("--load-setup", default=None, help="use this saved whitening")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    import viax
    from viax.infer import minibatch, stopping

    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    if args.like:
        from flights_like import _parse, make_data

        rows, carriers, dests, planes = _parse(args.like)
        data = make_data(rows, carriers, dests, planes)
        model = make_model(carriers, dests, planes)
        t0 = time.perf_counter()
        ref = viax.fit(model, data, path="full-batch", num_draws=64, seed=0, progress=False)
        ref_seconds = time.perf_counter() - t0
        ref_mean = np.asarray(ref.params["loc"])
        ref_sd = np.exp(np.asarray(ref.params["log_scale"]))
        print(f"reference: full batch {ref_seconds:.1f} s, converged {ref.converged}", flush=True)
    else:
        data, sizes, _ = load_arrays()
        model = make_model(sizes["C"], sizes["D"], sizes["T"])
        q = json.loads((RESULTS_DIR / "flights_full_batch.json").read_text())["result"]["q"]
        ref_mean, ref_sd = np.asarray(q["mean"]), np.asarray(q["sd"])

    # Record the set-up's whitening and the run's iterates (the tracker's feed).
    captured: dict = {}
    whitening_fn = minibatch._whitening

    def whitening(*a, **k):
        t0 = time.perf_counter()
        if args.load_setup:  # a set-up saved by --save-setup: iterate on the steps alone
            saved = np.load(args.load_setup, allow_pickle=False)
            fields = {f: jnp.asarray(saved[f]) for f in minibatch.Whitening._fields if f in saved}
            out = minibatch.Whitening(**fields), json.loads(str(saved["info"]))
        else:
            out = whitening_fn(*a, **k)
        if args.save_setup:
            w_, i_ = out
            arrays = {f: np.asarray(v) for f, v in w_._asdict().items() if v is not None}
            np.savez(args.save_setup, info=json.dumps(i_, default=str), **arrays)
        captured["whitening"], captured["setup_info"] = out
        captured["setup_seconds"] = time.perf_counter() - t0
        return out

    minibatch._whitening = whitening
    track: list = []
    update = stopping.MCSETracker.update

    def record(self, iterates, objective=None):
        iterates = np.asarray(iterates)
        track.append((self.steps + iterates.shape[0], iterates.mean(axis=0)))
        return update(self, iterates, objective)

    stopping.MCSETracker.update = record
    options = {}
    if args.lr is not None:
        options["learning_rate"] = args.lr
    if args.particles is not None:
        options["num_particles"] = args.particles
    if options:  # the minibatch path's own options (viax.fit does not pass them)
        result = minibatch.fit_minibatch(
            model,
            data,
            batch_size=args.batch,
            num_steps=args.steps,
            seed=args.seed,
            progress=False,
            **options,
        )
    else:
        result = viax.fit(
            model, data, batch_size=args.batch, num_steps=args.steps, seed=args.seed, progress=False
        )
    wall = time.perf_counter() - start
    info = result.info
    bm_layout = [(s.name, s.start, s.size) for s in _layout(result)]
    w = captured.get("whitening")
    if w is not None:
        center = np.asarray(w.center)
        scale = np.asarray(w.scale)
        show(
            f"set-up ({captured['setup_seconds']:.1f} s)",
            compare(center, scale, ref_mean, ref_sd, bm_layout),
        )
    fam = result.family
    dim = fam.dim
    next_report = args.every
    for steps, chunk_mean in track:
        if steps < next_report:
            continue
        next_report += args.every
        params = w.push(fam, {"loc": chunk_mean[:dim], "log_scale": chunk_mean[dim:]})
        show(
            f"step {steps} (chunk mean)",
            compare(
                np.asarray(params["loc"]),
                np.exp(np.asarray(params["log_scale"])),
                ref_mean,
                ref_sd,
                bm_layout,
            ),
        )
    final = compare(
        np.asarray(result.params["loc"]),
        np.exp(np.asarray(result.params["log_scale"])),
        ref_mean,
        ref_sd,
        bm_layout,
    )
    show(f"final ({result.num_steps} steps, converged {result.converged})", final)
    print(result.message)
    for key in (
        "preconditioner",
        "curvature_reason",
        "dadvi_steps",
        "dadvi_dense_steps",
        "full_dadvi_steps",
        "full_dadvi_converged",
        "full_dadvi_seconds",
        "map_steps",
        "timings",
        "rhat",
        "mcse_max_relative",
        "stop_events",
        "setup_seconds",
        "seconds_per_step",
        "dadvi_seconds",
        "hessian_seconds",
        "whitening_seconds",
        "setup_decrement",
        "hessian_negative_eigenvalues",
    ):
        print(f"{key}: {info.get(key)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wall {wall:.1f} s, RSS {peak:.0f} MB, elbo {result.elbo:.1f}, khat {result.khat:.2f}")
    if args.store and not args.like:
        draws = result.sample(4000, seed=1)
        record_ = {
            "wall_seconds": wall,
            "fit_seconds": result.wall_time,
            "steps": result.num_steps,
            "converged": result.converged,
            "message": result.message,
            "rows_seen": result.num_steps * args.batch,
            "rows_per_second": info["rows_per_second"],
            "wait_fraction": info["wait_fraction"],
            "setup_seconds": info["setup_seconds"],
            "preconditioner": info["preconditioner"],
            "curvature_reason": info.get("curvature_reason"),
            "dadvi_steps": info.get("dadvi_steps"),
            "full_dadvi_steps": info.get("full_dadvi_steps"),
            "full_dadvi_seconds": info.get("full_dadvi_seconds"),
            "map_steps": info.get("map_steps"),
            "timings": info.get("timings"),
            "mcse_max_relative": info.get("mcse_max_relative"),
            "rhat": info.get("rhat"),
            "elbo": result.elbo,
            "khat": result.khat,
            "num_rows": info["num_rows"],
            "latents": int(dim),
            "peak_rss_mb": peak,
            "agreement_unconstrained": final,
            "summary": _summary({k: draws[k] for k in draws if k in GLOBALS or k.startswith("z_")}),
        }
        name = f"flights_minibatch_{result.num_steps}.json"
        write_json(
            name,
            {"command": command_line(), "date": today(), "machine": machine(), "result": record_},
        )
        print(f"wrote {RESULTS_DIR / name}")


def _layout(result):
    from viax.infer.minibatch import _ANALYSED

    bm = next(reversed(_ANALYSED.values()))
    return bm.global_sites


if __name__ == "__main__":
    main()
