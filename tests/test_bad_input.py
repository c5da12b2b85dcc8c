"""Bad input through every public entry point: a named error, raised before compiling.

One table, ``ROWS``: (entry point, call, error class, a phrase of the message).  A new
entry point gets rows here.  Every row must

- raise the named class with a message that contains the phrase;
- raise it from viax's own code (or scikit-learn's / click's validation helpers), not
  from deep inside JAX, NumPyro, NumPy or pandas;
- not compile anything first (no XLA lowering during the call), unless the row says so;
- never pass on NumPy's advice to load a file with ``allow_pickle``.

The CLI rows run ``viax fit`` through click's CliRunner and check the exit code (2: a
usage error, 1: an error from the fit) and the phrase in its output.  The few inputs that
give a result, not an error (a fit whose q ran off, data that is None), are fitted on
tiny models below the table.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
import warnings
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from numpyro.distributions import constraints

import viax
from viax.cli import main
from viax.conjugate import (
    LDA,
    GaussianMixture,
    GaussianMixtureModel,
    LinearRegression,
    load_checkpoint,
    save_checkpoint,
)
from viax.conjugate.checkpoint import CheckpointError
from viax.infer import checkpoint as minibatch_checkpoint
from viax.model import ModelError, build_target
from viax.result import _khat_note

ROOT = Path(__file__).resolve().parents[1]
MIXTURE_FILE = ROOT / "examples" / "gaussian_mixture.py"
Y = np.array([0.3, -0.2, 0.8])
X2 = np.random.default_rng(0).normal(size=(30, 2))


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def mixture_builder(X):
    """A model file for the conjugate methods: returns (conjugate model, data)."""
    X = np.asarray(X)
    return GaussianMixtureModel.from_data(X, 2), X


GMM = GaussianMixtureModel.from_data(X2, 2)
FLAT = viax.Model(lambda v: 0.0 * v["x"], latents={"x": constraints.real})


# -- files the checkpoint and CLI rows read ------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input")
    good = folder / "good.npz"
    save_checkpoint(good, {"w": (np.arange(40.0),)}, 3, jax.random.PRNGKey(0), "gmm")
    raw = good.read_bytes()
    (folder / "empty.npz").write_bytes(b"")
    (folder / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (folder / "garbage.npz").write_bytes(b"\x93NUMPY garbage, not an archive" * 4)
    np.savez(folder / "other.npz", a=np.ones(3))  # an .npz archive, not a checkpoint
    np.savez(
        folder / "pickled.npz",
        format_version=np.asarray(1),
        model_name=np.asarray("gmm"),
        step=np.asarray(1),
        rng_key=np.zeros(2, np.uint32),
        **{"global/w/0": np.array([{}], dtype=object)},
    )
    (folder / "malformed.json").write_text('{"y": [1.0, 2.0')
    (folder / "list.json").write_text("[1.0, 2.0]")
    (folder / "strings.json").write_text('{"y": ["a", "b"]}')
    (folder / "good.json").write_text(json.dumps({"y": Y.tolist()}))
    (folder / "normal.py").write_text(
        "import numpyro, numpyro.distributions as dist\n\n\n"
        "def model(y):\n"
        "    mu = numpyro.sample('mu', dist.Normal(0.0, 10.0))\n"
        "    numpyro.sample('y', dist.Normal(mu, 1.0), obs=y)\n"
    )
    np.savez(folder / "points.npz", X=X2)
    pq.write_table(pa.table({"y": np.linspace(-1.0, 1.0, 8)}), folder / "rows.parquet")
    return folder


# -- the table ---------------------------------------------------------------------
# call(files) -> anything; files: the folder above.  phrase: a part of the message.


def subsampled_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("N", y.shape[0], subsample_size=2) as i:
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[i])


def param_model(y):
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, tau), obs=y)


# Staged on the device at import: putting Y there lowers a copy the first time (JAX's
# stage primitive), which is not the model compiling.
Y_STAGED = jax.numpy.asarray(Y)


def _param_init_model(init):
    def model(y):
        tau = numpyro.param("tau", init, constraint=constraints.positive)
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, tau), obs=y)

    return model


def _rows_source(folder):
    return viax.data.parquet(folder / "rows.parquet", columns={"y": "y"})


def _fit(model, data, **kwargs):
    return lambda f: viax.fit(model, data, progress=False, **kwargs)


def _cli(*argv):
    return lambda f: [str(a).format(f=f, mixture=MIXTURE_FILE) for a in argv]


ROWS = [
    # viax.fit: data
    ("fit", "data is a list", _fit(normal_model, [0.3, -0.2]), ModelError, "must be a mapping"),
    ("fit", "data is a path", _fit(normal_model, "y.csv"), ModelError, "got str"),
    ("fit", "data is an array", _fit(normal_model, Y), ModelError, "got ndarray"),
    ("fit", "a string", _fit(normal_model, {"y": "0.3, -0.2"}), ModelError, "is a string"),
    ("fit", "strings", _fit(normal_model, {"y": np.array(["a", "b"])}), ModelError, "not numbers"),
    ("fit", "complex", _fit(normal_model, {"y": Y + 1j}), ModelError, "complex numbers"),
    ("fit", "complex scalar", _fit(normal_model, {"y": 2j}), ModelError, "complex numbers"),
    ("fit", "ragged", _fit(normal_model, {"y": [[1.0], [2.0, 3.0]]}), ModelError, "rectangular"),
    (
        "fit",
        "dates",
        _fit(normal_model, {"y": pd.date_range("2020", periods=3)}),
        ModelError,
        "dates",
    ),
    (
        "fit",
        "a DataFrame with text",
        _fit(normal_model, {"y": pd.DataFrame({"a": Y, "b": list("abc")})}),
        ModelError,
        "non-numeric column(s) b",
    ),
    (
        "fit",
        "a DataFrame of other columns",
        _fit(normal_model, pd.DataFrame({"z": Y})),
        ModelError,
        "missing model argument(s): y",
    ),
    ("fit", "NaN", _fit(normal_model, {"y": [0.3, np.nan]}), ModelError, "NaN"),
    ("fit", "a missing argument", _fit(normal_model, {}), ModelError, "missing"),
    (
        "fit",
        "an unknown argument",
        _fit(normal_model, {"y": Y, "x": Y}),
        ModelError,
        "not arguments",
    ),
    # viax.fit: the model and the method
    ("fit", "a conjugate model", _fit(GMM, None), ModelError, "viax.cavi, viax.svi or viax.naive"),
    (
        "fit",
        "a conjugate model by bbvi",
        _fit(GMM, None, method="bbvi"),
        ModelError,
        "--method cavi, svi or naive",
    ),
    (
        "fit",
        "a function returning a conjugate model",
        _fit(mixture_builder, {"X": X2}),
        ModelError,
        "returns a viax.conjugate model",
    ),
    ("fit", "not a model", _fit(42, {}), ModelError, "NumPyro model function or viax.Model"),
    ("fit", "bbvi, data a list", _fit(normal_model, [1.0], method="bbvi"), ModelError, "mapping"),
    ("fit", "viax.Model, a string", _fit(FLAT, {"x0": "a"}), ModelError, "is a string"),
    ("fit", "unknown method", _fit(normal_model, {"y": Y}, method="mcmc"), ValueError, "method"),
    ("fit", "unknown family", _fit(normal_model, {"y": Y}, family="flow"), ValueError, "family"),
    ("fit", "seed -1", _fit(normal_model, {"y": Y}, seed=-1), ValueError, "seed"),
    ("fit", "num_draws 1", _fit(normal_model, {"y": Y}, num_draws=1), ValueError, "num_draws"),
    (
        "fit",
        "num_draws beyond memory",
        _fit(normal_model, {"y": Y}, num_draws=10**13),
        ValueError,
        "memory available",
    ),
    (
        "fit",
        "num_particles beyond memory",
        _fit(normal_model, {"y": Y}, optimizer="stan", num_particles=10**13),
        ValueError,
        "memory available",
    ),
    (
        "fit",
        "bbvi, num_particles beyond memory",
        _fit(normal_model, {"y": Y}, method="bbvi", num_particles=10**13),
        ValueError,
        "memory available",
    ),
    (
        "fit",
        "minibatch, more devices than there are",
        _fit(normal_model, {"y": Y}, batch_size=2, devices=64),
        ValueError,
        "devices=64: this process has",
    ),
    (
        "fit",
        "minibatch, devices a string",
        _fit(normal_model, {"y": Y}, batch_size=2, devices="cpu"),
        TypeError,
        "devices must be None, an integer or a list",
    ),
    (
        "fit",
        "bbvi on a subsampled plate",
        _fit(subsampled_model, {"y": Y}, method="bbvi"),
        ModelError,
        "plate 'N' subsamples 2 of its 3 rows",
    ),
    (
        "fit",
        "full-batch on a subsampled plate",
        _fit(subsampled_model, {"y": Y}, path="full-batch"),
        ModelError,
        "path='full-batch' evaluates every row",
    ),
    (
        "fit",
        "numpyro.param on an iterable source of unknown length",
        lambda f: viax.fit(param_model, viax.data.as_source([{"y": Y}]), progress=False),
        ModelError,
        "does not know its number of rows N",
    ),
    (
        "fit",
        "EarlyStopping on a streamed source",
        lambda f: viax.fit(
            param_model, _rows_source(f), stop_rule=viax.EarlyStopping(), progress=False
        ),
        ValueError,
        "stop_rule=EarlyStopping(...) holds out rows of data in memory",
    ),
    (
        "fit",
        "learning full batch, and batch_size",
        _fit(param_model, {"y": Y}, batch_size=2, path="full-batch"),
        ValueError,
        "path='full-batch' learns by L-BFGS on the whole data",
    ),
    (
        "fit",
        "learning full batch from a source",
        lambda f: viax.fit(param_model, _rows_source(f), path="full-batch", progress=False),
        ValueError,
        "path='full-batch' needs the data in memory",
    ),
    (
        "fit",
        "EarlyStopping with a checkpoint",
        _fit(
            param_model,
            {"y": Y},
            batch_size=2,
            stop_rule=viax.EarlyStopping(),
            checkpoint_path="run.npz",
        ),
        ValueError,
        "keeps its best parameters in memory, not in checkpoints",
    ),
    (
        "fit",
        "a checkpoint while learning full batch",
        _fit(param_model, {"y": Y}, checkpoint_path="run.npz"),
        ValueError,
        "checkpoint_path/resume: full-batch learning",
    ),
    (
        "fit",
        "numpyro.param with an integer initial value",
        _fit(_param_init_model(3), {"y": Y_STAGED}),
        ModelError,
        "param site 'tau' has an initial value of dtype int",
    ),
    (
        "fit",
        "numpyro.param with a NaN initial value",
        _fit(_param_init_model(float("nan")), {"y": Y_STAGED}),
        ModelError,
        "param site 'tau': its initial value is not finite",
    ),
    ("fit", "a nested dict", _fit(normal_model, {"y": {"a": 1.0}}), ModelError, "nested"),
    # viax.cavi / svi / naive
    ("cavi", "a NumPyro model", lambda f: viax.cavi(normal_model, Y), TypeError, "viax.fit"),
    ("svi", "a NumPyro model", lambda f: viax.svi(normal_model, Y), TypeError, "viax.fit"),
    ("naive", "a NumPyro model", lambda f: viax.naive(normal_model, Y), TypeError, "viax.fit"),
    ("cavi", "a viax.Model", lambda f: viax.cavi(FLAT, Y), TypeError, "conjugate model"),
    (
        "cavi",
        "resume from garbage",
        lambda f: viax.cavi(GMM, X2, resume=f / "garbage.npz", progress=False),
        CheckpointError,
        "garbage.npz: not a viax checkpoint",
    ),
    (
        "svi",
        "resume from an empty file",
        lambda f: viax.svi(GMM, X2, resume=f / "empty.npz", progress=False),
        CheckpointError,
        "empty",
    ),
    # checkpoints
    (
        "checkpoint",
        "missing",
        lambda f: load_checkpoint(f / "nope.npz"),
        CheckpointError,
        "no such",
    ),
    ("checkpoint", "empty", lambda f: load_checkpoint(f / "empty.npz"), CheckpointError, "empty"),
    (
        "minibatch checkpoint",
        "truncated",
        lambda f: minibatch_checkpoint.load(f / "truncated.npz"),
        CheckpointError,
        "truncated.npz: truncated or damaged",
    ),
    (
        "minibatch checkpoint",
        "garbage",
        lambda f: minibatch_checkpoint.load(f / "garbage.npz"),
        CheckpointError,
        "garbage.npz: not a viax checkpoint",
    ),
    (
        "checkpoint",
        "truncated",
        lambda f: load_checkpoint(f / "truncated.npz"),
        CheckpointError,
        "truncated.npz: truncated or damaged",
    ),
    (
        "checkpoint",
        "garbage",
        lambda f: load_checkpoint(f / "garbage.npz"),
        CheckpointError,
        "not a viax checkpoint",
    ),
    (
        "checkpoint",
        "another archive",
        lambda f: load_checkpoint(f / "other.npz"),
        CheckpointError,
        "not a viax checkpoint (no format_version",
    ),
    (
        "checkpoint",
        "an object array",
        lambda f: load_checkpoint(f / "pickled.npz"),
        CheckpointError,
        "never unpickled",
    ),
    # estimators (scikit-learn's conventions)
    (
        "estimator",
        "LinearRegression.predict, wrong features",
        lambda f: LinearRegression().fit(X2, X2[:, 0]).predict(np.ones((3, 5))),
        ValueError,
        "features",
    ),
    (
        "estimator",
        "GaussianMixture, n_components 0",
        lambda f: GaussianMixture(n_components=0).fit(X2),
        ValueError,
        "n_components",
    ),
    (
        "estimator",
        "LDA, negative counts",
        lambda f: LDA(n_components=2).fit(-np.ones((3, 4), int)),
        ValueError,
        "non-negative",
    ),
    # the CLI: (argv, exit code) in place of the error class
    ("cli", "--num-samples -5", _cli("fit", "{f}/normal.py", "--num-samples", "-5"), 2, "range"),
    ("cli", "--num-steps 0", _cli("fit", "{f}/normal.py", "--num-steps", "0"), 2, "range"),
    ("cli", "--seed -1", _cli("fit", "{f}/normal.py", "--seed", "-1"), 2, "range"),
    (
        "cli",
        "malformed JSON",
        _cli("fit", "{f}/normal.py", "--data", "{f}/malformed.json"),
        2,
        "malformed JSON at line 1",
    ),
    (
        "cli",
        "a JSON list",
        _cli("fit", "{f}/normal.py", "--data", "{f}/list.json"),
        2,
        "JSON object",
    ),
    (
        "cli",
        "JSON strings",
        _cli("fit", "{f}/normal.py", "--data", "{f}/strings.json", "--no-progress"),
        1,
        "not numbers",
    ),
    (
        "cli",
        "an .npz that is not one",
        _cli("fit", "{f}/normal.py", "--data", "{f}/garbage.npz"),
        2,
        "not a readable .npz",
    ),
    ("cli", "no model file", _cli("fit", "{f}/none.py"), 2, "no such model file"),
    (
        "cli",
        "--method cavi, a NumPyro model",
        _cli("fit", "{f}/normal.py", "--data", "{f}/good.json", "--method", "cavi"),
        1,
        "NumPyro model (sample site(s) mu",
    ),
    (
        "cli",
        "--method advi, a conjugate model",
        _cli("fit", "{mixture}", "--data", "{f}/points.npz", "--method", "advi", "--no-progress"),
        1,
        "--method cavi, svi or naive",
    ),
    (
        "cli",
        "--method mcmc",
        _cli("fit", "{f}/normal.py", "--data", "{f}/good.json", "--method", "mcmc"),
        1,
        "unknown method",
    ),
    *[
        (
            "cli",
            f"--resume from a {name} checkpoint",
            _cli(
                *("fit", "{mixture}", "--data", "{f}/points.npz", "--method", "cavi"),
                *("--checkpoint", f"{{f}}/{name}.npz", "--resume", "--no-progress"),
            ),
            1,
            phrase,
        )
        for name, phrase in [("empty", "empty"), ("truncated", "truncated"), ("garbage", "not a")]
    ],
]

# Rows that may compile before they raise: a resumed run prepares its data (on the
# device) before it reads the checkpoint; a function that fails to trace is run once on
# the data to see whether it returns a conjugate model (the user's code compiles then).
MAY_COMPILE = {
    "resume from garbage",
    "resume from an empty file",
    "a function returning a conjugate model",
    "--method advi, a conjugate model",
    "LinearRegression.predict, wrong features",  # the fit before the bad predict
} | {r[1] for r in ROWS if r[1].startswith("--resume")}
ALLOWED = ("/viax/", "/sklearn/", "/click/")


class _Lowerings:
    """Counts XLA lowerings (fresh compiles or persistent-cache loads) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, name, *args, **kwargs):
        if name.endswith("jaxpr_to_mlir_module_duration"):
            self.count += 1


