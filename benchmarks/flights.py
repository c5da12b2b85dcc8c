"""Flights (nycflights13, 336,776 flights from New York in 2013, CC0): a hierarchical
logistic regression of "arrived more than 15 minutes late" on the scheduled hour and the
distance (raw scales) with effects for 16 carriers, 105 destinations and ~4,000 planes.

    logit p_n = a + b_hour · hour_n + b_dist · distance_n
                + σ_c z_c[carrier_n] + σ_d z_d[dest_n] + σ_t z_t[tailnum_n]
    z ~ N(0, 1) (non-centred), σ ~ HalfNormal(1), a ~ N(0, 5), b ~ N(0, 1)

Side by side, each in a fresh process (peak RSS is the process's):

* ``viax-memory``: ``viax.fit(model, arrays, batch_size=B)`` (minibatch path);
* ``viax-parquet``: ``viax.fit(model, viax.data.parquet(...), batch_size=B)``, streamed;
* ``numpyro``: NumPyro SVI, AutoNormal, ``plate(subsample_size=B)``, Adam with an
  exponentially decaying rate (1e-2 → 1e-3), as many steps as viax-memory took (the same
  number of rows seen).

Agreement, as the issue asks (means within 0.1 posterior sd, sds within 10%): against
viax's full-batch mean-field fit, benchmarks/results/flights_full_batch.json (written by
benchmarks/flights_full_batch.py), when that file exists; else against NumPyro's SVI
(a reference only in name: it is itself a stochastic fit with no convergence test).
Results: benchmarks/results/flights.json + .md.

    python benchmarks/flights.py            # all three, ~minutes
    python benchmarks/flights.py --one viax-memory   # one, in this process
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from _common import RESULTS_DIR, SHARED_DATA_DIR, command_line, machine, today, write_json

PATH = SHARED_DATA_DIR / "flights" / "flights.parquet"
BATCH = 4096
GLOBALS = ("a", "b_hour", "b_dist", "s_carrier", "s_dest", "s_tail")


def load_arrays():
    """The model's columns in memory (rows with an arrival delay and a tail number)."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        PATH, columns=["arr_delay", "hour", "distance", "carrier", "dest", "tailnum"]
    )
    frame = table.to_pandas()
    # The vocabularies of the whole file (as viax.data.parquet's categories=None builds
    # them), then the rows with an arrival delay and a tail number.
    vocabs = {
        c: np.array(sorted(frame[c].dropna().unique())) for c in ("carrier", "dest", "tailnum")
    }
    frame = frame[frame["arr_delay"].notna() & frame["tailnum"].notna()]
    codes = {}
    for column, vocab in vocabs.items():
        codes[column] = (np.searchsorted(vocab, frame[column].to_numpy()), vocab)
    data = {
        "hour": frame["hour"].to_numpy(float),
        "distance": frame["distance"].to_numpy(float),
        "carrier": codes["carrier"][0].astype(np.int32),
        "dest": codes["dest"][0].astype(np.int32),
        "tail": codes["tailnum"][0].astype(np.int32),
        "y": (frame["arr_delay"].to_numpy() > 15).astype(float),
    }
    sizes = {k: len(codes[c][1]) for k, c in (("C", "carrier"), ("D", "dest"), ("T", "tailnum"))}
    return data, sizes, {c: codes[c][1] for c in codes}


def make_model(C: int, D: int, T: int, subsample: int | None = None):
    import numpyro
    import numpyro.distributions as dist

    def model(hour, distance, carrier, dest, tail, y):
        a = numpyro.sample("a", dist.Normal(0, 5))
        b_hour = numpyro.sample("b_hour", dist.Normal(0, 1))
        b_dist = numpyro.sample("b_dist", dist.Normal(0, 1))
        s_c = numpyro.sample("s_carrier", dist.HalfNormal(1))
        s_d = numpyro.sample("s_dest", dist.HalfNormal(1))
        s_t = numpyro.sample("s_tail", dist.HalfNormal(1))
        with numpyro.plate("carriers", C):
            z_c = numpyro.sample("z_carrier", dist.Normal(0, 1))
        with numpyro.plate("dests", D):
            z_d = numpyro.sample("z_dest", dist.Normal(0, 1))
        with numpyro.plate("tails", T):
            z_t = numpyro.sample("z_tail", dist.Normal(0, 1))
        with numpyro.plate("N", hour.shape[0], subsample_size=subsample) as i:
            logit = (
                a
                + b_hour * hour[i]
                + b_dist * distance[i]
                + s_c * z_c[carrier[i]]
                + s_d * z_d[dest[i]]
                + s_t * z_t[tail[i]]
            )
            numpyro.sample("y", dist.Bernoulli(logits=logit), obs=y[i])

    return model


