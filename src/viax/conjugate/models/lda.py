"""Latent Dirichlet allocation (Blei, Ng & Jordan 2003; Hoffman, Blei & Bach 2010;
Hoffman et al. 2013 §3.1), with scikit-learn's parameter names.

    β_k ~ Dirichlet(η 1_V)  (topic_word_prior η),   θ_d ~ Dirichlet(α 1_K)  (doc_topic_prior),
    z_dn ~ Categorical(θ_d),   w_dn ~ Categorical(β_{z_dn}).

Global factor ``topics`` (Dirichlet, (K, V)): λ in the literature, sklearn's
``components_``.  Local factor ``doc_topics`` (Dirichlet, (B, K)): γ.  The word
assignments z are collapsed in closed form: for a word w seen n_dw times,

    max_φ n_dw Σ_k φ_k (E log θ_dk + E log β_kw) + n_dw H(φ)
        = n_dw log Σ_k exp(E log θ_dk + E log β_kw),

so the expected log joint of a document is

    F_d = <α − 1, E log θ_d> − A_Dir(α 1_K) + Σ_w n_dw log Σ_k exp(E log θ_dk) exp(E log β_kw).

Its gradients are the textbook updates (Danskin's theorem): ∂F/∂E[log θ_d] =
α − 1 + Σ_w n_dw φ_dw = γ_d − 1, and ∂F/∂E[log β_kw] = Σ_d n_dw φ_dwk, the expected
counts.  Written with exp(E log θ) and exp(E log β) as sklearn and gensim do, φ is never
formed beyond one product per (document, word) entry.  The ELBO this yields is sklearn's
``_approx_bound`` exactly, hence the same perplexity.

Batches are flat lists of the nonzero (document, word, count) entries — no padding of
documents to a common length, so cost follows the number of distinct words:
``{"docs": (T,) int32, "ids": (T,) int32, "counts": (T,), "mask": (B,)}``, T rounded up
(with count-0 entries) to within 12.5% so that few shapes are compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.scipy.special import gammaln

from viax.conjugate.engine import ConjugateModel, conjugate_model, static
from viax.conjugate.expfam import Dirichlet
from viax.conjugate.models._base import check_positive_int

__all__ = ["LDAModel", "prepare_documents"]


def _bucket(n: int, minimum: int = 256) -> int:
    """n rounded up to a multiple of 2^(⌈log2 n⌉ − 3): at most 12.5% padding, and
    batches of similar size share one compiled shape."""
    step = max(minimum, 1 << max(0, int(np.ceil(np.log2(max(n, 1)))) - 3))
    return -(-n // step) * step


def prepare_documents(X, n_features: int | None = None, pad_to: int | None = None) -> dict:
    """Check a document-term matrix (dense or scipy.sparse) and flatten it into
    ``{"docs", "ids", "counts", "mask"}``.

    Raises ValueError for negative, non-integer or non-finite counts, an empty
    document, an empty batch or a vocabulary size that does not match."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sum_duplicates()
        X.eliminate_zeros()
        data = np.asarray(X.data, np.float64)
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"the document-term matrix must be 2-D, got shape {X.shape}")
        if not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"counts must be numbers, got dtype {X.dtype}")
        X = sp.csr_matrix(np.asarray(X, np.float64))
        X.eliminate_zeros()
        data = X.data
    num_docs, vocab = X.shape
    if num_docs == 0:
        raise ValueError("empty batch: the document-term matrix has no rows")
    if n_features is not None and vocab != n_features:
        raise ValueError(f"the data has {vocab} words (columns), the model {n_features}")
    if not np.all(np.isfinite(data)):
        raise ValueError("counts contain NaN or infinite values")
    if np.any(data < 0):
        raise ValueError(f"counts must be non-negative; found {int((data < 0).sum())} negative")
    if np.any(data != np.round(data)):
        raise ValueError("counts must be integers (word counts); found non-integer values")
    lengths = np.diff(X.indptr)
    if np.any(lengths == 0):
        empty = np.flatnonzero(lengths == 0)
        raise ValueError(
            f"{empty.size} empty document(s) (no words), the first at row {empty[0]}; "
            "drop them before fitting"
        )
    rows = max(num_docs, pad_to or 0)
    size = _bucket(data.size)
    docs = np.zeros(size, np.int32)
    ids = np.zeros(size, np.int32)
    counts = np.zeros(size)
    docs[: data.size] = np.repeat(np.arange(num_docs, dtype=np.int32), lengths)
    ids[: data.size] = X.indices
    counts[: data.size] = data
    mask = np.zeros(rows)
    mask[:num_docs] = 1.0
    return {
        "docs": jnp.asarray(docs),
        "ids": jnp.asarray(ids),
        "counts": jnp.asarray(counts),
        "mask": jnp.asarray(mask),
    }


