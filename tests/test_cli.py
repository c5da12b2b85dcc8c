"""`viax fit --method cavi|svi|naive`: conjugate models from the shell."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from viax.cli import main
from viax.conjugate import LinearRegressionModel, cavi, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gaussian_mixture.py"


@pytest.fixture
def points(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.5, (150, 2)), rng.normal(2, 0.7, (150, 2))])
    np.savez(tmp_path / "points.npz", X=x)
    return x, tmp_path / "points.npz"


def test_cavi_from_the_shell_matches_the_functional_call(points, tmp_path):
    import gaussian_mixture  # examples/ is on sys.path (conftest)

    x, path = points
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["fit", str(EXAMPLE), "--data", str(path), "--method", "cavi", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    expected = cavi(*gaussian_mixture.model(x))
    assert f"ELBO {expected.elbo:.4f}" in res.output and "closed form" in res.output
    assert "k-hat" in res.output and "n/a" in res.output  # no importance weights here
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    # The two heavy components sit at the two clusters, ±2 in both coordinates.
    weights = summary.loc[[f"weights[{k}]" for k in range(5)], "mean"].to_numpy()
    heavy = np.argsort(weights)[-2:]
    centres = sorted(summary.loc[f"means[{k},0]", "mean"] for k in heavy)
    np.testing.assert_allclose(centres, [-2.0, 2.0], atol=0.15)
    for name in ("summary.csv", "elbo.png", "marginals.png", "posterior.nc", "report.md"):
        assert (out / name).stat().st_size > 0


def test_conjugate_progress_bar_and_no_progress(points):
    _, path = points
    command = ["fit", str(EXAMPLE), "--data", str(path), "--method", "cavi", "--num-steps", "3"]
    shown = CliRunner().invoke(main, command)
    hidden = CliRunner().invoke(main, [*command, "--no-progress"])
    assert shown.exit_code == hidden.exit_code == 0, shown.output + hidden.output
    assert "viax cavi" in shown.output and "viax cavi" not in hidden.output


def test_svi_runs_from_the_shell(points):
    _, path = points
    res = CliRunner().invoke(
        main, ["fit", str(EXAMPLE), "--data", str(path), "--method", "svi", "--num-steps", "5"]
    )
    assert res.exit_code == 0, res.output
    assert "svi /" in res.output and "NOT converge" in res.output


def test_naive_runs_from_the_shell(tmp_path):
    # A regression model: the shell path is what is tested here, and its L-BFGS chunk
    # compiles in seconds where the mixture's takes 10-40 s (the mixture's naive fit is
    # tested in tests/conjugate).
    model_file = tmp_path / "regression.py"
    model_file.write_text(
        "from viax.conjugate import LinearRegressionModel\n\n\n"
        "def model(X, y):\n"
        "    return LinearRegressionModel.default(X.shape[1]), (X, y)\n"
    )
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    y = X @ [1.0, -2.0] + 0.1 * rng.normal(size=40)
    np.savez(tmp_path / "xy.npz", X=X, y=y)
    data = str(tmp_path / "xy.npz")
    res = CliRunner().invoke(main, ["fit", str(model_file), "--data", data, "--method", "naive"])
    assert res.exit_code == 0, res.output
    assert "naive /" in res.output and "NOT CONVERGED" not in res.output
    # The posterior is in the family: the optimum ELBO is the exact log evidence.
    evidence = cavi(LinearRegressionModel.default(2), (X, y), progress=False).elbo
    assert f"ELBO {evidence:.4f}" in res.output


def test_a_model_file_that_returns_no_conjugate_model_is_refused(points, tmp_path):
    _, path = points
    bad = tmp_path / "bad.py"
    bad.write_text("def model(X):\n    return X\n")
    res = CliRunner().invoke(main, ["fit", str(bad), "--data", str(path), "--method", "cavi"])
    assert res.exit_code != 0 and "must return (conjugate model, data to fit)" in res.output


def test_checkpoint_and_resume_from_the_shell(points, tmp_path):
    import gaussian_mixture

    x, path = points
    checkpoint = tmp_path / "run.npz"
    base = ["fit", str(EXAMPLE), "--data", str(path), "--method", "cavi", "--no-progress"]
    first = CliRunner().invoke(main, [*base, "--num-steps", "4", "--checkpoint", str(checkpoint)])
    assert first.exit_code == 0, first.output
    assert load_checkpoint(checkpoint)["step"] == 4
    resumed = CliRunner().invoke(
        main, [*base, "--num-steps", "200", "--checkpoint", str(checkpoint), "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    # The resumed run is the uninterrupted one: the same ELBO and sweep count.
    expected = cavi(*gaussian_mixture.model(x), progress=False)
    assert f"ELBO {expected.elbo:.4f}" in resumed.output
    assert f"after {expected.num_steps} steps" in resumed.output
    refused = CliRunner().invoke(main, [*base[:-3], "--method", "advi", "--checkpoint", "c.npz"])
    assert refused.exit_code != 0 and "checkpoints are for cavi, svi, naive" in refused.output
    alone = CliRunner().invoke(main, [*base, "--resume"])
    assert alone.exit_code != 0 and "--resume needs --checkpoint" in alone.output
