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

PSIS and k̂ follow ArviZ's ``psislw`` (Zhang & Stephens' empirical-Bayes generalised
Pareto fit with Vehtari et al.'s weak prior on k), written out here in NumPy because
``import arviz`` costs seconds of CPU that every fit would pay for one number; a test
checks the two agree to round-off.
"""

from __future__ import annotations

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


def psis(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights (unnormalised, same shape (S,)) and k̂.

    The largest min(S/5, 3√S) weights are replaced by the expected order statistics of
    a generalised Pareto fitted to them, and truncated at the largest raw weight.
    Constant weights (q equal to the posterior up to round-off) have no tail to fit:
    k̂ = −inf, the limit for bounded weights.  Fewer than five tail draws: k̂ = inf.
    """
    x = np.array(log_weights, dtype=float).ravel()
    if np.isnan(x).any():
        raise ValueError("log weights contain NaN")
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError("every log weight is -inf: q has no mass where p does")
    if np.ptp(finite) <= 1e-9 * max(1.0, float(np.abs(finite).max())):
        return x.reshape(np.shape(log_weights)), float("-inf")
    num = x.size
    shift = np.max(x)
    x -= shift
    order = np.argsort(x)
    tail_size = int(np.ceil(min(num / 5.0, 3 * num**0.5)))
    cutoff = max(x[order[-tail_size - 1]], np.log(np.finfo(float).tiny))
    tail = np.flatnonzero(x > cutoff)
    khat = float("inf")
    if tail.size > 4:
        tail = tail[np.argsort(x[tail])]
        khat, sigma = _gpd_fit(np.exp(x[tail]) - np.exp(cutoff))
        if np.isfinite(khat) and sigma > 0:
            probs = np.arange(0.5, tail.size) / tail.size
            if abs(khat) < np.finfo(float).eps:
                quantiles = -np.log1p(-probs)
            else:
                quantiles = np.expm1(-khat * np.log1p(-probs)) / khat
            x[tail] = np.log(sigma * quantiles + np.exp(cutoff))
            x[x > 0] = 0.0
    return (x + shift).reshape(np.shape(log_weights)), float(khat)


def _gpd_fit(excess: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (k, σ) for sorted positive ``excess`` (n,): Zhang & Stephens
    (2009) posterior mean of b = −k/σ on a grid, then k shrunk towards ½ by a prior
    worth 10 draws (Vehtari et al. 2024)."""
    n = excess.size
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b /= 3 * excess[int(n / 4 + 0.5) - 1]
    b += 1 / excess[-1]
    k = np.log1p(-b[:, None] * excess).mean(axis=1)
    log_lik = n * (np.log(-(b / k)) - k - 1)
    weights = 1 / np.exp(log_lik - log_lik[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep], b[keep]
    b_post = np.sum(b * weights / weights.sum())
    k_post = np.log1p(-b_post * excess).mean()
    sigma = -k_post / b_post
    return float((n * k_post + 10 * 0.5) / (n + 10)), float(sigma)


def khat_verdict(khat: float, converged: bool = True) -> str:
    """ "good" (k̂ < 0.5), "usable" (< 0.7) or "do not trust"; "not converged" for a fit
    that did not converge, whatever k̂ says: k̂ judges how far q is from the posterior,
    and a q stopped far from the optimum can still score well."""
    if not converged:
        return "not converged"
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
