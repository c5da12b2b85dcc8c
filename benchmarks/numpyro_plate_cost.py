"""What NumPyro's ``plate(name, N, subsample_size=B)`` costs per step on CPU.

On CPU NumPyro draws a subsampling plate's rows with a partial Fisher-Yates shuffle: a
``lax.scan`` of B sequential iterations, each a ``randint`` and a two-entry swap, over a
materialised ``arange(N)`` (numpyro/primitives.py, ``_subsample_fn``).  Its cost grows
with B (sequential iterations) and with N (the ``arange`` and its copy).  This script
times, jitted, each in the same process:

* the draw alone, ``_subsample_fn(N, B)``, for the (N, B) of the benchmarks;
* one SVI step (AutoNormal, Adam, Trace_ELBO) of benchmarks/synthetic_logistic.py's
  subsampled model on N = 10^6 random rows × 20 predictors, B = 1,000: the plate drawing
  its rows, against the same plate given the rows of a per-epoch permutation
  (``handlers.substitute(data={"N": idx})``).

    python benchmarks/numpyro_plate_cost.py

Writes benchmarks/results/numpyro_plate_cost.json and .md.
"""

from __future__ import annotations

import os
import time

import numpy as np
from _common import RESULTS_DIR, command_line, machine, today, write_json

SHAPES = ((327_346, 4096), (10**6, 1000), (10**7, 1000))


def timed(fn, repeats: int) -> dict:
    """Wall and CPU ms per call of ``fn(i)`` after one warm-up call (compilation)."""
    fn(10**6)
    wall, cpu = time.perf_counter(), sum(os.times()[:2])
    for i in range(repeats):
        fn(i)
    return {
        "wall_ms": (time.perf_counter() - wall) / repeats * 1e3,
        "cpu_ms": (sum(os.times()[:2]) - cpu) / repeats * 1e3,
        "repeats": repeats,
    }


def main():
    import jax
    import jax.numpy as jnp
    import optax
    from numpyro import handlers
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.primitives import _subsample_fn
    from synthetic_logistic import subsampled_model

    jax.config.update("jax_enable_x64", True)
    key = jax.random.PRNGKey(0)
    out = {"draw": [], "step": {}}
    for n, b in SHAPES:
        draw = jax.jit(lambda k, n=n, b=b: _subsample_fn(n, b, k))
        t = timed(lambda i, draw=draw: draw(jax.random.fold_in(key, i)).block_until_ready(), 20)
        out["draw"].append({"N": n, "B": b, **t})
        print(out["draw"][-1], flush=True)

    n, p, b = 10**6, 20, 1000  # synthetic_logistic.py's model (its plate has B = 1,000)
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(n, p)).astype(np.float32))
    y = jnp.asarray((rng.random(n) < 0.3).astype(np.float32))
    svi = SVI(subsampled_model, AutoNormal(subsampled_model), optax.adam(1e-2), Trace_ELBO())
    update = jax.jit(svi.update)
    box = {"plate": svi.init(key, X, y)}

    def plate_step(i):
        box["plate"], loss = update(box["plate"], X, y)
        loss.block_until_ready()

    def given_model(idx, X, y):
        with handlers.substitute(data={"N": idx}):  # the plate's rows: this batch's
            subsampled_model(X, y)

    guide = AutoNormal(subsampled_model)
    given = SVI(given_model, lambda idx, X, y: guide(X, y), optax.adam(1e-2), Trace_ELBO())
    given_update = jax.jit(given.update)
    box["given"] = given.init(key, jnp.arange(b), X, y)
    order = rng.permutation(n)

    def given_step(i):
        idx = order[(i % (n // b)) * b : (i % (n // b) + 1) * b]
        box["given"], loss = given_update(box["given"], idx, X, y)
        loss.block_until_ready()

    out["step"] = {
        "N": n,
        "B": b,
        "plate": timed(plate_step, 100),
        "given": timed(given_step, 100),
    }
    print(out["step"], flush=True)
    out["load_average"] = os.getloadavg()
    write_json(
        "numpyro_plate_cost.json",
        {"command": command_line(), "date": today(), "machine": machine(), "result": out},
    )
    s = out["step"]
    lines = [
        "# NumPyro's subsampling plate on CPU",
        "",
        f"`{command_line()}` ({today()}; load average {out['load_average'][0]:.1f} / "
        f"{out['load_average'][1]:.1f} / {out['load_average'][2]:.1f} on 2 cores shared "
        "with other jobs: ratios hold better than seconds).",
        "",
        "The draw of a batch's rows, `numpyro.primitives._subsample_fn(N, B)`, jitted:",
        "",
        "| N | B | wall ms | CPU ms |",
        "|---|---|---|---|",
        *(
            f"| {d['N']:,} | {d['B']:,} | {d['wall_ms']:.2f} | {d['cpu_ms']:.2f} |"
            for d in out["draw"]
        ),
        "",
        f"One jitted SVI step of benchmarks/synthetic_logistic.py's model (N = {s['N']:,}, "
        f"B = {s['B']:,}, 20 predictors; AutoNormal, Adam, Trace_ELBO):",
        "",
        "| rows of the batch | wall ms | CPU ms |",
        "|---|---|---|",
        f"| drawn by the plate | {s['plate']['wall_ms']:.2f} | {s['plate']['cpu_ms']:.2f} |",
        f"| given to the plate (`handlers.substitute`) | {s['given']['wall_ms']:.2f} | "
        f"{s['given']['cpu_ms']:.2f} |",
    ]
    (RESULTS_DIR / "numpyro_plate_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