def _summary(draws: dict) -> dict:
    out = {}
    for name, value in draws.items():
        value = np.asarray(value).reshape(len(value), -1)
        out[name] = {"mean": value.mean(0).tolist(), "sd": value.std(0, ddof=1).tolist()}
    return out


def run_viax(kind: str, steps: int | None) -> dict:
    import viax

    start = time.perf_counter()
    if kind == "viax-memory":
        data, sizes, _ = load_arrays()
        model = make_model(sizes["C"], sizes["D"], sizes["T"])
        source = data
    else:
        _, sizes, vocab = load_arrays()  # the vocabularies (a real pipeline stores them)
        model = make_model(sizes["C"], sizes["D"], sizes["T"])

        def transform(block):
            keep = ~np.isnan(block["arr_delay"]) & (block["tailnum"] >= 0)
            return {
                "_rows": block["_rows"][keep],
                "hour": block["hour"][keep].astype(float),
                "distance": block["distance"][keep].astype(float),
                "carrier": block["carrier"][keep].astype(np.int32),
                "dest": block["dest"][keep].astype(np.int32),
                "tail": block["tailnum"][keep].astype(np.int32),
                "y": (block["arr_delay"][keep] > 15).astype(float),
            }

        source = viax.data.parquet(
            PATH,
            columns=["hour", "distance", "carrier", "dest", "tail", "y"],
            read=["arr_delay", "hour", "distance", "carrier", "dest", "tailnum"],
            transform=transform,
            categories={"carrier": None, "dest": None, "tailnum": None},
        )
    result = viax.fit(model, source, batch_size=BATCH, num_steps=steps, seed=0, progress=False)
    wall = time.perf_counter() - start
    draws = result.sample(4000, seed=1)
    return {
        "wall_seconds": wall,
        "fit_seconds": result.wall_time,
        "steps": result.num_steps,
        "converged": result.converged,
        "message": result.message,
        "rows_seen": result.num_steps * BATCH,
        "rows_per_second": result.info["rows_per_second"],
        "wait_fraction": result.info["wait_fraction"],
        "setup_seconds": result.info["setup_seconds"],
        "preconditioner": result.info["preconditioner"],
        "dadvi_steps": result.info.get("dadvi_steps"),
        "map_steps": result.info.get("map_steps"),
        "timings": result.info.get("timings"),
        "mcse_max_relative": result.info.get("mcse_max_relative"),
        "elbo": result.elbo,
        "khat": result.khat,
        "num_rows": result.info["num_rows"],
        "latents": int(result.family.dim),
        "summary": _summary({k: draws[k] for k in draws if k in GLOBALS or k.startswith("z_")}),
    }


def run_numpyro(steps: int) -> dict:
    import jax
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    data, sizes, _ = load_arrays()
    model = make_model(sizes["C"], sizes["D"], sizes["T"], subsample=BATCH)
    schedule = optax.exponential_decay(1e-2, steps, 0.1)
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(schedule), Trace_ELBO())
    data = {k: jax.numpy.asarray(v) for k, v in data.items()}
    result = svi.run(jax.random.PRNGKey(0), steps, **data, progress_bar=False)
    wall = time.perf_counter() - start
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(4000,))
    return {
        "wall_seconds": wall,
        "steps": steps,
        "rows_seen": steps * BATCH,
        "final_loss": float(np.mean(np.asarray(result.losses)[-100:])),
        "summary": _summary({k: draws[k] for k in draws if k in GLOBALS or k.startswith("z_")}),
    }


