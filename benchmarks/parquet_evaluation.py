"""The final evaluation of a minibatch fit from a Parquet file: its sampled batches read
alone (``ParquetSource.padded_batches``: only the row groups holding them, each decoded
once) against the full pass read through to the last of them (the code before).

For each file (the synthetic logistic regressions of benchmarks/synthetic_logistic.py,
raw scales, snappy; written to ``$VIAX_BENCH_DATA`` if missing), one process:

1. ``viax.fit(model, viax.data.parquet(path, ...), batch_size=4096, seed=0)`` as the
   ``viax-parquet`` method of synthetic_logistic.py: its ``evaluate`` phase
   (``result.info["timings"]``, compiles included) and ``result.info["evaluation"]``.
2. The fit's evaluator called again (its compiled programs warm), in turns: reading the
   sampled batches alone (first 8 batches, then all 32 if the 8 do not suffice), and
   reading the pass through with one try of 32 (the code before: a file was read in
   sequence, so its first try was skipped).  Wall and CPU seconds (all threads).  Where
   both end on the same 32 batches their log weights must be equal, bit for bit.
3. Reading only, no model: the 8 and the 32 sampled batches by ``padded_batches``
   against the pass read through to the last of them.

Results: benchmarks/results/parquet_evaluation.json + .md.

    python benchmarks/parquet_evaluation.py --rows 1000000 10000000
"""

from __future__ import annotations

import argparse
import os
import time

import make_synthetic_parquet as synth
import numpy as np
from _common import RESULTS_DIR, command_line, machine, markdown_table, today, write_json
from synthetic_logistic import BATCH, model

DRAWS = 200  # as the fit's own evaluation (_NUM_EVAL_DRAWS)


def _clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(rows: int, rounds: int) -> dict:
    import viax
    from viax.infer import minibatch as mb

    path = synth.ensure(rows, raw_scales=True, compression="snappy")
    names = synth.column_names(20)
    source = viax.data.parquet(path, columns={"X": names, "y": "y"})
    result = viax.fit(model, source, batch_size=BATCH, seed=0, progress=False)
    out = {
        "rows": rows,
        "path": str(path),
        "fit_evaluate_seconds": result.info["timings"]["evaluate"],
        "fit_evaluation": result.info["evaluation"],
        "steps": result.num_steps,
    }

    evaluator = result.log_weights_fn
    reads_alone = mb._reads_alone

    def alone():
        mb._reads_alone = reads_alone
        return evaluator(DRAWS, 1), dict(evaluator.last)

    def through():
        # The code before: a file's pass read in sequence, one try of 32 batches.
        mb._reads_alone = lambda s: isinstance(s, viax.data.ArraySource)
        try:
            return evaluator(DRAWS, 1), dict(evaluator.last)
        finally:
            mb._reads_alone = reads_alone

    timings: dict[str, dict[str, list[float]]] = {
        "alone": {"wall": [], "cpu": []},
        "through": {"wall": [], "cpu": []},
    }
    answers = {}
    for _ in range(rounds):
        for name, fn in (("alone", alone), ("through", through)):
            answers[name], wall, cpu = _clock(fn)
            timings[name]["wall"].append(wall)
            timings[name]["cpu"].append(cpu)
    out["evaluator"] = {
        name: {
            "wall_seconds": min(t["wall"]),
            "cpu_seconds": min(t["cpu"]),
            "all_wall": t["wall"],
            "all_cpu": t["cpu"],
            "evaluation": answers[name][1],
        }
        for name, t in timings.items()
    }
    same_batches = answers["alone"][1].get("batches") == answers["through"][1].get("batches")
    out["same_batches"] = same_batches
    out["identical_log_weights"] = bool(np.array_equal(answers["alone"][0], answers["through"][0]))
    if same_batches and not out["identical_log_weights"]:
        raise AssertionError("the same batches read two ways gave different log weights")

    # Reading only.
    total, order = evaluator._sampled_batches()
    reading = {}
    for k in (mb._EVAL_BATCHES_FIRST, mb._EVAL_BATCHES):
        wanted = np.sort(order[:k])

        def read_through(last=int(wanted[-1])):
            for j, _ in enumerate(source.batches(BATCH, seed=0, epoch=0, remainder="pad")):
                if j == last:
                    return j + 1

        def read_alone(wanted=wanted):
            return sum(1 for _ in source.padded_batches(BATCH, wanted, seed=0))

        best = {}
        for name, fn in (("alone", read_alone), ("through", read_through)):
            runs = [_clock(fn) for _ in range(rounds)]
            best[name] = {
                "batches_read": runs[0][0],
                "wall_seconds": min(r[1] for r in runs),
                "cpu_seconds": min(r[2] for r in runs),
            }
        reading[k] = best
    out["reading"] = reading
    out["pass_batches"] = total
    return out


