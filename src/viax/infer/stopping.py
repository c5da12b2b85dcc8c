"""When to stop a stochastic optimisation: stationarity by R̂, then iterate averaging
until the Monte Carlo error of the average is small (host side, between chunks).

A stochastic optimiser with a fixed step size does not converge to a point: after a
transient, its iterates λ_t wander around the optimum λ* like a Markov chain in its
stationary distribution (Dhaka et al. 2020).  So "are we done?" is the question MCMC
asks, answered with MCMC's tools.  All distances are in posterior scales: ``scale_j``
is 1/sqrt(F_jj), F the Fisher information of q (q's sd for a Gaussian mean, 1/√2 for a
log-scale, 1/sqrt(p(1−p)) for a Bernoulli logit; :func:`fisher_scale`), so that an
error δ costs about ½ Σ_j (δ_j / scale_j)² nats of ELBO.

1. **Stationarity.**  The iterates of the current step-size level are cut into blocks
   of ``block_len`` steps; the window (the later half of the level, at least
   ``min_window`` steps) is split into ``num_segments`` consecutive segments and the
   classical split-R̂ is computed per coordinate on the block means
   (Gelman & Rubin 1992; Vehtari et al. 2021):

       W = mean_s Var_s,  B/n = Var_s(mean_s),  R̂ = sqrt(((n−1)/n W + B/n) / W)

   with n block means per segment.  A drift (the transient) makes the segment means
   differ, so R̂ > 1.  The window is stationary when R̂ < ``rhat_threshold`` for every
   coordinate (for P > 100 coordinates: all but the worst 1%, since P noisy R̂'s always
   have a few large ones), not counting coordinates whose segment means stay within
   ``drift_tol`` scales of each other (a Bernoulli logit wandering between −7 and −10,
   where q barely changes, never looks stationary).

2. **Averaging.**  From the start of the stationary window on, the answer is the
   Polyak–Ruppert average λ̄ = (1/T) Σ_t λ_t (Polyak & Juditsky 1992).  Its Monte
   Carlo standard error comes from the block means m_b (b = 1..K) treated as a chain:
   ESS_j by Geyer's initial monotone sequence (the ESS of Stan and ArviZ), and

       MCSE_j = sd_b(m_{b,j}) / sqrt(ESS_j).

   The level is done when MCSE_j ≤ ``tol`` · scale_j for every coordinate (the same 1%
   allowance), with at least ``min_blocks`` blocks averaged.  Two guards keep a slow
   drift out of the average: when the window's own split-R̂ says it drifts, or (given
   ``elbo_fn``, an ELBO estimate on fixed draws) when the ELBO at the average of the
   window's later half beats that of its earlier half by more than ``gain_tol`` nats,
   the window is cut to its later half.

3. **Step-size halving** (Welandawe et al. 2022, RAABBVI).  A fixed step size γ leaves
   a bias O(γ) in the stationary mean.  After a level is done the rule asks the caller
   to halve the step size (:attr:`MCSETracker.step_scale`) and repeats 1–2 for at least
   as many steps as the level before (the autocorrelation time doubles).  With the bias
   linear in γ, d = λ̄_γ − λ̄_{γ/2} estimates the bias of λ̄_{γ/2} (reported as
   ``bias``; ``error`` = sqrt(MCSE² + bias²)), and the ELBO lost to it is ∝ γ², so one
   more halving would gain about

       G = (ELBO(λ̄_{γ/2}) − ELBO(λ̄_γ)) / 4      (with elbo_fn), else
       G = (3/8) Σ_j max((d_j² − MCSE_{γ,j}² − MCSE_{γ/2,j}²) / scale_j², 0)

   nats.  The run stops when G ≤ ``gain_tol``, after ``max_halvings`` halvings, or when
   the next level (twice the steps of this one) would not fit in the step budget.
   When the budget ends first, the answer is the current average (or, if the level
   never became stationary, the average of its last steps) and ``converged`` is False.

The rule assumes a constant step size (optax's Adam at a fixed rate, plain SGD).  A
decaying one (AdaGrad, Stan's sequence) makes a slow creep look stationary, and the
rule may stop it early; the ELBO-rise guard catches part of that, not all.

API (stable; used by ``viax.fit``'s stochastic paths and by the minibatch driver):

    >>> rule = MCSEStop(tol=0.1).start(dim=P, scale=scale_or_fn, max_steps=10_000)
    >>> stop, message = rule.update(iterates)        # (chunk_len, P) flat iterates
    >>> # or, with running sums carried in the compiled state (large P):
    >>> stop, message = rule.update_sums(block_sums, block_counts)  # (K, P), (K,)
    >>> rule.step_scale      # multiply the optimiser's step by this (1, 0.5, ...)
    >>> rule.average, rule.mcse, rule.bias, rule.error, rule.summary()

``update`` returns ``(True, message)`` when the run should end; ``(False, message)``
otherwise — when the message is not empty, the step size was just halved
(``rule.step_scale`` changed).  ``rule.converged`` says whether the final level met its
tolerance; ``rule.finish()`` settles the answer when the budget ends first.
:func:`run_with_stopping` drives :func:`viax.infer.driver.run` under a rule.

References:
    Dhaka, Catalina, Andersen, Magnusson, Huggins & Vehtari (2020), "Robust, accurate
    stochastic optimization for variational inference", NeurIPS.
    Welandawe, Andersen, Vehtari & Huggins (2022), "Robust, automated, and accurate
    black-box variational inference", arXiv:2203.15945.
    Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization,
    folding, and localization: an improved R̂", Bayesian Analysis.
    Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science.
    Polyak & Juditsky (1992), "Acceleration of stochastic approximation by averaging".
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = [
    "IterateSum",
    "MCSEStop",
    "MCSETracker",
    "effective_sample_size",
    "fisher_scale",
    "iterate_sum_add",
    "iterate_sum_init",
    "robust_max",
    "STOP_RULES",
    "parse_stop_rule",
    "run_with_stopping",
    "stop_info",
    "split_rhat",
]


def robust_max(values: np.ndarray) -> float:
    """The largest value, ignoring the worst 1% of entries when there are more than 100
    (the ⌈0.99 P⌉-th smallest): P noisy per-coordinate statistics always have a few
    outliers, and a criterion on the plain max would never be met for P ~ 10⁴."""
    values = np.sort(np.asarray(values, dtype=float).ravel())
    if values.size == 0:
        return 0.0
    return float(values[math.ceil(0.99 * values.size) - 1])


def split_rhat(draws: np.ndarray, num_segments: int = 4) -> np.ndarray:
    """Classical R̂ per column of ``draws`` (n, P) split into ``num_segments`` consecutive
    segments (the first n mod num_segments rows dropped); 1 where a column is constant."""
    draws = np.asarray(draws, dtype=float)
    n = draws.shape[0] // num_segments
    if n < 2:
        return np.full(draws.shape[1:], np.inf)
    segments = draws[draws.shape[0] - n * num_segments :].reshape(num_segments, n, -1)
    within = segments.var(axis=1, ddof=1).mean(axis=0)
    between_over_n = segments.mean(axis=1).var(axis=0, ddof=1)
    pooled = (n - 1) / n * within + between_over_n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(pooled / within)
    return np.where(within > 0, rhat, np.where(between_over_n > 0, np.inf, 1.0))


def effective_sample_size(draws: np.ndarray) -> np.ndarray:
    """ESS per column of one chain ``draws`` (n, P): Geyer's initial monotone sequence
    estimator on FFT autocorrelations, as in Stan and ArviZ; n where a column is constant.

    τ = −1 + 2 Σ_{k≥0} Γ_k,  Γ_k = ρ_{2k} + ρ_{2k+1}, summed while Γ_k > 0 and made
    monotone; ESS = n / τ (at most n·log10(n), ArviZ's cap for antithetic chains)."""
    x = np.asarray(draws, dtype=float)
    n = x.shape[0]
    if n < 4:
        return np.full(x.shape[1:], float(n))
    x = x - x.mean(axis=0)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(x, n=size, axis=0)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=0)[:n] / n
    variance = acov[0]
    constant = ~(variance > 0)
    rho = acov / np.where(constant, 1.0, variance)
    num_pairs = n // 2
    pairs = rho[: 2 * num_pairs].reshape(num_pairs, 2, -1).sum(axis=1)
    # Initial positive sequence: keep pairs up to the first non-positive one...
    positive = np.cumprod(pairs > 0, axis=0).astype(bool)
    pairs = np.where(positive, pairs, 0.0)
    # ... made monotone non-increasing.
    pairs = np.minimum.accumulate(np.where(positive, pairs, np.inf), axis=0)
    pairs = np.where(positive, pairs, 0.0)
    tau = -1.0 + 2.0 * pairs.sum(axis=0)
    tau = np.maximum(tau, 1.0 / np.log10(max(n, 10)))
    return np.where(constant, float(n), n / tau)


