"""When to stop a stochastic optimisation: stationarity by R̂, then iterate averaging
until the Monte Carlo error of the average is small (host side, between chunks).

A stochastic optimiser with a fixed (or slowly shrinking) step size does not converge
to a point: after a transient, its iterates λ_t wander around the optimum λ* like a
Markov chain in its stationary distribution (Dhaka et al. 2020).  So the question
"are we done?" is the question MCMC asks, answered with MCMC's tools:

1. **Stationarity.**  The iterates of the current step-size level are cut into blocks
   of ``block_len`` steps; the window (the later half of the level, at least
   ``min_window`` steps) is split into ``num_segments`` consecutive segments and the
   classical split-R̂ is computed per coordinate on the block means
   (Gelman & Rubin 1992; Vehtari et al. 2021):

       W = mean_s Var_s,  B/n = Var_s(mean_s),  R̂ = sqrt(((n−1)/n W + B/n) / W)

   with n block means per segment.  A drift (the transient) makes the segment means
   differ, so R̂ > 1.  The window is stationary when R̂ < ``rhat_threshold`` for every
   coordinate (for P > 100 coordinates: all but the worst 1%, since P noisy R̂'s always
   have a few large ones).

2. **Averaging.**  From the start of the stationary window on, the returned parameters
   are the Polyak–Ruppert average λ̄ = (1/T) Σ_t λ_t (Polyak & Juditsky 1992).  Its
   Monte Carlo standard error comes from the block means m_b (b = 1..K) treated as a
   chain: ESS_j by Geyer's initial monotone sequence on their autocorrelations (the
   ESS of ArviZ / Stan, Vehtari et al. 2021), and

       MCSE_j = sd_b(m_{b,j}) / sqrt(ESS_j).

   The level has converged when MCSE_j ≤ ``tol`` · scale_j for every coordinate (the
   same 1% allowance for large P), with at least ``min_blocks`` blocks averaged.
   ``scale_j`` is the posterior scale of coordinate j: by default 1/sqrt(F_jj), the
   Fisher information of q in that parameter (q's sd for a Gaussian mean, 1/√2 for a
   log-scale, 1/sqrt(p(1−p)) for a Bernoulli logit; :func:`fisher_scale`), so that
   ½ Σ_j (MCSE_j / scale_j)² approximates the expected KL(q_λ̄ ‖ q_E[λ̄]) in nats.

3. **Step-size halving** (Welandawe et al. 2022, RAABBVI).  A fixed step size γ leaves
   a bias O(γ) in the stationary mean.  After a level converges the rule asks the
   caller to halve the step size (:attr:`MCSETracker.step_scale`) and repeats 1–2.
   With the bias linear in γ, the difference d = λ̄_γ − λ̄_{γ/2} estimates the bias of
   λ̄_{γ/2}, and one more halving would gain about

       G = (3/8) Σ_j max((d_j/scale_j)² − (MCSE_{γ,j}² + MCSE_{γ/2,j}²)/scale_j², 0)

   nats of ELBO (Fisher-diagonal approximation, the Monte Carlo part of d removed).
   The run stops when G ≤ ``gain_tol``, after ``max_halvings`` halvings, or when the
   next level (about twice the steps of this one) would not fit in the step budget.

API (stable; used by ``viax.fit``'s stochastic paths and by the minibatch driver):

    >>> rule = MCSEStop(tol=0.1).start(dim=P, scale=scale_or_fn, max_steps=10_000)
    >>> stop, message = rule.update(iterates)        # (chunk_len, P) flat iterates
    >>> # or, with running sums carried in the compiled state (large P):
    >>> stop, message = rule.update_sums(block_sums, block_counts)  # (K, P), (K,)
    >>> rule.step_scale      # multiply the optimiser's step by this (1, 0.5, ...)
    >>> rule.average, rule.mcse, rule.relative_mcse, rule.summary()

``update`` returns ``(True, message)`` when the run should end (converged, or the
rule can promise no progress); ``(False, message)`` otherwise — when the message is
not empty, the step size was just halved (``rule.step_scale`` changed).
``rule.converged`` says whether the final level met its MCSE tolerance.

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
        tol: stop a level when MCSE_j ≤ tol · scale_j for every coordinate.
        rhat_threshold: the window is stationary when R̂ < this for every coordinate.
        min_window: the shortest stationarity window, in steps.
        block_len: steps per block (block means feed R̂ and the ESS); blocks are merged
            pairwise when more than ``max_blocks`` are held, so memory stays
            O(max_blocks · P).
        min_blocks: the fewest blocks averaged before the MCSE is trusted.
        num_segments: segments of the window for split-R̂.
        max_halvings: step-size halvings at most (0: Dhaka et al.'s rule alone).
        gain_tol: stop halving when one more halving is predicted to gain at most this
            many nats of ELBO.
    """

    tol: float = 0.1
    rhat_threshold: float = 1.1
    min_window: int = 200
    block_len: int = 10
    min_blocks: int = 20
    max_blocks: int = 256
    num_segments: int = 4
    max_halvings: int = 2
    gain_tol: float = 0.05

    def __post_init__(self):
        _check("tol", self.tol, numbers.Real, 0.0, strict=True)
        _check("rhat_threshold", self.rhat_threshold, numbers.Real, 1.0, strict=True)
        for name in ("min_window", "block_len", "min_blocks"):
            _check(name, getattr(self, name), numbers.Integral, 1)
        _check("num_segments", self.num_segments, numbers.Integral, 2)
        _check("max_blocks", self.max_blocks, numbers.Integral, 2 * max(self.min_blocks, 8))
        _check("max_halvings", self.max_halvings, numbers.Integral, 0)
        _check("gain_tol", self.gain_tol, numbers.Real, 0.0)

    def start(
        self,
        dim: int,
        scale: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        max_steps: int | None = None,
    ) -> MCSETracker:
        """A fresh tracker for ``dim`` flattened parameters.  ``scale``: the posterior
        scale per coordinate (P,), or a function of the current average returning it
        (called at each MCSE check), or None for 1 (absolute tolerance).  ``max_steps``:
        the run's step budget, so that no halving is started that cannot finish."""
        return MCSETracker(self, int(dim), scale, max_steps)


