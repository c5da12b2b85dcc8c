"""scikit-learn estimators over the conjugate engine.

``GaussianMixture`` (sklearn's ``BayesianGaussianMixture``: same priors, parameter and
attribute names, initialisations), ``LDA`` (sklearn's ``LatentDirichletAllocation``)
and ``LinearRegression`` (Normal–Gamma prior, exact posterior and evidence).  They are
scikit-learn estimators: they inherit ``BaseEstimator`` and the mixin of their kind
(``DensityMixin``, ``TransformerMixin``, ``RegressorMixin``), declare their tags,
validate input with ``validate_data`` / ``check_is_fitted``, pickle, and pass
``sklearn.utils.estimator_checks.check_estimator``
(``tests/conjugate/test_sklearn_conformance.py``).  ``result_`` holds the
:class:`viax.result.Result` of the fit.

scikit-learn is needed for these three only (``pip install 'viax[sklearn]'``); the rest
of :mod:`viax.conjugate` imports without it, and loads this module on first use of one
of the estimators.

Data sets of at most ``_SMALL`` rows (points, documents) are padded with zero-weight
rows to ``_SMALL``: every conjugate model takes a ``mask`` of real rows, which the
updates and the ELBO ignore, and a grid search, a cross-validation or sklearn's
conformance suite, which fit and predict on many small data sets, compile one program
per number of features instead of one per shape.  (A GaussianMixture's random start is
drawn over the padded rows, with probability 0 for the padding: for a given
``random_state`` it is a different draw than an unpadded fit would make.)
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import scipy.sparse as sp
from scipy.special import digamma, logsumexp, softmax

try:
    from sklearn.base import (
        BaseEstimator,
        ClassNamePrefixFeaturesOutMixin,
        DensityMixin,
        RegressorMixin,
        TransformerMixin,
    )
    from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as error:  # scikit-learn missing, or older than 1.6 (validate_data)
    raise ImportError(
        "viax.conjugate's GaussianMixture, LDA and LinearRegression are scikit-learn "
        "estimators and need scikit-learn >= 1.6: pip install 'viax[sklearn]'.  The "
        "functional layer (cavi, svi, naive and the models) works without it."
    ) from error

from viax.conjugate.cavi import cavi
from viax.conjugate.engine import (
    compiled,
    fit_locals,
    global_means,
    global_terms,
    local_terms,
    max_extent,
    prepare_all,
    to_device,
    to_device_tree,
)
from viax.conjugate.expfam import Beta, Dirichlet
from viax.conjugate.models._base import check_positive_int, check_seed
from viax.conjugate.models.gmm import COVARIANCE_TYPES, INIT_METHODS, GaussianMixtureModel
from viax.conjugate.models.lda import LDAModel, num_rows
from viax.conjugate.models.linear import LinearRegressionModel
from viax.conjugate.svi import check_learning_rate, svi
from viax.conjugate.xla import jit

__all__ = ["LDA", "ConvergenceWarning", "GaussianMixture", "LinearRegression"]


class ConvergenceWarning(_SklearnConvergenceWarning, RuntimeWarning):
    """A fit stopped at ``max_iter`` before its tolerance: scikit-learn's
    ``ConvergenceWarning`` (so ``warnings.filterwarnings("ignore",
    category=sklearn.exceptions.ConvergenceWarning)`` silences it, as for sklearn's own
    estimators) and a ``RuntimeWarning``, as viax raised before."""


# Small data sets are padded to this many rows (module docstring): a sweep over 512
# rows costs microseconds, a compile ~1–2 s per program and shape; above this size the
# fits of one data set repeat and padding would only add work.
_SMALL = 512


def _padded_rows(n: int) -> int:
    """Rows of the padded batch for ``n`` real rows (see the module docstring)."""
    return _SMALL if n <= _SMALL else n


def _padded_extent(rows: int) -> int:
    """LDA's ragged part (rows of word entries) of a small corpus, up to a power of two
    (at least 32): fewer shapes, and a power of two ≤ 64 keeps the local sweeps in one
    stage (``engine.fit_locals``)."""
    return max(32, 1 << (rows - 1).bit_length()) if rows <= _SMALL else rows


def _without_padding(result, n: int):
    """``result`` with its local parameters cut to the ``n`` real rows."""
    if "local" not in result.params:
        return result
    local = jax.tree.map(lambda x: x[:n], result.params["local"])
    return dataclasses.replace(result, params={**result.params, "local": local})


def _validate(estimator, X, y="no_validation", *, reset: bool, **kwargs):
    """sklearn's ``validate_data`` (2-D, not empty, numeric, ``n_features_in_`` set or
    checked, its messages), float64; non-finite values refused with sklearn's phrase
    and the position of the first."""
    out = validate_data(
        estimator, X, y, reset=reset, dtype=np.float64, ensure_all_finite=False, **kwargs
    )
    X = out[0] if isinstance(out, tuple) else out
    values = X.data if sp.issparse(X) else X
    bad = ~np.isfinite(values)
    if bad.any():
        if sp.issparse(X):
            coo = X.tocoo()
            first = np.flatnonzero(~np.isfinite(coo.data))[0]
            row, col = coo.row[first], coo.col[first]
        else:
            row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"Input X contains NaN or infinity: {int(bad.sum())} value(s), the first at "
            f"row {row}, column {col}"
        )
    return out


def _pad_rows(X: np.ndarray) -> np.ndarray:
    """X (N, D) with zero rows up to ``_padded_rows(N)``, for the predictions."""
    n = X.shape[0]
    size = _padded_rows(n)
    return X if size == n else np.concatenate([X, np.zeros((size - n, X.shape[1]))])


# ----------------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------------


def _log_prob_fn(model, global_natural, x):
    gm = global_means(model, global_natural)
    return model.expected_log_likelihood(gm, x)


_log_prob = jax.jit(_log_prob_fn)
# One pass over the data, once per fit: compile time is all that matters.
_globals_from_resp = jit(
    lambda model, resp, batch: model.globals_from_responsibilities(resp, batch),
    fast_compile=True,
)
_init_globals = jax.jit(
    lambda model, key, batch, method: model.init_globals(key, batch, method),
    static_argnums=3,
)


class GaussianMixture(DensityMixin, BaseEstimator):
    """Variational Bayesian Gaussian mixture by CAVI: sklearn's BayesianGaussianMixture.

    Parameters and fitted attributes carry sklearn's names and meanings;
    ``covariance_type`` is "full", "tied", "diag" or "spherical".  The last three are the
    exact conjugate models (see ``models/gmm.py``); sklearn's versions borrow Wishart
    formulas or averages, so their numbers differ slightly ("diag": ~1e-3 relative) or,
    for "tied" and "spherical", by the prior's weight.
    Differences: ``tol`` is sklearn's (absolute change of the lower
    bound between sweeps), but ``lower_bound_`` and ``lower_bounds_`` are the *exact*
    ELBO; sklearn drops constants, so ours = sklearn's + C(priors, N, D, K).
    ``random_state=None`` means seed 0 (same call, same numbers); the k-means
    initialisation is viax's own (k-means++ seeds, Lloyd's iterations), so the start
    differs from sklearn's unless given with ``fit(X, initial_resp=...)``.
    A best initialisation that did not converge in ``max_iter`` sweeps warns with
    :class:`ConvergenceWarning` (sklearn's).

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import GaussianMixture
        >>> X = np.random.default_rng(0).normal(size=(200, 2))
        >>> gm = GaussianMixture(n_components=3, random_state=0).fit(X)
        >>> gm.predict(X).shape
        (200,)
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        mean_precision_prior: float | None = None,
        mean_prior=None,
        degrees_of_freedom_prior: float | None = None,
        covariance_prior=None,
        random_state: int | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _make_model(self, X) -> GaussianMixtureModel:
        check_positive_int("n_components", self.n_components)
        check_positive_int("max_iter", self.max_iter)
        check_positive_int("n_init", self.n_init)
        check_positive_int("verbose_interval", self.verbose_interval)
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}"
            )
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.init_params not in INIT_METHODS:
            raise ValueError(f"init_params must be one of {INIT_METHODS}, got {self.init_params!r}")
        return GaussianMixtureModel.from_data(
            X,
            self.n_components,
            weight_concentration_prior_type=self.weight_concentration_prior_type,
            weight_concentration_prior=self.weight_concentration_prior,
            mean_precision_prior=self.mean_precision_prior,
            mean_prior=self.mean_prior,
            degrees_of_freedom_prior=self.degrees_of_freedom_prior,
            covariance_prior=self.covariance_prior,
            reg_covar=self.reg_covar,
            covariance_type=self.covariance_type,
        )

    def fit(self, X, y=None, *, initial_resp=None):
        """Fit by CAVI.  ``X`` (N, D), N ≥ max(2, n_components).  ``initial_resp``
        (N, K): start from these responsibilities (sklearn's M-step on them) instead
        of ``init_params``."""
        self._fit(self._validate_fit_data(X), initial_resp)
        return self

    def fit_predict(self, X, y=None, *, initial_resp=None):
        """Fit, then the labels of ``X`` under the fitted model (sklearn's fit_predict)."""
        X = self._validate_fit_data(X)
        self._fit(X, initial_resp)
        return self.predict(X)

    def _validate_fit_data(self, X) -> np.ndarray:
        # sklearn's BaseMixture: at least two samples, and no fewer than components.
        X = _validate(self, X, reset=True, ensure_min_samples=2)
        check_positive_int("n_components", self.n_components)
        if X.shape[0] < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {X.shape[0]}"
            )
        return X

    def _fit(self, X, initial_resp):
        model = self._make_model(X)
        n = X.shape[0]
        batch = model.prepare(X, pad_to=_padded_rows(n))
        best = None
        seed = check_seed(self.random_state)
        # sklearn's warm_start: the last fit's solution starts the next, one init.
        warm = self.warm_start and hasattr(self, "result_") and initial_resp is None
        if warm and not _same_model(self.model_, model):
            raise ValueError(
                "warm_start: X or the parameters changed the model since the last fit "
                "(features, priors or components); fit with warm_start=False"
            )
        for init in range(1 if warm else self.n_init):
            if warm:
                g0 = self.global_natural_
            elif initial_resp is None:
                g0 = _init_globals(model, jax.random.PRNGKey(seed + init), batch, self.init_params)
            else:
                resp = np.asarray(initial_resp, np.float64)
                if resp.shape != (n, self.n_components):
                    raise ValueError(f"initial_resp must have shape {(n, self.n_components)}")
                # Padded rows carry mask 0: their responsibilities do not count.
                padding = np.full((_padded_rows(n) - n, self.n_components), 1.0)
                resp = np.concatenate([resp, padding / self.n_components])
                g0 = _globals_from_resp(model, to_device(resp), batch)
            result = cavi(
                model,
                batch,
                max_iter=self.max_iter,
                tol=0.0,
                atol=float(self.tol),
                init=(g0, model.init_locals(None, batch, None)),
                progress=self.verbose > 0,
                log_every=self.verbose_interval if self.verbose >= 2 else 0,
            )
            if self.verbose > 0:
                state = "converged" if result.converged else "did not converge"
                print(
                    f"Initialization {init}: {state} after {result.num_steps} sweeps, "
                    f"ELBO {result.elbo:.10g}"
                )
            if best is None or result.elbo > best.elbo:
                best = result
        if not best.converged:
            warnings.warn(
                f"GaussianMixture: the best of {self.n_init} initialization(s) did not "
                f"converge in max_iter={self.max_iter} sweeps (the last ELBO change "
                f"exceeds tol={self.tol}); increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._set_fitted(model, _without_padding(best, n))

    def _set_fitted(self, model, result):
        self.model_ = model
        self.result_ = result
        globals_ = result.params["global"]
        self.global_natural_ = to_device_tree(globals_)
        # numpy, not NormalWishart.to_standard: JAX ops run eagerly here would each be
        # compiled on a first fit (seconds for the Cholesky loops), for a few K×D×D.
        n1, n2, n3, n4 = (np.asarray(x) for x in globals_["components"])
        if model.covariance_type == "full":
            beta = -2.0 * n2
            scale_inv = -2.0 * n3 - n1[:, :, None] * n1[:, None, :] / beta[:, None, None]
            scale = np.linalg.inv(scale_inv)
            self.means_ = n1 / beta[:, None]
            self.mean_precision_ = beta
            self.degrees_of_freedom_ = 2.0 * n4 + n1.shape[1]
            self.precisions_ = self.degrees_of_freedom_[:, None, None] * scale
            self.precisions_ = 0.5 * (self.precisions_ + np.swapaxes(self.precisions_, 1, 2))
            self.covariances_ = np.linalg.inv(self.precisions_)
            self.precisions_cholesky_ = np.linalg.cholesky(self.precisions_)
        elif model.covariance_type == "tied":
            beta = -2.0 * n2
            self.means_ = n1 / beta[:, None]
            self.mean_precision_ = beta
            k, d = n1.shape
            self.degrees_of_freedom_ = float(2.0 * n4 + d + 1.0 - k)
            scale_inv = -2.0 * n3 - (n1 / beta[:, None]).T @ n1
            precision = self.degrees_of_freedom_ * np.linalg.inv(scale_inv)
            self.precisions_ = 0.5 * (precision + precision.T)
            self.covariances_ = np.linalg.inv(self.precisions_)
            self.precisions_cholesky_ = np.linalg.cholesky(self.precisions_)
        else:
            self._set_gamma_components(model.covariance_type, n1, n2, n3, n4)
        weights_natural = tuple(np.asarray(x) for x in globals_["weights"])
        if model.dirichlet_process:
            w = Beta.to_standard(weights_natural)
            a, b = w["a"], w["b"]
            self.weight_concentration_ = (a, b)
            weights = a / (a + b) * np.concatenate([[1.0], np.cumprod(b / (a + b))[:-1]])
        else:
            a = Dirichlet.to_standard(weights_natural)["concentration"]
            self.weight_concentration_ = a
            weights = a
        self.weights_ = weights / weights.sum()
        self.weight_concentration_prior_ = float(model.weight_concentration_prior)
        self.mean_precision_prior_ = float(model.mean_precision_prior)
        self.mean_prior_ = np.asarray(model.mean_prior)
        self.degrees_of_freedom_prior_ = float(model.degrees_of_freedom_prior)
        self.covariance_prior_ = (
            float(model.covariance_prior)
            if model.covariance_type == "spherical"
            else np.asarray(model.covariance_prior)
        )
        self.converged_ = bool(result.converged)
        self.n_iter_ = int(result.num_steps)
        self.lower_bound_ = float(result.elbo)
        self.lower_bounds_ = list(map(float, result.elbo_trace))
        self.elbo_trace_ = np.asarray(result.elbo_trace)

    def _set_gamma_components(self, covariance_type, n1, n2, n3, n4):
        """Fitted attributes from NormalGamma natural parameters (Λ = β I: the mean
        precision is a multiple of the identity).  precisions_ = E[λ] = a / b, as
        sklearn's (ν / scale); covariances_ its inverse."""
        if covariance_type == "diag":  # batch (K, D), event 1
            n1, n2 = n1[..., 0], n2[..., 0, 0]
            event = 1
        else:  # spherical: batch (K,), event D
            n2 = n2[:, 0, 0]
            event = n1.shape[-1]
        beta = -2.0 * n2
        mean = n1 / (beta if covariance_type == "diag" else beta[:, None])
        inner = mean * n1 if covariance_type == "diag" else np.sum(mean * n1, -1)
        shape = n4 + 1.0 - 0.5 * event
        rate = -n3 - 0.5 * inner
        self.means_ = mean
        self.mean_precision_ = beta[:, 0] if covariance_type == "diag" else beta
        # Every feature of a component has the same shape a_k (N_k/2 each).
        self.degrees_of_freedom_ = 2.0 * (shape[:, 0] if covariance_type == "diag" else shape)
        self.precisions_ = shape / rate
        self.covariances_ = 1.0 / self.precisions_
        self.precisions_cholesky_ = np.sqrt(self.precisions_)

    def _weighted_log_prob(self, X):
        """E[log π_k] + E[log N(x_n | μ_k, Λ_k⁻¹)], (N, K); NumPy, so that the
        reductions over it compile nothing."""
        check_is_fitted(self)
        X = _validate(self, X, reset=False)
        values = _log_prob(self.model_, self.global_natural_, to_device(_pad_rows(X)))
        return np.asarray(values)[: X.shape[0]]

    def score_samples(self, X) -> np.ndarray:
        """log Σ_k exp(E[log π_k] + E[log N(x | μ_k, Λ_k⁻¹)]) per sample, as sklearn."""
        return logsumexp(self._weighted_log_prob(X), axis=1)

    def score(self, X, y=None) -> float:
        """Mean of ``score_samples`` (sklearn's definition)."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities q(z_n = k), (N, K)."""
        return softmax(self._weighted_log_prob(X), axis=1)

    def predict(self, X) -> np.ndarray:
        return np.argmax(self._weighted_log_prob(X), axis=1)

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(X (n_samples, D), component labels) drawn from the mixture at the fitted
        point estimates ``weights_``, ``means_``, ``covariances_``: sklearn's ``sample``,
        with the same draws for the same ``random_state`` and attributes.  Draws from
        the posterior over the parameters: ``result_.sample``."""
        check_is_fitted(self)
        check_positive_int("n_samples", n_samples)
        rng = np.random.RandomState(check_seed(self.random_state))
        counts = rng.multinomial(n_samples, self.weights_)
        kind, d = self.covariance_type, self.n_features_in_
        parts = []
        for k, count in enumerate(counts):
            if kind == "full":
                parts.append(rng.multivariate_normal(self.means_[k], self.covariances_[k], count))
            elif kind == "tied":
                parts.append(rng.multivariate_normal(self.means_[k], self.covariances_, count))
            else:  # diag (K, D) or spherical (K,) variances
                scale = np.sqrt(self.covariances_[k])
                parts.append(self.means_[k] + rng.standard_normal((count, d)) * scale)
        labels = np.concatenate([np.full(c, k, dtype=int) for k, c in enumerate(counts)])
        return np.vstack(parts), labels


# ----------------------------------------------------------------------------------
# LDA
# ----------------------------------------------------------------------------------


def _same_model(a, b) -> bool:
    """The same model class, static settings and prior values."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        np.shape(x) == np.shape(y) and np.array_equal(x, y)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _transform_chunk(model, global_natural, batch):
    gm = global_means(model, global_natural)
    local = model.init_locals(None, batch, gm)
    local, _ = fit_locals(model, gm, local, batch)
    return local["doc_topics"][0] + 1.0, local_terms(model, gm, local, batch)


_transform_compiled = compiled(_transform_chunk)
_global_terms = jit(
    lambda model, g: global_terms(model, g, global_means(model, g)), fast_compile=True
)


class LDA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Latent Dirichlet allocation: batch CAVI or online SVI, sklearn's names.

    ``learning_method="batch"``: CAVI sweeps over the whole corpus (``max_iter``), from
    sklearn's start for the same ``random_state`` (λ0 ~ Gamma(100, 1/100));
    ``"online"``: SVI with batches of ``batch_size`` documents in order for ``max_iter``
    passes, ρ_t = (learning_offset + t)^(−learning_decay) — sklearn's schedule.
    ``components_`` is λ (K, V).  ``X`` (documents × words, dense or scipy.sparse)
    holds non-negative counts or, as sklearn accepts, any non-negative weights (tf-idf:
    the expected log joint is linear in them); an empty document keeps its prior
    q(θ) = Dirichlet(α).  ``evaluate_every``, ``perp_tol``, ``verbose`` are sklearn's
    (stop when the training perplexity, computed every ``evaluate_every`` iterations,
    changes by less than ``perp_tol`` between two evaluations; ``verbose`` > 0: progress
    bars and a line per evaluation).  ``n_jobs`` is accepted so that sklearn's parameters
    carry over, and ignored: XLA uses the machine's cores.  ``tol`` (viax's): batch CAVI
    stops when a sweep's relative ELBO gain is below it (0: run ``max_iter`` sweeps,
    sklearn's behaviour).  ``result_.message`` and ``result_.info`` describe the whole
    fit: iterations run, the perplexities evaluated (``info["perplexities"]``, pairs
    (iterations done, perplexity)) and the rule that stopped it (``info["stopped_by"]``:
    "perp_tol", "tol" or "max_iter").

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import LDA
        >>> X = np.random.default_rng(0).poisson(1.0, size=(50, 30))
        >>> lda = LDA(n_components=3, max_iter=5, random_state=0).fit(X)
        >>> lda.components_.shape
        (3, 30)
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        doc_topic_prior: float | None = None,
        topic_word_prior: float | None = None,
        learning_method: str = "batch",
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        max_iter: int = 10,
        batch_size: int = 128,
        total_samples: float = 1e6,
        mean_change_tol: float = 1e-3,
        max_doc_update_iter: int = 100,
        tol: float = 0.0,
        random_state: int | None = None,
        evaluate_every: int = -1,
        perp_tol: float = 1e-1,
        verbose: int = 0,
        n_jobs: int | None = None,
    ):
        self.n_components = n_components
        self.doc_topic_prior = doc_topic_prior
        self.topic_word_prior = topic_word_prior
        self.learning_method = learning_method
        self.learning_decay = learning_decay
        self.learning_offset = learning_offset
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.total_samples = total_samples
        self.mean_change_tol = mean_change_tol
        self.max_doc_update_iter = max_doc_update_iter
        self.tol = tol
        self.random_state = random_state
        self.evaluate_every = evaluate_every
        self.perp_tol = perp_tol
        self.verbose = verbose
        self.n_jobs = n_jobs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        return tags

    @property
    def _n_features_out(self) -> int:
        """Columns of ``transform`` (ClassNamePrefixFeaturesOutMixin: "lda0", …)."""
        return self.components_.shape[0]

    def _check_params(self):
        check_positive_int("max_iter", self.max_iter)
        check_positive_int("batch_size", self.batch_size)
        if isinstance(self.evaluate_every, bool) or not isinstance(self.evaluate_every, int):
            raise ValueError(f"evaluate_every must be an integer, got {self.evaluate_every!r}")
        if not self.perp_tol >= 0:
            raise ValueError(f"perp_tol must be >= 0, got {self.perp_tol}")
        if self.learning_method not in ("batch", "online"):
            raise ValueError(
                f"learning_method must be 'batch' or 'online', got {self.learning_method!r}"
            )
        check_learning_rate(self.learning_decay, self.learning_offset)

    def _validate(self, X, reset: bool):
        """sklearn's checks (2-D, finite, not empty, ``n_features_in_``, no negative
        value): float64, CSR or dense."""
        X = _validate(self, X, reset=reset, accept_sparse="csr")
        negative = int(np.sum((X.data if sp.issparse(X) else X) < 0))
        if negative:
            # sklearn's phrase first: tools match it.
            raise ValueError(
                f"Negative values in data passed to {type(self).__name__}: counts must be "
                f"non-negative; found {negative} negative"
            )
        return X

    def _make_model(self, n_features: int) -> LDAModel:
        return LDAModel.create(
            self.n_components,
            n_features,
            self.doc_topic_prior,
            self.topic_word_prior,
            self.max_doc_update_iter,
            self.mean_change_tol,
            strict_counts=False,
        )

    def _initial_topics(self, model: LDAModel, seed: int) -> dict:
        """λ0 ~ Gamma(100, 1/100) drawn as sklearn draws it (``RandomState(seed)``, kept
        as ``random_state_`` for the documents' starts, :meth:`_document_starts`), so
        the same ``random_state`` starts both from the same topics.  One pass over a
        corpus of a few thousand documents does not forget its start: on NYT the
        held-out perplexity (sklearn's bound) ranges over 7,100–8,600 across seeds, for
        sklearn, gensim and viax alike (benchmarks/conjugate_lda.py).  Drawn on the
        host: nothing to compile."""
        self.random_state_ = np.random.RandomState(seed)
        draws = self.random_state_.gamma(100.0, 0.01, (model.n_components, model.n_features))
        return {"topics": (draws - 1.0,)}

    def _document_starts(self, num_docs: int) -> dict:
        """Training's per-document start γ0 ~ Gamma(100, 1/100), (num_docs, K), from
        ``random_state_`` after λ0, batch after batch: sklearn's (and gensim's) random
        start, so that an online fit follows sklearn's from the same ``random_state``
        (float32 E-step round-off apart).  The start matters in a single pass: γ = 1
        for every document gave NYT perplexities 0.7–2.2% above sklearn's on seeds 0–2.
        Drawn on the host: no sampler to compile."""
        if not hasattr(self, "random_state_"):  # partial_fit after a batch fit
            self.random_state_ = np.random.RandomState(check_seed(self.random_state))
        draws = self.random_state_.gamma(100.0, 0.01, (num_docs, self.model_.n_components))
        return {"doc_topics": (draws - 1.0,)}

    def _set_globals(self, global_natural, n_batch_iter: int):
        self.global_natural_ = to_device_tree(global_natural)
        self.components_ = np.asarray(self.global_natural_["topics"][0]) + 1.0
        self.exp_dirichlet_component_ = np.exp(
            digamma(self.components_) - digamma(self.components_.sum(1, keepdims=True))
        )
        self.n_batch_iter_ = n_batch_iter
        self.doc_topic_prior_ = float(self.model_.doc_topic_prior)
        self.topic_word_prior_ = float(self.model_.topic_word_prior)

    def fit(self, X, y=None):
        """Fit on a document-term matrix (dense or scipy.sparse), rows = documents.

        With ``evaluate_every`` > 0 the training perplexity is computed every that
        many iterations (sweeps or passes; an extra E-step over X, as sklearn's) and
        the fit stops when it changes by less than ``perp_tol`` between two
        evaluations.  Perplexities are in the hundreds or thousands, so the default
        ``perp_tol=0.1`` (sklearn's) rarely stops a fit before ``max_iter``: compare
        ``result_.info["perplexities"]`` to choose it."""
        self._check_params()
        X = self._validate(X, reset=True)
        model = self._make_model(X.shape[1])
        self.model_ = model
        seed = check_seed(self.random_state)
        batch_method = self.learning_method == "batch"
        every = self.evaluate_every if self.evaluate_every > 0 else self.max_iter
        n = X.shape[0]
        # Batch CAVI runs in blocks between evaluations: the corpus is prepared once.
        data = (
            model.prepare(X, pad_to=_padded_rows(n), extent=_padded_extent(num_rows(X)))
            if batch_method
            else X
        )
        global_natural, local_natural, results, done = None, None, [], 0
        evaluations: list[tuple[int, float]] = []
        stopped_by = "max_iter"
        while done < self.max_iter:
            block = min(every, self.max_iter - done)
            if batch_method:
                if global_natural is None:
                    # sklearn's start (λ0 from RandomState(random_state), see
                    # _initial_topics), drawn on the host: nothing to compile.
                    doc_topics = np.zeros((data["mask"].shape[0], model.n_components))
                    init = (self._initial_topics(model, seed), {"doc_topics": (doc_topics,)})
                else:
                    init = (global_natural, local_natural)
                result = cavi(
                    model,
                    data,
                    max_iter=block,
                    tol=self.tol,
                    seed=seed,
                    init=init,
                    progress=self.verbose > 0,
                )
                local_natural = result.params["local"]
            else:
                result = svi(
                    model,
                    X,
                    batch_size=self.batch_size,
                    num_epochs=block,
                    learning_offset=self.learning_offset + sum(r.num_steps for r in results),
                    learning_decay=self.learning_decay,
                    seed=seed,
                    shuffle=False,
                    init=(
                        self._initial_topics(model, seed)
                        if global_natural is None
                        else global_natural
                    ),
                    evaluate=False,
                    local_start=self._document_starts,
                    progress=self.verbose > 0,
                )
            results.append(result)
            global_natural = result.params["global"]
            done += result.num_steps if batch_method else block
            if batch_method and result.converged:
                stopped_by = "tol"
            if self.evaluate_every > 0:
                self._set_globals(global_natural, 0)
                perplexity = self._perplexity(X)
                evaluations.append((done, perplexity))
                if self.verbose:
                    print(
                        f"iteration: {done} of max_iter: {self.max_iter}, "
                        f"perplexity: {perplexity:.4f}"
                    )
                if (
                    stopped_by == "max_iter"
                    and len(evaluations) > 1
                    and abs(evaluations[-2][1] - perplexity) < self.perp_tol
                ):
                    stopped_by = "perp_tol"
            elif self.verbose:
                print(f"iteration: {done} of max_iter: {self.max_iter}")
            if stopped_by != "max_iter":
                break
        steps = sum(r.num_steps for r in results)
        self.n_iter_ = done
        message = self._fit_message(done, len(results), evaluations, stopped_by)
        info = {
            **results[-1].info,
            "stopped_by": stopped_by,
            "perplexities": evaluations,
            "blocks": len(results),
            "iterations": done,
        }
        joined = _joined(results, message=message, converged=stopped_by != "max_iter", info=info)
        self.result_ = _without_padding(joined, n) if batch_method else joined
        self._set_globals(global_natural, steps + 1)
        self.elbo_trace_ = np.asarray(self.result_.elbo_trace)
        return self

    def _fit_message(self, done: int, blocks: int, evaluations, stopped_by: str) -> str:
        """What the whole fit did: iterations, blocks, evaluations, why it stopped."""
        unit = "sweeps" if self.learning_method == "batch" else "passes"
        method = "batch CAVI" if self.learning_method == "batch" else "online SVI"
        parts = [f"LDA {method}: {done} of max_iter={self.max_iter} {unit}"]
        if self.evaluate_every > 0:
            parts[0] += (
                f" in {blocks} block(s) of up to {self.evaluate_every}, the training "
                f"perplexity evaluated {len(evaluations)} time(s)"
            )
        last = None
        if len(evaluations) > 1:
            (i0, p0), (i1, p1) = evaluations[-2:]
            last = (
                f"changed by {abs(p1 - p0):.4g} (from {p0:.6g} to {p1:.6g}) between "
                f"{i0} and {i1} {unit}"
            )
        if stopped_by == "perp_tol":
            parts.append(f"stopped early: the perplexity {last}, below perp_tol={self.perp_tol}")
        elif stopped_by == "tol":
            parts.append(
                f"stopped early: the relative ELBO gain of the last sweep was below tol={self.tol}"
            )
        else:
            parts.append("stopped at max_iter")
            if last is not None:
                parts.append(f"the perplexity still {last}, not below perp_tol={self.perp_tol}")
            elif len(evaluations) == 1:
                parts.append("one evaluation of the perplexity: nothing to compare it with")
        return "; ".join(parts)

    def partial_fit(self, X, y=None):
        """One online pass over ``X`` (batches of ``batch_size``), N = ``total_samples``."""
        self._check_params()
        first = not hasattr(self, "components_")
        X = self._validate(X, reset=first)
        if first:
            self.model_ = self._make_model(X.shape[1])
            init, step = self._initial_topics(self.model_, check_seed(self.random_state)), 0
        else:
            init, step = self.global_natural_, self.n_batch_iter_ - 1
        result = svi(
            self.model_,
            X,
            batch_size=self.batch_size,
            num_data=self.total_samples,
            learning_offset=self.learning_offset + step,  # continue the schedule
            learning_decay=self.learning_decay,
            seed=check_seed(self.random_state) + step,
            shuffle=False,
            init=init,
            evaluate=False,
            local_start=self._document_starts,
            progress=self.verbose > 0,
        )
        self.result_ = result
        self._set_globals(result.params["global"], step + result.num_steps + 1)
        return self

    def _local_pass(self, X):
        """(γ (N, K), Σ_d local ELBO terms) for validated ``X``, in chunks of at least
        256 documents, each padded to the chunk size: few shapes to compile."""
        n = X.shape[0]
        gammas, total = [], 0.0
        size = max(self.batch_size, 256)
        starts = range(0, n, size)
        chunks = [X[start : start + size] for start in starts]
        extent = _padded_extent(max_extent(self.model_, chunks))
        batches = prepare_all(self.model_, chunks, size, extent)
        for start, batch in zip(starts, batches, strict=True):
            (gamma, value), _ = _transform_compiled(self.model_, self.global_natural_, batch)
            gammas.append(np.asarray(gamma, np.float64)[: min(size, n - start)])
            total += float(value)
        return np.concatenate(gammas), total

    def _small_local_fit(self, X) -> np.ndarray:
        """γ (N, K) of a small corpus (N ≤ ``_SMALL``) prepared as :meth:`fit` prepares
        one, by the local step of one CAVI sweep at the fitted topics (the sweep starts
        the locals afresh, ``init_locals``, and fits them given the globals: exactly
        :meth:`_local_pass`'s γ): the program a batch fit of a small corpus of this
        vocabulary compiled serves, instead of a second one."""
        n = X.shape[0]
        model = self.model_
        batch = model.prepare(X, pad_to=_SMALL, extent=_padded_extent(num_rows(X)))
        locals_ = {"doc_topics": (np.zeros((_SMALL, model.n_components)),)}
        result = cavi(
            model, batch, max_iter=1, tol=0.0, init=(self.global_natural_, locals_), progress=False
        )
        return np.asarray(result.params["local"]["doc_topics"][0], np.float64)[:n] + 1.0

    def transform(self, X, *, normalize: bool = True) -> np.ndarray:
        """Document-topic distributions E[θ_d] (or γ_d with ``normalize=False``), (N, K)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        if X.shape[0] <= _SMALL:
            gamma = self._small_local_fit(X)
        else:
            gamma, _ = self._local_pass(X)
        return gamma / gamma.sum(1, keepdims=True) if normalize else gamma

    def fit_transform(self, X, y=None, *, normalize: bool = True) -> np.ndarray:
        return self.fit(X).transform(X, normalize=normalize)

    def score(self, X, y=None) -> float:
        """The ELBO of ``X`` under the fitted topics (sklearn's approximate bound)."""
        check_is_fitted(self)
        return self._score(self._validate(X, reset=False))

    def _score(self, X) -> float:
        _, local_total = self._local_pass(X)
        return local_total + float(_global_terms(self.model_, self.global_natural_))

    def perplexity(self, X) -> float:
        """exp(−ELBO / number of words), sklearn's definition."""
        check_is_fitted(self)
        return self._perplexity(self._validate(X, reset=False))

    def _perplexity(self, X) -> float:
        return float(np.exp(-self._score(X) / X.sum()))


def _joined(results, **changes):
    """One Result for consecutive runs: the last one's state, the runs' traces, steps
    and times added up; ``changes`` replace other fields (message, converged, info)."""
    return dataclasses.replace(
        results[-1],
        elbo_trace=np.concatenate([r.elbo_trace for r in results]),
        num_steps=sum(r.num_steps for r in results),
        wall_time=sum(r.wall_time for r in results),
        compile_time=sum(r.compile_time for r in results),
        **changes,
    )


# ----------------------------------------------------------------------------------
# Linear regression
# ----------------------------------------------------------------------------------


class LinearRegression(RegressorMixin, BaseEstimator):
    """Bayesian linear regression, Normal–Gamma prior; exact posterior and evidence.

    Prior: τ ~ Gamma(shape_prior, rate_prior), w | τ ~ N(mean_prior, (τ Λ0)⁻¹) with
    Λ0 = ``precision_prior`` (a number: times the identity).  With ``fit_intercept`` a
    column of ones is appended and the intercept is the last weight (same prior).

    Fitted: ``coef_``, ``intercept_``, ``coef_covariance_`` (posterior covariance of all
    weights, Student-t: b/(a−1) Λn⁻¹), ``noise_precision_`` (E[τ]), ``log_evidence_``
    (log p(y), = the ELBO since q is the exact posterior), the posterior's
    ``posterior_mean_``, ``posterior_precision_``, ``posterior_shape_``,
    ``posterior_rate_``.  ``score`` is sklearn's R² of the posterior mean prediction.

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import LinearRegression
        >>> X = np.random.default_rng(0).normal(size=(100, 2))
        >>> lr = LinearRegression().fit(X, X @ [1.0, 2.0] + 0.5)
        >>> np.round(lr.coef_, 2).tolist(), round(lr.intercept_, 2)
        ([1.0, 2.0], 0.5)
    """

    def __init__(
        self,
        *,
        fit_intercept: bool = True,
        mean_prior=None,
        precision_prior=1e-2,
        shape_prior: float = 1.0,
        rate_prior: float = 1.0,
    ):
        self.fit_intercept = fit_intercept
        self.mean_prior = mean_prior
        self.precision_prior = precision_prior
        self.shape_prior = shape_prior
        self.rate_prior = rate_prior

    def _design(self, X):
        return np.hstack([X, np.ones((X.shape[0], 1))]) if self.fit_intercept else X

    def fit(self, X, y):
        """The exact posterior of the weights and the noise precision given (X, y):
        ``X`` (N, D), ``y`` (N,)."""
        X, y = _validate(self, X, y, reset=True, y_numeric=True)
        Z = self._design(X)
        p = Z.shape[1]
        m0 = np.zeros(p) if self.mean_prior is None else self.mean_prior
        model = LinearRegressionModel.create(
            m0, self.precision_prior, self.shape_prior, self.rate_prior
        )
        batch = model.prepare((Z, y), pad_to=_padded_rows(Z.shape[0]))
        # CAVI starts from the prior (the model's init_globals), given here in NumPy,
        # η0 = (Λ0 m0, −Λ0/2, −b0 − m0ᵀΛ0m0/2, a0 − 1 + P/2): no start to compile.
        m0, prec0 = (np.asarray(x, np.float64) for x in (model.mean_prior, model.precision_prior))
        a0, b0 = float(model.shape_prior), float(model.rate_prior)
        prior = (prec0 @ m0, -0.5 * prec0, -b0 - 0.5 * m0 @ prec0 @ m0, a0 - 1.0 + 0.5 * p)
        start = ({"regression": tuple(np.asarray(x, np.float64) for x in prior)}, {})
        result = cavi(model, batch, max_iter=5, tol=1e-12, init=start, progress=False)
        self.model_ = model
        self.result_ = result
        # NormalGamma's η = (Λm, −Λ/2, −b − mᵀΛm/2, a − 1 + D/2) inverted in NumPy: the
        # eager JAX version re-lowers its Cholesky loops on every call (0.3 s a fit).
        n1, n2, n3, n4 = (np.asarray(x, np.float64) for x in result.params["global"]["regression"])
        precision = -2.0 * n2
        cov = np.linalg.inv(precision)
        mean = cov @ n1
        self.posterior_mean_ = mean
        self.posterior_precision_ = precision
        self.posterior_shape_ = float(n4 + 1.0 - 0.5 * n1.shape[0])
        self.posterior_rate_ = float(-n3 - 0.5 * mean @ n1)
        a, b = self.posterior_shape_, self.posterior_rate_
        self.coef_covariance_ = b / (a - 1.0) * cov if a > 1 else np.full_like(cov, np.inf)
        self.noise_precision_ = a / b
        self.coef_ = mean[:-1] if self.fit_intercept else mean
        self.intercept_ = float(mean[-1]) if self.fit_intercept else 0.0
        self.log_evidence_ = float(result.elbo)
        self.elbo_trace_ = np.asarray(result.elbo_trace)
        return self

    def predict(self, X, return_std: bool = False):
        """Posterior predictive mean (and standard deviation: Student-t with 2a dof,
        scale² = b/a (1 + zᵀΛn⁻¹z))."""
        check_is_fitted(self)
        Z = self._design(_validate(self, X, reset=False))
        mean = Z @ self.posterior_mean_
        if not return_std:
            return mean
        a, b = self.posterior_shape_, self.posterior_rate_
        scale2 = (
            b / a * (1.0 + np.einsum("ni,ij,nj->n", Z, np.linalg.inv(self.posterior_precision_), Z))
        )
        var = scale2 * a / (a - 1.0) if a > 1 else np.full_like(scale2, np.inf)
        return mean, np.sqrt(var)
