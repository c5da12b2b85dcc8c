"""Where stochastic BBVI stops, by stopping rule, against the exact mean-field optimum.

Models: 12 binary causes, 20 linear-Gaussian observations (4096 states), the design of
tests/infer/test_stopping.py, one model per ``--models`` seed (seed 0 is the test's).
For each model the best mean-field ELBO comes from CAVI with exact (closed-form)
coordinate updates from 32 random starts; each BBVI fit's q is scored by its exact
ELBO (enumeration).  Prints one line per fit and a summary per rule.

    python benchmarks/stopping.py --models 0 1 2 3 --seeds 5 --rules mcse stan
"""

import argparse
import itertools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import viax

K, N, PRIOR, NOISE = 12, 20, 0.3, 0.8


def problem(model_seed):
    rng = np.random.default_rng(model_seed)
    w = rng.normal(size=(N, K)) * (rng.uniform(size=(N, K)) < 0.5)
    y = w @ (rng.uniform(size=K) < PRIOR) + NOISE * rng.normal(size=N)

    def model(y):
        z = numpyro.sample("z", dist.Bernoulli(PRIOR).expand([K]).to_event(1))
        numpyro.sample("y", dist.Normal(jnp.asarray(w) @ z, NOISE), obs=y)

    states = np.array(list(itertools.product([0, 1], repeat=K)), dtype=float)
    log_joint = np.sum(np.where(states == 1, np.log(PRIOR), np.log1p(-PRIOR)), 1) + np.sum(
        -0.5 * ((y - states @ w.T) / NOISE) ** 2 - np.log(NOISE) - 0.5 * np.log(2 * np.pi), 1
    )

    def exact_elbo(probs):
        probs = np.clip(np.atleast_2d(probs), 1e-12, 1 - 1e-12)
        log_q = states @ np.log(probs).T + (1 - states) @ np.log1p(-probs).T
        return np.sum(np.exp(log_q) * (log_joint[:, None] - log_q), 0)

    probs = np.random.default_rng(1).uniform(0.05, 0.95, (32, K))
    for _ in range(200):
        for i in range(K):
            residual = y[None] - probs @ w.T + probs[:, i : i + 1] * w[:, i][None]
            logit = (
                np.log(PRIOR / (1 - PRIOR))
                + (residual @ w[:, i] - 0.5 * w[:, i] @ w[:, i]) / NOISE**2
            )
            probs[:, i] = 1 / (1 + np.exp(-logit))
    return model, {"y": y}, exact_elbo, float(exact_elbo(probs).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rules", nargs="+", default=["mcse", "stan"])
    args = parser.parse_args()
    summary = {rule: [] for rule in args.rules}
    for model_seed in args.models:
        model, data, exact_elbo, best = problem(model_seed)
        for rule in args.rules:
            for seed in range(args.seeds):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = viax.fit(
                        model, data, method="bbvi", seed=seed, progress=False, stop_rule=rule
                    )
                probs = np.asarray(jax.nn.sigmoid(result.params["z"]["logits"]))
                gap = best - exact_elbo(probs)[0]
                summary[rule].append((gap, result.converged, result.num_steps))
                print(
                    f"model {model_seed} rule {rule:4s} seed {seed}: gap {gap:.3f} nats, "
                    f"{result.num_steps} steps, converged={result.converged} "
                    f"({result.info['stop_reason']}), {time.perf_counter() - start:.1f} s"
                )
    for rule, rows in summary.items():
        gaps = np.array([r[0] for r in rows])
        print(
            f"{rule}: gap {gaps.min():.3f}-{gaps.max():.3f} nats, {np.sum(gaps < 0.2)}/"
            f"{len(rows)} within 0.2, {sum(r[1] for r in rows)} converged, steps "
            f"{min(r[2] for r in rows)}-{max(r[2] for r in rows)}"
        )


if __name__ == "__main__":
    main()
