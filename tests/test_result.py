"""Result: summary, ArviZ round trip, plots, and the CLI that writes them."""

import json
from pathlib import Path

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from click.testing import CliRunner

import viax
from viax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5))
    with numpyro.plate("n", len(y)):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


Y = np.random.default_rng(1).normal(3.0, 2.0, size=50)


@pytest.fixture(scope="module")
def result():
    return viax.fit(model, {"y": Y}, family="fullrank", seed=0, progress=False)


def test_summary_table(result):
    table = result.summary(num_samples=4000, seed=0)
    assert list(table.columns) == ["mean", "sd", "5%", "50%", "95%"]
    assert list(table.index) == ["mu", "sigma"]
    # Posterior of mu ≈ N(ȳ, s/√n); 4000 draws give its mean to ±0.02.
    assert abs(table.loc["mu", "mean"] - Y.mean()) < 0.05
    assert abs(table.loc["sigma", "mean"] - Y.std()) < 0.2
    assert (table["5%"] < table["50%"]).all() and (table["50%"] < table["95%"]).all()


def test_arviz_round_trip(result, tmp_path):
    idata = result.to_arviz(num_samples=500, seed=0)
    assert idata.posterior["mu"].shape == (1, 500)
    assert idata.sample_stats["elbo_trace"].shape == (result.num_steps,)
    assert idata.posterior.attrs["converged"] == 1
    summary = az.summary(idata, kind="stats")
    assert {"mu", "sigma"} <= set(summary.index)
    path = tmp_path / "posterior.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["mu"].values, idata.posterior["mu"].values)
    np.testing.assert_array_equal(
        back.sample_stats["elbo_trace"].values, idata.sample_stats["elbo_trace"].values
    )


def test_plot_elbo_writes_a_png(result, tmp_path):
    path = tmp_path / "elbo.png"
    result.plot_elbo(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monte_carlo_error_of_the_fixed_draws_is_small(result):
    se = result.monte_carlo_error(num_repeats=4)
    sd = np.asarray(result.family.stddev(result.params))
    assert set(se) == {"mu", "sigma"}
    # Moment-matched draws: the fitted mean moves by well under 0.1 posterior sd.
    assert 0 < se["mu"] < 0.1 * sd[0] and 0 < se["sigma"] < 0.1 * sd[1]


def test_repr_names_the_verdict(result):
    assert "converged" in repr(result) and "dadvi" in repr(result)


def test_cli_fit_writes_outputs(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "fit",
            str(ROOT / "examples" / "eight_schools.py"),
            "--data",
            str(ROOT / "examples" / "data" / "eight_schools.json"),
            "--family",
            "fullrank",
            "--out",
            str(out),
            "--no-progress",
            "--num-samples",
            "300",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "converged" in res.output and "theta[7]" in res.output
    assert "Monte Carlo error of the fitted means" in res.output
    for name in ("summary.csv", "elbo.png", "marginals.png", "posterior.nc", "report.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "PSIS k-hat" in report and "verdict: **" in report and "![marginals]" in report
    assert "log p(x)" in res.output and "k-hat" in res.output
    idata = az.from_netcdf(str(out / "posterior.nc"))
    assert idata.posterior["theta"].shape == (1, 300, 8)


def test_cli_npz_data_and_errors(tmp_path):
    data = json.loads((ROOT / "examples" / "data" / "eight_schools.json").read_text())
    npz = tmp_path / "d.npz"
    np.savez(npz, **{k: np.asarray(v) for k, v in data.items()})
    runner = CliRunner()
    model_file = str(ROOT / "examples" / "eight_schools.py")
    res = runner.invoke(main, ["fit", model_file, "--data", str(npz), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["fit", model_file, "--data", str(npz), "--model", "nope"])
    assert res.exit_code != 0 and "defines no function 'nope'" in res.output
    res = runner.invoke(main, ["fit", model_file, "--data", str(npz), "--family", "diag"])
    assert res.exit_code != 0 and "valid families" in res.output
    res = runner.invoke(main, ["fit", model_file])
    assert res.exit_code != 0 and "missing model argument" in res.output
