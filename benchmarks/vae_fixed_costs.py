"""The fixed costs of a short minibatch learning fit: the MNIST VAE of
``benchmarks/vae_mnist.py`` fitted for a few epochs by ``fit_learn`` exactly as that
benchmark calls it, printing the total wall time, the set-up time before the first
step, the driver's wall time and the final ELBO, one JSON line per run.

To compare two versions of viax under the same load, alternate runs, the older from an
exported tree::

    git archive <commit> src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python benchmarks/vae_fixed_costs.py --epochs 1 --label old
    python benchmarks/vae_fixed_costs.py --epochs 1 --label new
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import optax
import vae_mnist

import viax
from viax.infer.learn import dynamic_binarization, fit_learn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    x_train, _ = vae_mnist.load_mnist(np.float32)
    vae = vae_mnist.make_vae(x_train.dtype)[0]
    start = time.perf_counter()
    result = fit_learn(
        vae,
        {"x": x_train},
        encoder=viax.MLPEncoder(hidden_sizes=(200, 200), activation="tanh"),
        objective=viax.ELBO(),
        batch_size=100,
        num_epochs=args.epochs,
        optimizer=optax.adam(1e-3),
        transform_batch=dynamic_binarization,
        seed=0,
        progress=False,
    )
    total = time.perf_counter() - start
    row = {
        "label": args.label,
        "viax": viax.__file__,
        "total_s": round(total, 2),
        "setup_s": round(result.info["setup_time"], 2),
        "driver_wall_s": round(result.wall_time, 2),
        "elbo": result.elbo,
        "elbo_se": result.elbo_se,
        "khat": result.khat,
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