@pytest.fixture(scope="module")
def lowerings():
    counter = _Lowerings()
    jax.monitoring.register_event_duration_secs_listener(counter)
    yield counter
    jax.monitoring.unregister_event_duration_listener(counter)


@pytest.mark.parametrize(
    ("entry", "case", "call", "expected", "phrase"), ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS]
)
def test_bad_input_is_refused_by_name(entry, case, call, expected, phrase, files, lowerings):
    before = lowerings.count
    if entry == "cli":
        result = CliRunner().invoke(main, call(files))
        assert result.exit_code == expected, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert phrase in result.output, result.output
        assert "Aborted!" not in result.output and "allow_pickle" not in result.output
    else:
        with pytest.raises(expected) as caught:
            call(files)
        message = str(caught.value)
        assert phrase in message, message
        assert "allow_pickle" not in message
        origin = traceback.extract_tb(caught.value.__traceback__)[-1].filename
        assert any(part in origin for part in ALLOWED), f"raised from {origin}"
    if case not in MAY_COMPILE:
        assert lowerings.count == before, "compiled before refusing"


# -- inputs that give a result: flagged, never silently wrong -----------------------


def improper_model(y):
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def flat_model():
    numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))


def test_a_fit_that_runs_off_is_never_converged():
    # No data, a flat prior: q's sd grows until it overflows and the ELBO is -inf; the
    # optimiser's own test (the objective stopped changing) would call that converged.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = viax.fit(flat_model, {}, progress=False)
    phrase = "q ran off to infinity in site(s) mu"
    assert not result.converged and phrase in result.message
    assert "improper" in result.message and "not finite" in result.message
    assert "runaway" in result.info and result.khat_verdict == "not converged"
    assert any("did not converge" in str(w.message) and phrase in str(w.message) for w in caught)