@conjugate_model
class LDAModel(ConjugateModel):
    """LDA with symmetric priors; see the module docstring."""

    doc_topic_prior: jax.Array  # α
    topic_word_prior: jax.Array  # η
    n_components: int = static()
    n_features: int = static()
    max_local_iter: int = static(100)  # sklearn's max_doc_update_iter
    local_tol: float = static(1e-3)  # sklearn's mean_change_tol

    name = "lda"
    local_order = ("doc_topics",)
    convergence_site = "doc_topics"
    restart_locals = True

    @classmethod
    def create(
        cls,
        n_components: int,
        n_features: int,
        doc_topic_prior: float | None = None,
        topic_word_prior: float | None = None,
        max_doc_update_iter: int = 100,
        mean_change_tol: float = 1e-3,
    ) -> LDAModel:
        """sklearn's defaults: α = η = 1 / n_components."""
        n_components = check_positive_int("n_components", n_components)
        n_features = check_positive_int("n_features", n_features)
        max_doc_update_iter = check_positive_int("max_doc_update_iter", max_doc_update_iter)
        alpha = 1.0 / n_components if doc_topic_prior is None else float(doc_topic_prior)
        eta = 1.0 / n_components if topic_word_prior is None else float(topic_word_prior)
        for label, value in [("doc_topic_prior", alpha), ("topic_word_prior", eta)]:
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be > 0, got {value}")
        if not mean_change_tol >= 0:
            raise ValueError(f"mean_change_tol must be >= 0, got {mean_change_tol}")
        return cls(
            jnp.asarray(alpha, jnp.float64),
            jnp.asarray(eta, jnp.float64),
            n_components,
            n_features,
            max_doc_update_iter,
            float(mean_change_tol),
        )

    def global_factors(self):
        return {"topics": Dirichlet()}

    def prior(self):
        shape = (self.n_components, self.n_features)
        return {"topics": Dirichlet.from_standard(jnp.full(shape, self.topic_word_prior))}

    def local_factors(self, batch):
        return {"doc_topics": Dirichlet(weights=batch["mask"])}

    def local_log_joint(self, global_mean, local_mean, batch):
        elog_theta = local_mean["doc_topics"][0]  # (B, K), zero rows for padding
        elog_beta = global_mean["topics"][0]  # (K, V)
        alpha, k = self.doc_topic_prior, self.n_components
        log_norm = k * gammaln(alpha) - gammaln(k * alpha)
        prior_part = (alpha - 1.0) * jnp.sum(elog_theta) - log_norm * jnp.sum(batch["mask"])
        exp_beta = jnp.exp(elog_beta).T[batch["ids"]]  # (T, K)
        # Entries are grouped by document: a sorted gather, whose transpose (the
        # gradient's scatter-add into γ) XLA lowers far faster than an unsorted one.
        exp_theta = jnp.exp(elog_theta).at[batch["docs"]].get(indices_are_sorted=True)  # (T, K)
        norm = jnp.sum(exp_theta * exp_beta, -1)
        return prior_part + jnp.sum(batch["counts"] * jnp.log(norm))

    def init_globals(self, rng_key, batch=None):
        # sklearn's and Hoffman's start: λ ~ Gamma(100, 1/100) elementwise.
        shape = (self.n_components, self.n_features)
        return {"topics": (jax.random.gamma(rng_key, 100.0, shape) / 100.0 - 1.0,)}

    def init_locals(self, rng_key, batch, global_mean):
        # γ = 1 (sklearn's transform).  sklearn and Hoffman draw γ ~ Gamma(100, 1/100)
        # when training; the random topics already break the symmetry, and a Gamma
        # sampler in the step would double its compile time.
        return {"doc_topics": (jnp.zeros((batch["mask"].shape[0], self.n_components)),)}

    def prepare(self, data, pad_to=None):
        return prepare_documents(data, self.n_features, pad_to)

    def sample_sites(self, global_natural, rng_key, num_samples):
        return {
            "topics": Dirichlet().sample(global_natural["topics"], rng_key, num_samples)["value"]
        }