def markdown(payload: dict) -> str:
    lines = [
        "# The final evaluation of a fit from a Parquet file: sampled batches read alone",
        "",
        f"`{payload['command']}` ({payload['date']}; 1-minute load average at the start and "
        f"the end: {payload['load'][0]:.1f}, {payload['load'][1]:.1f}; the machine "
        f"({payload['machine']['cpu_count']} cores) was shared with other jobs, so wall "
        "times are inflated: compare within a row).  Fit: the `viax-parquet` method of "
        f"benchmarks/synthetic_logistic.py (batch {BATCH}, seed 0).  Evaluator: the fit's "
        f"own, called again ({DRAWS} draws, programs compiled), best of "
        f"{payload['rounds']} turns each.  *Alone*: the sampled batches read by "
        "`ParquetSource.padded_batches` (8 first, then 32 if the 8 do not suffice); "
        "*through*: the code before (the pass read in sequence to the last sampled "
        "batch, one try of 32).",
        "",
    ]
    header = [
        "rows",
        "fit's evaluate s",
        "evaluator alone: wall / CPU s",
        "through: wall / CPU s",
        "batches alone / through",
        "same log weights",
    ]
    table = []
    for r in payload["results"]:
        a, t = r["evaluator"]["alone"], r["evaluator"]["through"]
        table.append(
            [
                f"{r['rows']:,}",
                f"{r['fit_evaluate_seconds']:.2f}",
                f"{a['wall_seconds']:.2f} / {a['cpu_seconds']:.2f}",
                f"{t['wall_seconds']:.2f} / {t['cpu_seconds']:.2f}",
                f"{a['evaluation'].get('batches')} / {t['evaluation'].get('batches')}",
                ("yes (bit for bit)" if r["identical_log_weights"] else "no")
                if r["same_batches"]
                else "(other batches)",
            ]
        )
    lines += [markdown_table(header, table), ""]
    lines += [
        "Reading only (no model): the sampled batches read alone against the pass read "
        "through to the last of them; wall / CPU s, best of the turns.",
        "",
    ]
    header = ["rows", "pass batches", "sampled", "alone", "through (batches read)"]
    table = []
    for r in payload["results"]:
        for k, v in r["reading"].items():
            table.append(
                [
                    f"{r['rows']:,}",
                    str(r["pass_batches"]),
                    str(k),
                    f"{v['alone']['wall_seconds']:.2f} / {v['alone']['cpu_seconds']:.2f}",
                    f"{v['through']['wall_seconds']:.2f} / {v['through']['cpu_seconds']:.2f}"
                    f" ({v['through']['batches_read']})",
                ]
            )
    lines += [markdown_table(header, table), ""]
    for r in payload["results"]:
        lines.append(f"- {r['rows']:,} rows, the fit's evaluation: {r['fit_evaluation']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    load = [os.getloadavg()[0]]
    results = [measure(rows, args.rounds) for rows in args.rows]
    load.append(os.getloadavg()[0])
    payload = {
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "load": load,
        "rounds": args.rounds,
        "results": results,
    }
    write_json("parquet_evaluation.json", payload)
    text = markdown(payload)
    (RESULTS_DIR / "parquet_evaluation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