class _Level(NamedTuple):
    step_scale: float
    start: int  # step at which averaging began
    steps: int  # steps run at this level
    average: np.ndarray
    mcse: np.ndarray
    scale: np.ndarray


class MCSETracker:
    """The state of :class:`MCSEStop` over one run (host side; see the module docstring).

    Attributes:
        phase: ``"transient"`` (waiting for R̂), ``"averaging"`` or ``"done"``.
        step_scale: the multiplier the caller applies to its step size (halvings).
        steps: iterates seen.  converged: the final level met the tolerance.
        stop_reason: ``"mcse"``, ``"gain"``, ``"max_halvings"``, ``"budget"`` or ``""``.
        rhat: the last robust-max R̂ of the window (nan before the first check).
    """

    def __init__(self, config: MCSEStop, dim: int, scale, max_steps: int | None):
        self.config = config
        self.dim = dim
        self._scale = scale
        self.max_steps = max_steps
        self.step_scale = 1.0
        self.steps = 0
        self.phase = "transient"
        self.converged = False
        self.stop_reason = ""
        self.rhat = float("nan")
        self.levels: list[_Level] = []
        self.history: list[tuple[int, str]] = []  # (step, event)
        self._block_len = config.block_len
        self._level_start = 0
        self._averaging_start = 0
        self._new_level()
        self._pending = np.zeros((0, dim))  # iterates not yet filling a block
        self._last = np.zeros(dim)
        self._mcse = np.full(dim, np.nan)
        self._relative = np.full(dim, np.nan)
        self._scale_now = np.ones(dim)

    # -- feeding ---------------------------------------------------------------------

    def update(self, iterates: np.ndarray, objective: Any = None) -> tuple[bool, str]:
        """Feed a chunk of flattened iterates (chunk_len, P), in step order."""
        del objective  # accepted for the API; the rule looks at the parameters only
        iterates = np.asarray(iterates, dtype=float)
        if iterates.ndim != 2 or iterates.shape[1] != self.dim:
            raise ValueError(
                f"MCSETracker.update: iterates must be (chunk_len, {self.dim}), got "
                f"{iterates.shape}"
            )
        if iterates.shape[0] == 0:
            return False, ""
        self._last = iterates[-1]
        data = np.concatenate([self._pending, iterates]) if self._pending.size else iterates
        num = data.shape[0] // self._block_len * self._block_len
        self._pending = data[num:]
        if num:
            sums = data[:num].reshape(-1, self._block_len, self.dim).sum(axis=1)
            self._add_blocks(sums, np.full(sums.shape[0], self._block_len))
        self.steps += iterates.shape[0]
        return self._decide()

    def update_sums(self, sums: np.ndarray, counts: np.ndarray, last=None) -> tuple[bool, str]:
        """Feed block sums (K, P) of flattened iterates with their step counts (K,)
        (e.g. an :class:`IterateSum` per chunk).  ``last``: the final iterate (P,), the
        answer before averaging starts (default: the last block's mean)."""
        sums = np.asarray(sums, dtype=float).reshape(-1, self.dim)
        counts = np.asarray(counts, dtype=float).reshape(-1)
        keep = counts > 0
        sums, counts = sums[keep], counts[keep]
        if counts.size == 0:
            return False, ""
        self._last = np.asarray(last, dtype=float) if last is not None else sums[-1] / counts[-1]
        self._add_blocks(sums, counts)
        self.steps += int(counts.sum())
        return self._decide()

    # -- answers ---------------------------------------------------------------------

    @property
    def average(self) -> np.ndarray:
        """The answer: the average of the current level once it averages, else the last
        finished level's average, else the last iterate.  Shape (P,)."""
        if self.phase in ("averaging", "done") and self._counts.size:
            start = self._averaging_block
            return self._sums[start:].sum(axis=0) / self._counts[start:].sum()
        if self.levels:
            return self.levels[-1].average
        return self._last

    @property
    def mcse(self) -> np.ndarray:
        """MCSE per coordinate of :attr:`average` (P,); nan before averaging starts
        (the error is then unknown, not small)."""
        if self.phase in ("averaging", "done"):
            return self._mcse
        if self.levels:
            return self.levels[-1].mcse
        return np.full(self.dim, np.nan)

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
        return {
            "stop_rule": "mcse",
            "stop_reason": self.stop_reason or "max_steps",
            "mcse_max_relative": float(np.max(relative)) if relative.size else float("nan"),
            "mcse_rms_relative": float(np.sqrt(np.mean(relative**2)))
            if relative.size
            else float("nan"),
            "averaged_steps": int(self._counts[self._averaging_block :].sum())
            if self.phase in ("averaging", "done")
            else 0,
            "step_scale": self.step_scale,
            "halvings": round(-math.log2(self.step_scale)),
            "rhat": self.rhat,
            "stop_events": list(self.history),
        }

    # -- internals -------------------------------------------------------------------

    def _new_level(self):
        self._sums = np.zeros((0, self.dim))
        self._counts = np.zeros(0)
        self._averaging_block = 0
        self._level_start = self.steps

    def _add_blocks(self, sums, counts):
        self._sums = np.concatenate([self._sums, sums])
        self._counts = np.concatenate([self._counts, counts])
        while self._counts.size > self.config.max_blocks:
            # Merge adjacent pairs (the averaging start stays on a block boundary).
            odd = self._counts.size % 2
            head_s, head_c = self._sums[:odd], self._counts[:odd]
            body_s = self._sums[odd:].reshape(-1, 2, self.dim).sum(axis=1)
            body_c = self._counts[odd:].reshape(-1, 2).sum(axis=1)
            self._sums = np.concatenate([head_s, body_s])
            self._counts = np.concatenate([head_c, body_c])
            self._averaging_block = (
                odd + (self._averaging_block - odd + 1) // 2
                if (self._averaging_block > odd)
                else self._averaging_block
            )
            self._block_len *= 2

    def _scale_at(self, average):
        scale = self._scale
        if scale is None:
            return np.ones(self.dim)
        value = scale(average) if callable(scale) else scale
        value = np.broadcast_to(np.asarray(value, dtype=float), (self.dim,))
        return np.where(np.isfinite(value) & (value > 0), value, np.inf)

    def _decide(self) -> tuple[bool, str]:
        config = self.config
        if self.phase == "done":
            return True, self._message
        means = self._sums / self._counts[:, None]
        if self.phase == "transient":
            level_steps = self._counts.sum()
            window_steps = max(config.min_window, level_steps / 2)
            tail = np.cumsum(self._counts[::-1])
            num = int(np.searchsorted(tail, window_steps) + 1)
            if tail[-1] < window_steps or num < config.num_segments * 5:
                return False, ""
            rhat = split_rhat(means[-num:], config.num_segments)
            self.rhat = robust_max(rhat)
            if not self.rhat < config.rhat_threshold:
                return False, ""
            self.phase = "averaging"
            self._averaging_block = self._counts.size - num
            self._averaging_start = self.steps - int(tail[num - 1])
            self.history.append(
                (
                    self.steps,
                    f"stationary (R̂ {self.rhat:.3f}), averaging from step {self._averaging_start}",
                )
            )
        block_means = means[self._averaging_block :]
        if block_means.shape[0] < config.min_blocks:
            return False, ""
        average = self.average
        ess = effective_sample_size(block_means)
        sd = block_means.std(axis=0, ddof=1)
        self._mcse = sd / np.sqrt(ess)
        self._scale_now = self._scale_at(average)
        self._relative = self._mcse / self._scale_now
        worst = robust_max(self._relative)
        if not worst <= config.tol:
            return False, ""
        return self._level_done(average, worst)

    def _level_done(self, average, worst) -> tuple[bool, str]:
        config = self.config
        level = _Level(
            self.step_scale,
            self._averaging_start,
            self.steps - self._level_start,
            average.copy(),
            self._mcse.copy(),
            self._scale_now.copy(),
        )
        self.levels.append(level)
        self.converged = True
        done = f"MCSE of the averaged iterate ≤ {worst:.3g} posterior scales (tol {config.tol})"
        if config.max_halvings == 0:
            return self._finish("mcse", f"{done}; stationary by R̂ {self.rhat:.3f}")
        if len(self.levels) >= 2:
            previous = self.levels[-2]
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
        self._new_level()
        self._block_len = self.config.block_len
        self._pending = np.zeros((0, self.dim))
        message = f"{done}; halving the step size (×{self.step_scale:g})"
        self.history.append((self.steps, message))
        return False, message

    def _finish(self, reason, message) -> tuple[bool, str]:
        self.phase = "done"
        self.stop_reason = reason
        self._message = message
        self.history.append((self.steps, message))
        return True, message
