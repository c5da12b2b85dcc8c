"""Score-function (REINFORCE) gradients of the ELBO for mean-field q, with
Rao-Blackwellisation and control variates (Ranganath, Gerrish & Blei 2014, "Black Box
Variational Inference", AISTATS).

For q(z; λ) = Π_i q_i(z_i; λ_i) and S draws z_s ~ q:

    ∇λ L = E_q[h(z) (log p(x, z) − log q(z))],          h = ∇λ log q(z; λ)   (plain)
    ∇λ_i L = E_q[h_i (log p_i(x, z_(i)) − log q_i(z_i))]                     (Rao-Blackwell)

where log p_i keeps only the log-joint terms that depend on z_i (its Markov blanket).
The blanket comes from the NumPyro trace: per-site log-prob arrays, the latent sites
each one depends on (NumPyro's provenance tracking, as in ``TraceGraph_ELBO``), and the
plates: for a local z_n inside a plate the cost keeps only the n-th element of each
dependent term.  Batch dimensions that are not plates are summed over (no
independence is assumed along them).  A plain log density (one ``factor`` that holds
every latent) gives every factor the whole joint: ``Structure.blanket`` says so.

Control variates: with f_i = h_i · cost_i,

    f̂_i = f_i − a_i h_i,   a_i = Σ_d Cov(f_i^d, h_i^d) / Σ_d Var(h_i^d),

a_i estimated for draw s from the other S − 1 draws (leave-one-out), so it is
independent of draw s and the estimate stays unbiased (E h = 0).  Option ``"ema"``
subtracts instead an exponential moving average of past costs (a baseline).

``estimator="auto"`` differentiates continuous sites by reparameterisation
(z = m + σ ε, closed-form Gaussian entropy) and discrete sites by the score function,
in one unbiased gradient (what Pyro's TraceGraph_ELBO does, here with control
variates).

Impossible draws: a draw whose log p(x, z) is −∞ (q puts mass where p has none) would
make the score-function cost −∞ and the gradient NaN.  Rule: every non-finite element
of a log-prob term is replaced by ``IMPOSSIBLE_LOG_PROB`` (−1000) in the costs and the
objective, and that draw contributes no pathwise gradient; such draws are counted in
``GradientInfo.num_impossible``.  The score function then pushes q away from them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.util import _unconstrain_reparam

from viax.families.discrete import (
    SUPPORTED_DISCRETE,
    Bernoulli,
    Categorical,
    MeanFieldProduct,
    Normal,
    Poisson,
)
from viax.infer.driver import jit_once
from viax.model import ModelError, Target

__all__ = [
    "ESTIMATORS",
    "IMPOSSIBLE_LOG_PROB",
    "GradientInfo",
    "ScoreEstimator",
    "ScoreEstimatorState",
    "SiteSpec",
    "Structure",
    "build_structure",
    "leave_one_out_control_variate",
    "score_estimator",
]

ESTIMATORS = ("auto", "score", "reparam")
IMPOSSIBLE_LOG_PROB = -1000.0
_EMA_DECAY = 0.9


class SiteSpec(NamedTuple):
    """One latent site: its factor, and the shape of its Rao-Blackwell cells."""

    name: str
    factor: Any
    is_discrete: bool
    cell_shape: tuple[int, ...]  # element shape with 1 along every non-plate dim
    batch_ndim: int  # leading dims of the element shape that are batch (plates live there)


@dataclass(frozen=True, eq=False)
class Structure:
    """A NumPyro model as per-site log-prob terms of per-site latent values.

    ``plan[site]``: ``(term, sum_axes, aligned_shape)`` for each term in the site's
    Markov blanket: sum the term over ``sum_axes`` (keepdims), reshape to
    ``aligned_shape`` and broadcast to the site's ``cell_shape``.
    """

    target: Target
    sites: tuple[SiteSpec, ...]
    plan: dict = field(repr=False)
    blanket: str  # "markov blanket" or "whole joint: <why>"
    family: MeanFieldProduct
    init_params: dict = field(repr=False)

    @property
    def discrete_sites(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites if s.is_discrete)

    def log_terms(self, latents: dict, data: dict) -> tuple[dict, dict]:
        """Per-site log-prob arrays and the constrained values (latent and deterministic
        sites), with continuous latents given unconstrained and discrete ones as is."""
        return _log_terms(self.target, self.discrete_sites, latents, data)


def _log_terms(target: Target, discrete: tuple[str, ...], latents: dict, data: dict):
    continuous = {k: v for k, v in latents.items() if k not in discrete}

    def substitute_fn(site):
        if site["name"] in discrete:
            return latents[site["name"]]
        return _unconstrain_reparam(continuous, site)

    model = handlers.seed(handlers.substitute(target.model_fn, substitute_fn=substitute_fn), 0)
    trace = handlers.trace(model).get_trace(**target._kwargs(data))
    terms, values = {}, {}
    for name, site in trace.items():
        if site["type"] == "sample":
            log_prob = site["fn"].log_prob(site["value"])
            if site.get("scale") is not None:
                log_prob = site["scale"] * log_prob
            terms[name] = log_prob
            if name in latents:
                values[name] = site["value"]
        elif site["type"] == "deterministic":
            values[name] = site["value"]
    return terms, values


def build_structure(target: Target, data: dict, seed: int = 0) -> Structure:
    """Trace the model once concretely (discrete latents drawn from the prior) and read
    the factors, the plates and the dependencies of each log-prob term."""
    del seed  # the structure does not depend on it: one compiled step per model
    return _build_structure(target, _Frozen(data), 0)


class _Frozen:
    """Data dict hashable by the identity of its arrays' shapes (for the cache)."""

    def __init__(self, data):
        self.data = data

    def __hash__(self):
        return hash(tuple((k, v.shape) for k, v in sorted(self.data.items())))

    def __eq__(self, other):
        return (
            isinstance(other, _Frozen)
            and all(
                k in other.data and self.data[k].shape == other.data[k].shape for k in self.data
            )
            and len(self.data) == len(other.data)
        )


