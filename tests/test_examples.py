"""Every example runs, with tiny settings (after NumPyro's ``test/test_examples.py``).

The scripts' ``__main__`` blocks run in-process with ``viax.fit`` wrapped to take a
few steps; the posteriordb models are fitted the same way and skip, with the reason,
when ``../shared/data`` is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import viax

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARED_POSTERIORDB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "posteriordb"
TINY = {"num_steps": 5, "progress": False}
NOT_CONVERGED = "ignore:viax.fit did not converge:RuntimeWarning"
# Smoke tests with tiny settings: a rough q may rightly get a k-hat warning.
HIGH_KHAT = "ignore:.*k-hat:RuntimeWarning"


def _import(name):
    spec = importlib.util.spec_from_file_location(f"viax_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


posteriordb_models = _import("posteriordb_models")
needs_posteriordb = pytest.mark.skipif(
    not SHARED_POSTERIORDB.is_dir(),
    reason=f"posteriordb data not found at {SHARED_POSTERIORDB} (shared/data is not "
    "part of the repository)",
)


@pytest.fixture
def tiny_fit(monkeypatch):
    """Make every ``viax.fit`` in a script take a few steps, without a progress bar."""
    real_fit = viax.fit
    calls = []

    @functools.wraps(real_fit)
    def fit(*args, **kwargs):
        result = real_fit(*args, **{**kwargs, **TINY})
        calls.append(result)
        return result

    monkeypatch.setattr(viax, "fit", fit)
    return calls


def _assert_draws_finite(result, sites):
    draws = result.sample(50, seed=1)
    for site in sites:
        assert site in draws, f"site {site!r} missing from the draws"
        assert np.all(np.isfinite(draws[site])), site


@pytest.mark.slow
@pytest.mark.filterwarnings(NOT_CONVERGED)
@pytest.mark.filterwarnings(HIGH_KHAT)
@pytest.mark.parametrize("script", ["eight_schools", "logistic_regression", "ppca"])
def test_example_script_runs(script, tiny_fit, capsys):
    pytest.importorskip("sklearn")
    runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="__main__")
    assert len(tiny_fit) == 1
    out = capsys.readouterr().out
    assert "Result(" in out and "mean" in out


@pytest.mark.slow
@pytest.mark.filterwarnings(NOT_CONVERGED)  # a fixed budget of epochs is never "converged"
@pytest.mark.filterwarnings(HIGH_KHAT)
def test_vae_example_runs_with_tiny_settings(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("equinox")
    result, evidence = _import("vae").main(num_epochs=1, batch_size=500, num_test_samples=20)
    assert evidence.log_p_rows.shape == (300,) and np.isfinite(evidence.log_p)
    assert "held-out log p(x)" in capsys.readouterr().out


def test_logistic_regression_data_are_standardised():
    pytest.importorskip("sklearn")
    logistic_regression = _import("logistic_regression")
    data = logistic_regression.load_data()
    assert data["X"].shape == (569, 30) and data["y"].shape == (569,)
    np.testing.assert_allclose(data["X"].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(data["X"].std(axis=0), 1.0, atol=1e-12)
    assert set(np.unique(data["y"])) == {0, 1}


def test_posteriordb_models_cover_the_seven_posteriors():
    assert len(posteriordb_models.MODELS) == 7
    if SHARED_POSTERIORDB.is_dir():
        assert set(posteriordb_models.MODELS) == {p.name for p in SHARED_POSTERIORDB.iterdir()}


def test_posteriordb_load_says_where_data_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no posteriordb folder"):
        posteriordb_models.load("sblrc-blr", data_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown posterior"):
        posteriordb_models.load("no-such-posterior")


def test_score_maps_one_based_names_and_measures_errors():
    rng = np.random.default_rng(0)
    beta = rng.normal(size=(20_000, 2)) * np.array([1.0, 2.0]) + np.array([0.0, 5.0])
    draws = {"beta": beta, "sigma": np.exp(rng.normal(size=20_000))}
    reference = {
        "beta[1]": (0.5, 1.0),  # off by half an sd
        "beta[2]": (5.0, 4.0),  # right mean, half the sd
        "sigma": (float(draws["sigma"].mean()), float(draws["sigma"].std(ddof=1))),
    }
    scores = posteriordb_models.score(draws, reference)
    assert scores["worst_parameter"] == "beta[1]"
    assert scores["mean_error"]["beta[1]"] == pytest.approx(0.5, abs=0.02)
    assert scores["mean_error"]["sigma"] == pytest.approx(0.0, abs=1e-12)
    assert scores["sd_ratio"]["beta[2]"] == pytest.approx(0.5, abs=0.01)
    assert scores["sd_ratio_worst"] == pytest.approx(0.5, abs=0.01)
    assert scores["mean_error_median"] == pytest.approx(scores["mean_error"]["beta[2]"])
    with pytest.raises(KeyError, match="no site 'tau'"):
        posteriordb_models.score(draws, {"tau": (1.0, 1.0)})


@needs_posteriordb
@pytest.mark.slow
@pytest.mark.filterwarnings(NOT_CONVERGED)
@pytest.mark.filterwarnings(HIGH_KHAT)
@pytest.mark.parametrize("name", list(posteriordb_models.MODELS))
def test_posteriordb_model_fits(name):
    model_fn, data, reference = posteriordb_models.load(name)
    result = viax.fit(model_fn, data, family="meanfield", seed=0, **TINY)
    assert np.isfinite(result.elbo)
    sites = {posteriordb_models.site_of(k) for k in reference}
    _assert_draws_finite(result, sites)
    scores = posteriordb_models.score(result, reference, num_samples=50)
    assert np.isfinite(scores["mean_error_worst"])


@needs_posteriordb
def test_posteriordb_log_densities_match_the_maths():
    """Spot checks of the models against the README's formulas at one point."""
    import jax.numpy as jnp
    from jax.scipy import stats
    from numpyro.infer.util import log_density

    def load(name):
        model_fn, data, _ = posteriordb_models.load(name)
        return model_fn, {k: np.asarray(v) if isinstance(v, list) else v for k, v in data.items()}

    model_fn, data = load("sblrc-blr")
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    beta, sigma = np.linspace(0.5, 1.5, data["D"]), 0.7
    got, _ = log_density(model_fn, (), data, {"beta": beta, "sigma": sigma})
    expected = (
        stats.norm.logpdf(beta, 0, 10).sum()
        + stats.norm.logpdf(sigma, 0, 10)
        + np.log(2.0)
        + stats.norm.logpdf(y, X @ beta, sigma).sum()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    model_fn, data = load("arma-arma11")
    y = np.asarray(data["y"])
    mu, phi, theta, sigma = 0.01, 0.9, -0.1, 0.2
    err = np.empty_like(y)
    err[0] = y[0] - (mu + phi * mu)
    for t in range(1, len(y)):
        err[t] = y[t] - (mu + phi * y[t - 1] + theta * err[t - 1])
    values = {"mu": mu, "phi": phi, "theta": theta, "sigma": sigma}
    got, _ = log_density(model_fn, (), data, values)
    half_cauchy = np.log(2.0) + stats.cauchy.logpdf(sigma, 0, 2.5)
    expected = (
        stats.norm.logpdf(mu, 0, 10)
        + stats.norm.logpdf(phi, 0, 2)
        + stats.norm.logpdf(theta, 0, 2)
        + half_cauchy
        + stats.norm.logpdf(err, 0, sigma).sum()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    model_fn, data = load("low_dim_gauss_mix-low_dim_gauss_mix")
    y = np.asarray(data["y"])
    mu, sigma, theta = jnp.array([-2.0, 3.0]), jnp.array([1.0, 0.8]), 0.4
    got, _ = log_density(model_fn, (), data, {"mu": mu, "sigma": sigma, "theta": theta})
    mixture = np.logaddexp(
        np.log(theta) + stats.norm.logpdf(y, mu[0], sigma[0]),
        np.log1p(-theta) + stats.norm.logpdf(y, mu[1], sigma[1]),
    )
    expected = (
        stats.norm.logpdf(mu, 0, 2).sum()
        + (np.log(2.0) + stats.norm.logpdf(sigma, 0, 2)).sum()
        + stats.beta.logpdf(theta, 5, 5)
        + mixture.sum()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_posteriordb_models_import_without_shared_data(tmp_path):
    """Only ``load`` touches the files: the module imports from a bare copy."""
    import subprocess

    copy = tmp_path / "examples" / "posteriordb_models.py"
    copy.parent.mkdir()
    copy.write_text((EXAMPLES / "posteriordb_models.py").read_text())
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import posteriordb_models as m; "
        "assert not m.DATA_DIR.exists(); print(len(m.MODELS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(copy.parent)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "7"
