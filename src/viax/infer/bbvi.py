"""Black-box variational inference (Ranganath, Gerrish & Blei 2014, AISTATS).

q is mean-field over the model's latent sites: Bernoulli-logits, Categorical-logits or
Poisson-log-rate factors for discrete sites, Gaussian factors on the unconstrained
value of continuous ones (:mod:`viax.families.discrete`).  The gradient is the score
function with Rao-Blackwellisation and control variates, or reparameterisation for
the continuous sites (:mod:`viax.estimators.score`).  By default the steps are Adam at
a constant rate (0.1), stopped by the statistical rule of :mod:`viax.infer.stopping`
(stationarity, then iterate averaging until the Monte Carlo error is small), which
needs a constant step size.  The paper's AdaGrad,

    λ_{t+1} = λ_t + ρ_t ∇̂λ L,   ρ_t = η diag(G_t)^(−1/2),   G_t = Σ_{k≤t} g_k g_kᵀ,

written as an optax transform (:func:`scale_by_bbvi_adagrad`), is
``optimizer="adagrad"`` and the default under ``stop_rule="stan"``; any optax
optimiser may replace either.  Each step's Info carries the S-draw ELBO, an estimate of the gradient
variance and the number of impossible draws.
"""

from __future__ import annotations

import functools
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from viax.estimators.score import (
    ESTIMATORS,
    ScoreEstimatorState,
    Structure,
    build_structure,
    score_estimator,
)
from viax.infer.advi import StanConvergence, stan_advi
from viax.infer.driver import Guard, guard_init, guarded_update, jit_once, run
from viax.infer.stopping import (
    fisher_scale,
    parse_stop_rule,
    run_with_stopping,
    stop_info,
)
from viax.model import ModelError, build_target

__all__ = [
    "BBVI",
    "BBVIInfo",
    "BBVIState",
    "ScaleByBBVIAdagradState",
    "bbvi_adagrad",
    "build_bbvi",
    "fit_bbvi",
    "gradient_variance",
    "parse_estimator",
    "scale_by_bbvi_adagrad",
]

# AdaGrad's η, measured (2 seeds each, fixed budgets): on the tests' 10-binary model
# (3000 steps) the gap to the best mean-field ELBO is 0.001-0.003 nats at η = 0.1-0.25,
# 0.004-0.007 at 0.5, 0.008-0.017 at 1, 0.02-0.05 at 2, 0.15 at 5 and 2.6 at 10; the
# 200-point Bernoulli mixture ends within 0.2 nats for every η in 0.1-2.  0.5 sits in
# the range that converges everywhere with room both ways.  No η makes AdaGrad
# reliable on the posteriordb mixture with 1000 assignments (2000 steps; one run of
# fourteen, η from 0.1 to 10, found the means, at η = 2): its first, large gradients
# shrink every later step; Adam is the choice there (README).
DEFAULT_ETA = 0.5
DEFAULT_ADAM_RATE = 0.1  # the default optimiser under the default stop rule
DEFAULT_NUM_PARTICLES = 16
_NUM_ELBO_DRAWS = 1000


class ScaleByBBVIAdagradState(NamedTuple):
    sum_sq: Any  # diag(G_t), a pytree like the params


