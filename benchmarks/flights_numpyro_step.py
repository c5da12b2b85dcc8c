"""Where NumPyro's SVI step on flights spends its time (benchmarks/flights.py's model).

NumPyro's ``plate(name, N, subsample_size=B)`` draws the batch's row indices itself.  On
CPU it does so with a partial Fisher-Yates shuffle: a ``lax.scan`` of B sequential
iterations over an ``arange(N)`` (numpyro/primitives.py, ``_subsample_fn``), each
drawing one ``randint`` and swapping two entries.  This script times, in one process:

* ``indices``: ``_subsample_fn(N, B)`` alone, jitted (N = 327,346 flights, B = 4,096);
* ``plate``: one jitted ``svi.update`` with the plate drawing its own indices;
* ``given``: the same step with the batch's indices given to the same plate
  (``handlers.substitute(model, data={"N": idx})``) from a per-epoch permutation, as a
  NumPyro user who feeds minibatches does;
* ``run``: ``svi.run(..., progress_bar=False)`` (one ``lax.scan``) for ``--run-steps``.

    python benchmarks/flights_numpyro_step.py --repeats 20 --run-steps 1000

Prints one JSON line (and writes benchmarks/results/flights_numpyro_step.json with
``--name``).  Wrap in ``/usr/bin/time -v`` for the process's peak RSS and system time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
from _common import command_line, machine, today, write_json
from flights import BATCH, load_arrays, make_model


def _times():
    t = os.times()
    return time.perf_counter(), t.user + t.system, t.system


def timed(fn, repeats: int) -> dict:
    """Wall, CPU and system ms per call of ``fn(i)`` (after one warm-up call)."""
    start = time.perf_counter()
    fn(10**6)  # a warm-up index no timed call uses
    first = time.perf_counter() - start
    w0, c0, s0 = _times()
    for i in range(repeats):
        fn(i)
    w1, c1, s1 = _times()
    return {
        "first_call_s": first,
        "wall_ms": (w1 - w0) / repeats * 1e3,
        "cpu_ms": (c1 - c0) / repeats * 1e3,
        "sys_ms": (s1 - s0) / repeats * 1e3,
        "repeats": repeats,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--run-steps", type=int, default=0, help="also time svi.run (0: skip)")
    parser.add_argument("--x32", action="store_true", help="leave jax_enable_x64 off")
    parser.add_argument("--name", default=None, help="write benchmarks/results/NAME.json")
    args = parser.parse_args()

    import jax
    import optax
    from numpyro import handlers
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.primitives import _subsample_fn

    jax.config.update("jax_enable_x64", not args.x32)
    data, sizes, _ = load_arrays()
    n = len(data["y"])
    data = {k: jax.numpy.asarray(v) for k, v in data.items()}
    out = {"rows": n, "batch": BATCH, "x64": not args.x32}
    key = jax.random.PRNGKey(0)

    draw = jax.jit(lambda k: _subsample_fn(n, BATCH, k))
    out["indices"] = timed(lambda i: draw(jax.random.fold_in(key, i)).block_until_ready(), 20)

    model = make_model(sizes["C"], sizes["D"], sizes["T"], subsample=BATCH)
    steps = max(args.run_steps, 1000)
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(optax.exponential_decay(1e-2, steps, 0.1)), Trace_ELBO())
    state0 = svi.init(jax.random.PRNGKey(0), **data)

    update = jax.jit(svi.update)
    box = {"state": state0}

    def plate_step(i):
        box["state"], loss = update(box["state"], **data)
        loss.block_until_ready()

    out["plate"] = timed(plate_step, args.repeats)

    def given_model(idx, **kw):
        with handlers.substitute(data={"N": idx}):  # the plate takes these rows
            model(**kw)

    given_guide_ = AutoNormal(model)

    def given_guide(idx, **kw):
        return given_guide_(**kw)

    svi_given = SVI(given_model, given_guide, svi.optim, Trace_ELBO())
    perm = np.random.default_rng(0).permutation(n)
    state_given = svi_given.init(jax.random.PRNGKey(0), jax.numpy.asarray(perm[:BATCH]), **data)
    given = jax.jit(svi_given.update)
    box["state"] = state_given

    def given_step(i):
        j = (i % (n // BATCH)) * BATCH
        box["state"], loss = given(box["state"], jax.numpy.asarray(perm[j : j + BATCH]), **data)
        loss.block_until_ready()

    out["given"] = timed(given_step, args.repeats)

    # the same steps, an epoch's worth in one jitted fori_loop (benchmarks/flights.py's
    # numpyro loop): per step
    per_epoch = n // BATCH

    @jax.jit
    def epoch(state, key, num, data):
        order = jax.random.permutation(key, n)

        def body(i, carry):
            idx = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
            state, loss = svi_given.update(carry[0], idx, **data)
            return state, carry[1] + loss

        return jax.lax.fori_loop(0, num, body, (state, 0.0))

    box["state"] = state_given

    def epoch_run(i):
        box["state"], total = epoch(box["state"], jax.random.fold_in(key, i), per_epoch, data)
        total.block_until_ready()

    def per_step(timing):
        return {
            **timing,
            "wall_ms": timing["wall_ms"] / per_epoch,
            "cpu_ms": timing["cpu_ms"] / per_epoch,
            "sys_ms": timing["sys_ms"] / per_epoch,
            "per": "step",
        }

    out["given_epoch_fori_loop"] = per_step(timed(epoch_run, max(1, args.repeats // 10)))

    # and in one jitted lax.scan over the epoch's rows drawn beforehand (a static length)
    @jax.jit
    def epoch_scan(state, rows, data):
        return jax.lax.scan(lambda s, idx: svi_given.update(s, idx, **data), state, rows)

    rows = jax.numpy.asarray(perm[: per_epoch * BATCH].reshape(per_epoch, BATCH))
    box["state"] = state_given

    def scan_run(i):
        box["state"], losses = epoch_scan(box["state"], rows, data)
        losses.block_until_ready()

    out["given_epoch_scan"] = per_step(timed(scan_run, max(1, args.repeats // 10)))

    if args.run_steps:
        w0, c0, s0 = _times()
        result = svi.run(jax.random.PRNGKey(0), args.run_steps, **data, progress_bar=False)
        np.asarray(result.losses)
        w1, c1, s1 = _times()
        out["run"] = {
            "steps": args.run_steps,
            "wall_s": w1 - w0,
            "cpu_s": c1 - c0,
            "sys_s": s1 - s0,
            "ms_per_step": (w1 - w0) / args.run_steps * 1e3,
            "final_loss": float(np.mean(np.asarray(result.losses)[-100:])),
        }
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_average"] = os.getloadavg()
    print(json.dumps(out))
    if args.name:
        write_json(
            f"{args.name}.json",
            {"command": command_line(), "date": today(), "machine": machine(), "result": out},
        )


if __name__ == "__main__":
    main()
