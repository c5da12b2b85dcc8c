"""The full-data ELBO of each flights fit's mean-field Gaussian, with the same draws.

Every record of benchmarks/flights.py (and flights_full_batch.py) stores, per latent
coordinate, the mean and sd of 4,000 draws from the fit's q.  All the fits are
mean-field Gaussians in the unconstrained space (identity for a, b and the z's, log for
the three scales), so that q is recovered from the summary: the mean and sd as they
are for an identity coordinate, and for a log-normal scale with draw mean m and sd s,
σ² = log(1 + s²/m²), μ = log m − σ²/2.  The ELBO over all 327,346 rows is then

    L(q) = E_{u~q}[log p(x, T(u)) + log |det J_T(u)|] + H(q),
    H(q) = Σ_i log σ_i + D/2 · log(2πe),

estimated with the same S standard-normal draws ε for every fit (u = μ + σ ε, common
random numbers, so differences between fits have a far smaller Monte Carlo error than
each estimate).  Recovering q from 4,000 draws perturbs each mean by ~sd/63, which
lowers L by about D/(2·4000) ≈ 0.5 nats (and as much again for the sds): the same
for every fit.  log p is NumPyro's ``log_density`` of benchmarks/flights.py's model.

    python benchmarks/flights_elbo.py --draws 256 --record flights_full_batch.json \\
        --record flights_numpyro_40k.json   # differences against the first record

Writes benchmarks/results/flights_elbo.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import RESULTS_DIR, command_line, machine, today, write_json
from flights import GLOBALS, load_arrays, make_model

SCALES = ("s_carrier", "s_dest", "s_tail")
ORDER = (*GLOBALS, "z_carrier", "z_dest", "z_tail")


def gaussian_from_summary(summary: dict) -> dict:
    """name → (μ, σ) of q in the unconstrained space (see the module docstring)."""
    out = {}
    for name in ORDER:
        m, s = np.asarray(summary[name]["mean"]), np.asarray(summary[name]["sd"])
        if name in SCALES:
            var = np.log1p(s**2 / m**2)
            out[name] = (np.log(m) - var / 2, np.sqrt(var))
        else:
            out[name] = (m, s)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16, help="draws evaluated at once")
    parser.add_argument(
        "--record", action="append", required=True, metavar="FILE", help="in benchmarks/results"
    )
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import log_density

    jax.config.update("jax_enable_x64", True)
    data, sizes, _ = load_arrays()
    data = {k: jnp.asarray(v) for k, v in data.items()}
    model = make_model(sizes["C"], sizes["D"], sizes["T"])

    def log_joint(u: dict) -> jax.Array:
        params = {k: (jnp.exp(v) if k in SCALES else v) for k, v in u.items()}
        lp, _ = log_density(model, (), data, params)
        return lp + sum(u[k] for k in SCALES)  # log |det J| of exp

    batched = jax.jit(jax.vmap(log_joint))
    shapes = {
        k: np.asarray(
            json.loads((RESULTS_DIR / "flights_full_batch.json").read_text())["result"]["summary"][
                k
            ]["mean"]
        ).shape
        for k in ORDER
    }
    key = jax.random.PRNGKey(0)
    eps = {
        k: jax.random.normal(jax.random.fold_in(key, i), (args.draws, *shapes[k]))
        for i, k in enumerate(ORDER)
    }
    results = {}
    for item in args.record:
        name = file = item
        record = json.loads((RESULTS_DIR / file).read_text())["result"]
        q = gaussian_from_summary(record["summary"])
        start = time.perf_counter()
        values = []
        for lo in range(0, args.draws, args.chunk):
            u = {
                k: jnp.asarray(q[k][0]).reshape(shapes[k])
                + jnp.asarray(q[k][1]).reshape(shapes[k]) * eps[k][lo : lo + args.chunk]
                for k in ORDER
            }
            values.append(np.asarray(batched(u)))
        values = np.concatenate(values)
        dim = sum(int(np.prod(shapes[k])) for k in ORDER)
        entropy = sum(float(np.sum(np.log(q[k][1]))) for k in ORDER)
        entropy += dim / 2 * np.log(2 * np.pi * np.e)
        results[name] = {
            "elbo": float(values.mean() + entropy),
            "mc_se": float(values.std(ddof=1) / np.sqrt(len(values))),
            "entropy": entropy,
            "stored_elbo": record.get("elbo"),
            "stored_final_loss": record.get("final_loss"),
            "seconds": time.perf_counter() - start,
            "values": values.tolist(),
        }
        print(name, {k: v for k, v in results[name].items() if k != "values"}, flush=True)
    names = list(results)
    diffs = {}
    for other in names[1:]:
        d = np.asarray(results[other]["values"]) - np.asarray(results[names[0]]["values"])
        ent = results[other]["entropy"] - results[names[0]]["entropy"]
        diffs[f"{other} - {names[0]}"] = {
            "elbo_difference": float(d.mean() + ent),
            "mc_se": float(d.std(ddof=1) / np.sqrt(len(d))),
        }
        print(f"{other} - {names[0]}", diffs[f"{other} - {names[0]}"], flush=True)
    write_json(
        "flights_elbo.json",
        {
            "command": command_line(),
            "date": today(),
            "machine": machine(),
            "draws": args.draws,
            "results": results,
            "differences_common_draws": diffs,
        },
    )


if __name__ == "__main__":
    main()
