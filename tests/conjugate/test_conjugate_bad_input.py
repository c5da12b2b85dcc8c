"""Bad input fails fast with a clear message, before any compute."""

import numpy as np
import pytest
import scipy.sparse as sp

from viax.conjugate import (
    LDA,
    GaussianMixture,
    GaussianMixtureModel,
    LDAModel,
    LinearRegression,
    cavi,
    naive,
    svi,
)
from viax.conjugate.models.lda import prepare_documents

COUNTS = np.array([[1, 0, 2], [0, 3, 1]])


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (np.array([[1, -1, 2], [0, 3, 1]]), "non-negative"),
        (np.array([[1.5, 0, 2], [0, 3, 1]]), "integers"),
        (np.array([[1, 0, 2], [0, 0, 0]]), "empty document"),
        (np.array([[np.nan, 0, 2], [0, 3, 1]]), "NaN"),
        (np.zeros((0, 3)), "empty batch"),
    ],
)
def test_bad_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        prepare_documents(counts)
    with pytest.raises(ValueError, match=message):
        prepare_documents(sp.csr_matrix(counts))


def test_lda_estimator_rejects_bad_counts_and_parameters():
    with pytest.raises(ValueError, match="non-negative"):
        LDA(n_components=2).fit(-COUNTS)
    with pytest.raises(ValueError, match="n_components"):
        LDA(n_components=0).fit(COUNTS)
    with pytest.raises(ValueError, match=r"learning_decay .* \(0.5, 1\]"):
        LDA(n_components=2, learning_method="online", learning_decay=0.5).fit(COUNTS)
    with pytest.raises(ValueError, match="learning_method"):
        LDA(n_components=2, learning_method="stochastic").fit(COUNTS)
    with pytest.raises(ValueError, match="words"):
        LDAModel.create(2, 4).prepare(COUNTS)


@pytest.mark.parametrize("kappa", [0.5, 0.2, 1.01, -1.0])
def test_svi_rejects_step_size_exponent_outside_robbins_monro(kappa):
    model = LDAModel.create(2, 3)
    with pytest.raises(ValueError, match=r"\(0.5, 1\]"):
        svi(model, COUNTS, learning_decay=kappa)


def test_svi_rejects_empty_data_and_iterators_without_size():
    model = LDAModel.create(2, 3)
    with pytest.raises(ValueError, match="num_data"):
        svi(model, iter([COUNTS]))
    with pytest.raises(ValueError, match="no batches"):
        svi(model, iter([]), num_data=10)
    with pytest.raises(ValueError, match="empty"):
        svi(model, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="num_data must be >= 1, got 0"):
        svi(model, COUNTS, num_data=0)


@pytest.mark.parametrize("method", [cavi, naive, svi])
def test_a_start_that_is_not_the_models_shape_or_finite_is_refused(method):
    X = np.random.default_rng(0).normal(size=(20, 2))
    model = GaussianMixtureModel.from_data(X, 2)
    good = model.prior()
    wrong = {**good, "weights": (np.ones(3), np.ones(3))}
    nan = {**good, "weights": (np.full(2, np.nan), np.ones(2))}
    for start, message in [(wrong, r"shaped as the model's prior.*\(3,\)"), (nan, "NaN")]:
        with pytest.raises(ValueError, match=message):
            if method is svi:
                svi(model, X, init=start, progress=False)
            else:
                method(model, X, init=(start, None), progress=False)


def test_gmm_rejects_nan_bad_prior_and_bad_sizes():
    X = np.random.default_rng(0).normal(size=(20, 2))
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 3, column 1"):
        GaussianMixture(n_components=2).fit(bad)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(n_components=2, covariance_prior=[[1.0, 2.0], [2.0, 1.0]]).fit(X)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixtureModel.from_data(X, 2, covariance_prior=[[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="n_components"):
        GaussianMixture(n_components=0).fit(X)
    with pytest.raises(ValueError, match="n_samples"):
        GaussianMixture(n_components=30).fit(X)
    with pytest.raises(ValueError, match="degrees_of_freedom_prior"):
        GaussianMixture(n_components=2, degrees_of_freedom_prior=0.5).fit(X)
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(n_components=2, covariance_type="banded").fit(X)
    with pytest.raises(ValueError, match="init_params"):
        GaussianMixture(n_components=2, init_params="spectral").fit(X)


def test_linear_regression_rejects_nan_and_bad_prior():
    X = np.ones((5, 2))
    with pytest.raises(ValueError, match="NaN"):
        LinearRegression().fit(X, [1.0, np.nan, 0, 0, 0])
    with pytest.raises(ValueError, match="positive definite"):
        LinearRegression(precision_prior=-1.0).fit(X, np.zeros(5))
    with pytest.raises(ValueError, match="shape_prior"):
        LinearRegression(shape_prior=0.0).fit(X, np.zeros(5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "num_steps and chunk_size"),
        ({"chunk_size": 0}, "num_steps and chunk_size"),
        ({"tol": -1.0}, "tol and gtol"),
        ({"gtol": float("nan")}, "tol and gtol"),
    ],
)
def test_naive_rejects_bad_settings_before_compiling(kwargs, message):
    X = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(ValueError, match=message):
        naive(GaussianMixtureModel.from_data(X, 2), X, **kwargs)