class IterateSum(NamedTuple):
    """Running sum of flattened iterates, carried in a compiled state when the (steps, P)
    trace is too large to return per step: the host reads it after each chunk, feeds
    ``rule.update_sums(total[None], count[None])`` and resets it."""

    total: jax.Array  # (P,) Σ_t λ_t since the last reset
    count: jax.Array  # int: steps summed


def iterate_sum_init(dim: int, dtype=jnp.float64) -> IterateSum:
    return IterateSum(jnp.zeros(dim, dtype), jnp.asarray(0, jnp.int32))


def iterate_sum_add(acc: IterateSum, params) -> IterateSum:
    """``acc`` plus one iterate (a pytree, flattened in ``ravel_pytree`` order)."""
    flat = ravel_pytree(params)[0]
    return IterateSum(acc.total + flat.astype(acc.total.dtype), acc.count + 1)


@functools.lru_cache(maxsize=64)
def _fisher_fn(family, num_draws: int):
    def run(params, rng_key):
        draws = family.sample(params, rng_key, num_draws)
        leaves = jax.tree_util.tree_leaves(draws) if isinstance(draws, dict) else None

        def score(i):
            one = jax.tree_util.tree_map(lambda a: a[i], draws) if leaves is not None else draws[i]
            grad = jax.grad(lambda p: jnp.sum(family.log_prob(p, one)))(params)
            return ravel_pytree(grad)[0]

        scores = jax.lax.map(score, jnp.arange(num_draws))
        return jnp.mean(scores**2, axis=0)

    return jax.jit(run)


