"""Result: what a fit returns — params, traces, verdicts — and what it turns into."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
import pandas as pd

from viax.families.gaussian import Family
from viax.infer.driver import jit_once
from viax.model import Target

__all__ = ["Result", "element_names"]


@functools.lru_cache(maxsize=128)
def _constrain_fn(target: Target):
    return jit_once(jax.vmap(target.constrain, in_axes=(0, None)))


@functools.lru_cache(maxsize=128)
def _sample_fn(family: Family, num_samples: int):
    return jit_once(lambda params, key: family.sample(params, key, num_samples))


def element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """``theta[0]``, ``theta[1]``, … (0-based, row-major) or ``name`` for a scalar."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


@dataclass(frozen=True, eq=False)
class Result:
    """The outcome of :func:`viax.fit`.

    Attributes:
        params: variational parameters of ``family`` in the unconstrained space.
        elbo_trace: objective per step, (num_steps,): the S-particle ELBO estimate for
            stochastic methods, the fixed-draw ELBO for the deterministic default.
        elbo, elbo_se: ELBO of the final q from 1000 fresh draws, with its Monte Carlo
            standard error.
        converged, message: the convergence verdict and why.
        num_steps, wall_time, compile_time: steps taken, seconds in all, seconds
            spent compiling.
        info: algorithm details (chosen η, MAP / preconditioner, Monte Carlo error).
    """

    method: str
    algorithm: str
    family: Family | str
    params: dict
    elbo_trace: np.ndarray
    elbo: float
    elbo_se: float
    converged: bool
    message: str
    num_steps: int
    wall_time: float
    compile_time: float
    target: Target | None = field(repr=False)
    data: dict = field(repr=False)
    info: dict = field(default_factory=dict, repr=False)
    # Methods whose q is not a Gaussian on the unconstrained space (the conjugate
    # engine) supply their own draws: sampler(num_samples, seed) -> {site: array}.
    sampler: Callable[[int, int], dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def __repr__(self):
        verdict = "converged" if self.converged else "NOT converged"
        family = getattr(self.family, "name", self.family)
        return (
            f"Result(method={self.method!r}, algorithm={self.algorithm!r}, family={family!r}, "
            f"elbo={self.elbo:.4f} ± {self.elbo_se:.2g}, "
            f"{verdict} after {self.num_steps} steps, {self.wall_time:.2f}s)"
        )

    # -- draws ---------------------------------------------------------------
    def sample_unconstrained(self, num_samples: int = 1000, seed: int = 0) -> jax.Array:
        """Draws of q in the unconstrained space, (num_samples, D)."""
        return _sample_fn(self.family, int(num_samples))(self.params, jax.random.PRNGKey(seed))

    def sample(self, num_samples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
        """Constrained draws: site name -> (num_samples, *site_shape), deterministic sites
        included."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.sampler is not None:
            return {k: np.asarray(v) for k, v in self.sampler(num_samples, seed).items()}
        positions = self.sample_unconstrained(num_samples, seed)
        values = _constrain_fn(self.target)(positions, self.data)
        return {k: np.asarray(v) for k, v in values.items()}

    def monte_carlo_error(self, num_repeats: int = 5, seed: int = 1) -> dict | None:
        """Monte Carlo standard error of q's mean from DADVI's fixed draws, per site, in
        the unconstrained space: the sd of the fitted means over ``num_repeats`` refits
        with independent draw sets (compiled code reused).  ``None`` for the
        stochastic optimisers, whose error is in the ELBO trace instead."""
        if self.algorithm != "dadvi":
            return None
        key = ("monte_carlo_error", num_repeats, seed)
        if key not in self.info:
            from viax.fit import refit_dadvi_means

            means = refit_dadvi_means(self, num_repeats, seed)
            se = np.std(means, axis=0, ddof=1)
            self.info[key] = {
                site.name: se[site.start : site.start + site.size].reshape(site.unconstrained_shape)
                for site in self.target.sites
            }
        return self.info[key]

    @property
    def mean_unconstrained(self) -> np.ndarray:
        return np.asarray(self.family.mean(self.params))

    @property
    def cov_unconstrained(self) -> np.ndarray:
        return np.asarray(self.family.covariance(self.params))

    # -- tables and objects --------------------------------------------------
    def summary(self, num_samples: int = 4000, seed: int = 0) -> pd.DataFrame:
        """mean, sd and 5%/50%/95% quantiles of every element of every site."""
        draws = self.sample(num_samples, seed)
        rows = {}
        for name, value in draws.items():
            flat = value.reshape(value.shape[0], -1)
            for i, label in enumerate(element_names(name, value.shape[1:])):
                x = flat[:, i]
                q = np.quantile(x, [0.05, 0.5, 0.95])
                rows[label] = {
                    "mean": x.mean(),
                    "sd": x.std(ddof=1),
                    "5%": q[0],
                    "50%": q[1],
                    "95%": q[2],
                }
        return pd.DataFrame.from_dict(rows, orient="index")

    def to_arviz(self, num_samples: int = 1000, seed: int = 0):
        """ArviZ InferenceData: ``posterior`` from draws (one chain), ``sample_stats``
        holding the ELBO trace (dimension ``step``), verdicts in ``attrs``."""
        import arviz as az
        import xarray as xr

        draws = self.sample(num_samples, seed)
        posterior = az.from_dict(posterior={k: v[None] for k, v in draws.items()}).posterior
        attrs = {
            "inference_library": "viax",
            "method": self.method,
            "algorithm": self.algorithm,
            "family": str(getattr(self.family, "name", self.family)),
            "elbo": float(self.elbo),
            "elbo_se": float(self.elbo_se),
            "converged": int(self.converged),
            "num_steps": int(self.num_steps),
            "message": self.message,
        }
        posterior.attrs.update(attrs)
        stats = xr.Dataset(
            {"elbo_trace": (("step",), np.asarray(self.elbo_trace))},
            coords={"step": np.arange(1, len(self.elbo_trace) + 1)},
            attrs=attrs,
        )
        return az.InferenceData(posterior=posterior, sample_stats=stats)

    def plot_elbo(self, ax=None, path: str | None = None):
        """ELBO trace with a moving-average line; saved to ``path`` when given."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        trace = np.asarray(self.elbo_trace)
        steps = np.arange(1, len(trace) + 1)
        ax.plot(steps, trace, lw=0.6, alpha=0.5, label="ELBO per step")
        window = max(1, len(trace) // 50)
        if window > 1:
            smooth = np.convolve(trace, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"moving average ({window})")
        finite = trace[np.isfinite(trace)]
        if finite.size:
            lo = np.quantile(finite, 0.05)
            hi = finite.max()
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        ax.axhline(self.elbo, color="k", ls="--", lw=0.8, label=f"final ELBO {self.elbo:.3f}")
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO")
        verdict = "converged" if self.converged else "not converged"
        family = getattr(self.family, "name", self.family)
        ax.set_title(f"{self.method} / {self.algorithm} / {family}: {verdict}")
        ax.legend(loc="lower right", fontsize=8)
        if path is not None and fig is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
        return ax


def elbo_estimate(target: Target, family: Family, params, data, seed: int, num_samples=1000):
    """ELBO and its Monte Carlo standard error from fresh draws of q."""
    values = _elbo_terms_fn(target, family, num_samples)(params, jax.random.PRNGKey(seed), data)
    return mean_and_se(np.asarray(values))


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and Monte Carlo standard error; (-inf, nan) if any value is not finite."""
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        return float("-inf"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


@functools.lru_cache(maxsize=128)
def _elbo_terms_fn(target: Target, family: Family, num_samples: int):
    from viax.estimators.reparam import elbo_terms

    def run(params, key, data):
        return elbo_terms(family, lambda z: target.log_density(z, data), params, key, num_samples)

    return jit_once(run)