@functools.lru_cache(maxsize=64)
def _build_structure(target: Target, frozen: _Frozen, seed: int) -> Structure:
    data = frozen.data
    u0 = target.unravel_fn(target.init_position)
    captured = {}

    def discover(data):
        # One compiled call (eager tracing would compile every primitive separately):
        # a prior draw of each discrete site, its support bounds and its prior mean.
        model = handlers.seed(
            handlers.substitute(
                target.model_fn, substitute_fn=lambda s: _unconstrain_reparam(u0, s)
            ),
            seed,
        )
        trace = handlers.trace(model).get_trace(**target._kwargs(data))
        captured["trace"] = trace
        out = {}
        for name in target.discrete_sites:
            site = trace[name]
            support = site["fn"].support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            bounds = {
                k: jnp.asarray(getattr(support, k))
                for k in ("lower_bound", "upper_bound")
                if hasattr(support, k)
            }
            try:
                mean = jnp.asarray(site["fn"].mean, float)
            except Exception:
                mean = jnp.ones(jnp.shape(site["value"]))
            out[name] = {"value": site["value"], "mean": mean, **bounds}
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            concrete = jit_once(discover)(data)
        except Exception as err:
            raise ModelError(
                f"the model raised while tracing it: {type(err).__name__}: {err}"
            ) from err
    trace = captured["trace"]
    latent_names = set(target.latent_names)
    sites, factors, init_params, values0 = [], [], {}, {}
    frames_of = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        frames_of[name] = {(f.name, f.dim) for f in site["cond_indep_stack"]}
        if name not in latent_names:
            continue
        fn = site["fn"]
        if name in target.discrete_sites:
            factor, params = _discrete_factor(name, fn.support, concrete[name])
            values0[name] = concrete[name]["value"]
            elem_shape = tuple(np.shape(values0[name]))
        else:
            elem_shape = tuple(np.shape(u0[name]))
            factor = Normal(elem_shape)
            params = factor.init(loc=u0[name])
            values0[name] = u0[name]
        batch_ndim = len(fn.batch_shape)
        plate_dims = {f.dim for f in site["cond_indep_stack"]}
        cell_shape = tuple(
            size if (i < batch_ndim and i - batch_ndim in plate_dims) else 1
            for i, size in enumerate(elem_shape)
        )
        sites.append(SiteSpec(name, factor, factor.is_discrete, cell_shape, batch_ndim))
        factors.append((name, factor))
        init_params[name] = params
    discrete = tuple(s.name for s in sites if s.is_discrete)
    terms0 = jax.eval_shape(lambda v, d: _log_terms(target, discrete, v, d)[0], values0, data)
    shapes = {k: tuple(v.shape) for k, v in terms0.items()}
    deps, reason = _dependencies(target, discrete, values0, data, shapes)
    plan = {}
    for spec in sites:
        entries = []
        site_frames = frames_of[spec.name]
        for term, term_deps in deps.items():
            if spec.name not in term_deps:
                continue
            shape = shapes[term]
            common = {dim for (_, dim) in site_frames & frames_of.get(term, set())}
            keep = [j for j in range(len(shape)) if j - len(shape) in common]
            batch_ndim = spec.batch_ndim
            aligned = [1] * len(spec.cell_shape)
            for j in keep:
                aligned[batch_ndim + (j - len(shape))] = shape[j]
            sum_axes = tuple(j for j in range(len(shape)) if j not in keep)
            entries.append((term, sum_axes, tuple(aligned)))
        plan[spec.name] = tuple(entries)
    if reason is None:
        whole = all(len(plan[s.name]) == len(deps) for s in sites) and not any(
            any(a != 1 for a in s.cell_shape) for s in sites
        )
        reason = (
            "whole joint: every log-prob term depends on every latent (a plain log density "
            "has no structure)"
            if whole
            else "markov blanket"
        )
    return Structure(
        target, tuple(sites), plan, reason, MeanFieldProduct(tuple(factors)), init_params
    )