def one(kind: str, steps: int | None) -> dict:
    out = run_numpyro(steps) if kind == "numpyro" else run_viax(kind, steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


FULL_BATCH = RESULTS_DIR / "flights_full_batch.json"
SECOND_FULL_BATCH = RESULTS_DIR / "flights_full_batch_seed1.json"  # other fixed draws


def agreement(reference: dict, other: dict, settled: dict | None = None) -> dict:
    """Worst and median |Δmean| / sd_ref, the range of sd_other / sd_ref, and the
    fractions off (a mean more than 0.1 sd_ref away, an sd more than 10% off) over the
    global latents, and the same over every effect (z).  ``settled`` (name → (means,
    sds) boolean masks): also the fractions off over the coordinates where the
    reference is itself precise to that tolerance (:func:`settled_by`)."""
    rows = {}
    for group, names in (("globals", GLOBALS), ("effects", ("z_carrier", "z_dest", "z_tail"))):
        dm, ratio = [], []
        for name in names:
            ref, oth = reference["summary"][name], other["summary"][name]
            sd = np.asarray(ref["sd"])
            dm.append(np.abs(np.asarray(oth["mean"]) - np.asarray(ref["mean"])) / sd)
            ratio.append(np.asarray(oth["sd"]) / sd)
        dm, ratio = np.concatenate(dm), np.concatenate(ratio)
        rows[group] = {
            "max_mean_diff_sd": float(dm.max()),
            "median_mean_diff_sd": float(np.median(dm)),
            "sd_ratio_min": float(ratio.min()),
            "sd_ratio_max": float(ratio.max()),
            "frac_mean_off": float(np.mean(dm > 0.1)),
            "frac_sd_off": float(np.mean(np.abs(ratio - 1) > 0.1)),
        }
    rows["by_site"] = {}
    for name in (*GLOBALS, "z_carrier", "z_dest", "z_tail"):
        ref, oth = reference["summary"][name], other["summary"][name]
        sd = np.asarray(ref["sd"])
        dm = np.abs(np.asarray(oth["mean"]) - np.asarray(ref["mean"])) / sd
        ratio = np.asarray(oth["sd"]) / sd
        rows["by_site"][name] = {
            "max_mean_diff_sd": float(dm.max()),
            "frac_mean_off": float(np.mean(dm > 0.1)),
            "frac_sd_off": float(np.mean(np.abs(ratio - 1) > 0.1)),
        }
    rows["agrees"] = all(
        rows[g]["frac_mean_off"] == 0 and rows[g]["frac_sd_off"] == 0
        for g in ("globals", "effects")
    )
    if settled:
        mean_off, sd_off = [], []
        for name, (means, sds) in settled.items():
            ref, oth = reference["summary"][name], other["summary"][name]
            sd = np.asarray(ref["sd"])
            dm = np.abs(np.asarray(oth["mean"]) - np.asarray(ref["mean"])) / sd
            ratio = np.asarray(oth["sd"]) / sd
            mean_off.append((dm > 0.1)[means])
            sd_off.append((np.abs(ratio - 1) > 0.1)[sds])
        mean_off, sd_off = np.concatenate(mean_off), np.concatenate(sd_off)
        rows["settled"] = {
            "means": int(mean_off.size),
            "sds": int(sd_off.size),
            "frac_mean_off": float(np.mean(mean_off)),
            "frac_sd_off": float(np.mean(sd_off)),
        }
    return rows


def settled_by(reference: dict, second: dict) -> dict:
    """name → (means, sds): the coordinates where two fits of the reference with
    different fixed draws agree (means within 0.1 sd, sds within 10%)."""
    out = {}
    for name in (*GLOBALS, "z_carrier", "z_dest", "z_tail"):
        ref, oth = reference["summary"][name], second["summary"][name]
        sd = np.asarray(ref["sd"])
        dm = np.abs(np.asarray(oth["mean"]) - np.asarray(ref["mean"])) / sd
        ratio = np.asarray(oth["sd"]) / sd
        out[name] = (dm <= 0.1, np.abs(ratio - 1) <= 0.1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", choices=("viax-memory", "viax-parquet", "numpyro"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--methods",
        default="viax-memory,viax-parquet,numpyro",
        help="comma-separated subset of the three, run in this order",
    )
    parser.add_argument(
        "--compare-only",
        action="store_true",
        help="recompute the agreement of the stored results (e.g. once the full-batch "
        "reference exists) and rewrite flights.json/md, keeping their command and date",
    )
    parser.add_argument(
        "--stored",
        action="append",
        default=[],
        metavar="KIND=FILE",
        help="take KIND's result from benchmarks/results/FILE (a --one run's record, "
        "with its own command and date) instead of running it",
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps)))
        return
    if args.compare_only:
        stored = json.loads((RESULTS_DIR / "flights.json").read_text())
        results = stored["results"]
        finish(results, stored["command"], stored["date"], stored["machine"])
        return
    results = {}
    for item in args.stored:
        kind, name = item.split("=", 1)
        stored = json.loads((RESULTS_DIR / name).read_text())
        results[kind] = {
            **stored["result"],
            "stored": f"{name}: {stored['command']}, {stored['date']}",
        }
    for kind in args.methods.split(","):
        if kind in results:
            continue
        steps = args.steps
        if kind == "numpyro" and "steps" in results.get("viax-memory", {}):
            steps = results["viax-memory"]["steps"]  # the same number of rows seen
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind] + (["--steps", str(steps)] if steps else []),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            results[kind] = {"error": out.stderr[-2000:]}
            print(kind, "failed:", out.stderr[-2000:], file=sys.stderr)
            continue
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(kind, {k: v for k, v in results[kind].items() if k != "summary"}, flush=True)
    shared = {**machine(), "note": "machine shared with other jobs"}
    finish(results, command_line(), today(), shared, tuple(args.note))