def fisher_scale(family, params, rng_key, num_draws: int = 512) -> np.ndarray:
    """1 / sqrt(F_jj) per flattened parameter of q: F_jj = E_q[(∂_j log q(z; λ))²], the
    diagonal Fisher information, by Monte Carlo over ``num_draws`` draws of q.  A
    coordinate that q does not depend on gets +inf (its error never matters).

    ``family`` needs ``sample(params, rng_key, n)`` and ``log_prob(params, z)``: the
    Gaussian families of :mod:`viax.families` and BBVI's mean-field product."""
    fisher = np.asarray(_fisher_fn(family, num_draws)(params, rng_key))
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(fisher)


def _check(name, value, kind, minimum, strict=False):
    bad = isinstance(value, bool) or not isinstance(value, kind)
    if not bad:
        bad = not (value > minimum if strict else value >= minimum)
    if bad:
        relation = ">" if strict else ">="
        raise ValueError(f"MCSEStop: {name} must be a number {relation} {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class MCSEStop:
    """The stopping rule's settings (validated here); :meth:`start` makes its tracker.

    Args:
        tol: a level is done when MCSE_j ≤ tol · scale_j for every coordinate.
        rhat_threshold: the window is stationary when R̂ < this for every coordinate.
        drift_tol: coordinates whose segment means stay within drift_tol · scale_j of
            each other count as stationary.
        gain_tol: nats.  The averaging window is cut to its later half while the ELBO
            at the average of its later half beats that of its earlier half by more
            than this; no further halving when one is predicted to gain at most this.
        min_window: the shortest stationarity window, in steps.
        block_len: steps per block (block means feed R̂ and the ESS); blocks are merged
            pairwise when more than ``max_blocks`` are held, so memory stays
            O(max_blocks · P).
        min_blocks: the fewest blocks averaged before the MCSE is trusted.
        num_segments: segments of the window for split-R̂.
        max_halvings: step-size halvings at most (0: Dhaka et al.'s rule alone).
    """

    tol: float = 0.1
    rhat_threshold: float = 1.1
    drift_tol: float = 0.3
    gain_tol: float = 0.02
    min_window: int = 500
    block_len: int = 10
    min_blocks: int = 20
    max_blocks: int = 256
    num_segments: int = 4
    max_halvings: int = 2

    def __post_init__(self):
        _check("tol", self.tol, numbers.Real, 0.0, strict=True)
        _check("rhat_threshold", self.rhat_threshold, numbers.Real, 1.0, strict=True)
        _check("drift_tol", self.drift_tol, numbers.Real, 0.0)
        _check("gain_tol", self.gain_tol, numbers.Real, 0.0)
        for name in ("min_window", "block_len", "min_blocks"):
            _check(name, getattr(self, name), numbers.Integral, 1)
        _check("num_segments", self.num_segments, numbers.Integral, 2)
        _check("max_blocks", self.max_blocks, numbers.Integral, 4 * max(self.min_blocks, 8))
        _check("max_halvings", self.max_halvings, numbers.Integral, 0)

    def start(
        self,
        dim: int,
        scale: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        max_steps: int | None = None,
        elbo_fn: Callable[[np.ndarray], float] | None = None,
    ) -> MCSETracker:
        """A fresh tracker for ``dim`` flattened parameters.

        Args:
            scale: the posterior scale per coordinate (P,), or a function of the current
                average returning it (called at each check), or None for 1 (an absolute
                tolerance).
            max_steps: the run's step budget, so that no halving starts that cannot end.
            elbo_fn: optional ``flat_params -> ELBO estimate``, with the same draws at
                every call (common random numbers, so that differences are precise):
                enables the ELBO checks (drift of the average, predicted gain).
        """
        return MCSETracker(self, int(dim), scale, max_steps, elbo_fn)


class _Level(NamedTuple):
    step_scale: float
    start: int  # step at which averaging began
    steps: int  # steps run at this level
    average: np.ndarray
    mcse: np.ndarray
    scale: np.ndarray
    elbo: float  # elbo_fn(average), nan without elbo_fn


class MCSETracker:
    """The state of :class:`MCSEStop` over one run (host side; see the module docstring).

    Attributes:
        phase: ``"transient"`` (waiting for R̂), ``"averaging"`` or ``"done"``.
        step_scale: the multiplier the caller applies to its step size (halvings).
        steps: iterates seen.  converged: the final level met the tolerance.
        stop_reason: ``"mcse"``, ``"gain"``, ``"max_halvings"``, ``"budget"`` or ``""``.
        rhat: the last robust-max R̂ of the window (nan before the first check);
            rhat_values: per coordinate (1 where the drift is negligible).
        history: ``(step, event)`` for each decision.
    """

    def __init__(self, config: MCSEStop, dim: int, scale, max_steps, elbo_fn):
        self.config = config
        self.dim = dim
        self._scale = scale
        self._elbo_fn = elbo_fn
        self.max_steps = max_steps
        self.step_scale = 1.0
        self.steps = 0
        self.phase = "transient"
        self.converged = False
        self.stop_reason = ""
        self.rhat = float("nan")
        self.rhat_values = np.full(dim, np.nan)
        self.levels: list[_Level] = []
        self.history: list[tuple[int, str]] = []
        self._drift_tol = config.drift_tol
        self._min_level_steps = 0
        self._last = np.zeros(dim)
        self._mcse = np.full(dim, np.nan)
        self._relative = np.full(dim, np.nan)
        self._scale_now = np.ones(dim)
        self._message = ""
        self._scale_calls = 0
        self._scale_cache = None
        self._new_level()

    # -- feeding ---------------------------------------------------------------------

    def update(self, iterates: np.ndarray, objective: Any = None) -> tuple[bool, str]:
        """Feed a chunk of flattened iterates (chunk_len, P), in step order."""
        del objective  # accepted for the API; the rule looks at the parameters
        iterates = np.asarray(iterates, dtype=float)
        if iterates.ndim != 2 or iterates.shape[1] != self.dim:
            raise ValueError(
                f"MCSETracker.update: iterates must be (chunk_len, {self.dim}), got "
                f"{iterates.shape}"
            )
        if iterates.shape[0] == 0:
            return self.phase == "done", self._message
        self._last = iterates[-1]
        data = np.concatenate([self._pending, iterates]) if self._pending.size else iterates
        num = data.shape[0] // self._block_len * self._block_len
        self._pending = data[num:]
        if num:
            sums = data[:num].reshape(-1, self._block_len, self.dim).sum(axis=1)
            self._add_blocks(sums, np.full(sums.shape[0], float(self._block_len)))
        self.steps += iterates.shape[0]
        return self._decide()

    def update_sums(self, sums: np.ndarray, counts: np.ndarray, last=None) -> tuple[bool, str]:
        """Feed block sums (K, P) of flattened iterates with their step counts (K,)
        (e.g. an :class:`IterateSum` per chunk).  ``last``: the final iterate (P,)
        (default: the last block's mean)."""
        sums = np.asarray(sums, dtype=float).reshape(-1, self.dim)
        counts = np.asarray(counts, dtype=float).reshape(-1)
        keep = counts > 0
        sums, counts = sums[keep], counts[keep]
        if counts.size == 0:
            return self.phase == "done", self._message
        self._last = np.asarray(last, dtype=float) if last is not None else sums[-1] / counts[-1]
        self._add_blocks(sums, counts)
        self.steps += int(counts.sum())
        return self._decide()

    def finish(self) -> None:
        """The budget ran out first: if the level never became stationary, the answer
        becomes the average of its last segment (better than the last iterate of a noisy
        optimiser; still flagged: ``converged`` stays False), with its MCSE."""
        if self.phase != "transient" or self._counts.size == 0:
            return
        num = max(1, int(self._counts.size // (2 * self.config.num_segments)))
        self._averaging_block = self._counts.size - num
        self._averaging_start = self.steps - int(self._counts[-num:].sum())
        self.phase = "averaging"
        means = self._sums[self._averaging_block :] / self._counts[self._averaging_block :, None]
        self._measure(means)
        self.history.append(
            (
                self.steps,
                f"budget spent before stationarity: averaging the last "
                f"{self.steps - self._averaging_start} steps",
            )
        )

    # -- answers ---------------------------------------------------------------------

    @property
    def average(self) -> np.ndarray:
        """The answer (P,): the average of the current level once it averages, else the
        last finished level's average, else the last iterate."""
        if self.phase in ("averaging", "done") and self._counts.size:
            return self._window_average(self._averaging_block, self._counts.size)
        if self.levels:
            return self.levels[-1].average
        return self._last

    @property
    def mcse(self) -> np.ndarray:
        """MCSE per coordinate of :attr:`average` (P,); nan while unknown."""
        if self.phase in ("averaging", "done"):
            return self._mcse
        if self.levels:
            return self.levels[-1].mcse
        return np.full(self.dim, np.nan)

    @property
    def bias(self) -> np.ndarray:
        """|λ̄_γ − λ̄_{γ/2}| per coordinate (P,), the estimated bias of the final level's
        average due to its step size (bias ∝ γ); nan before a halving has been judged."""
        if len(self.levels) >= 2 and self.phase == "done":
            return np.abs(self.levels[-1].average - self.levels[-2].average)
        return np.full(self.dim, np.nan)

    @property
    def error(self) -> np.ndarray:
        """sqrt(MCSE² + bias²) per coordinate (P,), the bias counted as 0 where unknown."""
        return np.sqrt(self.mcse**2 + np.nan_to_num(self.bias) ** 2)

    @property
    def relative_mcse(self) -> np.ndarray:
        """MCSE_j / scale_j (P,)."""
        if self.phase in ("averaging", "done"):
            return self._relative
        if self.levels:
            return self.levels[-1].mcse / self.levels[-1].scale
        return np.full(self.dim, np.nan)

    def summary(self) -> dict:
        """What a Result's info reports."""
        relative = self.relative_mcse
        averaging = self.phase in ("averaging", "done")
        return {
            "stop_rule": "mcse",
            "stop_reason": self.stop_reason or "max_steps",
            "mcse_max_relative": robust_max(relative) if relative.size else float("nan"),
            "mcse_rms_relative": float(np.sqrt(np.mean(relative**2)))
            if relative.size
            else float("nan"),
            "averaged_steps": int(self._counts[self._averaging_block :].sum()) if averaging else 0,
            "step_scale": self.step_scale,
            "halvings": round(-math.log2(self.step_scale)),
            "rhat": self.rhat,
            "stop_events": list(self.history),
        }

    # -- internals -------------------------------------------------------------------

    def _new_level(self):
        self._sums = np.zeros((0, self.dim))
        self._counts = np.zeros(0)
        self._pending = np.zeros((0, self.dim))
        self._block_len = self.config.block_len
        self._averaging_block = 0
        self._averaging_start = self.steps
        self._level_start = self.steps

    def _window_average(self, first, last):
        return self._sums[first:last].sum(axis=0) / self._counts[first:last].sum()

    def _add_blocks(self, sums, counts):
        self._sums = np.concatenate([self._sums, sums])
        self._counts = np.concatenate([self._counts, counts])
        while self._counts.size > self.config.max_blocks:
            # Merge adjacent pairs from the end, so the averaging start stays on a
            # block boundary (it is moved down to the boundary of its pair).
            odd = self._counts.size % 2
            body_s = self._sums[odd:].reshape(-1, 2, self.dim).sum(axis=1)
            body_c = self._counts[odd:].reshape(-1, 2).sum(axis=1)
            self._sums = np.concatenate([self._sums[:odd], body_s])
            self._counts = np.concatenate([self._counts[:odd], body_c])
            if self._averaging_block > odd:
                self._averaging_block = odd + (self._averaging_block - odd) // 2
            self._block_len *= 2

    def _scale_at(self, average):
        scale = self._scale
        if scale is None:
            return np.ones(self.dim)
        if callable(scale):
            # q's scale moves slowly once the run is near stationary: recomputing it at
            # every fifth check keeps a costly scale function (512 draws of q's score)
            # off the per-chunk path.
            self._scale_calls += 1
            if self._scale_calls % 5 == 1 or self._scale_cache is None:
                self._scale_cache = scale(average)
            value = self._scale_cache
        else:
            value = scale
        value = np.broadcast_to(np.asarray(value, dtype=float), (self.dim,))
        return np.where(np.isfinite(value) & (value > 0), value, np.inf)

    def _stationary(self, means) -> tuple[float, np.ndarray]:
        """Robust-max split-R̂ of ``means`` (blocks, P), negligible drifts excused."""
        config = self.config
        rhat = split_rhat(means, config.num_segments)
        n = means.shape[0] // config.num_segments
        segments = means[means.shape[0] - n * config.num_segments :]
        segments = segments.reshape(config.num_segments, n, -1).mean(axis=1)
        spread = segments.max(axis=0) - segments.min(axis=0)
        negligible = spread <= self._drift_tol * self._scale_at(means.mean(axis=0))
        values = np.where(negligible, 1.0, rhat)
        return robust_max(values), values

    def _measure(self, means):
        ess = effective_sample_size(means)
        sd = means.std(axis=0, ddof=1) if means.shape[0] > 1 else np.full(self.dim, np.nan)
        self._mcse = sd / np.sqrt(ess)
        self._scale_now = self._scale_at(self.average)
        self._relative = self._mcse / self._scale_now

    def _cut_averaging(self, why: str):
        """Keep the later half of the averaging window."""
        self._averaging_block += (self._counts.size - self._averaging_block) // 2
        self._averaging_start = self._level_start + int(self._counts[: self._averaging_block].sum())
        self.history.append((self.steps, f"{why}: averaging from step {self._averaging_start}"))

    def _decide(self) -> tuple[bool, str]:
        config = self.config
        if self.phase == "done":
            return True, self._message
        if self.steps - self._level_start < self._min_level_steps:
            # A halved step size doubles the autocorrelation time: a level shorter than
            # the one before would judge R̂ and the ESS on too few independent moves.
            return False, ""
        means = self._sums / self._counts[:, None]
        if self.phase == "transient":
            window_steps = max(config.min_window, self._counts.sum() / 2)
            tail = np.cumsum(self._counts[::-1])
            num = int(np.searchsorted(tail, window_steps) + 1)
            if tail[-1] < window_steps or num < config.num_segments * 5:
                return False, ""
            self.rhat, self.rhat_values = self._stationary(means[-num:])
            if not self.rhat < config.rhat_threshold:
                return False, ""
            self.phase = "averaging"
            self._averaging_block = self._counts.size - num
            self._averaging_start = self.steps - int(tail[num - 1])
            self.history.append(
                (
                    self.steps,
                    f"stationary (R̂ {self.rhat:.3f}): averaging from step {self._averaging_start}",
                )
            )
        window = means[self._averaging_block :]
        if window.shape[0] >= 2 * config.min_blocks:
            rhat, _ = self._stationary(window)
            if rhat >= config.rhat_threshold:
                self._cut_averaging(f"drift in the averaging window (R̂ {rhat:.3f})")
                window = means[self._averaging_block :]
        if window.shape[0] < config.min_blocks:
            return False, ""
        self._measure(window)
        worst = robust_max(self._relative)
        if not worst <= config.tol:
            return False, ""
        if self._elbo_fn is not None:
            first, last = self._averaging_block, self._counts.size
            middle = first + (last - first) // 2
            rise = float(self._elbo_fn(self._window_average(middle, last))) - float(
                self._elbo_fn(self._window_average(first, middle))
            )
            if rise > config.gain_tol:
                self._cut_averaging(
                    f"ELBO still rising ({rise:.3g} nats between the halves of the window)"
                )
                return False, ""
        return self._level_done(worst)

    def _level_done(self, worst) -> tuple[bool, str]:
        config = self.config
        average = self.average
        elbo = float(self._elbo_fn(average)) if self._elbo_fn is not None else float("nan")
        level = _Level(
            self.step_scale,
            self._averaging_start,
            self.steps - self._level_start,
            average.copy(),
            self._mcse.copy(),
            self._scale_now.copy(),
            elbo,
        )
        self.levels.append(level)
        self.converged = True
        done = f"MCSE of the averaged iterate ≤ {worst:.3g} posterior scales (tol {config.tol})"
        if config.max_halvings == 0:
            return self._finish("mcse", f"{done}; stationary by R̂ {self.rhat:.3f}")
        if len(self.levels) >= 2:
            previous = self.levels[-2]
            if np.isfinite(level.elbo) and np.isfinite(previous.elbo):
                # Bias ∝ γ, so the ELBO lost to it ∝ γ²: L_prev = 4 L, the difference is
                # 3 L, and one more halving gains ¾ L.
                gain = max(level.elbo - previous.elbo, 0.0) / 4.0
            else:
                d = (level.average - previous.average) / level.scale
                noise = (level.mcse**2 + previous.mcse**2) / level.scale**2
                gain = 0.375 * float(np.sum(np.maximum(np.nan_to_num(d**2 - noise), 0.0)))
            self.history.append((self.steps, f"predicted gain of halving {gain:.3g} nats"))
            if gain <= config.gain_tol:
                return self._finish(
                    "gain",
                    f"{done}; halving the step size again would gain ≈{gain:.2g} nats "
                    f"≤ gain_tol {config.gain_tol}",
                )
        if len(self.levels) > config.max_halvings:
            return self._finish("max_halvings", f"{done} after {config.max_halvings} halvings")
        if self.max_steps is not None and self.steps + 2 * level.steps > self.max_steps:
            return self._finish(
                "budget", f"{done}; a level at half the step size would not fit num_steps"
            )
        self.step_scale *= 0.5
        self.phase = "transient"
        self._min_level_steps = level.steps
        self._new_level()
        message = f"{done}; halving the step size (×{self.step_scale:g})"
        self.history.append((self.steps, message))
        return False, message

    def _finish(self, reason, message) -> tuple[bool, str]:
        self.phase = "done"
        self.stop_reason = reason
        self._message = message
        self.history.append((self.steps, message))
        return True, message


def run_with_stopping(
    step_fn: Callable,
    state: Any,
    data: Any,
    rng_key: jax.Array,
    num_steps: int,
    chunk_size: int,
    rule: MCSETracker,
    iterates_fn: Callable[[Any], np.ndarray],
    on_chunk: Callable[[Any, Any, int], None] | None = None,
    **run_kwargs,
):
    """:func:`viax.infer.driver.run` under ``rule``: after each chunk the flattened
    iterates ``iterates_fn(chunk_info)`` (chunk_len, P) go to ``rule.update``; when the
    rule halves the step size the run resumes with ``state.guard.step_scale`` halved (a
    new driver segment, keys folded with the segment's index, the same compiled chunk).
    ``on_chunk(state, chunk_info, steps_done)`` sees every chunk first (host
    bookkeeping).  Returns one
    :class:`~viax.infer.driver.RunOutput` for the whole run; its ``converged`` is the
    rule's verdict (False when ``num_steps`` ran out first)."""
    from viax.infer.driver import RunOutput, run

    outputs: list[RunOutput] = []
    done, segment, stopped = 0, 0, False
    applied = rule.step_scale
    while done < num_steps and not stopped:
        offset = done

        def check(state, chunk_info, steps_done, offset=offset, applied=applied):
            nonlocal stopped
            if on_chunk is not None:
                on_chunk(state, chunk_info, offset + steps_done)
            stop, message = rule.update(iterates_fn(chunk_info))
            if stop:
                stopped = True
                return rule.converged, message
            if rule.step_scale != applied:
                return False, message  # end this segment; the next runs at the new scale
            return None

        key = rng_key if segment == 0 else jax.random.fold_in(rng_key, segment)
        output = run(step_fn, state, data, key, num_steps - done, chunk_size, check, **run_kwargs)
        outputs.append(output)
        done += output.num_steps
        state = output.state
        segment += 1
        if rule.step_scale != applied and not stopped:
            guard = state.guard
            factor = rule.step_scale / applied
            state = state._replace(guard=guard._replace(step_scale=guard.step_scale * factor))
            applied = rule.step_scale
    if stopped:
        converged, message = rule.converged, rule.history[-1][1]
    else:
        if rule.phase != "transient":
            where = "averaging"
        elif np.isnan(rule.rhat):
            where = (
                f"too few steps for a stationarity check (min_window {rule.config.min_window}"
                "); the answer is the average of the last steps"
            )
        else:
            where = (
                f"never stationary (R̂ {rule.rhat:.3g} ≥ {rule.config.rhat_threshold}); the "
                "answer is the average of the last steps"
            )
        rule.finish()
        worst = robust_max(rule.relative_mcse)
        converged = False
        message = (
            f"reached the maximum of {num_steps} steps before the stopping rule was met "
            f"({where}: MCSE {worst:.3g} posterior scales, tol {rule.config.tol})"
        )
    steady = [o.seconds_per_step for o in outputs if o.seconds_per_step > 0]
    return RunOutput(
        state=state,
        trace=np.concatenate([o.trace for o in outputs]),
        num_steps=done,
        converged=bool(converged),
        message=message,
        wall_time=float(sum(o.wall_time for o in outputs)),
        compile_time=float(outputs[0].compile_time),
        num_backoffs=int(sum(o.num_backoffs for o in outputs)),
        seconds_per_step=float(np.median(steady)) if steady else 0.0,
    )


STOP_RULES = ("mcse", "stan")


def parse_stop_rule(stop_rule) -> MCSEStop | str:
    """``"mcse"`` (default settings), an :class:`MCSEStop` (your settings) or ``"stan"``
    (Stan's relative-ELBO rule); anything else is refused by name."""
    if isinstance(stop_rule, MCSEStop):
        return stop_rule
    if isinstance(stop_rule, str) and stop_rule in STOP_RULES:
        return MCSEStop() if stop_rule == "mcse" else "stan"
    raise ValueError(
        f"unknown stop_rule {stop_rule!r}: use 'mcse' (default: R̂ stationarity, iterate "
        "averaging, Monte Carlo error; Dhaka et al. 2020, Welandawe et al. 2022), "
        "viax.infer.stopping.MCSEStop(tol=...) for other settings, or 'stan' (Stan's "
        "relative ELBO change)"
    )


def stop_info(tracker: MCSETracker | None, unravel: Callable, converged: bool, dim: int) -> dict:
    """The ``Result.info`` entries of a stochastic run: ``stop_rule``, ``stop_reason``,
    ``mcse`` (a pytree like the params; nan where unknown: Stan's rule returns the last
    iterate, whose error it does not estimate), ``bias`` (the step size's, from the last
    halving; nan where not judged), ``error`` = sqrt(mcse² + bias²),
    ``mcse_max_relative`` (the largest MCSE_j / scale_j), ``mcse_rms_relative`` and the
    rule's events."""
    if tracker is None:
        nan = jax.tree_util.tree_map(np.asarray, unravel(jnp.full(dim, jnp.nan)))
        return {
            "stop_rule": "stan",
            "stop_reason": "stan" if converged else "max_steps",
            "mcse": nan,
            "bias": nan,
            "error": nan,
            "mcse_max_relative": float("nan"),
            "mcse_rms_relative": float("nan"),
        }
    info = tracker.summary()
    for name in ("mcse", "bias", "error"):
        value = unravel(jnp.asarray(getattr(tracker, name)))
        info[name] = jax.tree_util.tree_map(np.asarray, value)
    return info
