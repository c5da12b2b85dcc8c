"""Long NumPyro NUTS references for the speed benchmark, computed once and cached.

Posteriors: breast-cancer logistic regression (``examples/logistic_regression.py``) and
eight schools, non-centred (``examples/eight_schools.py``).  NUTS: 4 chains x 2,000
draws after 1,000 warm-up, target acceptance 0.9, float64, seed 0.  The posterior mean
and sd of every element are stored as ``benchmarks/reference/<name>.json`` in the
posteriordb layout (``{"params": {"w[1]": {"mean": .., "std": ..}}}``, Stan's 1-based
names) with split R-hat and bulk ESS, so ``posteriordb_models.score`` reads both.

    python benchmarks/reference.py            # compute what is missing
    python benchmarks/reference.py --force    # recompute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts examples/ on sys.path)

NUM_CHAINS = 4
NUM_WARMUP = 1000
NUM_SAMPLES = 2000
TARGET_ACCEPT = 0.9


def problems() -> dict:
    """name -> (model_fn, data dict); shared by the speed benchmark."""
    import eight_schools
    import logistic_regression

    eight = json.loads((_common.REPO_DIR / "examples" / "data" / "eight_schools.json").read_text())
    return {
        "logistic_regression": (logistic_regression.model, logistic_regression.load_data()),
        "eight_schools": (eight_schools.model, eight),
    }


def path_of(name: str) -> Path:
    return _common.REFERENCE_DIR / f"{name}.json"


def load_reference(name: str) -> dict[str, tuple[float, float]]:
    """Stan name (1-based) -> (mean, sd); computes and caches it when missing."""
    path = path_of(name)
    if not path.exists():
        compute(name)
    params = json.loads(path.read_text())["params"]
    return {k: (float(v["mean"]), float(v["std"])) for k, v in params.items()}


def compute(name: str, seed: int = 0) -> Path:
    import jax
    import numpy as np
    import numpyro
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    import viax  # noqa: F401  (float64, as every benchmark)

    model_fn, data = problems()[name]
    arrays = _common.as_arrays(data)
    numpyro.set_host_device_count(1)
    kernel = NUTS(model_fn, target_accept_prob=TARGET_ACCEPT)
    mcmc = MCMC(
        kernel,
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        num_chains=NUM_CHAINS,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **arrays)
    elapsed = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    # Deterministic sites (eight schools' theta) come with the samples.
    params, worst_rhat, min_ess = {}, 0.0, np.inf
    for site, value in samples.items():
        value = np.asarray(value)  # (chains, draws, *shape)
        flat = value.reshape(value.shape[0], value.shape[1], -1)
        shape = value.shape[2:]
        for i, index in enumerate(np.ndindex(*shape) if shape else [()]):
            x = flat[:, :, i]
            label = site if not shape else f"{site}[{','.join(str(j + 1) for j in index)}]"
            rhat = float(split_gelman_rubin(x[..., None])[0])
            ess = float(effective_sample_size(x[..., None])[0])
            worst_rhat, min_ess = max(worst_rhat, rhat), min(min_ess, ess)
            params[label] = {
                "mean": float(x.mean()),
                "std": float(x.std(ddof=1)),
                "r_hat": rhat,
                "ess_bulk": ess,
            }
    num_divergent = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    payload = {
        "posterior": name,
        "method": (
            f"numpyro NUTS, {NUM_CHAINS} chains x {NUM_SAMPLES} draws after {NUM_WARMUP} "
            f"warm-up, target_accept_prob={TARGET_ACCEPT}, float64, seed {seed}"
        ),
        "command": _common.command_line(),
        "date": _common.today(),
        "n_draws_total": NUM_CHAINS * NUM_SAMPLES,
        "std_ddof": 1,
        "max_r_hat": worst_rhat,
        "min_ess": min_ess,
        "num_divergent": num_divergent,
        "wall_time": elapsed,
        "versions": {"numpyro": numpyro.__version__, "jax": jax.__version__},
        "params": params,
    }
    path = path_of(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(
        f"{name}: {elapsed:.1f}s, max R-hat {worst_rhat:.4f}, min ESS {min_ess:.0f}, "
        f"{num_divergent} divergent -> {path}",
        flush=True,
    )
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="recompute cached references")
    parser.add_argument("--name", action="append", choices=("logistic_regression", "eight_schools"))
    args = parser.parse_args(argv)
    for name in args.name or ("logistic_regression", "eight_schools"):
        if args.force or not path_of(name).exists():
            compute(name)
        else:
            print(f"{name}: cached at {path_of(name)}")


if __name__ == "__main__":
    main()