def test_an_improper_posterior_is_flagged_or_refused():
    # Flat mu and sigma, one data point: no proper posterior; before the check, q's sd
    # reached 1e158 and the fit said "converged".
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            result = viax.fit(improper_model, {"y": np.array([1.0])}, progress=False)
        except viax.DivergenceError as err:  # refused by name: also an honest answer
            assert "mu" in str(err)
            return
    assert not result.converged and "ran off" in result.message


def test_the_runaway_check_names_the_site(none_fit):
    from viax.fit import _flag_runaway

    assert _flag_runaway(none_fit) is none_fit  # a finite answer passes as it is
    loc = np.array(none_fit.params["loc"], dtype=float)
    loc[0] = 3e120
    far = dataclasses.replace(none_fit, params={**none_fit.params, "loc": loc})
    flagged = _flag_runaway(far)
    assert not flagged.converged and "site(s) mu (mean 3e+120" in flagged.message


def prior_predictive_model(x, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mu * x, 1.0), obs=y)


@pytest.fixture(scope="module")
def none_fit():
    """y left at None: 'obs' becomes latent; fitted (a Gaussian, exact) with a warning."""
    with pytest.warns(RuntimeWarning, match=r"obs \(data 'y' is None\) became latent"):
        return viax.fit(
            prior_predictive_model, {"x": np.ones(2)}, family="fullrank", progress=False
        )