def finish(results: dict, command: str, date: str, machine_info: dict, notes: tuple = ()) -> None:
    """The agreement of every method with the reference; flights.json and .md."""
    if FULL_BATCH.exists():
        full = json.loads(FULL_BATCH.read_text())
        ref, ref_name = full["result"], f"viax full-batch ({FULL_BATCH.name}, {full['date']})"
    else:
        ref, ref_name = results.get("numpyro", {}), "numpyro (no full-batch reference file)"
    if SECOND_FULL_BATCH.exists():
        # The reference's own precision: the same full-batch fit with other fixed draws.
        second = json.loads(SECOND_FULL_BATCH.read_text())
        results["viax-full-batch-seed1"] = {
            "rows_seen": second["result"]["num_rows"] * second["result"]["steps"],
            **second["result"],
        }
    if "summary" in ref and ref is not results.get("numpyro"):
        ref.setdefault("rows_seen", ref["num_rows"] * ref["steps"])
        results.pop("viax-full-batch (reference)", None)  # a stored copy (--compare-only)
        results = {"viax-full-batch (reference)": ref, **results}
    settled = None
    if "viax-full-batch-seed1" in results and "summary" in ref:
        settled = settled_by(ref, results["viax-full-batch-seed1"])
    for kind in results:
        if "summary" in results.get(kind, {}) and "summary" in ref and results[kind] is not ref:
            results[kind]["agreement"] = agreement(ref, results[kind], settled)
    payload = {
        "command": command,
        "date": date,
        "machine": machine_info,
        "batch_size": BATCH,
        "reference": ref_name,
        "results": results,
        "notes": [f"\n{note}" for note in notes],
    }
    write_json("flights.json", payload)
    write_markdown(payload)


def write_markdown(payload: dict) -> None:
    lines = [
        "# Flights: hierarchical logistic regression, minibatch VI",
        "",
        f"`{payload['command']}` ({payload['date']}; batch {payload['batch_size']} rows; "
        "each method in a fresh process; machine shared with other jobs, so seconds are "
        f"inflated). Reference: {payload.get('reference', 'viax-memory')}. Off: a mean "
        "more than 0.1 reference sd away, an sd more than 10% off.",
        "",
        "| method | wall s | steps | rows/s | peak RSS MB | globals: max |Δmean|/sd | "
        "sd ratio | effects: median / max |Δmean|/sd | effects off (mean, sd) | agrees "
        "| off where the reference is settled (mean, sd) | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in payload["results"].items():
        if "error" in r:
            lines.append(f"| {kind} | failed | | | | | | | | | | |")
            continue
        agree = r.get("agreement", {})
        g, e = agree.get("globals", {}), agree.get("effects", {})
        nan = float("nan")
        ratio = f"{g['sd_ratio_min']:.2f}-{g['sd_ratio_max']:.2f}" if g else "(reference)"
        off = f"{e['frac_mean_off']:.1%}, {e['frac_sd_off']:.1%}" if e else ""
        st = agree.get("settled")
        settled_cell = (
            f"{st['frac_mean_off']:.1%} of {st['means']}, {st['frac_sd_off']:.1%} of {st['sds']}"
            if st
            else ""
        )
        lines.append(
            f"| {kind} | {r['wall_seconds']:.1f} | {r['steps']} | "
            f"{r.get('rows_per_second', r['rows_seen'] / r['wall_seconds']):.3g} | "
            f"{r['peak_rss_mb']:.0f} | {g.get('max_mean_diff_sd', nan):.2f} | {ratio} | "
            f"{e.get('median_mean_diff_sd', nan):.2f} / {e.get('max_mean_diff_sd', nan):.2f} | "
            f"{off} | {agree.get('agrees', '')} | {settled_cell} | {r.get('converged', '')} |"
        )
    sites = (*GLOBALS, "z_carrier", "z_dest", "z_tail")
    lines += [
        "",
        "By site: max |Δmean|/sd (fraction of means > 0.1 sd off; of sds > 10% off).",
        "",
        "| method | " + " | ".join(sites) + " |",
        "|---|" + "---|" * len(sites),
    ]
    for kind, r in payload["results"].items():
        by_site = r.get("agreement", {}).get("by_site")
        if by_site:
            cells = [
                f"{by_site[n]['max_mean_diff_sd']:.2f} ({by_site[n]['frac_mean_off']:.0%}; "
                f"{by_site[n]['frac_sd_off']:.0%})"
                for n in sites
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for kind, r in payload["results"].items():
        if "stored" in r:
            lines.append(f"\n{kind}: stored result, {r['stored']}.")
    if "viax-full-batch-seed1" in payload["results"]:
        lines.append(
            "\nviax-full-batch-seed1: the reference fit again with other fixed draws "
            "(flights_full_batch_seed1.json; rows/s there is rows × DADVI steps / wall): "
            "its row is the reference's own precision. Mean-field DADVI's 64 fixed draws "
            "move the optimum along the ridge of the intercept and the 16 carrier effects "
            "and move the globals' sds; the plane and destination effects are pinned."
        )
    lines.extend(payload.get("notes", []))
    (RESULTS_DIR / "flights.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
