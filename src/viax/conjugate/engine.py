"""The exponential-family engine: every update is a gradient of the expected log joint.

A conditionally conjugate model (Hoffman et al. 2013, §2) has global factors β with
priors in the same exponential family and, per data point n, local factors z_n.  The
model supplies one function, its expected log joint over a batch *in mean parameters*:

    F(μ_global, μ_local, batch) = Σ_{n∈B} E_q[log p(x_n, z_n | β)],

and the engine adds the prior terms Σ_g E_q[log p0(β_g)] = Σ_g <η0_g, μ_g> − A(η0_g).
Because the log joint is linear in each factor's sufficient statistics, the optimal
natural parameter of a factor j given all the others is (Blei et al. 2017, eq. 38)

    λ_j* = ∂ E_q[log p(x, z, β)] / ∂ μ_j ,

so ``jax.grad`` of F yields every coordinate update: local factors from ∂F/∂μ_local,
globals from ``η0 + s · ∂F/∂μ_global`` with ``s = N/|B|`` (s = 1 for the full data:
CAVI; s = N/|B| for a minibatch: SVI's intermediate global parameter λ̂).

The ELBO is ``Σ_g [E_q log p0(β_g) + H(q_g)] + s · (F + Σ_local H(q_l))``.

Local factors may be *collapsed*: a model may maximise some local factors out of F in
closed form (LDA's word assignments: max_φ <c, φ> + H(φ) = n · logsumexp(c)).  By
Danskin's theorem the gradients of the collapsed F equal those of the full one at the
optimal φ, so the updates and the ELBO are unchanged while φ is never stored.

Global factors must be conditionally independent given the locals (the setting of
Hoffman et al. 2013), so one gradient updates all of them as a block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from viax.conjugate.expfam import Factor
from viax.conjugate.xla import FAST_COMPILE

__all__ = [
    "ConjugateModel",
    "conjugate_model",
    "elbo",
    "fit_locals",
    "global_means",
    "local_means",
    "update_globals",
]

Natural = dict[str, tuple]


def conjugate_model(cls):
    """Make ``cls`` a frozen dataclass and a JAX pytree: fields marked
    ``field(metadata={"static": True})`` are part of the tree structure (hashable:
    sizes, option strings), all others are leaves (prior arrays), so a refit with new
    priors of the same shapes reuses the compiled code."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    static = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static", False)]
    leaves = [f.name for f in dataclasses.fields(cls) if f.name not in static]
    return jax.tree_util.register_dataclass(cls, data_fields=leaves, meta_fields=static)


def static(default=dataclasses.MISSING):
    """A static (hashable, non-array) model field."""
    return dataclasses.field(default=default, metadata={"static": True})


