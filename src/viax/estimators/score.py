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
import math
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
    _sum_last,
    standard_normal_quantile,
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


# XLA on CPU fuses a reduction into the elementwise loop that consumes it and then
# recomputes the reduction for every element of the consumer: a per-draw sum over
# 1000 log-prob terms broadcast over the (S, 1000, K) scores cost 30 ms a step.  Sums
# that feed larger arrays are therefore written as products with a vector of ones,
# which XLA never fuses that way; sums over a few entries are added slice by slice,
# which is cheap to recompute.


def _sum_draws(x):
    """``jnp.sum(x, 0)`` as a dot (see above)."""
    return jnp.tensordot(jnp.ones(x.shape[0], x.dtype), x, axes=1)


def _sum_trailing(x, ndim: int):
    """Sum of ``x`` over its dims after the first ``ndim`` (see above)."""
    if x.ndim == ndim:
        return x
    x = jnp.reshape(x, x.shape[:ndim] + (-1,))
    if x.shape[-1] <= 16:
        return _sum_last(x)
    return x @ jnp.ones(x.shape[-1], x.dtype)


def _sum_axes(x, axes: tuple[int, ...]):
    """``jnp.sum(x, axes, keepdims=True)`` (see above)."""
    if not axes:
        return x
    keep = [a for a in range(x.ndim) if a not in axes]
    moved = jnp.transpose(x, keep + list(axes))
    total = _sum_trailing(moved, len(keep))
    return jnp.reshape(total, tuple(1 if a in axes else n for a, n in enumerate(x.shape)))


def _materialise(x):
    """``x``, computed once: a dot's output is never recomputed by its consumers (see
    above), so an expensive per-draw value is not re-evaluated for every element of
    the (S, *element, K) arrays it feeds."""
    if 2 <= x.shape[-1] <= 16:
        return x @ jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.stack([x, jnp.zeros_like(x)], axis=-1) @ jnp.ones(2, x.dtype)


def _mean_and_variance_sum(x):
    """Mean over draws, and Σ over components of the variance over draws (ddof 1),
    from Σ_s x_s and Σ_s,d x_sd²: reductions of x itself, which XLA fuses with the
    work that makes x (centring first would add a pass over x).  The one-pass formula
    loses digits only where a component's mean dwarfs its spread, and this sum only
    reports the variance."""
    num_draws = x.shape[0]
    mean = jnp.sum(x, axis=0) / num_draws
    spread = jnp.sum(jnp.square(x)) - num_draws * jnp.sum(jnp.square(mean))
    return mean, jnp.maximum(spread, 0.0) / (num_draws - 1)


def leave_one_out_control_variate(f: dict, h: dict, elem_ndim: int) -> dict:
    """``f − a h`` with ``a = Σ_d Cov(f^d, h^d) / Σ_d Var(h^d)`` per element, estimated for
    draw s from the other S − 1 draws.  ``f``, ``h``: dicts of (S, *element, *extra);
    d runs over the dict's leaves and the extra (e.g. category) dims."""
    a = _leave_one_out_coefficient(f, h, elem_ndim)
    return {key: f[key] - _expand(a, h[key]) * h[key] for key in f}