def scale_by_bbvi_adagrad(eta: float = DEFAULT_ETA, eps: float = 1e-8):
    """g ↦ η g / √(Σ_{k≤t} g_k²): the BBVI paper's AdaGrad (no initial accumulator,
    unlike ``optax.adagrad``); ``eps`` only guards a coordinate whose gradient has
    always been 0."""

    def init_fn(params):
        return ScaleByBBVIAdagradState(jax.tree_util.tree_map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        sum_sq = jax.tree_util.tree_map(lambda g, s: s + g**2, updates, state.sum_sq)
        updates = jax.tree_util.tree_map(
            lambda g, s: eta * g / (jnp.sqrt(s) + eps), updates, sum_sq
        )
        return updates, ScaleByBBVIAdagradState(sum_sq)

    return optax.GradientTransformation(init_fn, update_fn)


@functools.lru_cache(maxsize=16)
def bbvi_adagrad(eta: float = DEFAULT_ETA) -> optax.GradientTransformation:
    """Descent on −ELBO with the paper's AdaGrad step sizes."""
    return optax.chain(scale_by_bbvi_adagrad(eta), optax.scale(-1.0))


@functools.lru_cache(maxsize=16)
def _adam(rate: float) -> optax.GradientTransformation:
    # One object per rate, so that refits find their compiled step in build_bbvi's cache.
    return optax.adam(rate)


class BBVIState(NamedTuple):
    params: dict
    opt_state: Any
    estimator_state: ScoreEstimatorState
    guard: Guard


class BBVIInfo(NamedTuple):
    objective: jax.Array  # the S-draw ELBO estimate
    grad_variance: jax.Array  # estimated Σ_components Var of the gradient estimate
    num_impossible: jax.Array  # draws with log p(x, z) = −∞ in this step
    iterate: jax.Array  # (P,) the parameters after this step, flattened (ravel_pytree)


class BBVI(NamedTuple):
    init: Callable[[dict, float], BBVIState]
    step: Callable  # (state, rng_key, data) -> (state, BBVIInfo)
    elbo: Callable  # (params, rng_key, data) -> ELBO estimate from num_eval draws
    log_weights: Callable  # (params, rng_key, data) -> (num_eval,) log p − log q
    sample: Callable  # (params, rng_key, data) -> {site: (num_eval, *shape)}


@functools.lru_cache(maxsize=128)
def build_bbvi(
    structure: Structure,
    optimizer: optax.GradientTransformation,
    num_particles: int,
    estimator: str = "auto",
    rao_blackwell: bool = True,
    control_variate: bool | str = True,
    num_eval: int = 100,
) -> BBVI:
    """Pure init/step for BBVI; cached so that refits reuse the compiled code."""
    grad_estimator = score_estimator(
        structure, num_particles, estimator, rao_blackwell, control_variate
    )
    names = [s.name for s in structure.sites]

    def init(params, step_scale=1.0):
        return BBVIState(
            params,
            optimizer.init(params),
            grad_estimator.init(params),
            guard_init(len(names), step_scale),
        )

    def step(state: BBVIState, rng_key, data):
        grads, estimator_state, info = grad_estimator.grad(
            state.params, state.estimator_state, rng_key, data
        )

        def apply(old):
            params, opt_state, _ = old
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(lambda u: state.guard.step_scale * u, updates)
            return optax.apply_updates(params, updates), opt_state, estimator_state

        # One entry per site, so a non-finite gradient is reported by site name.
        per_site = jnp.stack(
            [sum(jnp.sum(g) for g in jax.tree_util.tree_leaves(grads[n])) for n in names]
        )
        (params, opt_state, estimator_state), guard, _ = guarded_update(
            state.guard,
            info.objective,
            per_site,
            apply,
            (state.params, state.opt_state, state.estimator_state),
        )
        return BBVIState(params, opt_state, estimator_state, guard), BBVIInfo(
            *info, iterate=ravel_pytree(params)[0]
        )

    def draws(params, rng_key):
        return structure.family.sample(params, rng_key, num_eval)

    def log_weights(params, rng_key, data):
        latents = draws(params, rng_key)

        def one(latent):
            terms, _ = structure.log_terms(latent, data)
            log_p = sum(jnp.sum(t) for t in terms.values())
            return log_p - structure.family.log_prob(params, latent)

        return jax.vmap(one)(latents)

    def elbo(params, rng_key, data):
        values = log_weights(params, rng_key, data)
        return jnp.mean(jnp.where(jnp.isfinite(values), values, -jnp.inf))

    def sample(params, rng_key, data):
        latents = draws(params, rng_key)
        return jax.vmap(lambda latent: structure.log_terms(latent, data)[1])(latents)

    return BBVI(init, step, jit_once(elbo), jit_once(log_weights), jit_once(sample))


def parse_estimator(name: str) -> tuple[str, bool, bool | str]:
    """``"score+rb+cv"`` -> ("score", True, True); base in {auto, score, reparam}, flags
    ``rb`` (Rao-Blackwell), ``cv`` (leave-one-out control variate), ``ema`` (baseline)."""
    base, *flags = name.split("+")
    unknown = [f for f in flags if f not in ("rb", "cv", "ema")]
    if base not in ESTIMATORS or unknown or ("cv" in flags and "ema" in flags):
        raise ValueError(
            f"unknown estimator {name!r}: use one of {', '.join(ESTIMATORS)} followed by "
            "optional '+rb', '+cv' or '+ema', e.g. 'score+rb+cv'"
        )
    control_variate: bool | str = "ema" if "ema" in flags else ("cv" in flags)
    return base, "rb" in flags, control_variate


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _optimizer(optimizer, eta, stop_rule="stan"):
    if optimizer is None and stop_rule != "stan":
        # The default rule watches a stationary process, which needs a constant step
        # size (Dhaka et al. 2020): AdaGrad's shrinking steps look stationary long
        # before the optimum (measured, 10 fits on two 12-cause models like
        # tests/infer/test_stopping.py's: 0.13-0.52 nats short; Adam(0.1): 0.02-0.14).
        eta = DEFAULT_ADAM_RATE if eta is None else eta
        return _adam(eta), "adam", eta
    if optimizer is None or optimizer == "adagrad":
        eta = DEFAULT_ETA if eta is None else eta
        return bbvi_adagrad(eta), "adagrad", eta
    if optimizer == "stan":
        eta = 1.0 if eta is None else eta
        return stan_advi(eta), "stan", eta
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer, "optax", None
    raise ValueError(
        f"optimizer {optimizer!r} does not apply to method='bbvi': use None (default: "
        "Adam at rate eta=0.1), 'adagrad' (the BBVI paper's step sizes), 'stan' or an optax "
        "GradientTransformation"
    )


def fit_bbvi(
    model,
    data,
    *,
    family: str = "meanfield",
    optimizer=None,
    num_steps: int | None = None,
    num_particles: int | None = None,
    tol_rel_obj: float = 0.01,
    eval_elbo: int = 100,
    eta: float | None = None,
    estimator: str = "auto",
    rao_blackwell: bool = True,
    control_variate: bool | str = True,
    seed: int = 0,
    progress: bool = True,
    stop_rule="mcse",
):
    """BBVI fit: the work behind ``viax.fit(..., method="bbvi")``; returns a Result.

    ``stop_rule``: ``"mcse"`` (default; :mod:`viax.infer.stopping`: R̂ stationarity, the
    returned params are the averaged iterate, stop when its Monte Carlo error is under
    ``tol`` posterior scales, step-size halving), an ``MCSEStop(...)``, or ``"stan"``
    (relative ELBO change under ``tol_rel_obj``, fresh ELBO estimates every
    ``eval_elbo`` steps; the last iterate)."""
    from viax.diagnostics import psis
    from viax.result import Result, mean_and_se

    if family != "meanfield":
        raise ValueError(
            f"method='bbvi' fits a mean-field q (one factor per latent element); family "
            f"{family!r} is not available for it"
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if control_variate not in (True, False, "loo", "ema"):
        raise ValueError(
            f"control_variate must be True, False, 'loo' or 'ema', got {control_variate!r}"
        )
    num_particles = DEFAULT_NUM_PARTICLES if num_particles is None else num_particles
    num_particles = _check_int("num_particles", num_particles, 1)
    if control_variate in (True, "loo") and num_particles < 2:
        raise ValueError(
            f"control variates need num_particles >= 2 (got {num_particles}): a_i is "
            "estimated from the other draws of the same step (leave-one-out); pass "
            "control_variate=False or 'ema', or more particles"
        )
    config = parse_stop_rule(stop_rule)
    transform, algorithm, eta = _optimizer(optimizer, eta, config)
    start = time.perf_counter()
    target, arrays, _ = build_target(model, data, seed=seed)
    if target.param_sites:
        names = ", ".join(site.name for site in target.param_sites)
        raise ModelError(
            f"numpyro.param site(s) {names}: method='bbvi' does not learn model parameters "
            "and would hold them at their initial values; use method='advi' (which learns "
            "them, viax.infer.learn) or make them sample sites"
        )
    structure = build_structure(target, arrays, seed)
    algo = build_bbvi(
        structure, transform, num_particles, estimator, bool(rao_blackwell), control_variate
    )
    key_eval, key_run, key_final = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = _conditional_init(structure, arrays)
    flat, unravel = ravel_pytree(params)
    max_steps = num_steps or 10_000
    variances, impossible = [], []

    def record(state, chunk_info, steps_done):
        variances.append(np.asarray(chunk_info.grad_variance))
        impossible.append(np.asarray(chunk_info.num_impossible))

    run_kwargs = dict(
        site_of_index=lambda i: structure.sites[i].name,
        progress=progress,
        description="viax bbvi",
    )
    tracker = None
    if config == "stan":
        rule = StanConvergence(
            tol_rel_obj, max_steps, eval_elbo, float(algo.elbo(params, key_eval, arrays))
        )
        eval_keys = iter(jax.random.split(key_eval, max_steps // eval_elbo + 2))

        def check(state, chunk_info, steps_done):
            record(state, chunk_info, steps_done)
            value = float(algo.elbo(state.params, next(eval_keys), arrays))
            if not np.isfinite(value):
                return None
            stop, message = rule.update(value, steps_done)
            return (True, message) if stop else None

        setup_time = time.perf_counter() - start
        output = run(
            algo.step, algo.init(params), arrays, key_run, max_steps, eval_elbo, check, **run_kwargs
        )
        params = output.state.params
        elbo_evaluations = rule.history
    else:
        # q's posterior scale per parameter from its Fisher information, at the running
        # average; the same draws at every check so that the scale moves only with q.
        tracker = config.start(
            flat.size,
            scale=lambda average: fisher_scale(structure.family, unravel(average), key_eval),
            max_steps=max_steps,
            elbo_fn=lambda average: _common_draws_elbo(
                algo.elbo, unravel(average), key_final, arrays
            ),
        )
        setup_time = time.perf_counter() - start
        output = run_with_stopping(
            algo.step,
            algo.init(params),
            arrays,
            key_run,
            max_steps,
            eval_elbo,
            tracker,
            lambda chunk_info: np.asarray(chunk_info.iterate),
            on_chunk=record,
            **run_kwargs,
        )
        params = unravel(jnp.asarray(tracker.average))
        elbo_evaluations = []
    log_weights = np.concatenate(
        [np.asarray(algo.log_weights(params, k, arrays)) for k in jax.random.split(key_final, 10)]
    )
    elbo, elbo_se = mean_and_se(log_weights)
    finite = np.isfinite(log_weights)
    khat = psis(log_weights)[1] if finite.all() else float("nan")
    info: dict[str, Any] = {
        "estimator": estimator,
        "rao_blackwell": structure.blanket if rao_blackwell else "off",
        "control_variate": control_variate,
        "num_particles": num_particles,
        "eta": eta,
        "grad_variance": np.concatenate(variances) if variances else np.zeros(0),
        "num_impossible": int(np.sum([np.sum(x) for x in impossible])),
        "elbo_evaluations": elbo_evaluations,
        **stop_info(tracker, unravel, output.converged, flat.size),
        "num_backoffs": output.num_backoffs,
        "seconds_per_step": output.seconds_per_step,
        "discrete_sites": structure.discrete_sites,
    }
    return Result(
        method="bbvi",
        algorithm=algorithm,
        family=structure.family,
        params=params,
        elbo_trace=output.trace,
        elbo=elbo,
        elbo_se=elbo_se,
        converged=output.converged,
        message=output.message,
        num_steps=output.num_steps,
        wall_time=output.wall_time + setup_time,
        compile_time=output.compile_time,
        target=None,
        data=arrays,
        info=info,
        sampler=functools.partial(_sample, algo, params, arrays),
        log_weights_fn=functools.partial(_log_weights, algo, params, arrays),
        khat=khat,
    )


def _common_draws_elbo(elbo, params, rng_key, data, num_batches: int = 8) -> float:
    """The ELBO from ``num_batches`` × num_eval draws, the same draws at every call (so
    that the stopping rule's differences between nearby q's are precise)."""
    keys = jax.random.split(rng_key, num_batches)
    return float(np.mean([float(elbo(params, key, data)) for key in keys]))


def _conditional_init(structure: Structure, data) -> dict:
    """Start each plated Bernoulli/Categorical factor at its full conditional given the
    initial continuous values: logits_k = log p_blanket(z = k) (one Gibbs-like sweep).

    Uniform logits leave a mixture's components symmetric, and mean-field VI then
    settles in the one-component optimum; the conditional breaks the tie from the data.
    """
    params = dict(structure.init_params)
    plated = [
        s
        for s in structure.sites
        if s.is_discrete
        and s.factor.name in ("bernoulli", "categorical")
        and any(a != 1 for a in s.cell_shape)
    ]
    if not plated:
        return params
    fn = _conditional_logits_fn(structure, tuple(s.name for s in plated))
    for name, logits in fn(params, data).items():
        params[name] = {"logits": params[name]["logits"] + logits}
    return params


@functools.lru_cache(maxsize=64)
def _conditional_logits_fn(structure: Structure, names: tuple[str, ...]):
    specs = {s.name: s for s in structure.sites}

    def run(params, data):
        base = {}
        for s in structure.sites:
            if s.is_discrete:
                low = getattr(s.factor, "low", 0)
                base[s.name] = jnp.full(s.factor.shape, low, dtype=jnp.int64)
            else:
                base[s.name] = params[s.name]["loc"]
        out = {}
        for name in names:
            spec = specs[name]
            num = getattr(spec.factor, "num_categories", 2)
            low = getattr(spec.factor, "low", 0)
            costs = []
            for k in range(num):
                terms, _ = structure.log_terms({**base, name: base[name] * 0 + low + k}, data)
                cell = jnp.zeros(spec.cell_shape)
                for term, axes, aligned in structure.plan[name]:
                    part = jnp.sum(terms[term], axis=axes, keepdims=True)
                    cell = cell + jnp.reshape(part, aligned)
                costs.append(jnp.broadcast_to(cell, spec.factor.shape))
            costs = jnp.stack(costs, axis=-1)
            costs = jnp.where(jnp.isfinite(costs), costs, -1e9)
            if spec.factor.name == "bernoulli":
                out[name] = jnp.clip(costs[..., 1] - costs[..., 0], -20.0, 20.0)
            else:
                costs = costs - jnp.max(costs, axis=-1, keepdims=True)
                out[name] = jnp.clip(costs, -20.0, 0.0)
        return out

    return jit_once(run)


def _sample(algo: BBVI, params, data, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    chunks, done = [], 0
    for key in jax.random.split(jax.random.PRNGKey(seed), -(-num_samples // 100)):
        chunks.append(algo.sample(params, key, data))
        done += 100
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks])[:num_samples] for k in chunks[0]}


def _log_weights(algo: BBVI, params, data, num_samples: int, seed: int) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), -(-num_samples // 100))
    return np.concatenate([np.asarray(algo.log_weights(params, k, data)) for k in keys])[
        :num_samples
    ]


def gradient_variance(
    model,
    data: Mapping[str, Any] | None = None,
    *,
    params: dict | None = None,
    estimators: Sequence[str] = ("score", "score+rb", "score+rb+cv"),
    num_particles: int = DEFAULT_NUM_PARTICLES,
    num_repeats: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Variance of BBVI gradient estimators at the same parameters.

    For each estimator, ``num_repeats`` independent S-draw gradients at ``params``
    (default: BBVI's initial q); returns ``{name: Σ_components Var(gradient)}``, the
    trace of the estimator's covariance, measured across the repeats.  Names are
    ``auto``/``score``/``reparam`` with optional ``+rb``, ``+cv`` (e.g.
    ``"score+rb+cv"``); ``reparam`` needs continuous latents only.

    Example:
        >>> v = gradient_variance(model, data, params=result.params,
        ...                       estimators=["score", "score+rb+cv"])  # doctest: +SKIP
    """
    num_particles = _check_int("num_particles", num_particles, 1)
    num_repeats = _check_int("num_repeats", num_repeats, 2)
    target, arrays, _ = build_target(model, data, seed=seed)
    structure = build_structure(target, arrays, seed)
    params = structure.init_params if params is None else params
    out = {}
    for name in estimators:
        fn = _repeated_gradients(structure, name, num_particles, num_repeats)
        grads = fn(params, jax.random.PRNGKey(seed), arrays)
        out[name] = float(
            sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in jax.tree_util.tree_leaves(grads))
        )
    return out


@functools.lru_cache(maxsize=64)
def _repeated_gradients(structure: Structure, name: str, num_particles: int, num_repeats: int):
    base, rao_blackwell, control_variate = parse_estimator(name)
    grad_estimator = score_estimator(structure, num_particles, base, rao_blackwell, control_variate)

    def run_all(params, rng_key, data):
        state = grad_estimator.init(params)

        def one(key):
            return grad_estimator.grad(params, state, key, data)[0]

        return jax.lax.map(one, jax.random.split(rng_key, num_repeats))

    return jit_once(run_all)