class ConjugateModel:
    """What a conditionally conjugate model supplies.  Subclasses are decorated with
    :func:`conjugate_model` and implement the methods below; see ``models/`` for four."""

    name: ClassVar[str] = "conjugate"
    # Local factors are updated in this order within one local sweep.
    local_order: ClassVar[tuple[str, ...]] = ()
    # The local factor whose natural parameters decide local convergence.
    convergence_site: ClassVar[str | None] = None
    # CAVI restarts the locals from init_locals(None, ...) every sweep instead of
    # warm-starting them.  Both are coordinate ascent; for LDA a warm-started γ locks
    # documents into the first topics they saw and ends in poorer optima (perplexity
    # 10–30% worse than sklearn's, which restarts too).
    restart_locals: ClassVar[bool] = False

    # Local fits: at most this many sweeps, until the mean absolute change of the
    # convergence site's natural parameters is below local_tol for every point.
    max_local_iter: int = 1
    local_tol: float = 0.0
    # The dtype of the local sweeps (None: that of the local parameters).
    local_dtype = None

    def global_factors(self) -> dict[str, Factor]:
        raise NotImplementedError

    def prior(self) -> Natural:
        """Natural parameters of the priors of the global factors."""
        raise NotImplementedError

    def init_globals(self, rng_key, batch) -> Natural:
        """Starting global natural parameters."""
        raise NotImplementedError

    def local_factors(self, batch) -> dict[str, Factor]:
        return {}

    def local_log_joint(self, global_mean, local_mean, batch) -> jax.Array:
        """Σ_{n in batch} E_q[log p(x_n, z_n | β)] in (weighted) mean parameters."""
        raise NotImplementedError

    def local_objective(self, global_mean, batch) -> Callable[[Natural], jax.Array]:
        """``local_mean -> F`` with the globals fixed, for the local sweeps: by default
        ``local_log_joint``; a model may precompute what depends on the globals only (and
        use ``local_dtype``), as long as its gradients are those of ``local_log_joint``."""
        return lambda local_mean: self.local_log_joint(global_mean, local_mean, batch)

    def init_locals(self, rng_key, batch, global_mean) -> Natural:
        """Starting local natural parameters (``rng_key`` None: deterministic)."""
        return {}

    def prepare(self, data, pad_to: int | None = None):
        """Validate raw data (numpy / scipy.sparse) and turn it into a batch pytree of
        arrays with a ``mask`` of real points, padded to ``pad_to`` rows.  A model whose
        batches also have a ragged part (LDA's words) takes ``extent=``: pad that part
        to at least this length."""
        raise NotImplementedError

    def batch_extent(self, data) -> int | None:
        """The length of the ragged part of ``prepare(data)`` (None: no ragged part).
        The loops over batches pad every batch to the largest extent, so that one shape
        is compiled."""
        return None

    def active_extent(self, batch, active) -> tuple[jax.Array, int] | None:
        """(how much of the prepared batch's ragged part the points with ``active`` True
        use, its whole length); None when the model does not compact (:meth:`compact`)."""
        return None

    def compact(self, batch, active, extent: int):
        """The batch with its ragged part cut down to the active points' share, padded to
        ``extent`` (static), points and their order unchanged: the local sweeps over
        the last, slow points then cost a fraction of a full sweep.  Only called when
        ``active_extent(batch, active) <= extent``."""
        raise NotImplementedError

    def sample_sites(
        self, global_natural, rng: np.random.Generator, num_samples: int
    ) -> dict[str, np.ndarray]:
        """Draws of the global latents from q, keyed by site name, made on the host by
        the factors' NumPy samplers."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------
# Means, objective, updates
# ----------------------------------------------------------------------------------


def global_means(model: ConjugateModel, global_natural: Natural) -> Natural:
    factors = model.global_factors()
    return {name: factors[name].mean(eta) for name, eta in global_natural.items()}


def local_means(factors: Mapping[str, Factor], local_natural: Natural) -> Natural:
    return {name: factors[name].mean(eta) for name, eta in local_natural.items()}


def _tree_inner(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def prior_log_normalizer(model: ConjugateModel) -> jax.Array:
    """Σ_g A(η0_g): a constant of the ELBO, computed once outside the loops."""
    factors, prior = model.global_factors(), model.prior()
    return sum(jnp.sum(factors[name].log_normalizer(eta)) for name, eta in prior.items())


def global_terms(model: ConjugateModel, global_natural, global_mean, prior_constant=None):
    """Σ_g E_q[log p0(β_g)] + H(q_g) = Σ_g <η0_g − η_g, μ_g> + A(η_g) − A(η0_g): the part
    of the ELBO that is not scaled by N/|B| (base measures cancel)."""
    factors, prior = model.global_factors(), model.prior()
    total = 0.0
    for name, eta in global_natural.items():
        factor = factors[name]
        diff = tuple(p - e for p, e in zip(prior[name], eta, strict=True))
        total = total + jnp.sum(factor.inner(diff, global_mean[name]))
        total = total + jnp.sum(factor.log_normalizer(eta))
    if prior_constant is None:
        prior_constant = prior_log_normalizer(model)
    return total - prior_constant


def local_terms(model: ConjugateModel, global_mean, local_natural, batch) -> jax.Array:
    """F + Σ_l H(q_l) over the batch (unscaled)."""
    factors = model.local_factors(batch)
    value = model.local_log_joint(global_mean, local_means(factors, local_natural), batch)
    return value + _local_entropy(factors, local_natural)


def _local_entropy(factors, local_natural):
    return sum(
        (jnp.sum(factors[name].entropy(eta)) for name, eta in local_natural.items()),
        start=jnp.asarray(0.0),
    )


def elbo(model: ConjugateModel, global_natural, local_natural, batch, scale=1.0) -> jax.Array:
    """``Σ_g [E log p0 + H] + scale · (F + Σ_l H)``: the exact ELBO for scale = 1 and the
    full data, an unbiased estimate of it for a uniformly drawn batch and scale N/|B|."""
    gm = global_means(model, global_natural)
    return global_terms(model, global_natural, gm) + scale * local_terms(
        model, gm, local_natural, batch
    )


def fit_locals(model: ConjugateModel, global_mean, local_natural, batch):
    """Coordinate ascent over the local factors, globals fixed.

    Each local update is ``η_l ← ∂F/∂μ_l``, the gradient of ``model.local_objective``
    (built once per call, so whatever it precomputes from the globals stays out of the
    loop).  Each point stops on its own, as sklearn's and gensim's E-steps do: once the
    mean absolute change of its convergence-site parameters falls below ``local_tol``
    its factors are frozen; the loop ends when every point has stopped or after
    ``max_local_iter`` sweeps.  The sweeps run in ``model.local_dtype`` (the result is
    cast back).  Returns (local_natural, num_sweeps)."""
    factors = model.local_factors(batch)
    if not factors:
        return local_natural, jnp.asarray(0, jnp.int32)
    out_dtypes = jax.tree.map(lambda x: x.dtype, local_natural)
    if model.local_dtype is not None:
        local_natural = jax.tree.map(lambda x: x.astype(model.local_dtype), local_natural)
        factors = {
            name: factor
            if factor.weights is None
            else dataclasses.replace(factor, weights=factor.weights.astype(model.local_dtype))
            for name, factor in factors.items()
        }
    objective = model.local_objective(global_mean, batch)

    def one_sweep(objective, nat):
        for name in model.local_order:
            mean = local_means(factors, nat)

            def f(m, name=name, mean=mean):
                return objective({**mean, name: m})

            grad = factors[name].normalize(jax.grad(f)(mean[name]))
            nat = {
                **nat,
                name: tuple(g.astype(x.dtype) for g, x in zip(grad, nat[name], strict=True)),
            }
        return nat

    def cast_back(nat):
        return jax.tree.map(lambda x, dtype: x.astype(dtype), nat, out_dtypes)

    if model.max_local_iter <= 1:
        return cast_back(one_sweep(objective, local_natural)), jnp.asarray(1, jnp.int32)

    site = model.convergence_site or model.local_order[0]
    event = factors[site].event_ndims[0]

    def change(new, old):
        diff = jnp.abs(new[site][0] - old[site][0])
        return jnp.mean(diff, axis=tuple(range(-event, 0))) if event else diff

    def freeze(active, new, old):
        def pick(a, b):
            mask = active.reshape(active.shape + (1,) * (a.ndim - active.ndim))
            return jnp.where(mask, a, b)

        return jax.tree.map(pick, new, old)

    def sweeps(objective, carry, stage_batch, next_extent):
        """Sweeps until every point has stopped or max_local_iter, or (``next_extent``
        given) until the points still going fit in that much of the ragged part."""

        def cond(carry):
            _, i, active = carry
            going = (i < model.max_local_iter) & jnp.any(active)
            if next_extent is not None:
                used, _ = model.active_extent(stage_batch, active)
                going = going & (used > next_extent)
            return going

        def body(carry):
            nat, i, active = carry
            new = one_sweep(objective, nat)
            # sklearn keeps the update that brought the change under the tolerance.
            return freeze(active, new, nat), i + 1, active & (change(new, nat) >= model.local_tol)

        return jax.lax.while_loop(cond, body, carry)

    active = jnp.ones(factors[site].batch_shape(local_natural[site]), bool)
    carry = (local_natural, jnp.asarray(0, jnp.int32), active)
    extent = model.active_extent(batch, active)
    # Stages over ever smaller shares (1, 1/4, 1/16, …) of a ragged batch: a stage runs
    # until the points still going fit in the next, which then sweeps only their part.
    # No stage under 32 rows: each compiles its own loop (~0.25 s), and one of 20 rows
    # saved less run time than that on NYT (1280 rows a batch).
    stages = [None] if extent is None else [extent[1]]
    while stages[-1] is not None and stages[-1] // 4 >= 32:
        stages.append(stages[-1] // 4)
    stage_batch = batch
    for number, next_extent in enumerate([*stages[1:], None]):
        if number > 0:
            stage_batch = model.compact(batch, carry[2], stages[number])
            objective = model.local_objective(global_mean, stage_batch)
        carry = sweeps(objective, carry, stage_batch, next_extent)
    nat, count, _ = carry
    return cast_back(nat), count


def update_globals(
    model: ConjugateModel,
    global_natural,
    global_mean,
    local_natural,
    batch,
    scale=1.0,
    prior_constant=None,
):
    """The global block update ``λ̂_g = η0_g + scale · ∂F/∂μ_g`` at the given locals.

    Returns (λ̂, μ(λ̂), estimate, elbo_after):

    - ``estimate``: ``global_terms(λ) + scale · (F + H_l)`` at the *old* globals (SVI's
      per-step ELBO estimate);
    - ``elbo_after``: the same at λ̂ with the locals unchanged; F is affine in μ_g given
      the locals, so ``F(μ̂) = F(μ) + <∂F/∂μ, μ̂ − μ>`` costs no second pass over the data.
    """
    factors = model.local_factors(batch)
    lm = local_means(factors, local_natural)
    value, grad = jax.value_and_grad(model.local_log_joint)(global_mean, lm, batch)
    prior = model.prior()
    if prior_constant is None:
        prior_constant = prior_log_normalizer(model)
    target = {
        name: tuple(p + scale * g for p, g in zip(prior[name], grad[name], strict=True))
        for name in prior
    }
    local_entropy = _local_entropy(factors, local_natural)
    estimate = global_terms(model, global_natural, global_mean, prior_constant) + scale * (
        value + local_entropy
    )
    new_gm = global_means(model, target)
    delta = jax.tree.map(lambda a, b: a - b, new_gm, global_mean)
    value_after = value + _tree_inner(grad, delta)
    elbo_after = global_terms(model, target, new_gm, prior_constant) + scale * (
        value_after + local_entropy
    )
    return target, new_gm, estimate, elbo_after


# ----------------------------------------------------------------------------------
# Shared helpers for the algorithms
# ----------------------------------------------------------------------------------


def prepare_all(model: ConjugateModel, raw_batches, pad_to: int | None, extent: int | None = None):
    """``model.prepare`` over an iterable of raw batches, each padded to ``pad_to``
    points and to the largest ragged extent so far (at least ``extent``): the extent
    only grows, so a stream of batches compiles few shapes; give the maximum over the
    data as ``extent`` to compile one."""
    for raw in raw_batches:
        size = model.batch_extent(raw)
        if size is None:
            yield model.prepare(raw, pad_to=pad_to)
        else:
            extent = max(size, extent or 0)
            yield model.prepare(raw, pad_to=pad_to, extent=extent)


def max_extent(model: ConjugateModel, raw_batches) -> int | None:
    """The largest ``batch_extent`` over raw batches (None for models without one)."""
    sizes = [model.batch_extent(raw) for raw in raw_batches]
    return None if not sizes or sizes[0] is None else max(sizes)


def to_numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)


def progress_bar(method: str, unit: str, total: int | None, initial: int, show: bool):
    """The conjugate methods' progress bar ("viax cavi", …), cleared when done."""
    return tqdm(
        total=total,
        initial=initial,
        desc=f"viax {method}",
        unit=unit,
        disable=not show,
        leave=False,
    )


