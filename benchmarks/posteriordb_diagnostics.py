"""Does k-hat flag the fits that are off?  On the seven posteriordb posteriors, for
mean-field and full-rank viax fits: k-hat, ELBO, IWAE(100), log p(x) and the worst
|mean error| / reference sd, one row per posterior.

    .venv/bin/python benchmarks/posteriordb_diagnostics.py

writes benchmarks/results/posteriordb_diagnostics.json and .md.
"""

from __future__ import annotations

import datetime
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR as RESULTS  # noqa: E402  (also puts examples/ on sys.path)


def main() -> None:
    import posteriordb_models as pdb

    import viax

    rows = []
    for name in pdb.MODELS:
        model, data, reference = pdb.load(name)
        for family in ("meanfield", "fullrank"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = viax.fit(model, data, family=family, seed=0, progress=False)
            ev = result.log_evidence(num_samples=10_000, seed=0)
            score = pdb.score(result, reference, num_samples=10_000, seed=0)
            rows.append(
                {
                    "posterior": name,
                    "family": family,
                    "khat": result.khat,
                    "khat_10k": ev.khat_q,
                    "verdict": viax.diagnostics.khat_verdict(ev.khat_q),
                    "elbo": ev.elbo,
                    "elbo_se": ev.elbo_se,
                    "iwae100": ev.iwae[100][0],
                    "iwae100_se": ev.iwae[100][1],
                    "log_p": ev.log_p,
                    "log_p_se": ev.log_p_se,
                    "worst_mean_error_sd": score["mean_error_worst"],
                    "worst_parameter": score["worst_parameter"],
                    "sd_ratio_min": score["sd_ratio_min"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "posteriordb_diagnostics.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"Command: `.venv/bin/python benchmarks/posteriordb_diagnostics.py` "
        f"({datetime.date.today()}; 10k draws of q for k-hat, ELBO, IWAE and log p).",
        "",
        "| posterior | family | k-hat | verdict | ELBO | IWAE(100) | log p(x) "
        "| worst mean err / sd | min sd ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['posterior']} | {r['family']} | {r['khat_10k']:.2f} | {r['verdict']} | "
            f"{r['elbo']:.3f} ± {r['elbo_se']:.3f} | {r['iwae100']:.3f} | "
            f"{r['log_p']:.3f} ± {r['log_p_se']:.3f} | {r['worst_mean_error_sd']:.3f} "
            f"({r['worst_parameter']}) | {r['sd_ratio_min']:.2f} |"
        )
    (RESULTS / "posteriordb_diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