def _dependencies(target, discrete, values0, data, shapes):
    """{term: frozenset of latent names} from NumPyro's provenance tracking, or every
    latent for every term (with the reason) when tracking fails."""
    from numpyro.ops.provenance import eval_provenance

    def fn(**latents):
        return _log_terms(target, discrete, latents, data)[0]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deps = eval_provenance(fn, **values0)
        return {k: frozenset(v) for k, v in deps.items()}, None
    except Exception as err:  # a model provenance cannot trace: no structure
        everything = frozenset(values0)
        return (
            {k: everything for k in shapes},
            f"whole joint: dependency tracking failed ({type(err).__name__})",
        )


def _discrete_factor(name, support, concrete):
    value = np.asarray(concrete["value"])
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    shape = tuple(value.shape)
    if support is constraints.boolean:
        factor = Bernoulli(shape)
        return factor, factor.init()
    if isinstance(support, constraints._IntegerInterval):
        lower = np.broadcast_to(np.asarray(concrete["lower_bound"]), shape)
        upper = np.broadcast_to(np.asarray(concrete["upper_bound"]), shape)
        low, high = int(lower.min()), int(upper.max())
        num = high - low + 1
        if num > 10_000:
            raise ModelError(
                f"site {name!r}: {num} values in its support; a Categorical factor over so "
                "many values is impractical (model it as continuous or Poisson-like)"
            )
        factor = Categorical(shape, num, low)
        values = low + np.arange(num)
        valid = (values >= lower[..., None]) & (values <= upper[..., None])
        return factor, factor.init(None if valid.all() else valid)
    if isinstance(support, constraints._IntegerNonnegative) or (
        isinstance(support, constraints._IntegerGreaterThan)
        and np.all(np.asarray(concrete["lower_bound"]) == 0)
    ):
        factor = Poisson(shape)
        rate = np.broadcast_to(np.asarray(concrete["mean"], float), shape)
        return factor, factor.init(np.where(np.isfinite(rate), rate, 1.0))
    raise ModelError(
        f"site {name!r}: no discrete variational factor covers its support {support!r}; "
        f"supported supports: {'; '.join(SUPPORTED_DISCRETE)}"
    )


class GradientInfo(NamedTuple):
    objective: jax.Array  # the S-draw ELBO estimate (impossible terms floored)
    grad_variance: jax.Array  # Σ over components of Var(S-draw mean gradient), estimated
    num_impossible: jax.Array  # int: draws whose log p(x, z) was not finite


