"""Result: what a fit returns — params, traces, verdicts — and what it turns into."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax
import numpy as np

from viax.families.gaussian import Family
from viax.infer.driver import jit_once
from viax.model import Target

if TYPE_CHECKING:  # pandas costs a quarter of a second to import: only for tables
    import pandas as pd

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
        info: algorithm details (chosen η, MAP / preconditioner, Monte Carlo error;
            ``seconds_per_step``: steady cost of a step, progress bar and convergence
            check included, the median over the chunks after the first).
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
    # Such methods may also supply log weights: log_weights_fn(num_samples, seed) ->
    # (num_samples,) array of log p(x, z) − log q(z) for z ~ q, enabling the evidence
    # estimates and k̂.
    log_weights_fn: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False)
    khat: float = float("nan")  # PSIS k̂ of p/q on the draws of the final ELBO estimate
    # Learned model parameters θ (numpyro.param sites, constrained), by site name; a
    # network's value is its pytree of weights (viax.infer.learn).
    model_params: dict = field(default_factory=dict, repr=False)
    # Held-out evidence of an amortized q: evidence_fn(data, num_samples, seed) ->
    # viax.infer.learn.RowEvidence.
    evidence_fn: Callable | None = field(default=None, repr=False)

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

    def sample(
        self, num_samples: int = 1000, seed: int = 0, importance_resample: bool = False
    ) -> dict[str, np.ndarray]:
        """Constrained draws: site name -> (num_samples, *site_shape), deterministic sites
        included.  ``importance_resample=True`` draws 10× as many from q and resamples
        them with their Pareto-smoothed importance weights p/q (with replacement), which
        corrects q towards the posterior where k̂ says the weights are reliable."""
        num_samples = _check_num_samples(num_samples)
        if self.sampler is not None and not importance_resample:
            return {k: np.asarray(v) for k, v in self.sampler(num_samples, seed).items()}
        if importance_resample:
            if self.target is None:
                raise NotImplementedError(
                    f"importance resampling needs the model's log density; {self.method!r} "
                    "results have none"
                )
            from viax.diagnostics import psis

            pool, log_weights = self._draws_and_log_weights(10 * num_samples, seed, True)
            smoothed, _ = psis(log_weights)
            probs = np.exp(smoothed - smoothed.max())
            rng = np.random.default_rng(seed)
            index = rng.choice(pool.shape[0], size=num_samples, p=probs / probs.sum())
            positions = jax.numpy.asarray(pool[index])
        else:
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

    # -- importance weights, evidence, trust -------------------------------
    def _draws_and_log_weights(self, num_samples: int, seed: int, keep_positions: bool):
        """Unconstrained draws (or None) and log weights of ``num_samples`` draws of q."""
        if self.target is None:
            if self.log_weights_fn is None:
                raise NotImplementedError(
                    f"method {self.method!r} provides no log weights for evidence estimates"
                )
            return None, np.asarray(self.log_weights_fn(num_samples, seed), dtype=float)
        chunks = self._in_chunks(log_weights_fn, num_samples, seed)
        weights = np.concatenate([np.asarray(lw) for _, lw in chunks])[:num_samples]
        if not keep_positions:
            return None, weights
        return np.concatenate([np.asarray(z) for z, _ in chunks])[:num_samples], weights

    def _in_chunks(self, make_fn, num_samples: int, seed: int) -> list:
        """``make_fn(target, family, chunk)(params, key, data)`` for ⌈num_samples/chunk⌉
        keys, chunk ≤ 10⁴, so that 10⁶ draws fit in memory; over many rows the sum over
        rows is taken in blocks too (:meth:`_row_blocks`)."""
        chunk = int(min(num_samples, _CHUNK))
        target, data = self._row_blocks(chunk)
        fn = make_fn(target, self.family, chunk)
        keys = jax.random.split(jax.random.PRNGKey(seed), -(-num_samples // chunk))
        return [fn(self.params, key, data) for key in keys]

    def _row_blocks(self, num_draws: int):
        """``(target, data)`` for ``num_draws`` draws at once: the fit's own where the
        whole data × draws hold at most 2^27 numbers per array (1 GB); else the
        log density summed over row blocks (:mod:`viax.infer.chunked`: a scan over blocks
        sized for these draws, memory O(block × draws), not O(N × draws): 10⁴ draws of a
        10⁶-row model hold 80 GB in each (draws × rows) array).  A model that cannot be cut
        (per-row latents, rows used outside their plate) is evaluated whole, as before;
        ``info["log_weights_rows"]`` says which."""
        from viax.infer.chunked import WHOLE_ELEMENTS, plan_chunks, row_layout

        if not isinstance(self.data, dict) or not self.data:
            return self.target, self.data
        num_rows, _, width = row_layout(self.data)
        if num_rows * num_draws * (width + 8) <= max(WHOLE_ELEMENTS, _WHOLE_LOG_WEIGHTS):
            return self.target, self.data
        try:
            position = np.asarray(self.family.mean(self.params))
            chunked, reason = plan_chunks(self.target, self.data, num_draws, position)
        except (ValueError, TypeError) as error:  # ModelError is a ValueError
            chunked, reason = None, f"not chunked: {error}"
        self.info["log_weights_rows"] = reason
        if chunked is None:
            return self.target, self.data
        return chunked, chunked.blocked(self.data)

    def log_weights(self, num_samples: int = 1000, seed: int = 0) -> np.ndarray:
        """log p(x, z) − log q(z) for z ~ q, shape (num_samples,)."""
        num_samples = _check_num_samples(num_samples)
        return self._draws_and_log_weights(num_samples, seed, keep_positions=False)[1]

    def log_evidence(self, num_samples: int = 10_000, seed: int = 0, data: dict | None = None):
        """Estimates of log p(x): ELBO ± se, IWAE bounds L_K (K = 1, 10, 100, 1000) ± se,
        the PSIS importance-sampling estimate ± se, and k̂ (see :mod:`viax.diagnostics`).

        ``data``: held-out rows (e.g. ``{"x": x_test}``) for a model learned with an
        encoder: per-row estimates of log p_θ(x_n) from the amortized q(z_n | x_n), in
        chunks (a :class:`viax.infer.learn.RowEvidence`: ``log_p`` summed,
        ``log_p_rows``, ``log_p_se``, ``khat_rows``, ``elbo``)."""
        from viax.diagnostics import evidence_from_log_weights

        if data is not None:
            if self.evidence_fn is None:
                raise NotImplementedError(
                    "held-out evidence needs a q for new rows: fit with encoder=... on a model "
                    "whose rows are independent given its params (no global latents)"
                )
            return self.evidence_fn(data, _check_num_samples(num_samples, minimum=2), seed)

        num_samples = _check_num_samples(num_samples, minimum=2)
        defensive = None
        if self.target is not None and self.target.dim <= _MAX_DENSE_DIM:
            chunks = self._in_chunks(defensive_log_weights_fn, num_samples, seed + 7919)
            defensive = np.concatenate([np.asarray(lw) for lw in chunks])[:num_samples]
        return evidence_from_log_weights(
            self.log_weights(num_samples, seed), proposal_log_weights=defensive
        )

    @property
    def khat_verdict(self) -> str:
        from viax.diagnostics import khat_verdict

        return khat_verdict(self.khat, converged=bool(self.converged))

    def diagnostics(self, num_samples: int = 10_000, seed: int = 0) -> pd.DataFrame:
        """One table: convergence, steps, ELBO ± se, k̂ and its verdict, log p(x)."""
        exact = self.method in ("cavi", "svi", "naive") and self.elbo_se == 0
        rows = [
            ("converged", self.converged, self.message),
            ("steps", self.num_steps, f"{self.method} / {self.algorithm}"),
            (
                "ELBO",
                f"{self.elbo:.4f}" if exact else f"{self.elbo:.4f} ± {self.elbo_se:.2g}",
                "closed form" if exact else "final q, Monte Carlo over its draws",
            ),
        ]
        if np.isnan(self.khat) and self.target is None and self.log_weights_fn is None:
            rows.append(("k-hat", "n/a", "this model supplies no importance weights"))
        else:
            rows.append(("k-hat", f"{self.khat:.3f}", _khat_note(self.khat_verdict)))
        try:
            ev = self.log_evidence(num_samples, seed)
        except NotImplementedError:
            ev = None
        if ev is not None:
            rows.append(
                (
                    "log p(x)",
                    f"{ev.log_p:.4f} ± {ev.log_p_se:.2g}",
                    f"PSIS, {'defensive proposal' if self.target is not None else 'draws of q'}, "
                    f"{ev.num_samples} draws, k-hat {ev.khat:.2f}",
                )
            )
            for k, (value, se) in ev.iwae.items():
                if k > 1:
                    rows.append((f"IWAE L_{k}", f"{value:.4f} ± {se:.2g}", "lower bound"))
        import pandas as pd

        frame = pd.DataFrame(rows, columns=["quantity", "value", "note"]).set_index("quantity")
        return frame

    # -- tables and objects --------------------------------------------------
    def summary(self, num_samples: int = 4000, seed: int = 0) -> pd.DataFrame:
        """mean, sd and 5%/50%/95% quantiles of every element of every site."""
        import pandas as pd

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
        frame = pd.DataFrame.from_dict(rows, orient="index")
        if self.model_params:
            # Learned θ, listed after the latents: a point value (no sd); a network as
            # one row per weight array (mean and sd of its weights).
            frame["kind"] = "latent"
            params = {}
            for label, value in _flat_model_params(self.model_params).items():
                if label in self.model_params and value.size <= _MAX_PARAM_ROWS:
                    for i, element in enumerate(element_names(label, value.shape)):
                        v = float(value.ravel()[i])
                        params[element] = {"mean": v, "sd": np.nan, "5%": v, "50%": v, "95%": v}
                else:
                    params[label] = {"mean": value.mean(), "sd": value.std(), "5%": np.nan}
                    params[label].update({"50%": np.nan, "95%": np.nan})
            extra = pd.DataFrame.from_dict(params, orient="index")
            extra["kind"] = "param"
            frame = pd.concat([frame, extra])
        return frame

    def to_arviz(self, num_samples: int = 1000, seed: int = 0):
        """ArviZ InferenceData: ``posterior`` from draws of q (one chain);
        ``sample_stats`` with the importance log weights of those draws (``log_weight``,
        dims chain × draw) and the ELBO trace (``elbo_trace``, dim ``step``); k̂, the
        evidence estimate and the convergence verdict in ``attrs``."""
        import arviz as az
        import xarray as xr

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
            "khat": float(self.khat),
            "khat_verdict": self.khat_verdict,
        }
        stats = {"elbo_trace": (("step",), np.asarray(self.elbo_trace))}
        if self.target is not None:
            from viax.diagnostics import evidence_from_log_weights

            positions, log_weights = self._draws_and_log_weights(num_samples, seed, True)
            values = _constrain_fn(self.target)(jax.numpy.asarray(positions), self.data)
            draws = {k: np.asarray(v) for k, v in values.items()}
            stats["log_weight"] = (("chain", "draw"), log_weights[None])
            evidence = evidence_from_log_weights(log_weights, ks=())
            attrs.update(log_p=evidence.log_p, log_p_se=evidence.log_p_se)
        else:
            draws = self.sample(num_samples, seed)
        posterior = az.from_dict(posterior={k: v[None] for k, v in draws.items()}).posterior
        posterior.attrs.update(attrs)
        sample_stats = xr.Dataset(
            stats,
            coords={
                "chain": [0],
                "draw": np.arange(num_samples),
                "step": np.arange(1, len(self.elbo_trace) + 1),
            },
            attrs=attrs,
        )
        if self.model_params:
            # Learned θ are data of the fitted model, not draws: constant_data, one
            # variable per array (named in attrs too).
            flat = _flat_model_params(self.model_params)
            constant = xr.Dataset(
                {
                    name: (tuple(f"{name}_dim_{i}" for i in range(v.ndim)), v)
                    for name, v in flat.items()
                },
                attrs={"model_params": ", ".join(flat)},
            )
            return az.InferenceData(
                posterior=posterior, sample_stats=sample_stats, constant_data=constant
            )
        return az.InferenceData(posterior=posterior, sample_stats=sample_stats)

    def plot(
        self, reference=None, path: str | None = None, num_samples: int = 4000, max_panels: int = 16
    ):
        """ELBO trace and per-element marginals of q, with an optional reference overlay:
        posteriordb-style moments (``{"params": {"theta[1]": {"mean", "std"}}}`` or
        ``{"theta[1]": (mean, sd)}``, Stan's 1-based names) or draws
        (``{site: array (n, *shape)}``).  Saved to ``path`` when given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        draws = self.sample(num_samples, seed=0)
        panels = [
            (label, value.reshape(value.shape[0], -1)[:, i], name, idx)
            for name, value in draws.items()
            for i, (label, idx) in enumerate(
                zip(element_names(name, value.shape[1:]), np.ndindex(*value.shape[1:]), strict=True)
            )
        ][:max_panels]
        moments, ref_draws = _reference_parts(reference)
        cols = 4
        rows = 1 + -(-len(panels) // cols)
        fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows))
        self.plot_elbo(ax=fig.add_subplot(rows, 1, 1))
        for k, (label, x, name, idx) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, cols + k + 1)
            ax.hist(x, bins=50, density=True, alpha=0.6, label="q")
            stan = name + ("[" + ",".join(str(i + 1) for i in idx) + "]" if idx else "")
            if stan in moments:
                mean, sd = moments[stan]
                grid = np.linspace(mean - 4 * sd, mean + 4 * sd, 200)
                ax.plot(
                    grid,
                    np.exp(-0.5 * ((grid - mean) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
                    "k-",
                    lw=1.2,
                    label="reference",
                )
            if name in ref_draws:
                ref = np.asarray(ref_draws[name]).reshape(len(ref_draws[name]), -1)
                ax.hist(
                    ref[:, int(np.ravel_multi_index(idx, draws[name].shape[1:])) if idx else 0],
                    bins=50,
                    density=True,
                    histtype="step",
                    color="k",
                    label="reference",
                )
            ax.set_title(label, fontsize=9)
            ax.tick_params(labelsize=7)
        if panels:
            fig.axes[1].legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return fig

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


_MAX_PARAM_ROWS = 100  # a param with more elements is one summary row


def _flat_model_params(model_params: dict) -> dict[str, np.ndarray]:
    """``{"tau": 1.7, "decoder$params": <pytree>}`` as ``{"tau": array, "decoder$params.w":
    array, …}``: one entry per array, pytree paths joined with dots."""
    out = {}
    for name, value in model_params.items():
        leaves = jax.tree_util.tree_flatten_with_path(value)[0]
        for path, leaf in leaves:
            suffix = "".join(jax.tree_util.keystr((k,)) for k in path)
            out[name + suffix] = np.asarray(leaf)
    return out


def _check_num_samples(num_samples, minimum: int = 1) -> int:
    """``num_samples`` as an int, or a ValueError before anything is drawn."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise ValueError(f"num_samples must be an integer, got {num_samples!r}")
    if num_samples < minimum:
        raise ValueError(f"num_samples must be >= {minimum}, got {num_samples}")
    return int(num_samples)


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and Monte Carlo standard error; (-inf, nan) if any value is not finite."""
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        return float("-inf"), float("nan")
    # Log weights of an exploded q reach 1e300: their squares overflow to inf, which is
    # the honest standard error, without NumPy's overflow warning.
    with np.errstate(over="ignore"):
        return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


_CHUNK = 10_000
# rows x draws x (numbers per row + 8) above which log weights sum the rows in blocks
_WHOLE_LOG_WEIGHTS = 2**27


@functools.lru_cache(maxsize=128)
@functools.lru_cache(maxsize=128)
def log_weights_fn(target: Target, family: Family, num_samples: int):
    """Compiled ``(params, key, data) -> (z (S, D), log p̃(z) − log q(z) (S,))``."""

    def run(params, key, data):
        z, log_q = family.sample_and_log_prob(params, key, num_samples)
        return z, jax.vmap(lambda x: target.log_density(x, data))(z) - log_q

    return jit_once(run)


_MAX_DENSE_DIM = 2000
_DEFENSIVE_DF = 4.0


@functools.lru_cache(maxsize=128)
def defensive_log_weights_fn(target: Target, family: Family, num_samples: int):
    """log p̃(z) − log r(z), r = ½ q + ½ t₄(mean q, cov q), half the draws from each."""
    import numpyro.distributions as dist

    def run(params, key, data):
        loc = family.mean(params)
        scale_tril = jax.numpy.linalg.cholesky(family.covariance(params))
        student = dist.MultivariateStudentT(_DEFENSIVE_DF, loc, scale_tril)
        key_q, key_t = jax.random.split(key)
        half = num_samples // 2
        z = jax.numpy.concatenate(
            [family.sample(params, key_q, num_samples - half), student.sample(key_t, (half,))]
        )
        log_q = jax.vmap(lambda x: family.log_prob(params, x))(z)
        log_r = jax.numpy.logaddexp(log_q, student.log_prob(z)) - jax.numpy.log(2.0)
        return jax.vmap(lambda x: target.log_density(x, data))(z) - log_r

    return jit_once(run)


def _khat_note(verdict: str) -> str:
    return {
        "good": "good (< 0.5): q's draws and ELBO can be trusted",
        "usable": "usable (0.5-0.7): use importance resampling, check with care",
        "do not trust": "DO NOT TRUST (> 0.7): q is too far from the posterior",
        "not converged": "NOT CONVERGED: k-hat says nothing about an unfinished q",
    }[verdict]


def _reference_parts(reference) -> tuple[dict, dict]:
    """(moments by Stan name, draws by site) from either reference layout."""
    if reference is None:
        return {}, {}
    if "params" in reference:
        return {k: (v["mean"], v["std"]) for k, v in reference["params"].items()}, {}
    moments = {
        k: (float(v[0]), float(v[1]))
        for k, v in reference.items()
        if isinstance(v, tuple | list) and len(v) == 2 and np.ndim(v[0]) == 0
    }
    draws = {k: v for k, v in reference.items() if k not in moments}
    return moments, draws
