"""The three estimators pass scikit-learn's own conformance suite (``check_estimator``);
fitted estimators pickle; viax and its functional layer import without sklearn.

One test per estimator runs its whole suite, so that one process compiles its programs
and every check after the first of a number of features reuses them (``pytest -n``
would otherwise spread the checks over workers that each compile them again).  The
instances are the defaults but for short fits: the suite fits tiny data sets, and each
new number of features costs ~1-3 s of compilation, next to which the sweeps cost
nothing.  The only check sklearn skips is ``check_array_api_input``, for its own
reason (``SCIPY_ARRAY_API`` is not set in the environment; no tag of ours declares
array API support).
"""

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

from viax.conjugate import LDA, GaussianMixture, LinearRegression  # noqa: E402

# sklearn skips this one unless SCIPY_ARRAY_API=1 is set before scipy is imported.
SKIPPED_BY_SKLEARN = {"check_array_api_input"}


@pytest.mark.parametrize(
    "estimator",
    [GaussianMixture(max_iter=20), LDA(n_components=3, max_iter=2), LinearRegression()],
    ids=["GaussianMixture", "LDA", "LinearRegression"],
)
def test_passes_sklearn_check_estimator(estimator):
    # Short fits on sklearn's tiny data sets may stop at max_iter; sklearn's checks do
    # not expect the warning (its own estimators' tests silence it too).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        results = check_estimator(estimator, on_fail=None, on_skip=None)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert failed == {}
    assert skipped <= SKIPPED_BY_SKLEARN
    assert sum(r["status"] == "passed" for r in results) >= 40


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    return X, X @ [1.0, -2.0] + 0.5 + 0.1 * rng.normal(size=40)


def test_fitted_estimator_round_trips_through_joblib_and_pickle(regression, tmp_path):
    joblib = pytest.importorskip("joblib")
    X, y = regression
    lr = LinearRegression().fit(X, y)
    path = tmp_path / "lr.joblib"
    joblib.dump(lr, path)
    for loaded in (joblib.load(path), pickle.loads(pickle.dumps(lr))):
        np.testing.assert_array_equal(loaded.predict(X), lr.predict(X))
        assert loaded.log_evidence_ == lr.log_evidence_
        # The Result inside travels too: same draws from q for the same seed.
        for name, draws in lr.result_.sample(50, seed=1).items():
            np.testing.assert_array_equal(loaded.result_.sample(50, seed=1)[name], draws)


def test_sklearn_tools_take_the_estimators(regression):
    from sklearn.model_selection import GridSearchCV

    X, y = regression
    pipeline = make_pipeline(StandardScaler(), LinearRegression()).fit(X, y)
    assert pipeline.score(X, y) > 0.99  # noise sd 0.1 against a signal sd of ~2.2
    search = GridSearchCV(LinearRegression(), {"precision_prior": [1e-2, 1e2]}, cv=2)
    search.fit(X, y)
    # A strong prior (precision 100 per unit noise precision) shrinks the weights.
    assert search.best_params_ == {"precision_prior": 1e-2}
    assert clone(search.best_estimator_).get_params()["precision_prior"] == 1e-2
    with pytest.raises(
        ValueError, match="X has 3 features, but LinearRegression is expecting 2 features"
    ):
        search.best_estimator_.predict(np.ones((4, 3)))


def test_viax_imports_without_sklearn_and_the_estimators_name_the_extra():
    code = """
import sys
sys.modules["sklearn"] = None  # as if scikit-learn were not installed
import viax
from viax.conjugate import GaussianMixtureModel, cavi
try:
    from viax.conjugate import GaussianMixture
except ImportError as error:
    print(error)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert "pip install 'viax[sklearn]'" in out.stdout, out.stdout + out.stderr
    assert "GaussianMixture, LDA and LinearRegression" in out.stdout