class ScoreEstimatorState(NamedTuple):
    baseline: dict  # site -> EMA of its per-element costs ({} unless control_variate="ema")
    count: jax.Array


class ScoreEstimator(NamedTuple):
    """optax-shaped: ``init(params) -> state``; ``grad(params, state, rng_key, data) ->
    (gradient of −ELBO, state, GradientInfo)``."""

    init: Callable[[dict], ScoreEstimatorState]
    grad: Callable


def _expand(cost, leaf):
    return jnp.reshape(cost, cost.shape + (1,) * (leaf.ndim - cost.ndim))


def leave_one_out_control_variate(f: dict, h: dict, elem_ndim: int) -> dict:
    """``f − a h`` with ``a = Σ_d Cov(f^d, h^d) / Σ_d Var(h^d)`` per element, estimated for
    draw s from the other S − 1 draws.  ``f``, ``h``: dicts of (S, *element, *extra);
    d runs over the dict's leaves and the extra (e.g. category) dims."""
    num, den, scale = 0.0, 0.0, 0.0
    for key in f:
        # Cov and Var are shift-invariant: centring on the mean of all draws only
        # reduces cancellation, a_i stays a function of the other draws.
        fl = f[key] - jnp.mean(f[key], 0)
        hl = h[key] - jnp.mean(h[key], 0)
        n = fl.shape[0] - 1
        extra = tuple(range(1 + elem_ndim, fl.ndim))
        mfh = (jnp.sum(fl * hl, 0) - fl * hl) / n
        mf = (jnp.sum(fl, 0) - fl) / n
        mh = (jnp.sum(hl, 0) - hl) / n
        mhh = (jnp.sum(hl * hl, 0) - hl * hl) / n
        num = num + jnp.sum(mfh - mf * mh, axis=extra)
        den = den + jnp.sum(mhh - mh * mh, axis=extra)
        scale = scale + jnp.sum(mhh, axis=extra)
    # When the other draws of h are all equal, Var is 0 up to rounding: a_i = 0 then
    # (an a_i of rounding noise over rounding noise would be huge and random).
    ok = den > 1e-8 * scale + 1e-300
    a = jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)
    return {key: f[key] - _expand(a, h[key]) * h[key] for key in f}