def test_data_that_is_none_makes_a_latent_with_a_warning(none_fit):
    assert none_fit.target.latent_names == ("mu", "obs") and none_fit.converged
    # Given as None explicitly, the same warning (from the model's trace, which fit runs
    # first); a model that reads the argument (`if y is None`) is matched by site name.
    for model in (prior_predictive_model, reads_y_model):
        with pytest.warns(RuntimeWarning, match=r"(obs|y) \(data 'y' is None\) became latent"):
            build_target(model, {"x": np.ones(2), "y": None})
    # None for an argument that no site observes: no warning.
    build_target(optional_scale_model, {"y": Y, "scale": None})


def reads_y_model(x, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", x.shape[0] if y is None else y.shape[0]):
        numpyro.sample("y", dist.Normal(mu * x, 1.0), obs=y)


def optional_scale_model(y, scale=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0 if scale is None else scale))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.parametrize("num_samples", [0, 1, -5, 2.5, True])
def test_log_evidence_log_weights_and_sample_refuse_bad_num_samples(
    none_fit, num_samples, lowerings
):
    before = lowerings.count
    with pytest.raises(ValueError, match="num_samples must be"):
        none_fit.log_evidence(num_samples=num_samples)
    with pytest.raises(ValueError, match="num_samples must be"):
        none_fit.diagnostics(num_samples=num_samples)
    if num_samples != 1:
        with pytest.raises(ValueError, match="num_samples must be"):
            none_fit.log_weights(num_samples=num_samples)
        with pytest.raises(ValueError, match="num_samples must be"):
            none_fit.sample(num_samples=num_samples)
    assert lowerings.count == before


def test_the_verdict_of_an_unconverged_fit_is_never_good(none_fit):
    assert none_fit.khat_verdict in ("good", "usable")
    stopped = dataclasses.replace(none_fit, converged=False, message="stopped at num_steps")
    assert stopped.khat == none_fit.khat and stopped.khat_verdict == "not converged"
    assert viax.khat_verdict(0.1, converged=False) == "not converged"
    assert viax.khat_verdict(0.1) == "good"
    assert "NOT CONVERGED" in _khat_note(stopped.khat_verdict)  # the diagnostics table's
