"""scikit-learn-style estimators over the conjugate engine.

``GaussianMixture`` (sklearn's ``BayesianGaussianMixture``: same priors, parameter and
attribute names, initialisations), ``LDA`` (sklearn's ``LatentDirichletAllocation``)
and ``LinearRegression`` (Normal–Gamma prior, exact posterior and evidence).  They
follow sklearn's conventions — ``get_params``/``set_params``, fitted attributes with a
trailing underscore — so ``sklearn.base.clone`` and pipelines accept them; scikit-learn
itself is not needed.  ``result_`` holds the :class:`viax.result.Result` of the fit.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import scipy.sparse as sp
from scipy.special import digamma

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
from viax.conjugate.expfam import Beta, Dirichlet, NormalGamma
from viax.conjugate.models._base import (
    EstimatorMixin,
    check_finite_2d,
    check_fitted,
    check_positive_int,
    check_seed,
)
from viax.conjugate.models.gmm import COVARIANCE_TYPES, INIT_METHODS, GaussianMixtureModel
from viax.conjugate.models.lda import LDAModel
from viax.conjugate.models.linear import LinearRegressionModel
from viax.conjugate.svi import check_learning_rate, svi
from viax.conjugate.xla import jit

__all__ = ["LDA", "GaussianMixture", "LinearRegression"]


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


class GaussianMixture(EstimatorMixin):
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

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import GaussianMixture
        >>> X = np.random.default_rng(0).normal(size=(200, 2))
        >>> gm = GaussianMixture(n_components=3, random_state=0).fit(X)
        >>> gm.predict(X).shape
        (200,)
    """

    _estimator_type = "clusterer"

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
        """Fit by CAVI.  ``initial_resp`` (N, K): start from these responsibilities
        (sklearn's M-step on them) instead of ``init_params``."""
        self._fit(check_finite_2d(X), initial_resp)
        return self

    def fit_predict(self, X, y=None, *, initial_resp=None):
        """Fit, then the labels of ``X`` under the fitted model (sklearn's fit_predict)."""
        X = check_finite_2d(X)
        self._fit(X, initial_resp)
        return self.predict(X)

    def _fit(self, X, initial_resp):
        model = self._make_model(X)
        batch = model.prepare(X)
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
                if resp.shape != (X.shape[0], self.n_components):
                    raise ValueError(
                        f"initial_resp must have shape {(X.shape[0], self.n_components)}"
                    )
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
                RuntimeWarning,
                stacklevel=3,
            )
        self._set_fitted(model, best, X.shape[1])

    def _set_fitted(self, model, result, n_features):
        self.model_ = model
        self.result_ = result
        self.n_features_in_ = n_features
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
        check_fitted(self, "result_")
        X = check_finite_2d(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model {self.n_features_in_}")
        return np.asarray(_log_prob(self.model_, self.global_natural_, to_device(X)))

    def score_samples(self, X) -> np.ndarray:
        """log Σ_k exp(E[log π_k] + E[log N(x | μ_k, Λ_k⁻¹)]) per sample, as sklearn."""
        return np.asarray(jax.nn.logsumexp(self._weighted_log_prob(X), axis=1))

    def score(self, X, y=None) -> float:
        """Mean of ``score_samples`` (sklearn's definition)."""
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities q(z_n = k), (N, K)."""
        return np.asarray(jax.nn.softmax(self._weighted_log_prob(X), axis=1))

    def predict(self, X) -> np.ndarray:
        return np.argmax(self._weighted_log_prob(X), axis=1)

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(X (n_samples, D), component labels) drawn from the mixture at the fitted
        point estimates ``weights_``, ``means_``, ``covariances_``: sklearn's ``sample``,
        with the same draws for the same ``random_state`` and attributes.  Draws from
        the posterior over the parameters: ``result_.sample``."""
        check_fitted(self, "result_")
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


class LDA(EstimatorMixin):
    """Latent Dirichlet allocation: batch CAVI or online SVI, sklearn's names.

    ``learning_method="batch"``: CAVI sweeps over the whole corpus (``max_iter``);
    ``"online"``: SVI with batches of ``batch_size`` documents in order for ``max_iter``
    passes, ρ_t = (learning_offset + t)^(−learning_decay) — sklearn's schedule.
    ``components_`` is λ (K, V).  Counts must be non-negative integers, documents
    non-empty.  ``evaluate_every``, ``perp_tol``, ``verbose`` are sklearn's (stop when the
    training perplexity, computed every ``evaluate_every`` iterations, changes by less
    than ``perp_tol``; ``verbose`` > 0: progress bars and a line per iteration).
    ``n_jobs`` is accepted so that sklearn's parameters carry over, and ignored: XLA
    uses the machine's cores.  ``tol`` (viax's): batch CAVI stops when a sweep's
    relative ELBO gain is below it (0: run ``max_iter`` sweeps, sklearn's behaviour).

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import LDA
        >>> X = np.random.default_rng(0).poisson(1.0, size=(50, 30))
        >>> X = X[X.sum(1) > 0]
        >>> lda = LDA(n_components=3, max_iter=5, random_state=0).fit(X)
        >>> lda.components_.shape
        (3, 30)
    """

    _estimator_type = "transformer"

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

    def _make_model(self, n_features: int) -> LDAModel:
        return LDAModel.create(
            self.n_components,
            n_features,
            self.doc_topic_prior,
            self.topic_word_prior,
            self.max_doc_update_iter,
            self.mean_change_tol,
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
        the fit stops when it changes by less than ``perp_tol``."""
        self._check_params()
        X = _as_docs(X)
        model = self._make_model(_num_columns(X))
        self.model_ = model
        seed = check_seed(self.random_state)
        every = self.evaluate_every if self.evaluate_every > 0 else self.max_iter
        # Batch CAVI runs in blocks between evaluations: the corpus is prepared once.
        data = model.prepare(X) if self.learning_method == "batch" else X
        global_natural, local_natural, results, done = None, None, [], 0
        last_perplexity = None
        while done < self.max_iter:
            block = min(every, self.max_iter - done)
            if self.learning_method == "batch":
                init = None if global_natural is None else (global_natural, local_natural)
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
            done += result.num_steps if self.learning_method == "batch" else block
            converged = self.learning_method == "batch" and result.converged
            if self.evaluate_every > 0:
                self._set_globals(global_natural, 0)
                perplexity = self.perplexity(X)
                if self.verbose:
                    print(
                        f"iteration: {done} of max_iter: {self.max_iter}, "
                        f"perplexity: {perplexity:.4f}"
                    )
                if (
                    last_perplexity is not None
                    and abs(last_perplexity - perplexity) < self.perp_tol
                ):
                    converged = True
                last_perplexity = perplexity
            elif self.verbose:
                print(f"iteration: {done} of max_iter: {self.max_iter}")
            if converged:
                break
        steps = sum(r.num_steps for r in results)
        self.n_iter_ = done
        self.result_ = results[-1] if len(results) == 1 else _joined(results)
        self.n_features_in_ = model.n_features
        self._set_globals(global_natural, steps + 1)
        self.elbo_trace_ = np.asarray(self.result_.elbo_trace)
        return self

    def partial_fit(self, X, y=None):
        """One online pass over ``X`` (batches of ``batch_size``), N = ``total_samples``."""
        self._check_params()
        X = _as_docs(X)
        first = not hasattr(self, "components_")
        if first:
            self.model_ = self._make_model(_num_columns(X))
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
        self.n_features_in_ = self.model_.n_features
        self._set_globals(result.params["global"], step + result.num_steps + 1)
        return self

    def _local_pass(self, X):
        check_fitted(self, "components_")
        n = X.shape[0]
        gammas, total = [], 0.0
        size = max(self.batch_size, 256)
        starts = range(0, n, size)
        chunks = [X[start : start + size] for start in starts]
        batches = prepare_all(self.model_, chunks, size, max_extent(self.model_, chunks))
        for start, batch in zip(starts, batches, strict=True):
            (gamma, value), _ = _transform_compiled(self.model_, self.global_natural_, batch)
            gammas.append(np.asarray(gamma)[: min(size, n - start)])
            total += float(value)
        return np.concatenate(gammas), total

    def transform(self, X, *, normalize: bool = True) -> np.ndarray:
        """Document-topic distributions E[θ_d] (or γ_d with ``normalize=False``)."""
        gamma, _ = self._local_pass(_as_docs(X))
        return gamma / gamma.sum(1, keepdims=True) if normalize else gamma

    def fit_transform(self, X, y=None, *, normalize: bool = True) -> np.ndarray:
        return self.fit(X).transform(X, normalize=normalize)

    def score(self, X, y=None) -> float:
        """The ELBO of ``X`` under the fitted topics (sklearn's approximate bound)."""
        _, local_total = self._local_pass(_as_docs(X))
        return local_total + float(_global_terms(self.model_, self.global_natural_))

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names of ``transform``'s columns, sklearn's style: "lda0", "lda1", …"""
        check_fitted(self, "components_")
        return np.asarray([f"lda{k}" for k in range(self.components_.shape[0])], dtype=object)

    def perplexity(self, X) -> float:
        """exp(−ELBO / number of words), sklearn's definition."""
        X = _as_docs(X)
        return float(np.exp(-self.score(X) / X.sum()))


def _joined(results):
    """One Result for consecutive runs: the last one's state, the runs' traces, steps
    and times added up."""
    return dataclasses.replace(
        results[-1],
        elbo_trace=np.concatenate([r.elbo_trace for r in results]),
        num_steps=sum(r.num_steps for r in results),
        wall_time=sum(r.wall_time for r in results),
        compile_time=sum(r.compile_time for r in results),
    )


def _as_docs(X):
    return X if sp.issparse(X) else np.asarray(X)


def _num_columns(X) -> int:
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError("the document-term matrix must be 2-D (documents × words)")
    return int(shape[1])


# ----------------------------------------------------------------------------------
# Linear regression
# ----------------------------------------------------------------------------------


class LinearRegression(EstimatorMixin):
    """Bayesian linear regression, Normal–Gamma prior; exact posterior and evidence.

    Prior: τ ~ Gamma(shape_prior, rate_prior), w | τ ~ N(mean_prior, (τ Λ0)⁻¹) with
    Λ0 = ``precision_prior`` (a number: times the identity).  With ``fit_intercept`` a
    column of ones is appended and the intercept is the last weight (same prior).

    Fitted: ``coef_``, ``intercept_``, ``coef_covariance_`` (posterior covariance of all
    weights, Student-t: b/(a−1) Λn⁻¹), ``noise_precision_`` (E[τ]), ``log_evidence_``
    (log p(y), = the ELBO since q is the exact posterior), the posterior's
    ``posterior_mean_``, ``posterior_precision_``, ``posterior_shape_``,
    ``posterior_rate_``.

    Example:
        >>> import numpy as np
        >>> from viax.conjugate import LinearRegression
        >>> X = np.random.default_rng(0).normal(size=(100, 2))
        >>> lr = LinearRegression().fit(X, X @ [1.0, 2.0] + 0.5)
        >>> np.round(lr.coef_, 2).tolist(), round(lr.intercept_, 2)
        ([1.0, 2.0], 0.5)
    """

    _estimator_type = "regressor"

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
        X = check_finite_2d(X)
        return np.hstack([X, np.ones((X.shape[0], 1))]) if self.fit_intercept else X

    def fit(self, X, y):
        Z = self._design(X)
        p = Z.shape[1]
        m0 = np.zeros(p) if self.mean_prior is None else self.mean_prior
        model = LinearRegressionModel.create(
            m0, self.precision_prior, self.shape_prior, self.rate_prior
        )
        result = cavi(model, (Z, np.asarray(y, np.float64)), max_iter=5, tol=1e-12, progress=False)
        self.model_ = model
        self.result_ = result
        self.n_features_in_ = Z.shape[1] - int(self.fit_intercept)
        s = NormalGamma.to_standard(to_device_tree(result.params["global"]["regression"]))
        mean = np.asarray(s["mean"])
        self.posterior_mean_ = mean
        self.posterior_precision_ = np.asarray(s["precision"])
        self.posterior_shape_ = float(s["shape"])
        self.posterior_rate_ = float(s["rate"])
        a, b = self.posterior_shape_, self.posterior_rate_
        cov = np.linalg.inv(self.posterior_precision_)
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
        check_fitted(self, "coef_")
        Z = self._design(X)
        mean = Z @ self.posterior_mean_
        if not return_std:
            return mean
        a, b = self.posterior_shape_, self.posterior_rate_
        scale2 = (
            b / a * (1.0 + np.einsum("ni,ij,nj->n", Z, np.linalg.inv(self.posterior_precision_), Z))
        )
        var = scale2 * a / (a - 1.0) if a > 1 else np.full_like(scale2, np.inf)
        return mean, np.sqrt(var)

    def score(self, X, y) -> float:
        """R² of the posterior mean prediction (sklearn's regressor score)."""
        y = np.asarray(y, np.float64)
        residual = y - self.predict(X)
        return float(1.0 - residual @ residual / np.sum((y - y.mean()) ** 2))