def score_estimator(
    structure: Structure,
    num_particles: int,
    estimator: str = "auto",
    rao_blackwell: bool = True,
    control_variate: bool | str = True,
) -> ScoreEstimator:
    """The BBVI gradient of −ELBO over the params of ``structure.family``.

    Args:
        estimator: ``"auto"`` (reparameterisation for continuous sites, score function
            for discrete ones), ``"score"`` (score function everywhere) or
            ``"reparam"`` (continuous sites only).
        rao_blackwell: each factor's cost keeps only its Markov blanket.
        control_variate: ``True``/``"loo"`` (leave-one-out a_i), ``"ema"``
            (moving-average baseline) or ``False``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    cv = "loo" if control_variate is True else (control_variate or None)
    if cv not in (None, "loo", "ema"):
        raise ValueError(f"control_variate must be True, False, 'loo' or 'ema', got {cv!r}")
    if cv == "loo" and num_particles < 2:
        raise ValueError(
            f"control variates need num_particles >= 2 (got {num_particles}): a_i is "
            "estimated from the other draws of the same step (leave-one-out)"
        )
    if estimator == "reparam" and structure.discrete_sites:
        raise ModelError(
            f"site(s) {', '.join(structure.discrete_sites)} are discrete: no "
            "reparameterisation gradient exists; use estimator='auto' or 'score'"
        )
    sites = structure.sites
    score_names = tuple(s.name for s in sites if s.is_discrete or estimator == "score")
    score_sites = tuple(s for s in sites if s.name in score_names)
    path_sites = tuple(s for s in sites if s.name not in score_names)

    def particle(params, rng_key, data):
        frozen = jax.lax.stop_gradient(params)
        latents, eps = {}, {}
        for spec, key in zip(sites, jax.random.split(rng_key, len(sites)), strict=True):
            if spec.name in score_names:
                latents[spec.name] = spec.factor.sample(frozen[spec.name], key, 1)[0]
            else:
                eps[spec.name] = jax.random.normal(key, spec.factor.shape)
                latents[spec.name] = spec.factor.transform(frozen[spec.name], eps[spec.name])
        fixed = {n: latents[n] for n in score_names}

        def log_joint(path_latents):
            terms, _ = structure.log_terms({**fixed, **path_latents}, data)
            bad = jnp.any(jnp.asarray([~jnp.all(jnp.isfinite(t)) for t in terms.values()]))
            clean = {
                k: jnp.where(jnp.isfinite(t), t, IMPOSSIBLE_LOG_PROB) for k, t in terms.items()
            }
            return sum(jnp.sum(t) for t in clean.values()), (clean, bad)

        path_latents = {s.name: latents[s.name] for s in path_sites}
        if path_sites:
            (total, (terms, bad)), grad_u = jax.value_and_grad(log_joint, has_aux=True)(
                path_latents
            )
        else:
            (total, (terms, bad)), grad_u = log_joint({}), {}
        log_q = {s.name: s.factor.log_prob(frozen[s.name], latents[s.name]) for s in sites}
        total_log_q = sum(jnp.sum(v) for v in log_q.values())
        contributions = {}
        for spec in path_sites:
            g = jnp.where(bad, 0.0, grad_u[spec.name])
            sigma = jnp.exp(frozen[spec.name]["log_scale"])
            # pathwise term plus ∂H/∂log_scale = 1 (closed-form Gaussian entropy)
            contributions[spec.name] = {"loc": g, "log_scale": g * sigma * eps[spec.name] + 1.0}
        scores, costs = {}, {}
        for spec in score_sites:
            value = latents[spec.name]
            scores[spec.name] = jax.grad(
                lambda p, f=spec.factor, z=value: jnp.sum(f.log_prob(p, z))
            )(frozen[spec.name])
            if rao_blackwell:
                cell = jnp.zeros(spec.cell_shape)
                for term, axes, aligned in structure.plan[spec.name]:
                    part = jnp.sum(terms[term], axis=axes, keepdims=True)
                    cell = cell + jnp.reshape(part, aligned)
                costs[spec.name] = cell - log_q[spec.name]
            else:
                costs[spec.name] = jnp.broadcast_to(total - total_log_q, value.shape)
        return contributions, scores, costs, total - total_log_q, bad

    def init(params) -> ScoreEstimatorState:
        del params
        baseline = {s.name: jnp.zeros(s.factor.shape) for s in score_sites} if cv == "ema" else {}
        return ScoreEstimatorState(baseline, jnp.asarray(0, jnp.int32))

    def grad(params, state: ScoreEstimatorState, rng_key, data):
        keys = jax.random.split(rng_key, num_particles)
        contributions, scores, costs, elbos, bad = jax.vmap(particle, in_axes=(None, 0, None))(
            params, keys, data
        )
        baseline = dict(state.baseline)
        for spec in score_sites:
            name, h, cost = spec.name, scores[spec.name], costs[spec.name]
            if cv == "ema":
                adjusted = cost - state.baseline[name]
                mean_cost = jnp.mean(cost, axis=0)
                baseline[name] = jnp.where(
                    state.count == 0,
                    mean_cost,
                    _EMA_DECAY * state.baseline[name] + (1 - _EMA_DECAY) * mean_cost,
                )
            else:
                adjusted = cost
            f = {k: hl * _expand(adjusted, hl) for k, hl in h.items()}
            if cv == "loo":
                f = leave_one_out_control_variate(f, h, cost.ndim - 1)
            contributions[name] = f
        grads = jax.tree_util.tree_map(lambda x: -jnp.mean(x, axis=0), contributions)
        variance = sum(
            jnp.sum(jnp.var(x, axis=0, ddof=1)) / num_particles
            for x in jax.tree_util.tree_leaves(contributions)
        )
        info = GradientInfo(
            objective=jnp.mean(elbos),
            grad_variance=variance,
            num_impossible=jnp.sum(bad).astype(jnp.int32),
        )
        return grads, ScoreEstimatorState(baseline, state.count + 1), info

    return ScoreEstimator(init, grad)