def _leave_one_out_coefficient(f: dict, h: dict, elem_ndim: int):
    """a_s, (S, *element), of :func:`leave_one_out_control_variate`.

    With f̃, h̃ centred on the mean of all S draws (Cov and Var are shift-invariant,
    and centring only reduces cancellation), the leave-one-out moments of draw s are
    ``Cov₋ₛ = (A − c P_s) / n`` and ``Var₋ₛ = (B − c Q_s) / n`` with n = S − 1,
    c = 1 + 1/n, ``P_s = Σ_d f̃_s^d h̃_s^d``, ``Q_s = Σ_d (h̃_s^d)²``, A = Σ_s P_s,
    B = Σ_s Q_s: O(S) work per element, and a_s stays a function of the other draws."""
    num_draws = next(iter(f.values())).shape[0]
    n = num_draws - 1
    products, squares = 0.0, 0.0
    for key in f:
        fl = f[key] - _sum_draws(f[key]) / num_draws
        hl = h[key] - _sum_draws(h[key]) / num_draws
        products = products + _sum_trailing(fl * hl, 1 + elem_ndim)
        squares = squares + _sum_trailing(hl * hl, 1 + elem_ndim)
    sum_products, sum_squares = _sum_draws(products), _sum_draws(squares)
    c = 1.0 + 1.0 / n
    num = sum_products - c * products
    den = sum_squares - c * squares
    scale = sum_squares - squares  # n × the other draws' mean of h̃², Σ over d
    # When the other draws of h are all equal, Var is 0 up to rounding: a_i = 0 then
    # (an a_i of rounding noise over rounding noise would be huge and random).
    ok = den > 1e-8 * scale + 1e-300
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


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

    The S draws of each site are made at once, the model's log-prob terms are
    evaluated once per draw (vmapped; with their gradient for the reparameterised
    sites), and each factor's score ∇λ log q comes in closed form from the family:
    every Rao-Blackwellised cost is a slice of the same per-draw terms, so RB and the
    control variates add O(S × elements) arithmetic and no model evaluations.
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

    def log_joint(path_latents, fixed, data):
        """One draw: Σ log-prob terms, and (floored terms, whether any was not finite)."""
        terms, _ = structure.log_terms({**fixed, **path_latents}, data)
        clean = {k: jnp.where(jnp.isfinite(t), t, IMPOSSIBLE_LOG_PROB) for k, t in terms.items()}
        # Each term's floored sum and its count of non-finite entries in one dot.
        sums = [
            jnp.stack([jnp.ravel(clean[k]), jnp.ravel(~jnp.isfinite(t)).astype(t.dtype)])
            @ jnp.ones(t.size, t.dtype)
            if t.size > 1
            else jnp.stack([jnp.ravel(clean[k])[0], (~jnp.isfinite(t)).astype(t.dtype).sum()])
            for k, t in terms.items()
        ]
        total, num_bad = sum(sums)
        return total, (clean, num_bad > 0)

    def blanket_cost(spec, terms):
        """(S, *cell_shape): the log-joint terms in the site's Markov blanket, per draw."""
        cell = jnp.zeros((num_particles, *spec.cell_shape))
        for term, axes, aligned in structure.plan[spec.name]:
            part = _sum_axes(terms[term], tuple(a + 1 for a in axes))
            cell = cell + jnp.reshape(part, (num_particles, *aligned))
        return cell

    # Every site with an inverse CDF takes its draws from one block of uniforms: one
    # call of the random number generator per step (each call is a threefry loop whose
    # fixed cost exceeded the arithmetic of a small site).
    # The reparameterised sites come first and are handled as one flat vector: a few
    # fused operations for all of them instead of a dozen tiny ones per site.
    by_uniform = path_sites + tuple(s for s in score_sites if hasattr(s.factor, "quantile"))
    by_key = tuple(s for s in score_sites if not hasattr(s.factor, "quantile"))
    offsets = np.cumsum([0] + [math.prod(s.factor.shape) for s in by_uniform])
    path_size = int(offsets[len(path_sites)])

    def draw(params, rng_key):
        """{site: (S, *shape)} draws, and the (S, D) standard normals ε behind the
        reparameterised sites, concatenated."""
        keys = jax.random.split(rng_key, 1 + len(by_key)) if by_key else [rng_key]
        # Materialised: otherwise every consumer of a draw re-derives it from the
        # random bits.
        u = _materialise(jax.random.uniform(keys[0], (num_particles, int(offsets[-1]))))
        eps = standard_normal_quantile(u[:, :path_size])
        latents = {}
        for i, spec in enumerate(by_uniform):
            a, b = offsets[i], offsets[i + 1]
            if spec.name in score_names:
                block = u[:, a:b].reshape(num_particles, *spec.factor.shape)
                latents[spec.name] = spec.factor.quantile(params[spec.name], block)
            else:
                block = eps[:, a:b].reshape(num_particles, *spec.factor.shape)
                latents[spec.name] = spec.factor.transform(params[spec.name], block)
        for spec, key in zip(by_key, keys[1:], strict=True):
            latents[spec.name] = spec.factor.sample(params[spec.name], key, num_particles)
        return latents, eps

    def flat(tree, num_leading):
        return jnp.concatenate(
            [
                jnp.reshape(tree[s.name], tree[s.name].shape[:num_leading] + (-1,))
                for s in path_sites
            ],
            axis=-1,
        )

    def unflat(vector):
        return {
            s.name: jnp.reshape(vector[offsets[i] : offsets[i + 1]], s.factor.shape)
            for i, s in enumerate(path_sites)
        }

    def init(params) -> ScoreEstimatorState:
        del params
        baseline = {s.name: jnp.zeros(s.factor.shape) for s in score_sites} if cv == "ema" else {}
        return ScoreEstimatorState(baseline, jnp.asarray(0, jnp.int32))

    def grad(params, state: ScoreEstimatorState, rng_key, data):
        params = jax.lax.stop_gradient(params)
        latents, eps = draw(params, rng_key)
        fixed = {n: latents[n] for n in score_names}
        path_latents = {s.name: latents[s.name] for s in path_sites}
        if path_sites:
            value_and_grad = jax.value_and_grad(log_joint, has_aux=True)
            (total, (terms, bad)), grad_u = jax.vmap(value_and_grad, in_axes=(0, 0, None))(
                path_latents, fixed, data
            )
        else:
            total, (terms, bad) = jax.vmap(log_joint, in_axes=(None, 0, None))({}, fixed, data)
        log_q = {s.name: s.factor.log_prob(params[s.name], latents[s.name]) for s in score_sites}
        elbos = total - sum(_sum_trailing(v, 1) for v in log_q.values())
        contributions = {}
        if path_sites:
            log_scale = flat({s.name: params[s.name]["log_scale"] for s in path_sites}, 0)
            # log q of a reparameterised draw: −ε²/2 − log σ − log(2π)/2, summed
            elbos = (
                elbos
                + 0.5 * _sum_trailing(jnp.square(eps), 1)
                + jnp.sum(log_scale + 0.5 * math.log(2 * math.pi))
            )
            g = jnp.where(bad[:, None], 0.0, flat(grad_u, 1))
            # pathwise term plus ∂H/∂log_scale = 1 (closed-form Gaussian entropy)
            contributions["__path__"] = {"loc": g, "log_scale": g * jnp.exp(log_scale) * eps + 1.0}
        baseline = dict(state.baseline)
        for spec in score_sites:
            name, value = spec.name, latents[spec.name]
            h = spec.factor.score(params[name], value)
            if rao_blackwell:
                cost = blanket_cost(spec, terms) - log_q[name]
            else:
                cost = jnp.broadcast_to(_expand(_materialise(elbos), value), value.shape)
            if cv == "ema":
                mean_cost = _sum_draws(cost) / num_particles
                baseline[name] = jnp.where(
                    state.count == 0,
                    mean_cost,
                    _EMA_DECAY * state.baseline[name] + (1 - _EMA_DECAY) * mean_cost,
                )
                cost = cost - state.baseline[name]
            if cv == "loo":
                f = {k: hl * _expand(cost, hl) for k, hl in h.items()}
                # f − a h = h (cost − a): the corrected terms without f
                cost = cost - _leave_one_out_coefficient(f, h, cost.ndim - 1)
            contributions[name] = {k: hl * _expand(cost, hl) for k, hl in h.items()}
        moments = jax.tree_util.tree_map(_mean_and_variance_sum, contributions)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        grads = jax.tree_util.tree_map(lambda m: -m[0], moments, is_leaf=is_pair)
        if path_sites:
            path = grads.pop("__path__")
            loc, scale = unflat(path["loc"]), unflat(path["log_scale"])
            grads.update(
                {s.name: {"loc": loc[s.name], "log_scale": scale[s.name]} for s in path_sites}
            )
        variance = sum(m[1] for m in jax.tree_util.tree_leaves(moments, is_leaf=is_pair))
        variance = variance / num_particles
        info = GradientInfo(
            objective=jnp.mean(elbos),
            grad_variance=variance,
            num_impossible=jnp.sum(bad).astype(jnp.int32),
        )
        return grads, ScoreEstimatorState(baseline, state.count + 1), info

    return ScoreEstimator(init, grad)