def to_device(x, dtype=None) -> jax.Array:
    """Host data as a device array, without compiling: ``jnp.asarray`` of a NumPy array
    compiles a small program per new shape (~25 ms each, and ~0.15 s of a first GMM fit
    on digits); ``jax.device_put`` only copies."""
    return jax.device_put(np.asarray(x, dtype))


def to_device_tree(tree):
    return jax.tree.map(to_device, tree)


def check_globals(model: ConjugateModel, global_natural, what: str = "init") -> None:
    """ValueError, before any compute, unless ``global_natural`` has the structure and
    shapes of the model's prior (``{factor: (arrays, ...)}``) with finite values."""
    expected = jax.tree.map(lambda x: tuple(x.shape), jax.eval_shape(model.prior))
    try:
        got = jax.tree.map(lambda x: tuple(np.shape(x)), global_natural)
    except Exception:  # noqa: BLE001 - any malformed tree gets the message below
        got = None
    if got != expected:
        raise ValueError(
            f"{what}: the global parameters must be natural parameters shaped as the "
            f"model's prior, {expected}; got {got if got is not None else global_natural!r}"
        )
    if not all_finite(global_natural):
        raise ValueError(f"{what}: the global parameters contain NaN or infinite values")


def _sample_sites(model: ConjugateModel, global_natural, num_samples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return model.sample_sites(global_natural, rng, int(num_samples))


def make_sampler(model: ConjugateModel, global_natural) -> Callable[[int, int], dict]:
    """``sampler(num_samples, seed) -> {site: (num_samples, *shape)}`` for Result.

    A ``functools.partial`` of a module-level function, not a closure, so that a Result
    (and an estimator holding one) pickles: ``joblib.dump`` of a fitted model."""
    return functools.partial(_sample_sites, model, global_natural)


def all_finite(tree: Any) -> bool:
    """Every value of every array in ``tree`` finite (checked on the host: no program
    to compile)."""
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _dtype(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    # Python scalars are weakly typed: keep them apart from arrays of the same dtype.
    return ("weak", type(x).__name__)


class compiled:
    """``jax.jit`` with the compile step timed: ``fn(*args)`` returns (output,
    compile_seconds), 0.0 when the executable for these shapes was already built.

    A refit with the same shapes, dtypes and static structure reuses the executable.
    ``fn(*args, fast_compile=True)`` compiles with :data:`viax.conjugate.xla.FAST_COMPILE`.
    """

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...] = ()):
        self._jitted = jax.jit(fn, static_argnames=static_argnames)
        self._static = static_argnames
        self._cache: dict = {}

    def __call__(self, *args, fast_compile: bool = False, **static_kwargs):
        leaves, treedef = jax.tree.flatten(args)
        key = (
            treedef,
            tuple((np.shape(x), _dtype(x)) for x in leaves),
            tuple(sorted(static_kwargs.items())),
            fast_compile,
        )
        executable = self._cache.get(key)
        seconds = 0.0
        if executable is None:
            import time

            start = time.perf_counter()
            executable = self._jitted.lower(*args, **static_kwargs).compile(
                FAST_COMPILE if fast_compile else None
            )
            seconds = time.perf_counter() - start
            self._cache[key] = executable
        return executable(*args), seconds


def check_conjugate_model(model, method: str) -> None:
    """A TypeError, before anything runs, when ``model`` is not a conjugate model: a
    NumPyro model function (or a ``viax.Model``) is fitted by :func:`viax.fit` instead."""
    if isinstance(model, ConjugateModel):
        return
    kind = "a NumPyro model function" if callable(model) else type(model).__name__
    raise TypeError(
        f"{method} takes a viax.conjugate model (GaussianMixtureModel, LDAModel, "
        f"LinearRegressionModel, ... or one built with @conjugate_model), got {kind}; "
        "NumPyro models and viax.Model are fitted with viax.fit (methods advi, bbvi)"
    )
