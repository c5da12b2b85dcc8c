"""Evidence estimates and trust diagnostics from importance log weights.

With draws z_s ~ q and log weights w_s = log p(x, z_s) − log q(z_s):

* ELBO:  L = mean_s w_s ≤ log p(x), standard error sd(w)/√S.
* IWAE:  L_K = E[log (1/K) Σ_k exp w_k] (Burda et al. 2016), estimated from S/K disjoint
  groups of K draws; L_1 = ELBO ≤ L_K ≤ L_{K'} ≤ log p(x) for K ≤ K'.
* Importance sampling: log p̂(x) = log mean_s exp w̃_s with w̃ the Pareto-smoothed
  weights (PSIS, Vehtari et al. 2024); standard error by the delta method,
  se² ≈ (S Σ ŵ² − 1)/S with ŵ the self-normalised weights.  A Gaussian q has lighter
  tails than most posteriors (a Beta in logit space has exponential tails), so p/q has
  infinite variance and the estimate from q alone is erratic; the estimate therefore
  uses a *defensive* proposal r = ½ q + ½ t₄(mean q, cov q) (Hesterberg 1995), whose
  Student-t half bounds the weights, with half the draws from each component.
* k̂: the shape of the generalised Pareto fitted to the largest weights (Yao et al.
  2018, "Yes, but did it work?"): < 0.5 good, < 0.7 usable, otherwise q is too far
  from the posterior for its draws or its ELBO to be trusted.

PSIS and k̂ come from ArviZ (``arviz.psislw``).
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "Evidence",
    "KHAT_GOOD",
    "KHAT_USABLE",
    "evidence_from_log_weights",
    "importance_estimate",
    "iwae_bound",
    "khat_verdict",
    "psis",
]

KHAT_GOOD, KHAT_USABLE = 0.5, 0.7

_ARVIZ_IMPORT: threading.Thread | None = None


def prefetch_arviz() -> None:
    """Start importing ArviZ in a background thread.  The import takes seconds; started
    when a fit starts, it overlaps with tracing and compilation, so the k̂ at the end of
    the fit does not wait for it (``import arviz`` there joins this import)."""
    global _ARVIZ_IMPORT
    if _ARVIZ_IMPORT is not None or "arviz" in sys.modules:
        return

    def load():
        try:
            import arviz  # noqa: F401
        except Exception:  # noqa: BLE001  the foreground import will report it
            pass

    _ARVIZ_IMPORT = threading.Thread(target=load, name="viax-import-arviz", daemon=True)
    _ARVIZ_IMPORT.start()


def psis(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights (unnormalised, same shape) and k̂.

    Constant weights (q equal to the posterior up to round-off) have no tail to fit:
    k̂ = −inf, the limit for bounded weights.
    """
    import arviz as az

    log_weights = np.asarray(log_weights, dtype=float)
    if np.isnan(log_weights).any():
        raise ValueError("log weights contain NaN")
    finite = log_weights[np.isfinite(log_weights)]
    if finite.size == 0:
        raise ValueError("every log weight is -inf: q has no mass where p does")
    if np.ptp(finite) <= 1e-9 * max(1.0, float(np.abs(finite).max())):
        return log_weights.copy(), float("-inf")
    with warnings.catch_warnings():
        # ArviZ warns when k̂ > 0.7; viax reports that verdict itself.
        warnings.simplefilter("ignore")
        smoothed, khat = az.psislw(log_weights, normalize=False)
    return np.asarray(smoothed), float(khat)


def khat_verdict(khat: float) -> str:
    """ "good" (k̂ < 0.5), "usable" (< 0.7) or "do not trust"."""
    if np.isnan(khat):
        return "do not trust"
    if khat < KHAT_GOOD:
        return "good"
    if khat < KHAT_USABLE:
        return "usable"
    return "do not trust"


def iwae_bound(log_weights: np.ndarray, num_inner: int) -> tuple[float, float]:
    """L_K from S // K disjoint groups of K draws: (estimate, standard error)."""
    log_weights = np.asarray(log_weights, dtype=float)
    groups = log_weights.size // num_inner
    if groups < 1:
        raise ValueError(f"IWAE with K={num_inner} needs at least K draws, got {log_weights.size}")
    blocks = log_weights[: groups * num_inner].reshape(groups, num_inner)
    values = logsumexp(blocks, axis=1) - np.log(num_inner)
    se = float(values.std(ddof=1) / np.sqrt(groups)) if groups > 1 else float("nan")
    return float(values.mean()), se


@dataclass(frozen=True)
class Evidence:
    """Estimates of log p(x) from ``num_samples`` draws of q."""

    elbo: float
    elbo_se: float
    iwae: dict[int, tuple[float, float]]  # K -> (L_K, se)
    log_p: float  # PSIS importance-sampling estimate
    log_p_se: float
    khat: float  # k̂ of the weights behind log_p: is that estimate reliable?
    num_samples: int
    ess: float = field(default=float("nan"))  # effective sample size of the IS weights
    khat_q: float = field(default=float("nan"))  # k̂ of p/q itself: the verdict on q

    @property
    def verdict(self) -> str:
        """The verdict on q itself (k̂ of p/q)."""
        return khat_verdict(self.khat_q)


def importance_estimate(log_weights: np.ndarray) -> tuple[float, float, float, float]:
    """PSIS estimate of log mean exp(w): (log p̂, se, k̂, effective sample size)."""
    log_weights = np.asarray(log_weights, dtype=float)
    num = log_weights.size
    smoothed, khat = psis(log_weights)
    log_p = float(logsumexp(smoothed) - np.log(num))
    normalised = np.exp(smoothed - logsumexp(smoothed))
    sum_sq = float(np.sum(normalised**2))
    return log_p, float(np.sqrt(max(num * sum_sq - 1.0, 0.0) / num)), khat, 1.0 / sum_sq


def evidence_from_log_weights(
    log_weights: np.ndarray,
    ks: tuple[int, ...] = (1, 10, 100, 1000),
    proposal_log_weights: np.ndarray | None = None,
) -> Evidence:
    """ELBO, IWAE bounds and the PSIS estimate of log p(x) from log weights (S,) of
    draws of q.  ``proposal_log_weights``, when given, are log p − log r for draws of a
    heavier-tailed proposal r, used for the importance-sampling estimate instead."""
    log_weights = np.asarray(log_weights, dtype=float)
    num = log_weights.size
    if num < 2:
        raise ValueError("need at least 2 draws")
    if np.isneginf(log_weights).any():
        elbo, elbo_se = float("-inf"), float("nan")
    else:
        elbo, elbo_se = float(log_weights.mean()), float(log_weights.std(ddof=1) / np.sqrt(num))
    iwae = {k: iwae_bound(log_weights, k) for k in ks if k <= num}
    khat_q = psis(log_weights)[1]
    weights = log_weights if proposal_log_weights is None else proposal_log_weights
    log_p, log_p_se, khat, ess = importance_estimate(weights)
    return Evidence(elbo, elbo_se, iwae, log_p, log_p_se, khat, num, ess=ess, khat_q=khat_q)
