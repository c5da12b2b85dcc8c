"""The default optimizer on the two ill-conditioned regressions of issue 14 (part 1).

The cases, their exact posterior moments (quadrature over log σ of the Gaussian
conditionals of β) and the models live in ``tests/infer/test_ill_conditioned.py``;
this script fits each with both families at the default settings (default number
of draws, ``num_steps=1000``) and prints, per fit: converged, DADVI steps, the MAP
search (``map_ok``, L-BFGS + Newton steps, decrement, preconditioner), the worst and
median ``|mean_q − mean_exact| / sd_exact`` and the sd ratios, on the unconstrained
coordinates (β, log σ), and the seconds of the fit.

    python benchmarks/ill_conditioned.py
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np

import viax

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    spec = importlib.util.spec_from_file_location(
        "ill_conditioned_cases", ROOT / "tests" / "infer" / "test_ill_conditioned.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    design = np.stack([np.ones_like(module.YEAR), module.YEAR], axis=1)
    year = module.exact_moments(design, module.TEMPERATURE, np.array([100.0, 0.03]), 1.0)
    x, y = module.collinear_data()
    design = np.column_stack([np.ones(len(y)), x])
    prior_sd = np.r_[100.0, np.full(x.shape[1], 10.0)]
    collinear = module.exact_moments(design, y, prior_sd, 5.0)
    return {
        "raw year (D=3)": (
            module.year_model,
            {"year": module.YEAR, "y": module.TEMPERATURE},
            year,
        ),
        "25 collinear terms, N=5000 (D=27)": (module.collinear_model, {"x": x, "y": y}, collinear),
    }


def main() -> None:
    header = (
        "| case | family | converged | steps | map_ok | MAP steps (Newton) | decrement "
        "| preconditioner | worst / median error | sd ratio | seconds |"
    )
    print(header)
    print("|---" * 11 + "|")
    for name, (model, data, (mean, sd)) in _cases().items():
        for family in ("fullrank", "meanfield"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                result = viax.fit(model, data, family=family, progress=False)
                seconds = time.perf_counter() - start
            info = result.info
            errors = np.abs(np.asarray(result.mean_unconstrained) - mean) / sd
            ratio = np.sqrt(np.diagonal(np.asarray(result.cov_unconstrained))) / sd
            print(
                f"| {name} | {family} | {result.converged} | {result.num_steps} "
                f"| {info['map_ok']} | {info['map_steps']} ({info.get('map_newton_steps', 0)}) "
                f"| {info.get('map_decrement', float('nan')):.1e} | {info['preconditioner']} "
                f"| {errors.max():.3f} / {np.median(errors):.3f} "
                f"| {ratio.min():.2f}–{ratio.max():.2f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
