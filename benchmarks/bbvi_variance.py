"""BBVI gradient variance along an optimisation (the BBVI paper's variance figure) on a
real model with discrete latents: the posteriordb Gaussian mixture with one explicit
Categorical assignment per data point (1000 local discrete latents), against NumPyro's
TraceGraph_ELBO (Rao-Blackwellised score function) at the same parameters.

    python benchmarks/bbvi_variance.py [--steps 400] [--every 50] [--repeats 50] [--rounds 21]

Writes benchmarks/results/bbvi_variance.json, bbvi_variance.png and bbvi.md.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import _common
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import posteriordb_models
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

import viax
from viax.estimators.score import build_structure
from viax.infer import bbvi
from viax.infer.driver import chunk_fn
from viax.model import build_target

ESTIMATORS = ("score", "score+rb", "score+rb+cv", "auto+rb+cv")
NUM_PARTICLES = 16
ETA = bbvi.DEFAULT_ETA
TRACEGRAPH = "numpyro TraceGraph_ELBO"


gmm = posteriordb_models.low_dim_gauss_mix_assignments


def guide(N, y):
    """The same mean-field q as viax's, written for NumPyro's TraceGraph_ELBO."""
    for name, shape, support in (
        ("mu", (2,), constraints.ordered_vector),
        ("sigma", (2,), constraints.positive),
        ("theta", (), constraints.unit_interval),
    ):
        loc = numpyro.param(f"{name}_loc", jnp.zeros(shape))
        scale = numpyro.param(f"{name}_scale", jnp.ones(shape), constraint=constraints.positive)
        base = dist.Normal(loc, scale)
        base = base.to_event(1) if shape else base
        numpyro.sample(name, dist.TransformedDistribution(base, biject_to(support)))
    logits = numpyro.param("z_logits", jnp.zeros((N, 2)))
    with numpyro.plate("n", N):
        numpyro.sample("z", dist.Categorical(logits=logits))


def numpyro_params(params):
    out = {"z_logits": params["z"]["logits"]}
    for name in ("mu", "sigma", "theta"):
        out[f"{name}_loc"] = params[name]["loc"]
        out[f"{name}_scale"] = jnp.exp(params[name]["log_scale"])
    return out


def tracegraph(data, num_repeats):
    elbo = numpyro.infer.TraceGraph_ELBO(num_particles=NUM_PARTICLES)
    constrain = {
        k: biject_to(constraints.positive) for k in ("mu_scale", "sigma_scale", "theta_scale")
    }

    def loss(unconstrained, key):
        params = {k: constrain[k](v) if k in constrain else v for k, v in unconstrained.items()}
        return elbo.loss(key, params, gmm, guide, **data)

    grad = jax.jit(jax.grad(loss))

    def to_unconstrained(params):
        return {k: constrain[k].inv(v) if k in constrain else v for k, v in params.items()}

    def variance(params, seed):
        u = to_unconstrained(params)
        keys = jax.random.split(jax.random.PRNGKey(seed), num_repeats)
        grads = [grad(u, k) for k in keys]
        return float(
            sum(
                np.var(np.stack([np.asarray(g[k]) for g in grads]), axis=0, ddof=1).sum()
                for k in grads[0]
            )
        )

    def seconds_per_step(params, n=50):
        u = to_unconstrained(params)
        # keys split and sliced before the clock starts: slicing a device array in the
        # loop would add a dispatch per step to NumPyro's time
        keys = [jax.block_until_ready(k) for k in jax.random.split(jax.random.PRNGKey(0), n)]
        jax.block_until_ready(grad(u, keys[0]))
        start = time.perf_counter()
        for k in keys:
            out = grad(u, k)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    return variance, seconds_per_step


def step_runner(structure, data, name, params, num_steps=100):
    """Seconds per step of ``num_steps`` compiled steps of the driver's scan (gradient
    + optimiser update + guard), from ``params``."""
    base, rao_blackwell, control_variate = bbvi.parse_estimator(name)
    algo = bbvi.build_bbvi(
        structure, bbvi.bbvi_adagrad(ETA), NUM_PARTICLES, base, rao_blackwell, control_variate
    )
    run_chunk = chunk_fn(algo.step)
    state = algo.init(params)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(run_chunk(state, key, 0, num_steps, data))

    def seconds():
        start = time.perf_counter()
        jax.block_until_ready(run_chunk(state, key, 0, num_steps, data))
        return (time.perf_counter() - start) / num_steps

    return seconds


def interleaved_seconds(runners, num_rounds):
    """Each runner timed once per round, rounds interleaved (the machine's load drifts);
    returns {name: [seconds per round]}."""
    out = {name: [] for name in runners}
    for _ in range(num_rounds):
        for name, runner in runners.items():
            out[name].append(runner())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    args = parser.parse_args()
    folder = _common.POSTERIORDB_DIR / "low_dim_gauss_mix-low_dim_gauss_mix"
    data = json.loads((folder / "data.json").read_text())
    target, arrays, _ = build_target(gmm, data)
    structure = build_structure(target, arrays)
    algo = bbvi.build_bbvi(structure, bbvi.bbvi_adagrad(ETA), NUM_PARTICLES, "auto", True, True)
    run_chunk = chunk_fn(algo.step)
    state = algo.init(bbvi._conditional_init(structure, arrays))
    tg_variance, tg_seconds = tracegraph({"N": data["N"], "y": arrays["y"]}, args.repeats)
    history = {name: [] for name in (*ESTIMATORS, TRACEGRAPH)}
    iterations = []
    key = jax.random.PRNGKey(0)
    for it in range(0, args.steps + 1, args.every):
        if it:
            key, sub = jax.random.split(key)
            state, _ = run_chunk(state, sub, 0, args.every, arrays)
        variance = viax.gradient_variance(
            gmm,
            data,
            params=state.params,
            estimators=ESTIMATORS,
            num_particles=NUM_PARTICLES,
            num_repeats=args.repeats,
            seed=it,
        )
        for name in ESTIMATORS:
            history[name].append(variance[name])
        history[TRACEGRAPH].append(tg_variance(numpyro_params(state.params), it))
        iterations.append(it)
        print(it, {k: f"{v[-1]:.3g}" for k, v in history.items()}, flush=True)
    runners = {name: step_runner(structure, arrays, name, state.params) for name in ESTIMATORS}
    tg_params = numpyro_params(state.params)
    runners[TRACEGRAPH] = lambda: tg_seconds(tg_params, n=100)
    rounds = interleaved_seconds(runners, args.rounds)
    seconds = {name: float(np.median(v)) for name, v in rounds.items()}
    best = {name: float(np.min(v)) for name, v in rounds.items()}

    def round_ratio(a, b):
        return float(np.median(np.asarray(rounds[a]) / np.asarray(rounds[b])))

    final = {k: v[-1] for k, v in history.items()}
    ratio = {
        k: float(np.median(np.asarray(history["score"]) / np.asarray(v)))
        for k, v in history.items()
    }
    payload = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "model": "posteriordb low_dim_gauss_mix with explicit Categorical assignments "
        "(1000 local discrete latents + 5 continuous)",
        "num_particles": NUM_PARTICLES,
        "num_repeats": args.repeats,
        "iterations": iterations,
        "variance": history,
        "final_variance": final,
        "median_variance_ratio_plain_over": ratio,
        "seconds_per_step": seconds,
        "seconds_per_step_best": best,
        "seconds_per_step_each_round": rounds,
        "step_cost_ratio_rb_cv_over_plain": round_ratio("score+rb+cv", "score"),
        "step_cost_ratio_auto_rb_cv_over_tracegraph": round_ratio("auto+rb+cv", TRACEGRAPH),
        "best_step_cost_ratio_rb_cv_over_plain": best["score+rb+cv"] / best["score"],
        "best_step_cost_ratio_auto_rb_cv_over_tracegraph": best["auto+rb+cv"] / best[TRACEGRAPH],
        "note": "TraceGraph_ELBO's time is one jitted gradient (no optimiser update); "
        "viax's is one compiled step of the driver's scan (gradient + AdaGrad + guard), at "
        "the same final q. Rounds time every estimator in turn (100 steps or gradients "
        "each); median and best round per estimator; ratios are medians of the per-round "
        "ratios and ratios of the best rounds.",
    }
    _common.write_json("bbvi_variance.json", payload)
    plot(iterations, history, _common.RESULTS_DIR / "bbvi_variance.png")
    rows = [
        (
            name,
            _common.fmt(final[name]),
            _common.fmt(ratio[name]),
            f"{_common.fmt(seconds[name] * 1e6)} ({_common.fmt(best[name] * 1e6)})",
        )
        for name in history
    ]
    table = _common.markdown_table(
        [
            "estimator",
            "variance at the last iteration",
            "median plain / this",
            "µs per step, median (best)",
        ],
        rows,
    )
    text = (
        "# BBVI gradient variance\n\n"
        f"{payload['model']}; S = {NUM_PARTICLES} draws per gradient, variance = trace of "
        f"the covariance over {args.repeats} repeated gradients at the same q, every "
        f"{args.every} steps of an auto+rb+cv AdaGrad run.\n\n"
        f"Command: `{payload['command']}` ({payload['date']}).\n\n{table}\n\n"
        f"Step-cost ratio RB+CV / plain: {payload['step_cost_ratio_rb_cv_over_plain']:.2f} "
        f"(best rounds {payload['best_step_cost_ratio_rb_cv_over_plain']:.2f}); "
        "auto+rb+cv step / TraceGraph_ELBO gradient: "
        f"{payload['step_cost_ratio_auto_rb_cv_over_tracegraph']:.2f} (best rounds "
        f"{payload['best_step_cost_ratio_auto_rb_cv_over_tracegraph']:.2f}).\n"
        f"{payload['note']}\n\n![variance](bbvi_variance.png)\n"
    )
    (_common.RESULTS_DIR / "bbvi.md").write_text(text)
    print(text)


def plot(iterations, history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in history.items():
        ax.plot(iterations, values, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient variance (trace)")
    ax.set_title("BBVI gradient variance, posteriordb Gaussian mixture, S = 16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
