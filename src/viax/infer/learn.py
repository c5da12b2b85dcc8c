"""Learning the model: parameters θ jointly with q, amortized q, ELBO / IWAE training.

A model with ``numpyro.param`` sites (or networks registered through
``numpyro.contrib.module``, which are param sites whose value is a pytree of weights)
defines a family of joints p_θ(x, z).  Maximising the ELBO over θ and q together,

    max_{θ, φ} L(θ, φ) = E_{q_φ}[log p_θ(x, z) − log q_φ(z)] ≤ log p_θ(x),

is variational EM / type-II maximum likelihood: where q can reach the exact posterior
the bound is tight and θ is the maximum-likelihood estimate (Neal & Hinton 1998).
θ is optimised unconstrained, mapped through ``biject_to(constraint)`` of its site.

Two paths:

* **Full batch** (default): the deterministic fixed-draw objective of DADVI (Giordano,
  Ingram & Broderick 2023): the ELBO with M fixed, moment-matched base draws is a
  deterministic function of (θ, φ), so its θ-gradient is exact for that objective and
  L-BFGS optimises both to a tight tolerance.  For a model whose log joint is quadratic
  in z (probabilistic PCA), the fixed-draw ELBO *is* the ELBO, for any M > D + 1.
* **Minibatch** (``batch_size=``): Adam (or the user's optax optimiser) on simple random
  minibatches of in-memory arrays, a fresh permutation of the rows every epoch; the
  local terms of a batch of B of N rows are scaled by N/B.  Objectives:
  :class:`~viax.estimators.objectives.ELBO` and
  :class:`~viax.estimators.objectives.IWAE` (with DReG gradients).  float32 when the
  per-row data are float32 (:func:`_compute_dtype`).  A fixed budget unless
  ``stop_rule=``:class:`EarlyStopping` (held-out rows, paired test, patience).
  Devices: as on the scale path (:mod:`viax.data.sharding`), a one-axis mesh "data"
  over the local devices (all by default); each step's gathered batch is split over it
  and θ, φ and the optimiser state are replicated, so XLA sums the gradient over the
  devices.  The row order and the draws depend on the seed alone, so 1 and 4 devices
  give the same numbers up to the order of floating-point sums.

q is either a Gaussian family over all latents (full batch), or an encoder for the
local latents of the data plate (:mod:`viax.encoders`; amortization) with a mean-field
Gaussian for any global latents.

Anything this path cannot learn is refused by name before compiling: mutable
(state) sites, discrete latents, an encoder or minibatches on a model without a data
plate, local latents whose rows are not their leading axis, IWAE on a model whose
global latents couple the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions.distribution import MaskedDistribution
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import _unconstrain_reparam

from viax import data as vdata
from viax.diagnostics import KHAT_USABLE, importance_estimate, psis
from viax.encoders import MLPEncoder, ModuleEncoder, num_outputs
from viax.estimators.objectives import ELBO, IWAE, objective_value_and_grad
from viax.families.gaussian import Family, MeanField, make_family
from viax.infer import threefry
from viax.infer.dadvi import base_draws
from viax.infer.driver import (
    Guard,
    chunk_fn,
    guard_init,
    guarded_update,
    jit_once,
    precompile,
    run,
)
from viax.infer.optimize import LBFGSState, lbfgs
from viax.model import PARAMS_KEY, ModelError, Target, build_target, prepare_data
from viax.result import Result, log_weights_fn, mean_and_se

__all__ = ["EarlyStopping", "RowEvidence", "dynamic_binarization", "fit_learn", "needs_learning"]

_LOG_2PI = math.log(2 * math.pi)
_LBFGS_CHUNK = 20
_EARLY_STEPS = 100  # L-BFGS steps before compiling the run-time program (see _full_batch)
_FAST_STEPS = 500  # L-BFGS steps compiled for compile time at most
_ROW_STEP = 2**12  # row-draws per step of the per-row log weights' program (see _row_plan)
_ROW_CALL = 2**15  # row-draws per call of that program
_KHAT_ROWS = 64  # training rows whose k̂ is checked (1000 draws each)
_FINAL_BUDGET = 2**15  # draws × rows for the final training ELBO
_FINAL_CALL = 2**12  # row-draws per call of the final estimates' one program
_FINAL_ROWS = 2048  # rows the final training ELBO reads (a random sample beyond)
_CHECK_ROWS = 2048  # rows on which minibatch learning checks the initial point


@dataclass(frozen=True)
class EarlyStopping:
    """Stop minibatch learning when the bound on held-out rows stops improving.

    A random ``validation_fraction`` of the rows (seeded) is held out of training.  After
    each chunk of whole epochs, the training objective per row (L_K for
    ``viax.IWAE(K)``; for ``viax.ELBO``, the mean of ``num_samples`` log weights) is
    evaluated on up to ``max_rows`` of them with the *same* base draws every time (common
    random numbers), so that two checks differ only through the parameters.  A check
    improves on the best so far when the mean paired difference over the rows exceeds
    ``threshold`` standard errors of that mean:

        d_r = v_r(now) − v_r(best),   improved ⇔ mean(d) > threshold · sd(d) / √R.

    The run stops, converged, after ``patience`` checks in a row without improvement, and
    returns the parameters of the best check (early stopping, e.g. Prechelt 1998; the
    held-out criterion of Burda et al. 2016).  A budget spent before that is reported as
    not converged.  Needs rows that are independent given θ (an encoder, no global
    latents).

    ``validation_data``: held-out rows of your own instead (``{name: array}`` with the
    training data's per-row arrays, e.g. MNIST's validation split); no training rows are
    then held out, the first ``max_rows`` of them are evaluated, and the rule also
    watches learning from a :mod:`viax.data` source.

    Example:
        >>> rule = EarlyStopping(validation_fraction=0.1, patience=5)
    """

    validation_fraction: float = 0.1
    patience: int = 5
    threshold: float = 2.0
    num_samples: int = 8
    max_rows: int = 1000
    validation_data: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.validation_data is not None and not isinstance(self.validation_data, Mapping):
            raise TypeError(
                "validation_data must be a mapping of arrays (the held-out rows), got "
                f"{type(self.validation_data).__name__}"
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}"
            )
        for name in ("patience", "num_samples", "max_rows"):
            _check_int(name, getattr(self, name))
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")


def needs_learning(target: Target, encoder, objective, batch_size) -> bool:
    """True when the fit must go through this module: θ to learn, an encoder, an
    objective other than the plain ELBO, or minibatches."""
    return bool(target.param_sites) or any(v is not None for v in (encoder, objective, batch_size))


def dynamic_binarization(rng_key, batch: dict) -> dict:
    """Each value in [0, 1] replaced by a Bernoulli draw with that probability, afresh
    for every batch (the binarization of Burda et al. 2016 for MNIST grey levels)."""
    keys = threefry.split(rng_key, len(batch))

    def draw(key, value):
        # Uniforms in the data's own precision: float64 uniforms (the x64 default) for
        # float32 grey levels cost twice the random bits and promoted every comparison.
        # threefry.uniform: jax.random.uniform's numbers, unrolled (3.6x faster on CPU).
        dtype = value.dtype if jnp.issubdtype(value.dtype, jnp.floating) else jnp.float64
        return (threefry.uniform(key, value.shape, dtype) < value).astype(value.dtype)

    pairs = zip(keys, sorted(batch.items()), strict=True)
    return {name: draw(key, value) for key, (name, value) in pairs}


# -- structure of the model --------------------------------------------------------------


class _Structure(NamedTuple):
    plate: str | None  # the data plate: rows are its elements
    num_rows: int
    local: tuple[tuple[str, tuple[int, ...]], ...]  # (site, unconstrained shape of one row)
    global_names: tuple[str, ...]
    batch_keys: tuple[str, ...]  # data arrays with one row per plate element
    outside: tuple[str, ...]  # sample sites outside the data plate (priors of globals ...)


def _abstract_trace(target: Target, arrays, summarize: Callable[[dict], Any]):
    """``summarize(trace)`` of the model's trace on ``arrays``, traced abstractly
    (``jax.eval_shape``: nothing runs or compiles); latents at uniform initial values."""
    static = dict(target.static_data)
    captured = {}

    def discover(dynamic):
        seeded = handlers.substitute(
            handlers.seed(target.model_fn, jax.random.PRNGKey(0)),
            substitute_fn=init_to_uniform(radius=2),
        )
        captured["out"] = summarize(handlers.trace(seeded).get_trace(**static, **dynamic))
        return 0.0

    jax.eval_shape(discover, arrays)
    return captured["out"]


def _trace_sites(target: Target, arrays) -> dict:
    """Site name -> (type, is_observed, plate frames, value shape, is_discrete,
    is_partly_masked), abstractly."""

    def summarize(trace):
        return {
            name: (
                site["type"],
                bool(site.get("is_observed", False)),
                tuple((f.name, f.dim, f.size) for f in site.get("cond_indep_stack", ())),
                tuple(jnp.shape(site["value"])) if site["type"] == "sample" else (),
                site["type"] == "sample" and site["fn"].support.is_discrete,
                site["type"] == "sample" and _partly_masked(site["fn"]),
            )
            for name, site in trace.items()
        }

    return _abstract_trace(target, arrays, summarize)


def _partly_masked(fn) -> bool:
    """A distribution wrapped by ``handlers.mask`` / ``obs_mask=`` whose mask is not
    known to be all True (a data-dependent mask is traced here)."""
    if not isinstance(fn, MaskedDistribution):
        return False
    mask = fn._mask
    return isinstance(mask, jax.core.Tracer) or not bool(np.all(np.asarray(mask)))


def _structure(target: Target, arrays, need_plate: bool, why: str) -> _Structure:
    sites = _trace_sites(target, arrays)
    masked = [s.name for s in target.sites if sites[s.name][5]]
    if masked:
        # The masked-out entries of a latent have no density at all (log p = 0 there):
        # q's sd on them grows without bound and θ follows (obs_mask= on a learned
        # noise scale ran off to 2.7e5 with "q ran off to infinity").
        raise ModelError(
            f"latent site(s) {', '.join(masked)} are masked (handlers.mask or obs_mask=): "
            "their masked-out entries have no density, so the bound has no maximum there; "
            "viax cannot learn θ with them (drop the missing rows, or mask only observed sites)"
        )
    mutable = [n for n, s in sites.items() if s[0] == "mutable"]
    if mutable:
        raise ModelError(
            f"site(s) {', '.join(mutable)} are numpyro.mutable (state) sites; viax cannot "
            "learn them (use a stateless network, e.g. no batch norm)"
        )
    if target.discrete_sites:
        raise ModelError(
            f"site(s) {', '.join(target.discrete_sites)} are discrete latents; learning θ "
            "needs continuous latents (marginalise them out)"
        )
    latent = [s.name for s in target.sites]
    plates = {f[0]: f for n in latent for f in sites[n][2]}
    if not plates:  # no local latents: the plate of the observations, if any
        plates = {f[0]: f for s in sites.values() if s[0] == "sample" for f in s[2]}
    if len(plates) > 1:
        if need_plate:
            raise ModelError(
                f"{why} needs one data plate, but the latents sit in plates "
                f"{', '.join(sorted(plates))}; viax cannot choose the rows"
            )
        plates = {}
    if not plates:
        if need_plate:
            raise ModelError(f"{why} needs a data plate (numpyro.plate over the rows)")
        return _Structure(None, 0, (), tuple(latent), (), ())
    plate, _, num_rows = next(iter(plates.values()))
    local, global_names = [], []
    for site in target.sites:
        frames = [f for f in sites[site.name][2] if f[0] == plate]
        if not frames:
            global_names.append(site.name)
            continue
        shape = sites[site.name][3]
        if not shape or shape[0] != num_rows:
            raise ModelError(
                f"local latent {site.name!r} of plate {plate!r}: its rows must be its leading "
                f"axis (shape {shape}, plate size {num_rows})"
            )
        local.append((site.name, tuple(site.unconstrained_shape[1:])))
    batch_keys = tuple(
        k for k, v in sorted(arrays.items()) if k != PARAMS_KEY and v.shape[:1] == (num_rows,)
    )
    outside = tuple(
        n for n, s in sites.items() if s[0] == "sample" and not any(f[0] == plate for f in s[2])
    )
    if need_plate and not batch_keys:
        raise ModelError(
            f"{why}: no data array has one row per element of plate {plate!r} "
            f"(size {num_rows}); the plate's size must come from the data"
        )
    return _Structure(plate, num_rows, tuple(local), tuple(global_names), batch_keys, outside)


def _params_not_in_density(target: Target, arrays, position) -> tuple[tuple[str, ...], ...]:
    """(unused, no_gradient): the param sites that the log joint does not depend on at
    all, and those it depends on only through operations with a zero derivative
    (``lax.stop_gradient``, round/floor/ceil/sign, comparisons and integer casts).  Both
    get a gradient that is identically zero, so they would keep their initial values.

    Read from the jaxpr of log p_θ(x, z) as a function of θ (traced, nothing compiles): a
    forward pass over its equations marks what depends on each θ leaf, and what depends
    on it differentiably (a value of an integer or boolean type carries no derivative;
    nested ``jit`` programs are followed).  A structural rule, not a numerical one: a
    gradient that is zero at the initial point only (θ at an optimum, a ReLU in its flat
    part) is never flagged, and a zero gradient at a random perturbation would still not
    prove "identically".  Other equations with inner programs (scan, cond, custom
    derivatives) count as depending differentiably on all their inputs, so both lists
    err on "used"."""
    if not target.param_sites:
        return (), ()
    theta = {site.name: site.init_value for site in target.param_sites}
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    is_array = [isinstance(leaf, jax.Array | np.ndarray | float) for leaf in leaves]
    owners = []  # the site of each leaf, in flattening order (sorted site names)
    for name in sorted(theta):
        owners += [name] * len(jax.tree_util.tree_leaves(theta[name]))

    def log_joint(array_leaves):
        it = iter(array_leaves)
        full = [next(it) if a else leaf for a, leaf in zip(is_array, leaves, strict=True)]
        data = {**arrays, PARAMS_KEY: jax.tree_util.tree_unflatten(treedef, full)}
        return target.log_density(position, data)

    pairs = zip(leaves, is_array, strict=True)
    arrays_in = [jnp.asarray(leaf, dtype=float) for leaf, a in pairs if a]
    jaxpr = jax.make_jaxpr(log_joint)(arrays_in).jaxpr
    start = [({i}, {i}) for i in range(len(jaxpr.invars))]
    (used, differentiable), *_ = _dependencies(jaxpr, start)
    leaf_owner = [o for o, a in zip(owners, is_array, strict=True) if a]
    used_sites = {leaf_owner[i] for i in used}
    gradient_sites = {leaf_owner[i] for i in differentiable}
    sites = [n for n in sorted(theta) if n in leaf_owner]
    return (
        tuple(n for n in sites if n not in used_sites),
        tuple(n for n in sites if n in used_sites and n not in gradient_sites),
    )


# Primitives whose derivative is zero wherever it exists: their outputs carry no gradient.
_ZERO_DERIVATIVE = frozenset({"stop_gradient", "round", "floor", "ceil", "sign"})


def _dependencies(jaxpr, inputs):
    """Forward pass over ``jaxpr``: for each of its outputs, (the input indices it depends
    on, those it depends on differentiably), from ``inputs``' pairs of sets."""
    depends = dict(zip(jaxpr.invars, inputs, strict=True))
    none: set = set()

    def of(atom):
        return depends.get(atom, (none, none)) if _is_var(atom) else (none, none)

    for eqn in jaxpr.eqns:
        ins = [of(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
        if inner is not None:
            outs = _dependencies(getattr(inner, "jaxpr", inner), ins)
        else:
            every = set().union(*(a for a, _ in ins))
            grad = set().union(*(g for _, g in ins))
            if eqn.primitive.name in _ZERO_DERIVATIVE:
                grad = none
            outs = [(every, grad)] * len(eqn.outvars)
        for var, (every, grad) in zip(eqn.outvars, outs, strict=True):
            inexact = jnp.issubdtype(getattr(var.aval, "dtype", jnp.float32), jnp.inexact)
            depends[var] = (every, grad if inexact else none)
    return [of(v) for v in jaxpr.outvars]


def _is_var(atom) -> bool:
    return not hasattr(atom, "val")  # a Literal carries its value; a Var does not


def _refuse_per_row_params(target: Target, arrays, structure: _Structure) -> None:
    """Minibatch training runs the model on batches of B of the N rows with one θ: a param
    site whose shape follows the number of rows (one value per row) cannot be learned
    that way.  Found by tracing the model on half the rows and comparing shapes."""
    if not target.param_sites or structure.num_rows < 2:
        return
    half = structure.num_rows // 2
    # Shapes only (jax.eval_shape): slicing 50,000 MNIST rows eagerly cost 0.4 s.
    batch = {
        k: jax.ShapeDtypeStruct((half, *v.shape[1:]), v.dtype) if k in structure.batch_keys else v
        for k, v in arrays.items()
    }
    try:
        on_batch = _param_shapes(target, batch)
    except Exception as err:  # the user's model fails on a batch of rows: say so
        raise ModelError(
            f"minibatch training runs the model on batches of rows of plate "
            f"{structure.plate!r}, but it fails on {half} of its {structure.num_rows} rows: "
            f"{type(err).__name__}: {err}"
        ) from err
    on_all = _param_shapes(target, arrays)
    per_row = [n for n in on_all if on_batch.get(n) != on_all[n]]
    if per_row:
        raise ModelError(
            f"param site(s) {', '.join(per_row)} change shape with the number of rows of "
            f"plate {structure.plate!r} (one value per row); minibatch training learns one θ "
            "shared by every batch: make them latents in the plate (with encoder=) or learn "
            "on the full batch"
        )


def _param_shapes(target: Target, arrays) -> dict:
    """Param site -> the shapes of its value's leaves, abstractly."""

    def summarize(trace):
        return {
            name: tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(site["value"]))
            for name, site in trace.items()
            if site["type"] == "param"
        }

    return _abstract_trace(target, arrays, summarize)


def _log_p_parts(target: Target, plate, values, theta, batch):
    """(rows (B,), rest ()) of log p_θ(x, z) + log|J|: the terms of the data plate summed
    per row, and every other term.  ``values``: unconstrained latents by name, ``theta``:
    constrained params by name."""
    params = {**values, **theta}
    model = handlers.substitute(
        target.model_fn, substitute_fn=functools.partial(_unconstrain_reparam, params)
    )
    trace = handlers.trace(model).get_trace(**dict(target.static_data), **batch)
    rows, rest = 0.0, 0.0
    for site in trace.values():
        if site["type"] != "sample":
            continue
        lp = site["fn"].log_prob(site["value"])
        if site.get("scale") is not None:
            lp = lp * site["scale"]
        frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
        if frame is None or jnp.ndim(lp) == 0:
            rest = rest + jnp.sum(lp)
        else:
            axis = jnp.ndim(lp) + frame.dim
            lp = jnp.moveaxis(lp, axis, 0)
            rows = rows + jnp.sum(lp.reshape(lp.shape[0], -1), axis=1)
    return rows, rest


def _over_draws(fn: Callable, z):
    """``jax.vmap(fn)(z)`` over the leading draw axis of ``z`` (S, ...); with S = 1, ``fn``
    on the one draw and the axis put back: the same numbers, and the model's products
    keep their own shapes (a vmap over a size-1 axis leaves a unit batch dimension in the
    model's products and their gradients, about 2% of the MNIST VAE step on one core:
    benchmarks/results/vae_step_one_draw.md)."""
    if jax.tree_util.tree_leaves(z)[0].shape[0] != 1:
        return jax.vmap(fn)(z)
    out = fn(jax.tree_util.tree_map(lambda a: a[0], z))
    return jax.tree_util.tree_map(lambda a: a[None], out)


# -- variational families over the latents -------------------------------------------------


def _constrain_theta(target: Target, theta_u: dict) -> dict:
    out = {}
    for site in target.param_sites:
        transform = biject_to(site.constraint)
        out[site.name] = jax.tree_util.tree_map(transform, theta_u[site.name])
    return out


def _unconstrained_theta(target: Target) -> dict:
    out = {}
    for site in target.param_sites:
        transform = biject_to(site.constraint)
        out[site.name] = jax.tree_util.tree_map(
            lambda v, t=transform: jnp.asarray(t.inv(jnp.asarray(v, dtype=float)), dtype=float),
            site.init_value,
        )
    return out


@dataclass(frozen=True, eq=False)
class _FamilyQ:
    """A Gaussian family over all latents (flat, unconstrained): full batch only; the
    log weights are of the whole joint (R = 1)."""

    target: Target
    family: Family
    structure: _Structure
    rows_mode = False

    def noise_dim(self, num_rows):
        del num_rows
        return self.family.noise_dim

    def split_noise(self, eps, num_rows):
        del num_rows
        return eps

    def normal_noise(self, key, num, num_rows):
        del num_rows
        return jax.random.normal(key, (num, self.family.noise_dim))

    def init(self, key, init_position):
        del key
        return self.family.init(loc=init_position)

    def draw(self, phi, eps, batch):
        del batch
        return jax.vmap(lambda e: self.family.transform(phi, e))(eps)

    def log_q(self, phi, z, batch, row_scale):
        del batch, row_scale
        return jax.vmap(lambda u: self.family.log_prob(phi, u))(z)[:, None]

    def log_p(self, theta, z, batch, row_scale):
        def one(u):
            rows, rest = _log_p_parts(
                self.target, self.structure.plate, self.target.unravel_fn(u), theta, batch
            )
            return rest + row_scale * jnp.sum(rows)

        return _over_draws(one, z)[:, None]


@dataclass(frozen=True, eq=False)
class _AmortizedQ:
    """q(z) = q_λ(z_global) Π_n q_φ(z_n | x_n): an encoder for the data plate's local
    latents, mean-field Gaussian for the global ones.  Without global latents (and terms
    outside the plate) the log weights are per row (R = B rows), else of the joint."""

    target: Target
    encoder: Any
    structure: _Structure
    input_keys: tuple[str, ...]
    input_dim: int
    local_dim: int
    global_family: MeanField | None
    unravel_global: Callable | None
    # The encoder reads centred, scaled inputs (see _make_q): raw-scale data (grey
    # levels 0-16) would leave its first layer badly conditioned.
    feature_shift: Any = 0.0
    feature_scale: Any = 1.0
    # float32 on the minibatch path when the data are float32 (see fit_learn).
    dtype: Any = jnp.float64
    # An affine encoder reads whitened inputs instead (a (d, d) matrix; see _make_q).
    feature_whiten: Any = None

    @property
    def rows_mode(self) -> bool:
        return self.global_family is None and not self.structure.outside

    def noise_dim(self, num_rows):
        g = self.global_family.dim if self.global_family is not None else 0
        return g + num_rows * self.local_dim

    def split_noise(self, eps, num_rows):
        g = self.global_family.dim if self.global_family is not None else 0
        return {
            "global": eps[:, :g],
            "local": eps[:, g:].reshape(eps.shape[0], num_rows, self.local_dim),
        }

    def normal_noise(self, key, num, num_rows):
        eps = threefry.normal(key, (num, self.noise_dim(num_rows)), self.dtype)
        return self.split_noise(eps, num_rows)

    def row_noise(self, key, rows, draws):
        """Base draws of the local latents in rows mode, (D, R, k), for row indices
        ``rows`` (R,) and draw indices ``draws`` (D, R) (uint32): coordinate j of draw s
        of row n comes from the counter (n, s·k + j) (:func:`threefry.normal_at`), the
        same number in any chunk of rows and draws."""
        k = self.local_dim
        high = jnp.broadcast_to(rows[None, :, None], (*draws.shape, k))
        low = draws[:, :, None] * np.uint32(k) + jnp.arange(k, dtype=jnp.uint32)
        local = threefry.normal_at(key, high, low, self.dtype)
        return {"local": local, "global": jnp.zeros((draws.shape[0], 0), self.dtype)}

    def init(self, key, init_position):
        del init_position
        out_dim = num_outputs(self.encoder.covariance, self.local_dim)
        phi = {"encoder": self.encoder.init(key, self.input_dim, out_dim)}
        if self.global_family is not None:
            phi["global"] = self.global_family.init()
        return phi

    def features(self, batch):
        parts = [
            jnp.asarray(batch[k], dtype=self.dtype).reshape(batch[k].shape[0], -1)
            for k in self.input_keys
        ]
        centred = jnp.concatenate(parts, axis=1) - self.feature_shift
        if self.feature_whiten is not None:
            return centred @ self.feature_whiten
        return centred / self.feature_scale

    def _gaussian(self, phi, batch):
        out = self.encoder.apply(phi["encoder"], self.features(batch))  # (B, outputs)
        k = self.local_dim
        loc, rest = out[:, :k], out[:, k:]
        if self.encoder.covariance == "diagonal":
            return loc, rest + self.encoder.init_log_scale, None
        rows, cols = np.tril_indices(k)
        tril = jnp.zeros((out.shape[0], k, k)).at[:, rows, cols].set(rest)
        log_diag = jnp.diagonal(tril, axis1=1, axis2=2) + self.encoder.init_log_scale
        strict = jnp.where(np.tri(k, k=-1, dtype=bool), tril, 0.0)
        return loc, log_diag, strict

    def draw(self, phi, eps, batch):
        return self._draw_from(self._gaussian(phi, batch), phi, eps)

    def _draw_from(self, gaussian, phi, eps):
        """z from the encoder's output ``gaussian`` = (loc, log diag L, strict L) and ε."""
        loc, log_diag, strict = gaussian
        local = loc + jnp.exp(log_diag) * eps["local"]
        if strict is not None:
            local = local + jnp.einsum("bij,kbj->kbi", strict, eps["local"])
        z = {"local": local}
        if self.global_family is not None:
            z["global"] = jax.vmap(lambda e: self.global_family.transform(phi["global"], e))(
                eps["global"]
            )
        return z

    def log_q(self, phi, z, batch, row_scale):
        return self.log_q_from(self._gaussian(phi, batch), phi, z, row_scale)

    def draw_with_gaussian(self, phi, eps, batch):
        """``(draw(phi, eps, batch), the encoder's output)``: the output is what
        :meth:`log_q_from` needs, so an estimator that holds q's parameters fixed in
        log q (DReG, sticking the landing) runs the encoder once per step."""
        gaussian = self._gaussian(phi, batch)
        return self._draw_from(gaussian, phi, eps), gaussian

    def log_q_from(self, gaussian, phi, z, row_scale):
        """log q(z) from the encoder's output ``gaussian`` = (loc, log diag L, strict L)
        for the batch's rows (and φ for the global family)."""
        loc, log_diag, strict = gaussian
        resid = z["local"] - loc
        if strict is None:
            r = resid * jnp.exp(-log_diag)
        else:
            chol = strict + jax.vmap(jnp.diag)(jnp.exp(log_diag))
            r = jax.vmap(
                lambda res: jax.vmap(
                    lambda c, x: jax.scipy.linalg.solve_triangular(c, x, lower=True)
                )(chol, res)
            )(resid)
        rows = (
            -0.5 * jnp.sum(r**2, axis=-1)
            - jnp.sum(log_diag, axis=-1)
            - 0.5 * self.local_dim * (_LOG_2PI)
        )
        return self._log_q_total(phi, rows, z, row_scale)

    def _log_q_total(self, phi, rows, z, row_scale):
        """The per-row local log q (S, B) as returned: per row in rows mode, else
        summed over the rows scaled by N/B, plus the global family's log q: (S, 1)."""
        if self.rows_mode:
            return rows
        total = row_scale * jnp.sum(rows, axis=1)
        if self.global_family is not None:
            total = total + jax.vmap(lambda u: self.global_family.log_prob(phi["global"], u))(
                z["global"]
            )
        return total[:, None]

    def log_q_at_noise(self, phi, eps, z, batch, row_scale):
        """log q(z) for z = draw(phi, eps, batch): the local part from the base draws
        (−|ε|²/2 − Σ log diag L), so no residual z − m (which cancels to rounding error
        where L is tiny) is divided by the scale: the deterministic full-batch objective
        was driven to a spurious +1e24 through that cancellation (full-rank encoder)."""
        _, log_diag, _ = self._gaussian(phi, batch)
        return self._log_q_total(phi, self._rows_at_noise(log_diag, eps), z, row_scale)

    def _rows_at_noise(self, log_diag, eps):
        """Per-row local log q at z = m + L ε: −|ε|²/2 − Σ log diag L − k/2 log 2π."""
        return (
            -0.5 * jnp.sum(eps["local"] ** 2, axis=-1)
            - jnp.sum(log_diag, axis=-1)
            - 0.5 * self.local_dim * _LOG_2PI
        )

    def draw_and_log_q(self, phi, eps, batch, row_scale):
        """``(draw(phi, eps, batch), log_q_at_noise(...))`` from one pass of the encoder.

        Separate ``draw`` and ``log_q`` calls run the encoder twice per step, forward and
        backward (XLA does not merge the two differentiated copies: two of the three
        784 × 200 products of an MNIST encoder, doubled).  log q(z) from the base draws
        is the same number as from z (the residual (z − m)/s is ε up to rounding), and
        its reparameterised gradient is the same: the terms through z and through m, s
        cancel exactly, leaving −∇ Σ log diag L."""
        gaussian = self._gaussian(phi, batch)
        z = self._draw_from(gaussian, phi, eps)
        rows = self._rows_at_noise(gaussian[1], eps)
        return z, self._log_q_total(phi, rows, z, row_scale)

    def values(self, z_one):
        """Latents by name for one draw: local (B, *row_shape), global from its flat vector."""
        out, start = {}, 0
        local = z_one["local"]
        for name, shape in self.structure.local:
            size = int(np.prod(shape, dtype=int))
            out[name] = local[:, start : start + size].reshape(local.shape[0], *shape)
            start += size
        if self.global_family is not None:
            out.update(self.unravel_global(z_one["global"]))
        return out

    def log_p(self, theta, z, batch, row_scale):
        def one(z_one):
            rows, rest = _log_p_parts(
                self.target, self.structure.plate, self.values(z_one), theta, batch
            )
            if self.rows_mode:
                return rows
            return (rest + row_scale * jnp.sum(rows))[None]

        return _over_draws(one, z)

    def log_p_folded(self, theta, z, batch):
        """``log_p`` in rows mode with the S draws folded into the rows: one evaluation
        of the model on S·B rows (the row arrays repeated S times), (S, B) per-row log
        densities, the same numbers up to rounding.  vmap over the draws leaves
        contractions over two batch axes, (S, B), in the gradient (W's gradient in PPCA,
        "sbd,sbk->dk"), which XLA's CPU backend runs 3–5× slower than the same
        contraction over one axis of S·B."""
        local = z["local"]
        num_draws, num_rows = local.shape[:2]
        keys = self.structure.batch_keys
        tiled = {
            k: (
                jnp.broadcast_to(v, (num_draws, *jnp.shape(v))).reshape(
                    num_draws * num_rows, *jnp.shape(v)[1:]
                )
                if k in keys
                else v
            )
            for k, v in batch.items()
        }
        values = self.values({"local": local.reshape(num_draws * num_rows, -1)})
        rows, _ = _log_p_parts(self.target, self.structure.plate, values, theta, tiled)
        return rows.reshape(num_draws, num_rows)


def _make_q(target, arrays, structure, encoder, family, rank, dtype=jnp.float64):
    if encoder is None:
        return _FamilyQ(target, make_family(family, target.dim, rank), structure)
    keys = encoder.data_keys if encoder.data_keys is not None else structure.batch_keys
    unknown = [k for k in keys if k not in arrays]
    if unknown:
        raise ModelError(f"encoder data_keys {', '.join(unknown)} are not data arrays")
    short = [k for k in keys if arrays[k].shape[:1] != (structure.num_rows,)]
    if short:
        raise ModelError(
            f"encoder data_keys {', '.join(short)} do not have one row per element of plate "
            f"{structure.plate!r} ({structure.num_rows})"
        )
    input_dim = sum(int(np.prod(arrays[k].shape[1:], dtype=int)) for k in keys)
    local_dim = sum(int(np.prod(shape, dtype=int)) for _, shape in structure.local)
    global_family, unravel = None, None
    if structure.global_names:
        sites = {s.name: s for s in target.sites}
        zeros = {n: jnp.zeros(sites[n].unconstrained_shape) for n in structure.global_names}
        flat, unravel = ravel_pytree(zeros)
        global_family = MeanField(int(flat.shape[0]))
    features = np.concatenate(
        [np.asarray(arrays[k], dtype=float).reshape(structure.num_rows, -1) for k in keys], axis=1
    )
    # Centre each feature; divide all by one scale, the root mean square of the features'
    # sds.  A per-feature sd would blow up the rare pixels of MNIST's border (sd ~ 0.005:
    # an "on" pixel read as 200) and saturate the first tanh layer on exactly the rows
    # where they occur; one common scale keeps every input O(1).
    shift = features.mean(axis=0)
    scale = float(np.sqrt(np.mean(features.var(axis=0))))
    scale = scale if scale > 0 else 1.0
    whiten = None
    if isinstance(encoder, MLPEncoder) and not encoder.hidden_sizes:
        # An affine encoder of whitened inputs is the same family as one of raw inputs
        # (a change of its coordinates), but the curvature of the objective in its
        # weights is the inputs' covariance: on the digits (eigenvalues spread over 1e7)
        # L-BFGS crawled for thousands of steps (PPCA, 400 s) until whitened.  Directions
        # of (near) zero variance are left unscaled.  A network is not whitened: that
        # would change what its nonlinear layers see.
        lam, vectors = np.linalg.eigh(np.cov(features, rowvar=False).reshape(input_dim, input_dim))
        keep = lam > 1e-10 * max(float(lam.max()), 1e-300)
        whiten = vectors * np.where(keep, 1.0 / np.sqrt(np.where(keep, lam, 1.0)), 1.0 / scale)
        whiten = jnp.asarray(whiten, dtype=dtype)
    return _AmortizedQ(
        target,
        encoder,
        structure,
        tuple(keys),
        input_dim,
        local_dim,
        global_family,
        unravel,
        jnp.asarray(shift, dtype=dtype),
        jnp.asarray(scale, dtype=dtype),
        dtype,
        whiten,
    )


# -- evidence per row --------------------------------------------------------------------


@dataclass(frozen=True)
class RowEvidence:
    """Estimates of log p_θ(x) for data whose rows are independent given θ (no global
    latents): per row n, from ``num_samples`` draws of the amortized q(z_n | x_n).

    ``log_p`` is the sum over rows of the PSIS importance-sampling estimates
    ``log_p_rows`` (with ``log_p_se`` = √Σ se²), ``elbo`` the sum of the per-row ELBOs,
    ``iwae`` the sum of the per-row L_S (S = num_samples, no smoothing; per row in
    ``iwae_rows``), and
    ``khat_rows`` the per-row PSIS k̂ (Yao et al. 2018): rows above 0.7 have an
    unreliable estimate."""

    log_p: float
    log_p_se: float
    elbo: float
    elbo_se: float
    iwae: float
    log_p_rows: np.ndarray
    log_p_se_rows: np.ndarray
    elbo_rows: np.ndarray
    khat_rows: np.ndarray
    num_samples: int
    iwae_rows: np.ndarray | None = None

    @property
    def khat(self) -> float:
        """The largest per-row k̂."""
        return float(np.max(self.khat_rows))

    @property
    def fraction_untrusted(self) -> float:
        """Fraction of rows with k̂ ≥ 0.7."""
        return float(np.mean(~(self.khat_rows < KHAT_USABLE)))


@functools.lru_cache(maxsize=64)
def _row_weights_fn(q: _AmortizedQ, draws: int, fold: bool = False):
    """Compiled ``(theta, phi, fixed, key, parts, rows, starts) -> (n, D, R)`` per-row log
    weights: ``parts`` holds n × R row slots (arrays (n, R, ...)), slot (i, c) reading row
    ``rows[i, c]`` with draws ``starts[i, c] + 0 … D−1``.  A ``lax.map`` over the n steps,
    so one call runs n chunks of D × R row-draws with one dispatch and no host sync, and
    memory stays O(D × R × network width) whatever n.  ``fold``: the model evaluated once
    on D·R rows (:meth:`_AmortizedQ.log_p_folded`; where :func:`_evidence_folds` allows)."""

    def one(theta, phi, fixed, key, slot):
        part, rows, starts = slot
        batch = {**fixed, **part}
        index = starts[None, :] + jnp.arange(draws, dtype=jnp.uint32)[:, None]  # (D, R)
        # log q from the base draws (as the training step does): the same number as from
        # z, without the residual (z − m) / s that cancels to rounding where s is tiny.
        z, log_q = q.draw_and_log_q(phi, q.row_noise(key, rows, index), batch, 1.0)
        if fold:
            return q.log_p_folded(theta, z, batch) - log_q
        return q.log_p(theta, z, batch, 1.0) - log_q

    def fn(theta, phi, fixed, key, parts, rows, starts):
        return jax.lax.map(lambda slot: one(theta, phi, fixed, key, slot), (parts, rows, starts))

    # Optimised (not jit_once), also for the fit's final estimates: at XLA's level 0 the
    # MNIST VAE's final ELBO and k̂ check cost 5.9 s of CPU against 2.1 s.
    return jax.jit(fn)


def _row_plan(num_rows: int, num_samples: int, chunk: tuple[int, int] | None = None):
    """(D, R, n, B): D draws × R row slots per step, n steps per call, B blocks of D
    draws per row (B·D ≥ S).  A step holds about _ROW_STEP row-draws (its intermediates,
    e.g. the (D·R, 784) logits of an MNIST decoder, stay a few MiB), a call about
    _ROW_CALL (n steps, fewer when there is less work).  D = ⌈S / ⌈S / _ROW_STEP⌉⌉, so
    5,000 draws are two blocks of 2,500 rather than 8,192 draws cut to 5,000.
    ``chunk``: (R, D) given (the fit's final estimates share one program)."""
    if chunk is not None:
        columns, draws = (int(c) for c in chunk)
    else:
        draws = -(-num_samples // -(-num_samples // _ROW_STEP))
        columns = max(1, _ROW_STEP // draws)
    blocks = -(-num_samples // draws)
    items = num_rows * blocks
    columns = min(columns, items)
    steps = max(1, min(_ROW_CALL // (draws * columns), -(-items // columns)))
    return draws, columns, steps, blocks


def _evidence_folds(q, theta, phi, batch, fixed) -> bool:
    """Whether the held-out evidence may fold the draws into the rows, checked as
    :func:`_folds` does (the folded per-row log densities equal the per-draw ones), on
    the first 4 rows × 2 draws at the fitted θ, φ.  Folded, the MNIST VAE's evidence
    costs 9.7 µs of CPU per row-draw against 11.9 (one product over D·R rows per layer).
    Tolerance 1e-9 relative, or 10³ ε of a float32 q: rounding, not a coupling of rows."""
    if not getattr(q, "rows_mode", False):
        return False
    keys = q.structure.batch_keys
    part = {**fixed, **{k: np.asarray(batch[k])[:4] for k in keys}}
    rows = int(part[keys[0]].shape[0])

    def both():
        index = jnp.broadcast_to(jnp.arange(2, dtype=jnp.uint32)[:, None], (2, rows))
        eps = q.row_noise(jax.random.PRNGKey(0), jnp.arange(rows, dtype=jnp.uint32), index)
        z = q.draw(phi, eps, part)
        return q.log_p_folded(theta, z, part), q.log_p(theta, z, part, 1.0)

    return _fold_agrees(both, max(1e-9, 1e3 * float(jnp.finfo(q.dtype).eps)))


def _fold_agrees(both: Callable[..., tuple], tolerance: float, *args) -> bool:
    """Whether ``both(*args)`` (run once, compiled for compile time) gives folded per-row log
    densities equal to the per-draw ones within ``tolerance`` relative to 1 + |value|;
    False where the model does not trace on the folded rows (a plate's size given as an
    argument, say)."""
    try:
        folded, per_draw = (np.asarray(v) for v in jit_once(both)(*args))
    except Exception:  # noqa: BLE001  the model does not trace on the folded rows
        return False
    scale = 1.0 + np.abs(per_draw)
    return folded.shape == per_draw.shape and bool(
        np.all(np.abs(folded - per_draw) <= tolerance * scale)
    )


def _row_weight_chunks(q, theta, phi, batch, fixed, num_samples, seed, chunk=None, fold=False):
    """Yields ``(first_row, weights)``, weights (S, m) the per-row log weights
    log p_θ(x_n, z) − log q_φ(z | x_n) of m consecutive rows, z ~ q(z | x_n), until every
    row is done.  Memory O(_ROW_STEP × network width + S × rows of a call), never
    (S, N): 10⁴ rows × 5,000 draws are 400 MB as one float64 array.

    The work is (row, block of D draws) items in row order, packed R per step and n × R
    per call (the last call padded by wrapping around).  Row n's draw s has the noise of
    the counter (n, s) (:meth:`_AmortizedQ.row_noise`), so the numbers do not depend on
    the plan (tests/infer/test_learn_evidence.py: two plans agree to rounding).  The next
    call is dispatched before this one's weights are read, so the caller's work on them
    (PSIS per row) runs beside the compiled program."""
    keys = q.structure.batch_keys
    host = {k: np.asarray(batch[k]) for k in keys}
    num_rows = int(host[keys[0]].shape[0])
    if num_rows == 0:
        raise ValueError(f"no rows to evaluate: {keys[0]!r} has 0 rows")
    if num_samples * getattr(q, "local_dim", 1) >= 2**32:
        raise ValueError(f"num_samples={num_samples} too large for 32-bit draw counters")
    draws, columns, steps, blocks = _row_plan(num_rows, num_samples, chunk)
    fn = _row_weights_fn(q, draws, fold)
    key = jax.random.PRNGKey(seed)
    items, per_call = num_rows * blocks, steps * columns

    def launch(call):
        item = np.arange(call * per_call, (call + 1) * per_call) % items
        row = item // blocks
        parts = {k: v[row].reshape(steps, columns, *v.shape[1:]) for k, v in host.items()}
        starts = (item % blocks) * draws
        shape = (steps, columns)
        return fn(
            theta,
            phi,
            fixed,
            key,
            parts,
            row.astype(np.uint32).reshape(shape),
            starts.astype(np.uint32).reshape(shape),
        )

    calls = -(-items // per_call)
    pending, done, first_row = launch(0), np.empty((0, draws)), 0
    for call in range(calls):
        ahead = launch(call + 1) if call + 1 < calls else None
        out = np.asarray(pending).transpose(0, 2, 1).reshape(per_call, draws)
        done = np.concatenate([done, out[: min(per_call, items - call * per_call)]])
        complete = done.shape[0] // blocks
        if complete:
            weights = done[: complete * blocks].reshape(complete, blocks * draws)
            yield first_row, np.ascontiguousarray(weights[:, :num_samples].T)
            first_row, done = first_row + complete, done[complete * blocks :]
        pending = ahead


def _row_log_weights(
    q, theta, phi, batch, fixed, num_samples, seed, chunk: tuple[int, int] | None = None
) -> np.ndarray:
    """(num_samples, N) per-row log weights (:func:`_row_weight_chunks`, joined).
    ``chunk``: (rows, draws) per step, to share one compiled program between calls (the
    fit's final estimates)."""
    chunks = _row_weight_chunks(q, theta, phi, batch, fixed, num_samples, seed, chunk)
    return np.concatenate([w for _, w in chunks], axis=1)


def _final_elbo(q, theta, phi, batch, fixed, seed, total_rows=None):
    """The training ELBO Σ_n L_n ± se, from S draws on m of the N rows (all rows when
    N ≤ _FINAL_ROWS, else a simple random sample of them, seeded).  ``total_rows``: the
    data have that many rows, of which ``batch`` holds a simple random sample (a
    source's rows in memory), so N = total_rows and the m rows are drawn from it.

    With per-row estimates L̂_r (the mean of S log weights) on a sample of m rows,
    the total is N · mean_r L̂_r, and its variance has the row-sampling part
    N² (1 − m/N) s²_L / m (s²_L the sample variance of L̂_r over rows) plus the Monte
    Carlo part (N/m)² Σ_r Var_k(lw_r) / S.  For m = N the first part vanishes.
    Bounded cost: a 50,000-row VAE spent minutes on an all-rows final ELBO."""
    keys = q.structure.batch_keys
    held = q.structure.num_rows  # rows in ``batch``
    num_rows = max(held, total_rows or 0)
    num_checked = int(min(held, _FINAL_ROWS))
    num_final = int(min(1000, max(16, _FINAL_BUDGET // num_checked)))
    if num_checked < held:
        rows = np.sort(np.random.default_rng(seed).choice(held, num_checked, replace=False))
        batch = {k: np.asarray(batch[k])[rows] for k in keys}
    weights = _row_log_weights(q, theta, phi, batch, fixed, num_final, seed + 1, _final_chunk(held))
    per_row = weights.mean(axis=0)
    factor = num_rows / num_checked
    mc_var = factor**2 * np.sum(weights.var(axis=0, ddof=1)) / num_final
    row_var = 0.0
    if num_checked < num_rows:
        row_var = num_rows**2 * (1 - num_checked / num_rows) * per_row.var(ddof=1) / num_checked
    elbo = float(factor * per_row.sum())
    return elbo, float(np.sqrt(mc_var + row_var)), num_final, num_checked


def _final_chunk(num_rows: int) -> tuple[int, int]:
    """(rows, draws) per call of the program that the final ELBO and the k̂ check share
    (one compile, not two): min(N, 256) rows × _FINAL_CALL / rows draws (a power of
    two), 16 draws on 256 rows; the k̂ check's 64 rows fill it with blocks of their draws."""
    rows = int(min(num_rows, 256))
    draws = 1 << max(0, (max(1, _FINAL_CALL // rows) - 1).bit_length())
    return rows, draws


def _row_evidence(chunks) -> RowEvidence:
    """Per-row estimates from ``chunks``, (S, m) log weights of consecutive rows (an
    array, or the pieces of :func:`_row_weight_chunks`): each piece is reduced to its
    rows' numbers as it comes, so the (S, N) weights are never held at once."""
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    parts = []
    for log_weights in chunks:
        num, num_rows = log_weights.shape
        elbo_var = log_weights.var(axis=0, ddof=1) if num > 1 else np.full(num_rows, np.nan)
        estimates = np.array([importance_estimate(log_weights[:, n])[:3] for n in range(num_rows)])
        top = log_weights.max(axis=0)
        iwae_rows = top + np.log(np.mean(np.exp(log_weights - top), axis=0))
        parts.append((log_weights.mean(axis=0), elbo_var, *estimates.reshape(-1, 3).T, iwae_rows))
    elbo_rows, elbo_var, log_p_rows, se_rows, khat_rows, iwae_rows = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )
    return RowEvidence(
        log_p=float(log_p_rows.sum()),
        log_p_se=float(np.sqrt(np.sum(se_rows**2))),
        elbo=float(elbo_rows.sum()),
        elbo_se=float(np.sqrt(np.sum(elbo_var) / num)),
        iwae=float(np.sum(iwae_rows)),
        log_p_rows=log_p_rows,
        log_p_se_rows=se_rows,
        elbo_rows=elbo_rows,
        khat_rows=khat_rows,
        num_samples=num,
        iwae_rows=iwae_rows,
    )


# -- the two optimisation paths ------------------------------------------------------------


def _row_matched_draws(q: _AmortizedQ, key, num_draws, per_group) -> dict:
    """Fixed base draws for an amortized q: the global ones moment-matched jointly, the
    local ones per row (M, N, k), each row's M draws with sample mean 0 and covariance I.

    The log joint is a sum over rows, so per-row matching makes the fixed-draw ELBO
    exact for a model quadratic in each row's z (PPCA) once M > k + 1: M = 64 serves
    any number of rows, where matching all N·k local coordinates jointly needs N·k + 2.
    """
    dim = q.local_dim
    global_dim = q.global_family.dim if q.global_family is not None else 0
    num = (num_draws or max(64, dim + 2, min(global_dim + 2, 512))) * per_group
    key_global, key_local = jax.random.split(key)
    key_data = np.asarray(jax.random.key_data(key_local)).ravel()
    rng = np.random.default_rng([int(k) for k in key_data])
    eps = rng.standard_normal((q.structure.num_rows, num, dim))
    eps -= eps.mean(axis=1, keepdims=True)
    if num > dim + 1:
        chol = np.linalg.cholesky(np.einsum("nmi,nmj->nij", eps, eps) / num)
        eps = np.linalg.solve(chol, eps.transpose(0, 2, 1)).transpose(0, 2, 1)
    draws = {"local": jnp.asarray(eps.transpose(1, 0, 2))}
    draws["global"] = jnp.asarray(base_draws(key_global, num, global_dim))
    return draws


class LearnState(NamedTuple):
    params: dict  # {"theta": unconstrained θ, "q": φ}
    opt_state: Any
    perm: jax.Array  # (N,) this epoch's order of the rows
    average: dict  # running mean of params over the averaged tail of the run
    num_averaged: jax.Array
    guard: Guard


class LearnInfo(NamedTuple):
    objective: jax.Array  # the step's estimate of the objective over the whole data
    grad_norm: jax.Array


class _LBFGSStateG(NamedTuple):
    optimizer: LBFGSState
    guard: Guard


def _folds(q, target, params0, arrays, draws) -> bool:
    """Whether the full-batch objective may fold the draws into the rows
    (:meth:`_AmortizedQ.log_p_folded`): rows mode, the model traces on S·N rows (not when
    a plate's size is an argument), and the folded per-row log densities equal the
    per-draw ones at the starting point to rounding (not when the model couples its rows
    inside the plate, a cumulative sum say, which would couple the draws)."""
    if not (isinstance(q, _AmortizedQ) and q.rows_mode):
        return False

    def both(params):
        theta = _constrain_theta(target, params["theta"])
        z = q.draw(params["q"], draws, arrays)
        return q.log_p_folded(theta, z, arrays), q.log_p(theta, z, arrays, 1.0)

    # Compiled for compile time: 0.4 of PPCA's 2 s in this check.
    return _fold_agrees(both, 1e-9, params0)


def _full_batch(q, target, arrays, objective, params0, key, num_draws, max_steps, progress):
    per_group = objective.num_samples if isinstance(objective, IWAE) else 1
    if isinstance(q, _AmortizedQ):
        draws = _row_matched_draws(q, key, num_draws, per_group)
        num_draws = int(draws["local"].shape[0]) // per_group
    else:
        noise_dim = q.noise_dim(q.structure.num_rows)
        num_draws = num_draws or int(min(max(64, noise_dim + 2), 512))
        eps = base_draws(key, num_draws * per_group, noise_dim)
        draws = q.split_noise(jnp.asarray(eps), q.structure.num_rows)
    fold = _folds(q, target, params0, arrays, draws)

    def value_fn(params, inputs):
        data, draws = inputs
        theta = _constrain_theta(target, params["theta"])
        z = q.draw(params["q"], draws, data)
        if isinstance(q, _AmortizedQ):
            log_q = q.log_q_at_noise(params["q"], draws, z, data, 1.0)
        else:
            log_q = q.log_q(params["q"], z, data, 1.0)
        if fold:
            lw = q.log_p_folded(theta, z, data) - log_q
        else:
            lw = q.log_p(theta, z, data, 1.0) - log_q
        # IWAE over groups of K fixed draws, K = 1 included: IWAE.value over all M draws
        # at once would be L_M, not L_1 = the ELBO (IWAE(num_samples=1) ran q off).
        if isinstance(objective, IWAE):
            lw = lw.reshape(-1, per_group, lw.shape[-1])
            return jnp.mean(jax.vmap(lambda g: objective.value(g))(lw))
        return objective.value(lw)

    lbfgs_init, lbfgs_step = lbfgs(lambda p, i: -value_fn(p, i))
    inputs = (arrays, draws)
    state = _LBFGSStateG(lbfgs_init(params0, inputs), guard_init(1))

    def step(state, rng_key, inputs):
        del rng_key
        opt, info = lbfgs_step(state.optimizer, inputs)
        return _LBFGSStateG(opt, state.guard), LearnInfo(-info.value, info.grad_norm)

    history: list[float] = []

    def check(state, chunk_info, steps_done):
        last = float(np.asarray(chunk_info.objective)[-1])
        grad = float(np.asarray(chunk_info.grad_norm)[-1])
        previous = history[-1] if history else -np.inf
        history.append(last)
        if not np.isfinite(last):
            raise ModelError(
                "the fixed-draw objective is not finite at the starting θ and q; check the "
                "params' initial values"
            )
        if grad < 1e-9 * max(1.0, abs(last)):
            return True, f"L-BFGS: gradient max-norm {grad:.2g}"
        if float(state.optimizer.step_size) < 1e-12:
            return grad < 1e-4 * max(1.0, abs(last)), f"L-BFGS: no further decrease ({grad:.2g})"
        if abs(last - previous) <= 1e-12 * (1.0 + abs(last)):
            return True, "L-BFGS: fixed-draw objective unchanged (relative 1e-12) over 20 steps"
        return None

    def run_from(state, num_steps, fast_compile=True):
        return run(
            step,
            state,
            inputs,
            key,
            num_steps,
            _LBFGS_CHUNK,
            check_fn=check,
            progress=progress,
            description="viax learn (L-BFGS)",
            fast_compile=fast_compile,
        )

    def joined(first, more):
        return more._replace(
            trace=np.concatenate([first.trace, more.trace]),
            num_steps=first.num_steps + more.num_steps,
            wall_time=first.wall_time + more.wall_time,
            compile_time=first.compile_time + more.compile_time,
        )

    # The first steps run a program compiled for compile time: most fits converge within
    # _EARLY_STEPS.  A longer run goes on with one compiled for run time (PPCA on the
    # digits: 24 against 43 ms a step, over 540-680 steps), compiled on another thread
    # while the quick program keeps stepping, and taken up as soon as it is ready (by
    # _FAST_STEPS at the latest, waiting for it then).  Switching at step 500 after a
    # compile in the foreground cost PPCA q = 5 500 slow steps and a compile for 40 steps.
    output = run_from(state, min(max_steps, _EARLY_STEPS))
    fast, quick_steps = True, None
    if not output.converged and output.num_steps < max_steps:
        optimised = chunk_fn(step, False)
        args = (output.state, key, np.int32(0), _LBFGS_CHUNK, inputs)
        optimised.lower(*args)  # traced here: NumPyro's handler stack is process-wide
        background = precompile((optimised, args))
        while (
            background.is_alive()
            and not output.converged
            and output.num_steps < min(max_steps, _FAST_STEPS)
        ):
            more = run_from(output.state, min(_LBFGS_CHUNK, max_steps - output.num_steps))
            # One compiled chunk: run() would book all of it as compile time.
            output = joined(output, more._replace(compile_time=0.0))
        if not output.converged and output.num_steps < max_steps:
            background.join()
            fast, quick_steps = False, output.num_steps
            output = joined(output, run_from(output.state, max_steps - output.num_steps, False))
    restarts = 0
    # A stalled line search far from a stationary point means the stored curvature pairs
    # point the step nearly orthogonally to the gradient (XLA's threaded sums make the
    # path differ from run to run: PPCA on the digits stalled at gradient 1.3e4 in one run
    # of three).  Restart from the same point with an empty memory, up to three times.
    while (
        not output.converged
        and output.message.startswith("L-BFGS: no further decrease")
        and restarts < 3
        and output.num_steps < max_steps
    ):
        restarts += 1
        history.clear()
        fresh = _LBFGSStateG(
            lbfgs_init(output.state.optimizer.position, inputs), output.state.guard
        )
        output = joined(output, run_from(fresh, max_steps - output.num_steps, fast))
    info = {
        "num_draws": num_draws,
        "path": "full-batch L-BFGS, fixed draws",
        "lbfgs_restarts": restarts,
        # steps on the program compiled for compile time before the run-time one took
        # over (None: it never did)
        "quick_program_steps": quick_steps,
    }
    return output.state.optimizer.position, output, info


def _minibatch(
    q,
    target,
    arrays,
    objective,
    params0,
    key,
    optimizer,
    batch_size,
    num_epochs,
    num_steps,
    progress,
    average_fraction,
    transform_batch,
    validate=None,
    stop_rule=None,
    mesh=None,
    stream=None,
):
    """``validate(params) -> (R,)`` held-out per-row objective, watched by ``stop_rule``
    (an :class:`EarlyStopping`) after each chunk.  ``mesh``: a "data" mesh
    (:func:`viax.data.data_mesh`) whose devices share each batch's rows; the data and
    the state are replicated on it.  ``stream``: a :class:`_StreamLoop` (a
    :mod:`viax.data` source): its prefetched batches feed the step, which then gathers
    nothing, ``arrays`` holds only the static data, and it runs the host loop
    (checkpoints, resume)."""
    structure = q.structure
    num_rows = structure.num_rows
    if batch_size > num_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_rows} rows of the data")
    steps_per_epoch = num_rows // batch_size
    row_scale = num_rows / batch_size
    keys = structure.batch_keys
    num_samples = objective.num_samples
    rows_sharding = state_sharding = None
    if mesh is not None:
        rows_sharding = vdata.batch_sharding(mesh)
        state_sharding = vdata.replicated(mesh)

    def step(state: LearnState, rng_key, data, batch=None):
        # threefry.split: jax.random.split's keys, unrolled (no per-step loop kernels).
        key_perm, key_eps = threefry.split(rng_key)
        if batch is None:  # in memory: gather this step's rows of this epoch's order
            position = jnp.mod(state.guard.step, steps_per_epoch)
            perm = jax.lax.cond(
                position == 0,
                lambda _: jax.random.permutation(key_perm, num_rows),
                lambda _: state.perm,
                None,
            )
            index = jax.lax.dynamic_slice(perm, (position * batch_size,), (batch_size,))
            batch = {k: (v[index] if k in keys else v) for k, v in data.items()}
        else:  # a source's batch (its order is the source's)
            perm, batch = state.perm, {**data, **batch}
        if rows_sharding is not None:
            # Each device evaluates its B/P rows; the replicated θ, φ make XLA all-reduce
            # the gradient's row sums.
            batch = {
                k: (jax.lax.with_sharding_constraint(v, rows_sharding) if k in keys else v)
                for k, v in batch.items()
            }

        def draw(operand):
            key_eps, rows = operand
            if transform_batch is not None:
                key_eps, key_transform = threefry.split(key_eps)
                rows = {**rows, **transform_batch(key_transform, rows)}
            return rows, q.normal_noise(key_eps, num_samples, batch_size)

        # A conditional is a fusion boundary, so the draws are computed once and stored:
        # XLA otherwise fuses the unrolled hash (and the hash of the keys) into every
        # consumer and recomputes it per element of each (the binarized rows feed the
        # encoder and the likelihood; ε the draw, log q and three gradients).  The
        # predicate is always true but not known to the compiler.
        rows, eps = jax.lax.cond(
            state.guard.step >= 0, draw, draw, (key_eps, {k: batch[k] for k in keys})
        )
        if rows_sharding is not None:
            rows = {k: jax.lax.with_sharding_constraint(v, rows_sharding) for k, v in rows.items()}
        batch = {**batch, **rows}

        def log_p_fn(theta_u, z):
            return q.log_p(_constrain_theta(target, theta_u), z, batch, row_scale)

        def log_q_fn(phi, z):
            return q.log_q(phi, z, batch, row_scale)

        draw_and_log_q_fn = draw_with_aux_fn = log_q_at_fn = None
        if isinstance(q, _AmortizedQ):

            def draw_and_log_q_fn(phi):
                return q.draw_and_log_q(phi, eps, batch, row_scale)

            def draw_with_aux_fn(phi):
                return q.draw_with_gaussian(phi, eps, batch)

            def log_q_at_fn(gaussian, phi, z):
                return q.log_q_from(gaussian, phi, z, row_scale)

        inner_scale = row_scale if q.rows_mode else 1.0
        value, (g_theta, g_phi) = objective_value_and_grad(
            objective,
            log_p_fn,
            lambda phi: q.draw(phi, eps, batch),
            log_q_fn,
            state.params["theta"],
            state.params["q"],
            inner_scale,
            draw_and_log_q_fn=draw_and_log_q_fn,
            draw_with_aux_fn=draw_with_aux_fn,
            log_q_at_fn=log_q_at_fn,
        )
        grads = {"theta": g_theta, "q": g_phi}
        norm = optax.tree.norm(grads)  # no concatenation of every gradient per step

        def apply(old):
            params, opt_state = old
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(
                lambda u: state.guard.step_scale.astype(u.dtype) * u, updates
            )
            return optax.apply_updates(params, updates), opt_state

        (params, opt_state), guard, _ = guarded_update(
            state.guard, value, norm[None], apply, (state.params, state.opt_state)
        )
        # Polyak-Ruppert average of the iterates of the run's last average_fraction (not
        # computed at all without averaging: a pass over every weight per step).
        average, count = state.average, state.num_averaged
        if average_fraction:
            use = (guard.step > average_start).astype(state.num_averaged.dtype)
            count = state.num_averaged + use
            weight = use / jnp.maximum(count, 1.0)
            average = jax.tree_util.tree_map(
                lambda a, p: a + weight.astype(p.dtype) * (p - a), state.average, params
            )
        new_state = LearnState(params, opt_state, perm, average, count, guard)
        if state_sharding is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
        return new_state, LearnInfo(value, norm)

    state = LearnState(
        params0,
        optimizer.init(params0),
        jnp.arange(num_rows) if stream is None else jnp.zeros(0, jnp.int32),
        params0,
        jnp.asarray(0.0, jnp.float64),
        guard_init(1),
    )
    if mesh is not None:
        state = vdata.put(state, state_sharding)
        arrays = vdata.put(arrays, state_sharding)
    values: list[np.ndarray] = [] if stream is None else stream.saved_trace()

    history: list[dict] = []  # one entry per validation check
    best: dict = {}

    def check(state, chunk_info, steps_done):
        values.append(np.asarray(chunk_info.objective))
        if validate is None:
            return None
        params = state.average if average_fraction else state.params
        now = validate(params)
        entry = {"epoch": steps_done / steps_per_epoch, "value_per_row": float(now.mean())}
        if not best:
            improved, entry["z"] = True, float("inf")
        else:
            diff = now - best["rows"]
            se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            entry["z"] = float(diff.mean() / se) if se > 0 else float(np.sign(diff.mean()) * np.inf)
            improved = diff.mean() > stop_rule.threshold * se
        entry["improved"] = bool(improved)
        history.append(entry)
        if improved:
            best.update(
                rows=now,
                epoch=entry["epoch"],
                params=jax.tree_util.tree_map(np.asarray, params),
                since=0,
            )
            return None
        best["since"] += 1
        if best["since"] >= stop_rule.patience:
            return True, (
                f"early stopping: the held-out {objective.name} per row did not improve by "
                f"more than {stop_rule.threshold:g} se over {stop_rule.patience} checks; "
                f"returned the parameters of epoch {best['epoch']:.4g} "
                f"({best['rows'].mean():.6g} per row on {best['rows'].size} held-out rows)"
            )
        return None

    total = num_epochs * steps_per_epoch
    if num_steps is not None and num_steps < total:
        total, chunk = num_steps, num_steps
    else:
        # Chunks of whole epochs that divide the run (a shorter last chunk compiles anew),
        # about 250 steps or one epoch each, and at least two chunks when there are two
        # epochs: the first chunk pays for compilation, the later ones give the steady
        # time per step (info["seconds_per_step"]) and the points where the stopping
        # rule looks.
        most = max(1, min(num_epochs // 2 or 1, 250 // steps_per_epoch))
        chunk = max(e for e in range(1, most + 1) if num_epochs % e == 0) * steps_per_epoch
    average_start = int(round(total * (1.0 - average_fraction))) if average_fraction else total
    output = (run if stream is None else stream.run)(
        step,
        state,
        arrays,
        key,
        total,
        chunk,
        check_fn=check,
        progress=progress,
        description=f"viax learn ({objective.name}, minibatch)",
        objective_name=objective.name,
    )
    trace = np.concatenate(values) if values else np.zeros(0)
    whole = trace.size // steps_per_epoch * steps_per_epoch
    epochs = trace[:whole].reshape(-1, steps_per_epoch).mean(axis=1)
    # Without a stop rule the run is a fixed budget (the MCSE rule of viax.infer.stopping
    # needs a stationary iterate, which a network's weights under Adam rarely are), and a
    # fixed budget is never reported as converged.
    if not output.converged:
        message = (
            f"fixed budget of {output.num_steps / steps_per_epoch:.4g} epochs "
            f"({output.num_steps} steps of {batch_size} rows); "
            + (
                "the held-out bound was still improving (EarlyStopping's patience not spent)"
                if validate is not None
                else "minibatch learning has no convergence test without "
                "stop_rule=EarlyStopping(...): judge the per-epoch objective in "
                "info['epoch_objective']"
            )
        )
        output = output._replace(converged=False, message=message)
    info = {
        "path": "minibatch",
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "steps_per_epoch": steps_per_epoch,
        "epoch_objective": np.asarray(epochs),
    }
    if validate is not None:
        info["validation"] = history
        info["best_epoch"] = best["epoch"]
        info["stop_rule"] = stop_rule
        if output.converged:
            return best["params"], output, info
    if average_fraction:
        info["averaged_steps"] = int(output.state.num_averaged)
        return output.state.average, output, info
    return output.state.params, output, info


# -- the entry point -------------------------------------------------------------------------


def _build_transformed(model, data, seed, transform_batch, check=True):
    from viax.model import Model, _numpyro_fn

    model_fn = _numpyro_fn(model) if isinstance(model, Model) else model
    prepared = prepare_data(model_fn, data)
    dynamic = dict(prepared.dynamic)
    key = jax.random.PRNGKey(seed + 3)
    if not check and _same_shapes(jax.eval_shape(transform_batch, key, dynamic), dynamic):
        # The Target depends on the shapes only: no need to transform every row.
        shown = dynamic
    else:
        shown = transform_batch(key, dynamic)
    target, _, init_position = build_target(
        model, {**dict(prepared.static), **shown}, seed, check=check
    )
    return target, prepared.dynamic, init_position


def _same_shapes(shapes, arrays) -> bool:
    return set(shapes) == set(arrays) and all(
        tuple(shapes[k].shape) == tuple(np.shape(arrays[k]))
        and jnp.dtype(shapes[k].dtype) == jnp.dtype(arrays[k].dtype)
        for k in arrays
    )


def _check_initial_rows(model, target, arrays, structure, seed, transform_batch):
    """The initial point u = 0, checked before compiling on a seeded random sample of
    ``_CHECK_ROWS`` of the plate's rows (all of them when fewer): the log density at
    u = 0 is finite there, or the ModelError of :func:`viax.model.build_target` names
    the site.  One evaluation on all rows of a 50,000-row VAE cost 2.8 s (a third of an
    epoch, in float64) before the first step; a row outside the sample whose log density
    is not finite is caught by the driver's guard (step-size back-offs, then a
    DivergenceError).  Returns the initial position for the full data."""
    from viax.model import _check_finite_at

    static = dict(target.static_data)
    dynamic = dict(arrays)
    keys = structure.batch_keys
    if structure.num_rows > _CHECK_ROWS:
        rng = np.random.default_rng([seed, 11])
        rows = np.sort(rng.choice(structure.num_rows, _CHECK_ROWS, replace=False))
        dynamic = {k: (np.asarray(v)[rows] if k in keys else v) for k, v in dynamic.items()}
    key = jax.random.PRNGKey(seed + 3)
    if transform_batch is not None:
        dynamic = transform_batch(key, dynamic)
    try:
        sample_target, _, position = build_target(model, {**static, **dynamic}, seed)
        if position is sample_target.init_position:
            return target.init_position
    except Exception as error:  # noqa: BLE001  a model that does not trace on fewer rows
        if isinstance(error, ModelError) and str(error).startswith("the log density is not"):
            raise
    # u = 0 is not finite on the sample, or the model does not trace on fewer rows: the
    # check (and the search for a finite initial point) on every row.
    shown = arrays if transform_batch is None else transform_batch(key, dict(arrays))
    return _check_finite_at(target, shown, target.init_position, seed)


def _compute_dtype(arrays, keys):
    """float32 when every per-row data array is float32 (or narrower), else float64.

    A network trained by stochastic steps does not need float64 (its gradient noise
    dwarfs float32 rounding), and float32 halves the cost of its matrix products on a
    CPU; float64 stays the default for everything else (the deterministic path, the
    closed-form checks), and a user who passes float32 data asks for float32 the way
    NumPyro and PyTorch users do."""
    dtypes = [
        np.asarray(arrays[k]).dtype if not hasattr(arrays[k], "dtype") else arrays[k].dtype
        for k in keys
    ]
    if dtypes and all(
        jnp.issubdtype(d, jnp.floating) and jnp.dtype(d).itemsize <= 4 for d in dtypes
    ):
        return jnp.float32
    return jnp.float64


def _split_rows(arrays, structure: _Structure, rule: EarlyStopping, seed):
    """(training arrays, held-out per-row arrays, training structure): a seeded random
    ``rule.validation_fraction`` of the rows held out (at least one, and at most
    ``rule.max_rows`` of them evaluated)."""
    num_rows = structure.num_rows
    num_held = int(round(rule.validation_fraction * num_rows))
    if not 1 <= num_held < num_rows:
        raise ValueError(
            f"validation_fraction {rule.validation_fraction} of {num_rows} rows holds out "
            f"{num_held}; at least one row must be held out and one kept"
        )
    order = np.random.default_rng([seed, 7]).permutation(num_rows)
    held, kept = np.sort(order[:num_held]), np.sort(order[num_held:])
    keys = structure.batch_keys
    train = {k: (v[kept] if k in keys else v) for k, v in arrays.items()}
    held_out = {k: (v[held[: rule.max_rows]] if k in keys else v) for k, v in arrays.items()}
    return train, held_out, structure._replace(num_rows=int(kept.size)), held


def _given_rows(rule: EarlyStopping, arrays, structure: _Structure) -> dict:
    """The user's held-out rows (``rule.validation_data``, the first ``rule.max_rows``)
    with the training data's other arrays, checked against the training rows."""
    keys = structure.batch_keys
    given = dict(rule.validation_data)
    missing = [k for k in keys if k not in given]
    if missing:
        raise ModelError(f"EarlyStopping validation_data lacks {', '.join(missing)}")
    rows = {k: np.asarray(given[k], dtype=np.asarray(arrays[k]).dtype) for k in keys}
    bad = [k for k in keys if rows[k].shape[1:] != np.shape(arrays[k])[1:]]
    if bad:
        shapes = ", ".join(
            f"{k} {rows[k].shape[1:]} (training {np.shape(arrays[k])[1:]})" for k in bad
        )
        raise ModelError(f"EarlyStopping validation_data rows have other shapes: {shapes}")
    counts = {rows[k].shape[0] for k in keys}
    if len(counts) != 1 or 0 in counts:
        raise ModelError(
            f"EarlyStopping validation_data: {', '.join(keys)} must have the same number of "
            "rows, at least one"
        )
    rows = {k: v[: rule.max_rows] for k, v in rows.items()}
    return {**{k: v for k, v in arrays.items() if k not in keys}, **rows}


def _validation_fn(q, target, held_out, rule, objective, transform_batch, seed):
    """``params -> (R,)`` the objective per held-out row, on fixed base draws (the same
    draws, and one fixed transform of the rows, at every check)."""
    if held_out is None:
        return None
    keys = q.structure.batch_keys
    fixed = {k: v for k, v in held_out.items() if k not in keys}
    held_out = {k: held_out[k] for k in keys}
    if transform_batch is not None:
        held_out = {**held_out, **transform_batch(jax.random.PRNGKey(seed + 5), held_out)}
    num = objective.num_samples if isinstance(objective, IWAE) else rule.num_samples

    def validate(params):
        params = jax.tree_util.tree_map(_host, params)  # replicated over processes too
        theta = _constrain_theta(target, params["theta"])
        weights = _row_log_weights(q, theta, params["q"], held_out, fixed, num, seed + 11)
        if isinstance(objective, IWAE):
            return np.asarray(jax.scipy.special.logsumexp(weights, axis=0)) - np.log(num)
        return weights.mean(axis=0)

    return validate


def _check_int(name, value, minimum=1):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# -- learning from a viax.data source: the host loop, checkpoints ----------------------------

_SAMPLE_ROWS = 65_536  # a source's rows held in memory (trace, encoder inputs, final estimates)
_SAMPLE_BYTES = 2**27  # ... and at most 128 MiB of them
_CHUNK_BYTES = 2**25  # a source's rows per stacked chunk (the prefetch holds three)
_CHECKPOINT_FORMAT = "viax-learn-1"
_STEP_KEY = "__viax_step_key__"  # the run's key among the step's data
EARLY_STOPPING_CHECKPOINTS = (
    "stop_rule=EarlyStopping(...) keeps its best parameters in memory, not in "
    "checkpoints: drop checkpoint_path/resume, or train for num_epochs and compare "
    "result.log_evidence(data=held_out) between checkpoints"
)


def _source_sample(source, batch_size: int, seed: int) -> dict:
    """Rows of ``source`` held in memory, the same in every process: all N rows when
    they are at most _SAMPLE_ROWS and _SAMPLE_BYTES (one padded pass, the padding
    dropped), else the first batches of epoch 0 up to that many rows (a simple random
    sample for a shuffled source).  They give the model's trace (sites, initial θ), the
    encoder's input centring and scale, and the rows of the final estimates."""
    from viax.infer.minibatch import _first_epoch

    cap = max(batch_size, min(_SAMPLE_ROWS, _SAMPLE_BYTES // _row_bytes(source)))
    whole = source.num_rows <= cap
    parts, got = [], 0
    remainder = "pad" if whole else "drop"
    for batch in _first_epoch(source, batch_size, seed, (0, 1), remainder=remainder):
        keep = batch.get(vdata.MASK)
        part = {k: v for k, v in batch.items() if k not in (vdata.ROWS, vdata.MASK)}
        if keep is not None:
            part = {k: np.asarray(v)[keep] for k, v in part.items()}
        parts.append(part)
        got += len(next(iter(part.values())))
        if not whole and got >= cap:
            break
    if not parts:
        raise ValueError(f"the data source gave no batch of {batch_size} rows")
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def _learning_source(data, minibatch, checkpoint_path, resume, stop_rule):
    """The :mod:`viax.data` source to learn from, or None for arrays in memory (gathered
    on the devices by the step).  A source, or checkpoints (in-memory arrays are then
    read as ``viax.data.as_source(data)``), take the source's host loop."""
    streamed = data is not None and not isinstance(data, Mapping)
    checkpoints = checkpoint_path is not None or (resume is not None and resume is not False)
    if not streamed and not checkpoints:
        return None
    if not streamed and not minibatch:
        raise ValueError(
            "checkpoint_path/resume: full-batch learning (L-BFGS on fixed draws) writes no "
            "checkpoints; pass batch_size=... to learn by minibatches, which does"
        )
    if stop_rule is not None and checkpoints:
        raise ValueError(EARLY_STOPPING_CHECKPOINTS)
    if stop_rule is not None and getattr(stop_rule, "validation_data", None) is None:
        raise ValueError(
            "stop_rule=EarlyStopping(...) holds out rows of data in memory, and a viax.data "
            "source is streamed: pass held-out rows of your own, "
            "EarlyStopping(validation_data={name: array, ...})"
        )
    source = vdata.as_source(data)
    if source.num_rows is None:
        raise ModelError(
            "the data source does not know its number of rows N (the likelihood's N/B "
            "scaling needs it): pass viax.data.as_source(..., num_rows=N)"
        )
    return source


def _row_bytes(source) -> int:
    """Bytes of one row of the source's columns (at least 1)."""
    total = sum(
        int(np.prod(shape, dtype=int)) * np.dtype(dtype).itemsize
        for name, (shape, dtype) in source.columns.items()
        if not name.startswith("_")
    )
    return max(int(total), 1)


def _steps_per_read(chunk: int, batch_size: int, row_bytes: int) -> int:
    """K, the batches stacked per compiled scan on a source: the checking chunk when its
    rows fit _CHUNK_BYTES, else the largest divisor of it within the budget (down to
    half the budget), else the budget (the last piece of a check is then shorter)."""
    most = max(1, _CHUNK_BYTES // (batch_size * row_bytes))
    if chunk <= most:
        return chunk
    divisors = [d for d in range(max(1, most // 2), most + 1) if chunk % d == 0]
    return max(divisors) if divisors else most


def _host(x) -> np.ndarray:
    """A (replicated) array as NumPy, also when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _save_checkpoint(path, state: LearnState, trace: list, fingerprint: dict) -> None:
    """The whole learning state (θ, φ, optimiser moments, averages, guard: its step
    fixes the data position and the draws) and the objective trace, in one atomic
    pickle-free ``.npz`` (process 0 writes; every process holds the same state)."""
    from pathlib import Path

    from viax.conjugate.checkpoint import write_npz_atomic
    from viax.infer.checkpoint import state_arrays

    leaves = [_host(leaf) for leaf in jax.tree_util.tree_leaves(state)]
    if jax.process_index() != 0:
        return
    step = int(_host(state.guard.step))
    trace = np.concatenate(trace) if trace else np.zeros(0)
    arrays = state_arrays(_CHECKPOINT_FORMAT, step, trace, leaves)
    arrays.update({f"fingerprint/{k}": np.asarray(v) for k, v in fingerprint.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(path, arrays)


def _load_checkpoint(path, fingerprint: dict) -> dict:
    """The arrays of a learning checkpoint; a file of another kind, or of a run with
    other data rows, batch size or seed, is refused naming what differs."""
    from viax.conjugate.checkpoint import read_npz_checkpoint
    from viax.infer.checkpoint import format_reader

    saved = read_npz_checkpoint(path, format_reader(_CHECKPOINT_FORMAT, "viax learning"))
    for name, value in fingerprint.items():
        was = saved.get(f"fingerprint/{name}")
        if was is None or was.item() != value:
            raise ValueError(
                f"checkpoint {path} was written by a run with {name}="
                f"{None if was is None else was.item()!r}, this run has {name}={value!r}"
            )
    return saved


class _StreamLoop:
    """The host loop of minibatch learning on a :mod:`viax.data` source, shared in shape
    with :func:`viax.infer.minibatch.fit_minibatch`: the batches of epoch e in the order
    of (seed, e) (``source.batches``; this process's share of each), stacked K at a time
    and placed on the "data" mesh by a prefetch thread while the previous chunk runs
    (K from a memory budget, :func:`_steps_per_read`; the caller's checks still come
    after its own chunks of whole epochs); step t draws from ``fold_in(key, t)``; a
    checkpoint at most every ``checkpoint_every`` seconds (at the end of a scan) and at
    the end.  Resumed, the run continues from the saved step with the batches and draws
    the uninterrupted run would have used, so it ends with its numbers."""

    def __init__(self, source, batch_size, seed, mesh, checkpoint_path, every, resume):
        from viax.infer import checkpoint as ckpt

        self.source, self.batch_size, self.seed, self.mesh = source, batch_size, seed, mesh
        self.path, self.every = checkpoint_path, every
        self.fingerprint = {"num_rows": int(source.num_rows), "batch_size": batch_size}
        self.fingerprint["seed"] = seed
        resume_from = ckpt.resume_path(resume, checkpoint_path)
        self.saved = None
        if resume_from is not None:
            import os

            if os.path.exists(resume_from):  # as fit_minibatch: no file yet, a fresh start
                self.saved = _load_checkpoint(resume_from, self.fingerprint)
        self.wait_fraction = 0.0
        self.resumed_at = int(self.saved["step"]) if self.saved is not None else 0

    def saved_trace(self) -> list:
        return [self.saved["elbo_trace"]] if self.saved is not None else []

    def run(self, step, state, data, key, num_steps, chunk, *, check_fn, **kwargs) -> Any:
        from viax.infer import checkpoint as ckpt
        from viax.infer.minibatch import _epochs

        done = self.resumed_at
        if done > num_steps:
            raise ValueError(
                f"the checkpoint is at step {done}, past this run's {num_steps} steps "
                f"({num_steps // (self.source.num_rows // self.batch_size)} epochs): pass "
                "num_epochs (or num_steps) at least as large as the checkpointed run's"
            )
        if self.saved is not None:
            state = vdata.put(ckpt.restore_state(state, self.saved), vdata.replicated(self.mesh))
        # The batched chunk donates the state: no two leaves may share a buffer (the
        # average starts as the very arrays of the parameters).
        state = jax.tree_util.tree_map(jnp.copy, state)
        trace = self.saved_trace()
        per_epoch = self.source.num_rows // self.batch_size

        def keyed(state, rng_key, data, batch):
            # Step t's draws from fold_in(key, t), not from the chunk's place in this
            # call's run: a resumed run draws what the uninterrupted one drew.  The key
            # is an input, not a constant: one program serves every seed.
            del rng_key
            data = dict(data)
            base = data.pop(_STEP_KEY)
            return step(state, jax.random.fold_in(base, state.guard.step), data, batch)

        data = {**data, _STEP_KEY: vdata.put(key, vdata.replicated(self.mesh))}

        pc = vdata.process_share()
        stream = _epochs(
            self.source, self.batch_size, self.seed, done, num_steps - done, per_epoch, pc
        )
        # Stacking the caller's whole chunk (an epoch of MNIST: 157 MB; all of a run given
        # by num_steps) would hold it three times over on the devices.
        per_read = _steps_per_read(chunk, self.batch_size, _row_bytes(self.source))
        chunks = vdata.prefetch(
            ({k: v for k, v in b.items() if k != vdata.ROWS} for b in stream),
            size=2,
            sharding=vdata.batch_sharding(self.mesh, stacked=True),
            stack=per_read,
        )
        last_save = [time.perf_counter()]
        pending: list = []  # the scans' infos since the caller's last check

        def check(state, chunk_info, steps_done):
            trace.append(np.asarray(chunk_info.objective))
            pending.append(jax.tree_util.tree_map(np.asarray, chunk_info))
            outcome = None
            if (
                sum(p.objective.shape[0] for p in pending) >= chunk
                or done + steps_done >= num_steps
            ):
                merged = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *pending)
                pending.clear()
                outcome = check_fn(state, merged, steps_done)
            if self.path is not None and time.perf_counter() - last_save[0] >= self.every:
                _save_checkpoint(self.path, state, trace, self.fingerprint)
                last_save[0] = time.perf_counter()
            return outcome

        try:
            output = run(
                keyed,
                state,
                data,
                key,
                num_steps - done,
                per_read,
                check_fn=check,
                batches=chunks,
                **kwargs,
            )
        finally:
            self.wait_fraction = float(chunks.wait_fraction)
            chunks.close()
            try:
                stream.close()  # frees the epoch's readers now
            except ValueError:  # still running in a prefetch thread that did not stop
                pass
        if self.path is not None:
            _save_checkpoint(self.path, output.state, trace, self.fingerprint)
        whole = np.concatenate(trace) if trace else np.zeros(0)
        return output._replace(trace=whole, num_steps=done + output.num_steps)


def fit_learn(
    model,
    data: Mapping[str, Any] | None = None,
    *,
    encoder=None,
    objective=None,
    family: str = "meanfield",
    rank: int | None = None,
    batch_size: int | None = None,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    num_draws: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    progress: bool = True,
    average_fraction: float = 0.0,
    transform_batch: Callable | None = None,
    stop_rule: EarlyStopping | None = None,
    devices=None,
    checkpoint_path=None,
    checkpoint_every: float = 60.0,
    resume=False,
    evaluate: bool = True,
    path: str = "auto",
) -> Result:
    """Learn θ (the model's ``numpyro.param`` sites) jointly with q; see the module
    docstring.  Called by :func:`viax.fit` when the model has params, or an ``encoder``,
    ``objective`` or ``batch_size`` is given.

    Returns a :class:`~viax.result.Result` whose ``model_params`` holds θ (constrained)
    and whose ``log_evidence(data=...)`` gives per-row held-out evidence for an
    amortized q.

    ``average_fraction`` (minibatch): return the Polyak–Ruppert average of the iterates
    over this last fraction of the steps (Polyak & Juditsky 1992) instead of the last
    iterate: with a constant step size the average's error shrinks as 1/√steps.

    ``transform_batch(rng_key, batch) -> batch`` (minibatch): a fresh random transform
    of each batch's rows, e.g. :func:`dynamic_binarization` (Burda et al. 2016); the
    check of the initial point and the final estimates see one fixed transform.

    ``stop_rule`` (minibatch, with an encoder): an :class:`EarlyStopping`, which holds
    out a fraction of the rows and stops when the bound on them stops improving; the
    result is then ``converged`` and ``info["validation"]`` holds every check.  Without
    it the run is a fixed budget of ``num_epochs`` and never reported as converged.

    ``devices`` (minibatch): the devices whose "data" mesh shares each batch's rows:
    ``None`` every device (of every process, after ``jax.distributed.initialize()``),
    an integer the first that many of a single process, or a list of devices;
    ``batch_size`` must be a multiple of their number (the default batch size is rounded
    down to one).  The full-batch path runs on one device.  ``info["devices"]`` says how
    many ran.

    ``data`` may be a :mod:`viax.data` source (a Parquet file, memmaps, an iterable of
    dict batches that knows N): minibatch learning then reads it through
    :class:`_StreamLoop` (the batches of epoch e in the source's order for (seed, e),
    prefetched to the "data" mesh over every device of every process after
    ``jax.distributed.initialize()``; ``devices`` as :func:`viax.data.data_mesh`).  Up
    to ``_SAMPLE_ROWS`` rows are held in memory for the model's trace, the encoder's
    input scale and the final estimates (``info["rows_in_memory"]``).

    ``checkpoint_path``, ``checkpoint_every``, ``resume`` (minibatch): an atomic,
    pickle-free ``.npz`` of θ, φ, the optimiser state, the average and the step (which
    fixes the data position and the draws), written at most every ``checkpoint_every``
    seconds and at the end; ``resume=True`` continues from it with the numbers of the
    uninterrupted run.  In-memory arrays are then read as ``viax.data.as_source(data)``.

    ``evaluate=False``: no final pass over rows; ``elbo`` is the mean of the last
    quarter of the training objective and ``khat`` NaN.  ``path="minibatch"`` asks for
    minibatches without ``batch_size`` (default min(100, N)).
    """
    start = time.perf_counter()
    if stop_rule is not None and not isinstance(stop_rule, EarlyStopping):
        raise TypeError(f"stop_rule must be viax.EarlyStopping(...) here, got {stop_rule!r}")
    if not 0.0 <= average_fraction < 1.0:
        raise ValueError(f"average_fraction must be in [0, 1), got {average_fraction!r}")
    if encoder is not None and not isinstance(encoder, MLPEncoder | ModuleEncoder):
        if not (hasattr(encoder, "init") and hasattr(encoder, "apply")):
            raise TypeError(
                "encoder must be a viax.MLPEncoder, a viax.ModuleEncoder or an object with "
                f"init(rng_key, input_dim, output_dim) and apply(params, x); got {encoder!r}"
            )
    objective = ELBO() if objective is None else objective
    if not isinstance(objective, ELBO | IWAE):
        raise TypeError(f"objective must be viax.ELBO(...) or viax.IWAE(...), got {objective!r}")
    batch_size = _check_int("batch_size", batch_size)
    num_epochs = _check_int("num_epochs", num_epochs)
    num_steps = _check_int("num_steps", num_steps)
    num_draws = _check_int("num_draws", num_draws, minimum=2)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation here, got {optimizer!r}"
        )
    minibatch = batch_size is not None or num_epochs is not None or optimizer is not None
    minibatch = minibatch or path == "minibatch"  # viax.fit's path= (checked there)
    source = _learning_source(data, minibatch, checkpoint_path, resume, stop_rule)
    minibatch = minibatch or source is not None  # a source is read in batches
    # The "data" mesh over every device of every process (viax.data.data_mesh validates
    # devices=): minibatches from a source or from arrays in memory (every process
    # holding them all) are shared by all of them.
    mesh = vdata.data_mesh(devices)
    num_devices = int(mesh.devices.size) if minibatch else 1
    if not minibatch and devices is not None and mesh.devices.size > 1:
        raise ValueError(
            f"devices= lists {mesh.devices.size} devices, but full-batch learning runs "
            "on one: the devices share minibatches (pass batch_size=...)"
        )
    if batch_size is not None and batch_size % num_devices:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of devices "
            f"({num_devices}) so that every device gets the same rows; pass devices= to use "
            "fewer"
        )
    if source is not None:
        if batch_size is None:  # min(100, N), rounded down to a multiple of the devices
            batch_size = max(min(100, source.num_rows) // num_devices * num_devices, num_devices)
        if batch_size > source.num_rows:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {source.num_rows} rows of the data"
            )
        data = {**dict(source.static), **_source_sample(source, batch_size, seed)}
    # Minibatch training checks the initial point on a sample of the rows (below).
    check = not minibatch
    if transform_batch is None:
        target, arrays, init_position = build_target(model, data, seed=seed, check=check)
    else:
        # The model only ever sees transformed rows (grey levels are not Bernoulli
        # data): the initial check runs on one fixed transform of the array data.
        target, arrays, init_position = _build_transformed(
            model, data, seed, transform_batch, check=check
        )
    need_plate = encoder is not None or minibatch
    why = "encoder=" if encoder is not None else "minibatch training"
    try:
        structure = _structure(target, arrays, need_plate, why)
    except ModelError:
        if not check:  # a log density that is not finite is refused first, as before
            from viax.model import _check_finite_at

            shown = arrays
            if transform_batch is not None:
                shown = transform_batch(jax.random.PRNGKey(seed + 3), dict(arrays))
            _check_finite_at(target, shown, target.init_position, seed)
        raise
    if not check:
        init_position = _check_initial_rows(model, target, arrays, structure, seed, transform_batch)
    if source is not None:
        # The rows in memory are a sample of R of the N rows (all of them when N is
        # small); only the source's row columns are rows.
        columns = {k for k in source.columns if not k.startswith("_")}
        keys = tuple(k for k in structure.batch_keys if k in columns)
        structure = structure._replace(batch_keys=keys)
    if encoder is not None and not structure.local:
        raise ModelError(
            f"encoder= given, but plate {structure.plate!r} holds no latent sites to amortize"
            + (
                f" (latent(s) {', '.join(structure.global_names)} lie outside it: global)"
                if structure.global_names
                else ""
            )
        )
    if minibatch:
        _refuse_per_row_params(target, arrays, structure)
    unused, no_gradient = _params_not_in_density(target, arrays, init_position)
    if unused:
        warnings.warn(
            f"param site(s) {', '.join(unused)} do not enter the log density (their gradient "
            "is identically zero): they keep their initial values",
            UserWarning,
            stacklevel=3,
        )
    if no_gradient:
        warnings.warn(
            f"param site(s) {', '.join(no_gradient)} enter the log density only through "
            "operations without a derivative (lax.stop_gradient, round/floor/sign, a "
            "comparison, an integer cast): their gradient is identically zero and they keep "
            "their initial values",
            UserWarning,
            stacklevel=3,
        )
    if minibatch and encoder is None and structure.local:
        raise ModelError(
            f"local latent(s) {', '.join(n for n, _ in structure.local)} of plate "
            f"{structure.plate!r} need per-row variational parameters for minibatch "
            "training; pass encoder=viax.MLPEncoder(...) to amortize them"
        )
    held_out = held_rows = None
    if stop_rule is not None:
        if not minibatch or encoder is None:
            raise ModelError(
                "stop_rule=EarlyStopping(...) watches minibatch training with an encoder "
                "(batch_size=..., encoder=...); the full-batch path stops by its own test"
            )
        if stop_rule.validation_data is not None:
            held_out, held_rows = _given_rows(stop_rule, arrays, structure), None
        else:
            arrays, held_out, structure, held_rows = _split_rows(arrays, structure, stop_rule, seed)
    dtype = _compute_dtype(arrays, structure.batch_keys) if minibatch else jnp.float64
    if encoder is None:
        dtype = jnp.float64
    q = _make_q(target, arrays, structure, encoder, family, rank, dtype)
    if held_out is not None and not q.rows_mode:
        names = structure.global_names or structure.outside
        raise ModelError(
            f"EarlyStopping needs rows that are independent given θ; site(s) "
            f"{', '.join(names)} couple them"
        )
    if isinstance(objective, IWAE) and objective.num_samples > 1 and minibatch and not q.rows_mode:
        names = structure.global_names or structure.outside
        raise ModelError(
            f"IWAE on minibatches needs rows that are independent given θ; site(s) "
            f"{', '.join(names)} couple them (use viax.ELBO() or the full batch)"
        )
    key_init, key_run, key_final = jax.random.split(jax.random.PRNGKey(seed), 3)
    params0 = {"theta": _unconstrained_theta(target), "q": q.init(key_init, init_position)}
    params0 = jax.tree_util.tree_map(
        lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, params0
    )
    setup_time = time.perf_counter() - start
    if minibatch:
        optimizer = optimizer if optimizer is not None else optax.adam(1e-3)
        if batch_size is None:  # min(100, N), rounded down to a multiple of the devices
            batch_size = min(100, structure.num_rows) // num_devices * num_devices
            if batch_size == 0:
                raise ValueError(
                    f"{structure.num_rows} rows cannot be shared by {num_devices} devices; "
                    "pass devices= to use fewer"
                )
        stream = None
        train_q, train_arrays = q, arrays
        if source is not None:
            stream = _StreamLoop(
                source, batch_size, seed, mesh, checkpoint_path, checkpoint_every, resume
            )
            # Trained over all N rows (the N/B scaling, epochs of ⌊N/B⌋ batches); the
            # step reads the static data and the source's batches.
            train_q = dataclasses.replace(q, structure=structure._replace(num_rows=source.num_rows))
            train_arrays = {k: v for k, v in arrays.items() if k not in structure.batch_keys}
        params, output, info = _minibatch(
            train_q,
            target,
            train_arrays,
            objective,
            params0,
            key_run,
            optimizer,
            batch_size,
            num_epochs or 100,
            num_steps,
            progress,
            average_fraction,
            transform_batch,
            _validation_fn(q, target, held_out, stop_rule, objective, transform_batch, seed),
            stop_rule,
            mesh,
            stream,
        )
        # Back to the host: the final estimates run on the default device, uncommitted.
        params = jax.tree_util.tree_map(_host, params)
        if stream is not None:
            info.update(
                source_rows=source.num_rows,
                rows_in_memory=structure.num_rows,
                wait_fraction=stream.wait_fraction,
                resumed_at_step=stream.resumed_at,
            )
    else:
        params, output, info = _full_batch(
            q, target, arrays, objective, params0, key_run, num_draws, num_steps or 2000, progress
        )
    info["objective"] = objective
    info["params_not_in_density"] = unused  # warned above: they kept their initial values
    info["params_without_gradient"] = no_gradient  # warned above, likewise
    info["devices"] = num_devices
    info["processes"] = jax.process_count() if minibatch else 1
    if held_rows is not None:
        info["held_out_rows"] = held_rows  # indices into the data's rows, not trained on
    info["setup_time"] = setup_time
    info["seconds_per_step"] = output.seconds_per_step
    if source is not None and output.seconds_per_step > 0:
        info["rows_per_second"] = batch_size / output.seconds_per_step  # steady, all processes
    theta = _constrain_theta(target, params["theta"])
    model_params = jax.tree_util.tree_map(np.asarray, theta)
    common = {
        "elbo_trace": output.trace,
        "converged": output.converged,
        "message": output.message,
        "num_steps": output.num_steps,
        "wall_time": output.wall_time + setup_time,
        "compile_time": output.compile_time,
        "info": info,
        "model_params": model_params,
    }
    total_rows = source.num_rows if source is not None else structure.num_rows
    partial = total_rows > structure.num_rows  # a source larger than the rows in memory
    if not evaluate or (partial and not q.rows_mode):
        # No final pass: the log weights of a q that couples the rows (global latents)
        # need every row, which a large source does not hold in memory.
        tail = output.trace[-max(1, output.trace.size // 4) :]
        elbo, elbo_se = mean_and_se(tail) if tail.size > 1 else (float("nan"),) * 2
        info["evaluation"] = (
            "none (evaluate=False)"
            if not evaluate
            else f"none: the rows are coupled by global latents and only {structure.num_rows} "
            f"of the source's {total_rows} rows are held in memory"
        ) + "; elbo: the mean of the last quarter of the training objective"
        return Result(
            method="learn",
            algorithm="optax" if minibatch else "lbfgs",
            family=q.family if isinstance(q, _FamilyQ) else "amortized",
            params=params["q"],
            elbo=float(elbo),
            elbo_se=float(elbo_se),
            target=None,
            data={},
            khat=float("nan"),
            **common,
        )
    if isinstance(q, _FamilyQ):
        data_theta = {**arrays, PARAMS_KEY: theta}
        _, log_weights = log_weights_fn(target, q.family, 1000)(params["q"], key_final, data_theta)
        log_weights = np.asarray(log_weights)
        elbo, elbo_se = mean_and_se(log_weights)
        khat = psis(log_weights)[1] if np.all(np.isfinite(log_weights)) else float("nan")
        return Result(
            method="learn",
            algorithm="lbfgs" if not minibatch else "optax",
            family=q.family,
            params=params["q"],
            elbo=elbo,
            elbo_se=elbo_se,
            target=target,
            data=data_theta,
            khat=khat,
            **common,
        )
    if transform_batch is not None:
        # The final estimates see the training rows as the model saw them: transformed
        # (one fixed draw).
        rows = {k: arrays[k] for k in structure.batch_keys}
        arrays = {**arrays, **transform_batch(jax.random.PRNGKey(seed + 3), rows)}
    return _amortized_result(
        q, target, arrays, theta, params["q"], seed, minibatch, common, total_rows
    )


def _amortized_result(
    q, target, arrays, theta, phi, seed, minibatch, common, total_rows=None
) -> Result:
    keys = q.structure.batch_keys
    fixed = {k: v for k, v in arrays.items() if k not in keys}
    batch = {k: arrays[k] for k in keys}
    num_rows = q.structure.num_rows
    info = common["info"]

    @functools.lru_cache(maxsize=8)
    def sample_fn(num_samples):
        def fn(theta, phi, data, key):
            eps = q.normal_noise(key, num_samples, num_rows)
            z = q.draw(phi, eps, data)
            values = jax.vmap(q.values)(z)
            return jax.vmap(lambda v: _constrained_values(target, v, theta, data))(values)

        return jit_once(fn)

    def sampler(num_samples, seed):
        draws = sample_fn(int(num_samples))(theta, phi, arrays, jax.random.PRNGKey(seed))
        return {k: np.asarray(v) for k, v in draws.items()}

    if q.rows_mode:
        elbo, elbo_se, num_final, num_checked = _final_elbo(
            q, theta, phi, batch, fixed, seed, total_rows
        )
        info["final_elbo_rows"] = num_checked
        rows = np.arange(min(num_rows, _KHAT_ROWS))
        check = _row_log_weights(
            q,
            theta,
            phi,
            {k: v[rows] for k, v in batch.items()},
            fixed,
            1000,
            seed + 2,
            _final_chunk(num_rows),
        )
        khat_rows = np.array([psis(check[:, n])[1] for n in range(check.shape[1])])
        # One number for the fit: the median k̂ of the checked rows (the fraction above
        # 0.7 is in info["khat_rows"]; RowEvidence gives it for held-out rows).
        khat = float(np.median(khat_rows))
        info["khat_rows"] = khat_rows
        info["num_final_draws"] = num_final

        def log_weights(num_samples, seed):
            return _row_log_weights(q, theta, phi, batch, fixed, num_samples, seed).sum(axis=1)

        def evidence_fn(new_data, num_samples, seed):
            prepared = prepare_data(target.model_fn, {**dict(target.static_data), **new_data})
            missing = [k for k in keys if k not in prepared.dynamic]
            if missing:
                raise ModelError(f"held-out data lacks {', '.join(missing)}")
            new_batch = {k: prepared.dynamic[k] for k in keys}
            shapes = {k: v.shape[1:] for k, v in new_batch.items()}
            expected = {k: arrays[k].shape[1:] for k in keys}
            if shapes != expected:
                raise ModelError(f"held-out rows have shapes {shapes}, training {expected}")
            extra = {k: v for k, v in prepared.dynamic.items() if k not in keys}
            fixed_all = {**fixed, **extra}
            fold = _evidence_folds(q, theta, phi, new_batch, fixed_all)
            chunks = _row_weight_chunks(
                q, theta, phi, new_batch, fixed_all, num_samples, seed, fold=fold
            )
            return _row_evidence(w for _, w in chunks)
    else:
        joint = _joint_weights_fn(q, num_rows)

        def log_weights(num_samples, seed):
            keys_ = jax.random.split(jax.random.PRNGKey(seed), -(-num_samples // 10))
            parts = [np.asarray(joint(theta, phi, arrays, k)) for k in keys_]
            return np.concatenate(parts)[:num_samples]

        lw = log_weights(1000, seed + 1)
        elbo, elbo_se = mean_and_se(lw)
        khat = psis(lw)[1] if np.all(np.isfinite(lw)) else float("nan")
        evidence_fn = None
    return Result(
        method="learn",
        algorithm="optax" if minibatch else "lbfgs",
        family="amortized",
        params=phi,
        elbo=elbo,
        elbo_se=elbo_se,
        target=None,
        data=arrays,
        sampler=sampler,
        log_weights_fn=log_weights,
        evidence_fn=evidence_fn,
        khat=khat,
        **common,
    )


@functools.lru_cache(maxsize=32)
def _joint_weights_fn(q, num_rows):
    def fn(theta, phi, data, key):
        eps = q.normal_noise(key, 10, num_rows)
        z = q.draw(phi, eps, data)
        return (q.log_p(theta, z, data, 1.0) - q.log_q(phi, z, data, 1.0))[:, 0]

    return jit_once(fn)


def _constrained_values(target: Target, values, theta, data):
    from numpyro.infer.util import constrain_fn

    out = constrain_fn(
        target.model_fn,
        (),
        {**dict(target.static_data), **data},
        {**values, **theta},
        return_deterministic=True,
    )
    return {k: v for k, v in out.items() if k in target.latent_names or k in target.deterministic}
