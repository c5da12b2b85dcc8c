"""Minibatch VI for any NumPyro model: doubly stochastic ELBO gradients from batches of
rows, preconditioned, variance-reduced, averaged, stopped by the Monte Carlo error.

The ELBO of all N rows, with global latents z_g ~ q_λ (a core family: mean-field,
full-rank, low-rank) and per-row latents z_i ~ N(m_i, diag(s_i²)) (mean-field, stored
at full size),

    L = E_q[G(z_g) + Σ_{i≤N} ℓ_i(z_g, z_i)] + H[q_λ] + Σ_i H[q_i],

is estimated from a batch B of rows by scaling the local terms by N/|B| (Hoffman et
al. 2013; Titsias & Lázaro-Gredilla 2014: reparameterised draws and a random batch,
"doubly stochastic").  The default needs no tuning on raw-scale data:

1. **Whitening** (Laplace on a subsample): the MAP ẑ of the global latents on up to
   ``num_precondition_rows`` rows (local terms scaled to N) by Newton's method on the
   dense Hessian (D_g ≤ 64) or L-BFGS, the Hessian H there (dense for D_g ≤ 256, else
   its diagonal by Hessian-vector products), and the
   global parameters optimised in coordinates where the posterior is about N(0, I):
   ``m = ẑ + A a`` with A = chol(H⁻¹) (or diag(H)^(−1/2)), scales relative to
   diag(H)^(−1/2).  Skipped (A = I) for models with per-row latents.  Hierarchical
   models (scale sites and group effects), whose joint MAP is degenerate, are instead
   whitened at a mean-field DADVI fit on the same subsample (:func:`_dadvi_whitening`):
   centre its means, scales its sds, dense E_q[−∇² log p]^(−1/2) on the smaller sites.
2. **A control variate at the anchor ẑ** (models without per-row latents): one pass
   over the data gives ``S = Σ_i ℓ_i(ẑ)`` and ``g = Σ_i ∇ℓ_i(ẑ)``, and each batch's
   local sum is replaced by

       (N/|B|) Σ_{i∈B} [ℓ_i(z) − ℓ_i(ẑ) − ∇ℓ_i(ẑ)ᵀ(z − ẑ)] + S + gᵀ(z − ẑ),

   unbiased for Σ_i ℓ_i(z) with a variance that shrinks with |z − ẑ|² instead of
   growing with N/|B|: the subsampling noise of plain SGD, which costs about one epoch
   per posterior sd of accuracy, is gone (the anchor of SVRG, Johnson & Zhang 2013;
   as a Taylor control variate in Baker et al. 2019, "Control variates for stochastic
   gradient MCMC").
3. **Adam with iterate averaging**, stopped by :mod:`viax.infer.stopping` (R̂
   stationarity, then Polyak–Ruppert averaging until the Monte Carlo standard error of
   the average is under ``tol`` posterior scales; Dhaka et al. 2020, Welandawe et al.
   2022).  ``Result.info["mcse"]`` reports that error.

Per-row variational parameters and their Adam moments live at full size (N, k) and are
gathered and scattered by the batch's row indices: a step costs O(|B|), not O(N) (lazy
Adam: a row's moments and bias correction advance only when the row is in a batch).

The variational parameters are a pytree ``{"global": ..., "local": {site: {"loc",
"log_scale"}}}``; the per-batch objective is a function ``objective(params, batch,
key) -> (loss, aux)`` that other objectives (importance-weighted bounds, amortised
encoders, parameters θ) can replace.

Devices: a :class:`jax.sharding.Mesh` over the axis "data" (every device by default,
those of every process after ``jax.distributed.initialize()``), batches sharded,
parameters replicated; the row order is a function of the seed alone, so the numbers
do not depend on the number of devices or processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from viax import data as vdata
from viax.batched import ROWS, BatchedModel, analyse
from viax.diagnostics import psis
from viax.families.gaussian import Family, FullRank, LowRank, MeanField, make_family
from viax.infer.driver import (
    Guard,
    batched_chunk_fn,
    guard_init,
    jit_once,
    precompile,
    run,
)
from viax.infer.optimize import NewtonResult, minimize_on_host, newton_on_host
from viax.infer.stopping import MCSEStop, parse_stop_rule, robust_max
from viax.model import Model, ModelError
from viax.result import Result, mean_and_se

__all__ = [
    "MinibatchInfo",
    "MinibatchState",
    "Whitening",
    "build_minibatch",
    "elbo_objective",
    "fit_minibatch",
]

_LOG_2PI = math.log(2 * math.pi)
_MASK = "_mask"
_MAX_DENSE_DIM = 256  # above: diagonal curvature (Hessian-vector products)
# Above this many global latents the steps apply a dense whitening in float32: each step
# reads the D x D matrix twice (m = c + A a, and Aᵀ for the gradient), which bounded the
# step by memory bandwidth (flights, D = 4,170: 139 MB in float64; fwd + bwd 25 ms in
# float64, 7 ms in float32 on 2 cores).  The rounding, ~1e-6 of |A a| (a few posterior
# sds), is far below the Monte Carlo error; the answer is pushed through in float64.
_F32_WHITENING_DIM = 512
_LOOKAHEAD_STEPS = 200  # batches the steps' reader keeps ready (see open_steps)
_NUM_EVAL_DRAWS = 200  # draws of the final ELBO / k̂ pass over the data
# The final evaluation's difference estimator (see _Evaluator): batches of the pass
# evaluated with every draw, and the largest row-sampling sd of a log weight accepted.
_EVAL_BATCHES = 32
_EVAL_MAX_RELATIVE_SD = 0.1  # row-sampling sd of a log weight / sd of the log weights
# First tried on this many of those batches, accepted there under half the bound (the
# sd's estimate from 8 batches is itself rough: 7 degrees of freedom).
_EVAL_BATCHES_FIRST = 8
_SALT_EVALUATION = 0x5EED_0E7A
_MAP_STEPS = 500  # L-BFGS steps of the whitening's MAP search
_MAP_STEPS_DADVI = 100  # the same, where it only starts the DADVI set-up
# Up to this many global latents (and no hierarchical set-up) the MAP search is Newton's
# method on the dense Hessian, which the Laplace whitening needs at the MAP anyway: one
# compiled program (value, gradient, Hessian) instead of three (value and gradient, a
# diagonal curvature to scale L-BFGS, the Hessian), and 7 Hessians instead of 43 L-BFGS
# steps on the 10^6-row logistic regression's 65,536 rows (21 latents: a Hessian costs
# about 4 gradients there, 7 at 256 latents, where L-BFGS is kept).
_NEWTON_MAX_DIM = 64
_NEWTON_STEPS = 50  # Hessians at most; not converged: L-BFGS goes on from its point
_NEWTON_TOL = 1e-8  # Newton decrement gᵀH⁻¹g: the step's squared length in posterior sds
_MAX_SCALE = 100.0  # whitened unit at most this (a flat direction is not a huge one)
_MAP_RESTARTS = 2  # MAP searches restarted after a scale collapsed
_COLLAPSE = 8.0  # a scale this far (in log) below its start has collapsed
_DADVI_DRAWS = 16  # fixed draws of the hierarchical set-up's mean-field fit (0: off)
# Its L-BFGS steps at most; also where the fit is resumed on every row afterwards
# (:func:`_full_dadvi`): the whitening is placed at the subsample's fit, and capped at
# 100 steps on flights that fit was so far off (σ_carrier 124 sd) that 400 passes over
# every row did not converge from it (a session script, 19:21-19:26).
_DADVI_STEPS = 400
# Its gradient tolerance (max |∂L/∂w|, w in posterior sds): a preconditioner needs the
# centre to a few hundredths of an sd, and the stochastic phase corrects the rest (at
# 1e-3 the flights set-up took 977 steps of 16 draws × 65,536 rows, 12 minutes).
_DADVI_TOL = 0.02
_DADVI_DENSE_TOL = 2e-3  # the same resumed in dense-whitened coordinates (cheap there)
_DRIFT_TOL = 0.05  # the stopping rule's negligible drift, posterior scales (tol / 2)
_HIERARCHICAL_HALVINGS = 2  # step-size halvings of a fit whitened at DADVI
_HIERARCHICAL_STEPS = 40_000  # its default step budget (20,000 otherwise)
# Draws of q per step: with the draws' second-order control variate the gradient's
# noise is the residual's (cubic terms) and 2 draws do (measured at 10^6 rows: MCSE
# 0.005 posterior scales after 504 steps, 0.002 with 8; steps 35% cheaper).
_PARTICLES = 8
_PARTICLES_CURVATURE = 2


# -- whitening ------------------------------------------------------------------------
class Whitening(NamedTuple):
    """Global coordinates: ``m = center + A a`` with ``A = tril`` (dense) or
    ``diag(scale)``, except on the coordinates ``block_index`` where ``A`` is the dense
    ``block_tril`` (the small global sites of a large model: intercepts, slopes and
    scales, whose posterior correlations a diagonal cannot undo); the scale parameters
    are relative to ``scale`` = diag(H)^(−1/2)."""

    center: jax.Array  # (D_g,)
    tril: jax.Array | None  # (D_g, D_g): lower triangular (FullRank) or symmetric H^(-1/2)
    scale: jax.Array  # (D_g,)
    block_index: jax.Array | None = None  # (k,) int
    block_tril: jax.Array | None = None  # (k, k) lower triangular

    def linear(self, a):
        """``A a``."""
        if self.tril is not None:
            if self.tril.dtype != a.dtype:  # float32 for large D (see _F32_WHITENING_DIM)
                return (self.tril @ a.astype(self.tril.dtype)).astype(a.dtype)
            return self.tril @ a
        out = self.scale * a
        if self.block_index is not None:
            out = out.at[self.block_index].set(self.block_tril @ a[self.block_index])
        return out

    def push(self, family: Family, params_w: dict) -> dict:
        """The family's parameters in the model's unconstrained space."""
        if self.tril is not None and isinstance(family, FullRank):
            return family.affine_tril(params_w, self.center, self.tril)
        if isinstance(family, FullRank):
            return family.affine(params_w, self.center, self.scale)
        a = params_w["loc"]
        loc = self.center + self.linear(a)
        if isinstance(family, MeanField):
            return {"loc": loc, "log_scale": params_w["log_scale"] + jnp.log(self.scale)}
        if isinstance(family, LowRank):
            return {
                "loc": loc,
                "cov_factor": self.scale[:, None] * params_w["cov_factor"],
                "log_diag": params_w["log_diag"] + jnp.log(self.scale),
            }
        raise TypeError(f"unknown family {family!r}")


class Anchor(NamedTuple):
    """The control variate's anchor: ``position`` ẑ (D_g,), the full-data local sum
    ``value`` = Σ_i ℓ_i(ẑ) and its gradient ``grad`` (D_g,); ``enabled`` 0 or 1."""

    position: jax.Array
    value: jax.Array
    grad: jax.Array
    enabled: jax.Array


class Curvature(NamedTuple):
    """The draws' control variate: the quadratic model of the full-data log joint at
    the anchor ẑ, ``f̃(z) = gradᵀδ − ½ δᵀ precision δ`` with δ = z − ẑ, ``grad`` (D_g,)
    its gradient there (global terms included) and ``precision`` (D_g, D_g) the
    whitening's Laplace H (``(A Aᵀ)⁻¹``); ``enabled`` 0 or 1.  Derived from the
    whitening and the anchor, so a checkpoint needs no copy of it."""

    grad: jax.Array
    precision: jax.Array
    enabled: jax.Array


# -- state ----------------------------------------------------------------------------
class MinibatchState(NamedTuple):
    params: dict  # {"global": whitened family params, "local": {site: {"loc", "log_scale"}}}
    opt_state: Any  # optax state of params["global"]
    local_moments: dict  # {site: {"m": {...}, "v": {...}, "count": (N,) int32}}
    local_average: dict  # {site: {"loc", "log_scale", "count": (N,) int32}}
    averaging: jax.Array  # bool: average the per-row parameters
    step: jax.Array  # int32: steps taken
    rng_key: jax.Array  # the run's key; step t uses fold_in(rng_key, t)
    guard: Guard


class MinibatchInfo(NamedTuple):
    objective: jax.Array  # the batch's ELBO estimate (full-data scale)
    position: jax.Array  # flat global parameters after the step (for the stopping rule)


class Minibatch(NamedTuple):
    init: Callable
    step: Callable  # (state, rng_key, data, batch) -> (state, info)
    objective: Callable  # (params, batch, key) -> (loss, aux)


def _local_gather(local: dict, rows) -> dict:
    return jax.tree_util.tree_map(lambda a: a[rows], local)


SETUP = "_setup"  # the batch key of the run's (Whitening, Anchor)
# Models without per-row latents: the standard normals of each step's draws of q are made
# on the host (:func:`_step_noise`) and handed to each chunk as data, (K, draws, D) from
# its first step on; a step reads its row into the batch under _EPS.
_NOISE, _NOISE_START, _EPS = "_noise", "_noise_start", "_eps"
_SALT_NOISE = 0x5EED_D4A3


def _step_noise(seed: int, start: int, num: int, shape: tuple) -> np.ndarray:
    """Standard normals ``(num, *shape)`` for the global steps ``start, …, start + num − 1``:
    step t's from its own stream (NumPy's generator seeded by (seed, t)), so a step's
    draws depend on neither the chunking, nor the devices or processes, nor a resumption.

    A compiled Threefry hash and its float64 inverse error function were 0.9 s of the
    step's chunk's 2.2 s of compilation (the 10^6-row logistic regression, 2-core
    machine), for a few numbers a step; NumPy makes a chunk's in well under a millisecond.
    """
    return np.stack([_host_normals(seed, shape, _SALT_NOISE, start + i) for i in range(num)])


@functools.lru_cache(maxsize=64)
def elbo_objective(bm: BatchedModel, family: Family, num_particles: int) -> Callable:
    """The batch ELBO estimate ``objective(params, batch, key) -> (−ELBO, ELBO)`` with
    ``params = {"global": whitened params, "local": {site: {"loc", "log_scale"} (|B|, k)}}``
    (the batch's rows already gathered) and the run's ``(Whitening, Anchor)`` or
    ``(Whitening, Anchor, Curvature)`` under ``batch["_setup"]`` (arguments, not
    constants: refits reuse the compiled step); see the module docstring for the
    estimator.

    With a :class:`Curvature`, each draw's value f(z_k) becomes
    ``f(z_k) − f̃(z_k) + E_q[f̃]``, where f̃ is the quadratic model and
    ``E_q[f̃] = f̃(μ) − ½ tr(H Σ)`` in closed form for q = N(μ, Σ): unbiased for the
    same ELBO, and the reparameterised gradient's noise is that of the residual f − f̃
    only (cubic and higher terms), instead of H's quadratic form in the draws (a
    second-order Taylor control variate, Miller et al. 2017, "Reducing
    reparameterization gradient variance"; Paisley et al. 2012 for the first order).
    Near a Gaussian posterior (many rows) the noise almost vanishes."""
    n = bm.num_rows

    def local_sum_at(zg, zl, batch):
        return bm.log_joint_parts(zg, zl, batch)

    def objective(params, batch, key):
        setup = batch[SETUP]
        whitening, anchor = setup[:2]
        curvature = setup[2] if len(setup) > 2 else None
        rows = batch[ROWS]
        factor = n / rows.shape[0]
        fam_params = whitening.push(family, params["global"])
        if _EPS in batch:  # the step's draws made on the host (see _step_noise)
            eps, key_l = batch[_EPS], key
        else:
            key_g, key_l = jax.random.split(key)
            eps = jax.random.normal(key_g, (num_particles, family.noise_dim))
        zg = jax.vmap(lambda e: family.transform(fam_params, e))(eps)
        zl, local_entropy = {}, 0.0
        for index, site in enumerate(bm.local_sites):
            p = params["local"][site.name]
            e = jax.random.normal(
                jax.random.fold_in(key_l, index),
                (num_particles, *p["loc"].shape),
            )
            zl[site.name] = p["loc"] + jnp.exp(p["log_scale"]) * e
            local_entropy += jnp.sum(p["log_scale"]) + 0.5 * p["loc"].size * (1 + _LOG_2PI)

        # The anchor's batch terms: value and gradient at ẑ (no per-row latents here).
        def at_anchor(z):
            return bm.log_joint_parts(z, {}, batch)[1]

        if bm.local_sites:
            anchor_value, anchor_grad = 0.0, jnp.zeros_like(anchor.position)
        else:
            anchor_value, anchor_grad = jax.value_and_grad(at_anchor)(anchor.position)
            anchor_value = jax.lax.stop_gradient(anchor_value) * anchor.enabled
            anchor_grad = jax.lax.stop_gradient(anchor_grad) * anchor.enabled

        def one(z, zloc):
            global_sum, local_sum = local_sum_at(z, zloc, batch)
            delta = z - anchor.position
            corrected = (
                factor * (local_sum - anchor_value - anchor_grad @ delta)
                + (anchor.value + anchor.grad @ delta) * anchor.enabled
            )
            return global_sum + corrected

        values = jax.vmap(one)(zg, zl)
        if curvature is not None:

            def quadratic(z):
                delta = z - anchor.position
                return curvature.grad @ delta - 0.5 * delta @ (curvature.precision @ delta)

            expected = quadratic(family.mean(fam_params)) - 0.5 * jnp.sum(
                curvature.precision * family.covariance(fam_params)
            )
            values = values + curvature.enabled * (expected - jax.vmap(quadratic)(zg))
        elbo = jnp.mean(values) + family.entropy(fam_params) + factor * local_entropy
        return -elbo, elbo

    return objective


@functools.lru_cache(maxsize=64)
def build_minibatch(
    bm: BatchedModel,
    family: Family,
    *,
    num_particles: int = 1,
    learning_rate: float = 0.02,
    local_learning_rate: float = 0.05,
    objective: Callable | None = None,
    sharding=None,
) -> Minibatch:
    """The pure init/step pair; ``step(state, rng_key, data, batch)`` ignores the
    driver's key (step t draws from ``fold_in(state.rng_key, t)``, so the numbers do not
    depend on how the steps are cut into chunks) and ``data`` holds the constant arrays
    and ``"_setup"``: ``(Whitening, Anchor)``.  Cached: refits reuse the compiled chunk."""
    optimizer = optax.adam(learning_rate)
    objective = objective or elbo_objective(bm, family, num_particles)
    b1, b2, eps_adam = 0.9, 0.999, 1e-8

    def init(params_w: dict, rng_key, local_init: dict | None = None) -> MinibatchState:
        local = local_init or {
            s.name: {
                "loc": jnp.zeros((bm.num_rows, s.size)),
                "log_scale": jnp.full((bm.num_rows, s.size), -1.0),
            }
            for s in bm.local_sites
        }

        # Separate buffers for every array: the chunk donates (updates in place) each.
        def zeros():
            return jax.tree_util.tree_map(jnp.zeros_like, local)

        def counts():
            return jnp.zeros(bm.num_rows, jnp.int32)

        params = {"global": params_w, "local": local}
        flat, _ = ravel_pytree(params_w)
        m, v, average = zeros(), zeros(), zeros()
        return MinibatchState(
            params=params,
            opt_state=optimizer.init(params_w),
            local_moments={k: {"m": m[k], "v": v[k], "count": counts()} for k in local},
            local_average={k: {**average[k], "count": counts()} for k in local},
            averaging=jnp.asarray(False),
            step=jnp.asarray(0, jnp.int32),
            rng_key=rng_key,
            guard=guard_init(flat.shape[0]),
        )

    def step(state: MinibatchState, rng_key, data, batch):
        del rng_key
        batch = {**data, **batch}
        rows = batch[ROWS]
        factor = bm.num_rows / rows.shape[0]
        if _NOISE in batch:
            # This step's row of the chunk's host-drawn noise (:func:`_step_noise`).
            batch[_EPS] = batch[_NOISE][state.step - batch[_NOISE_START]]
            key = state.rng_key  # unused: no per-row latents
        else:
            key = jax.random.fold_in(state.rng_key, state.step)
        gathered = _local_gather(state.params["local"], rows)
        params = {"global": state.params["global"], "local": gathered}
        (loss, elbo), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, key)
        flat_grad, _ = ravel_pytree(grads["global"])
        local_grads = jax.tree_util.tree_map(lambda g: g / factor, grads["local"])
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(flat_grad))
        for g in jax.tree_util.tree_leaves(local_grads):
            finite &= jnp.all(jnp.isfinite(g))
        scale = state.guard.step_scale

        def apply(old):
            p, opt_state = old
            updates, opt_state = optimizer.update(grads["global"], opt_state, p)
            updates = jax.tree_util.tree_map(lambda u: scale * u, updates)
            return optax.apply_updates(p, updates), opt_state

        new_global, opt_state = jax.lax.cond(
            finite, apply, lambda o: o, (state.params["global"], state.opt_state)
        )
        # Per-row parameters: lazy Adam on the gathered rows, scattered back.  A
        # non-finite step writes the old rows back (a where over |B| rows, not N).
        local, moments, average = {}, {}, {}
        for name, p_rows in gathered.items():
            mom = state.local_moments[name]
            count = mom["count"][rows] + 1
            t = count.astype(jnp.float64)[:, None]
            m_new = jax.tree_util.tree_map(
                lambda m, g: b1 * m[rows] + (1 - b1) * g, mom["m"], local_grads[name]
            )
            v_new = jax.tree_util.tree_map(
                lambda v, g: b2 * v[rows] + (1 - b2) * g**2, mom["v"], local_grads[name]
            )
            p_new = jax.tree_util.tree_map(
                lambda p, m, v, t=t: (
                    p
                    - scale
                    * local_learning_rate
                    * (m / (1 - b1**t))
                    / (jnp.sqrt(v / (1 - b2**t)) + eps_adam)
                ),
                p_rows,
                m_new,
                v_new,
            )
            keep = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old), p_new, p_rows
            )
            local[name] = jax.tree_util.tree_map(
                lambda full, new: full.at[rows].set(new), state.params["local"][name], keep
            )
            m_keep = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old[rows]), m_new, mom["m"]
            )
            v_keep = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old[rows]), v_new, mom["v"]
            )
            moments[name] = {
                "m": jax.tree_util.tree_map(lambda f, n: f.at[rows].set(n), mom["m"], m_keep),
                "v": jax.tree_util.tree_map(lambda f, n: f.at[rows].set(n), mom["v"], v_keep),
                "count": mom["count"].at[rows].set(jnp.where(finite, count, count - 1)),
            }
            avg = state.local_average[name]
            n_avg = avg["count"][rows] + (state.averaging & finite).astype(jnp.int32)
            w = jnp.where(state.averaging, 1.0 / jnp.maximum(n_avg, 1), 0.0)[:, None]
            average[name] = {
                key_: avg[key_].at[rows].set(avg[key_][rows] + w * (keep[key_] - avg[key_][rows]))
                for key_ in ("loc", "log_scale")
            }
            average[name]["count"] = avg["count"].at[rows].set(n_avg)
        guard = state.guard._replace(
            step=state.guard.step + 1,
            num_nonfinite=state.guard.num_nonfinite + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.guard.first_nonfinite_step < 0) & ~finite,
                state.guard.step + 1,
                state.guard.first_nonfinite_step,
            ),
            nonfinite_mask=state.guard.nonfinite_mask | ~jnp.isfinite(flat_grad),
        )
        new_state = state._replace(
            params={"global": new_global, "local": local},
            opt_state=opt_state,
            local_moments=moments,
            local_average=average,
            step=state.step + 1,
            guard=guard,
        )
        if sharding is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, sharding)
        position, _ = ravel_pytree(new_global)
        return new_state, MinibatchInfo(objective=elbo, position=position)

    return Minibatch(init, step, objective)


# -- set-up: whitening and anchor ---------------------------------------------------------
def _first_epoch(source, batch_size, seed, pc, remainder="drop") -> Iterator:
    """This process's share (``pc`` = (index, count)) of the batches of epoch 0."""
    return source.batches(
        batch_size,
        seed=seed,
        epoch=0,
        process_index=pc[0],
        process_count=pc[1],
        remainder=remainder,
    )


def _rows_of(source, batch_size, count, seed, pc) -> dict:
    """Up to ``count`` rows (whole batches of epoch 0) of this process, concatenated."""
    out: list[dict] = []
    got = 0
    for batch in _first_epoch(source, batch_size, seed, pc):
        out.append(batch)
        got += batch[ROWS].shape[0] * pc[1]  # rows of the global batches
        if got >= count:
            break
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def _rows_of_chunk(chunks, batch_size: int, count: int) -> dict | None:
    """:func:`_rows_of` (one process) taken from the steps' first chunk, which holds
    the same batches of epoch 0 (read already: no second pass through the shuffle
    buffers); None where the chunk has fewer batches than needed."""
    first = chunks.peek()
    need = -(-count // batch_size)
    if first is None or jax.tree_util.tree_leaves(first)[0].shape[0] < need:
        return None
    # On one CPU device the chunk's arrays are the host's (aliased): views, no copy;
    # sliced in NumPy, not by a compiled slice.
    return {k: np.asarray(v)[:need].reshape(-1, *v.shape[2:]) for k, v in first.items()}


def _whitening(
    bm,
    batch,
    num_sample_rows,
    init_u,
    symmetric=False,
    dadvi_draws=_DADVI_DRAWS,
    full=None,
) -> tuple[Whitening, dict]:
    """MAP and curvature of the global latents on ``batch`` (local terms scaled to N).

    ``symmetric``: the dense factor is H^(-1/2) (eigen-decomposition) rather than the
    Cholesky factor of H^(-1); both whiten, but a Cholesky factor depends on the order
    of the sites (measured: the same 8-group model stopped in 5,740 steps with its
    effects sorting last and not in 20,000 with them first).  Only for families whose
    push does not need a triangular factor (not FullRank).  ``full``: a :class:`FullData`,
    passes over every row for the set-up of a large hierarchical model
    (:func:`_dense_dadvi`)."""
    dim = bm.global_dim
    identity = Whitening(jnp.asarray(init_u), None, jnp.ones(dim))
    if bm.local_sites or dim == 0:
        return identity, {"preconditioner": "identity (per-row latents)" if dim else "none"}
    factor = jnp.asarray(bm.num_rows / num_sample_rows)
    value_and_grad, value_grad_hessian, diagonal_fn, _ = _map_fns(bm)
    # Newton's method on the dense Hessian for a few latents (affine invariant: raw
    # scales cost it nothing); otherwise L-BFGS in coordinates scaled by the curvature
    # at the start: on raw scales (a slope per km next to an intercept) its first steps
    # would otherwise overshoot by orders of magnitude and its step-size search give up.
    # Off the exact start u = 0 (a fixed nudge, the same in every process): there a
    # logistic likelihood's logits are exactly 0, where the gradient of NumPyro's
    # softplus (max(x, 0) + log1p(exp(-|x|))) takes the wrong subgradient.
    nudge = np.random.default_rng(0).uniform(-1e-3, 1e-3, dim)
    start = jnp.asarray(np.asarray(init_u, dtype=float) + nudge)
    # A scale (a site bounded below, u = log σ) the search drives e^8 below its start
    # has run into a boundary: a hierarchical scale collapsing with its effects (the
    # joint density has no MAP there, or the search stepped off into the flat region
    # where σ·z ≈ 0 and z gets no gradient).  Put those scales back at their start,
    # keep the rest of the search's point (effects fitted), and search again with the
    # curvature of that point; after _MAP_RESTARTS the whitening is taken at that
    # sane point instead of a meaningless one.
    positive = bm.positive_index()
    effects = any(site.size > _BLOCK_SITE_SIZE for site in bm.global_sites)
    dadvi = bool(dadvi_draws and positive.size and effects and (dim > _MAX_DENSE_DIM or symmetric))
    # For a hierarchical model the search only starts the DADVI fit (fixed effects on
    # raw scales found; the scales' mode is no target): a short one.
    map_steps = _MAP_STEPS_DADVI if dadvi else _MAP_STEPS
    newton = not dadvi and dim <= _NEWTON_MAX_DIM
    point, collapsed_ever = np.asarray(start), np.zeros(0, int)
    total_steps, collapsed, newton_steps = 0, np.zeros(0, int), 0
    found: NewtonResult | None = None
    for _ in range(_MAP_RESTARTS + 1):
        found = _newton_map(value_grad_hessian, point, factor, batch) if newton else None
        if found is not None:
            newton_steps += found.num_steps
            total_steps += found.num_steps
            center, value, steps = found.position, found.value, 0
        if found is None or not (found.converged and np.isfinite(found.value)):
            found = None  # L-BFGS (from Newton's point where it is finite)
            if newton and np.isfinite(value) and np.all(np.isfinite(center)):
                point = center
            curvature = np.asarray(diagonal_fn(jnp.asarray(point), factor, batch))
            good = np.isfinite(curvature) & (curvature > 0)
            unit = np.where(good, np.abs(curvature) ** -0.5, 1.0) if good.any() else np.ones(dim)

            def scaled(w, point=point, unit=unit):
                # NumPy on the host: an eager jnp operation is a compiled program
                value, grad = value_and_grad(jnp.asarray(point + unit * w), factor, batch)
                return value, np.asarray(grad) * unit

            w, value, grad, steps = minimize_on_host(scaled, np.zeros(dim), map_steps, 1e-3)
            total_steps += int(steps)
            center = point + unit * w
        if not (np.isfinite(value) and np.all(np.isfinite(center))):
            break
        collapsed = positive[center[positive] < np.asarray(start)[positive] - _COLLAPSE]
        if not collapsed.size:
            break
        collapsed_ever = np.union1d(collapsed_ever, collapsed)
        point = center.copy()
        point[collapsed] = np.asarray(start)[collapsed]
    info = {"map_steps": total_steps, "precondition_rows": int(num_sample_rows)}
    if newton:
        info["map_newton_steps"] = newton_steps  # Hessians evaluated
    if collapsed_ever.size:
        info["collapsed_scales"] = sorted({bm.site_of_index(int(i)) for i in collapsed_ever})
    if not (np.isfinite(value) and np.all(np.isfinite(center))):
        # The search failed outright: whiten by the curvature at the start.
        curvature = np.asarray(diagonal_fn(start, factor, batch))
        good = np.isfinite(curvature) & (curvature > 0)
        unit = np.where(good, np.abs(curvature) ** -0.5, 1.0) if good.any() else np.ones(dim)
        return Whitening(start, None, jnp.asarray(np.minimum(unit, _MAX_SCALE))), {
            **info,
            "preconditioner": "diagonal curvature at the start (the MAP search failed)",
        }
    where = ""
    if collapsed.size:
        center = point  # the last search's scales collapsed again: the sane point
        where = ", at the last search point with collapsing scales reset (no MAP)"
    elif steps >= map_steps:
        where = f", at the MAP search's point after {total_steps} steps (not converged)"
    if dadvi:
        # A hierarchical model (scale sites and group effects): the joint MAP is no
        # place to whiten at (see _dadvi_whitening); the search's point starts it.
        return _dadvi_whitening(bm, batch, factor, center, dadvi_draws, info, full)
    center_j = jnp.asarray(center)
    if dim <= _MAX_DENSE_DIM:
        if found is not None and not collapsed.size:
            hessian = found.hessian  # Newton's, at its point: the centre
        else:
            hessian = np.asarray(value_grad_hessian(center_j, factor, batch)[2])
        hessian = 0.5 * (hessian + hessian.T)
        diag = np.diagonal(hessian)
        try:
            if symmetric:
                eigval, eigvec = np.linalg.eigh(hessian)
                if not np.all(eigval > 0):
                    raise np.linalg.LinAlgError("Hessian not positive definite")
                tril = (eigvec * eigval**-0.5) @ eigvec.T  # H^(-1/2), symmetric
            else:
                tril = np.linalg.cholesky(np.linalg.inv(hessian))
            if np.all(np.isfinite(tril)) and np.all(diag > 0):
                return Whitening(center_j, jnp.asarray(tril), jnp.asarray(diag**-0.5)), {
                    **info,
                    "preconditioner": "laplace (subsample MAP, dense Hessian)" + where,
                }
        except np.linalg.LinAlgError:
            pass
    else:
        diag = np.asarray(diagonal_fn(center_j, factor, batch))
        block_info = _block(bm, center_j, factor, batch, diag)
    ok = np.isfinite(diag) & (diag > 0)
    if not ok.any():
        return Whitening(center_j, None, jnp.ones(dim)), {
            **info,
            "preconditioner": "MAP centre, identity scale (curvature not positive)",
        }
    # Coordinates with no positive curvature get the median scale.
    scale = np.where(ok, np.abs(diag) ** -0.5, np.median(np.abs(diag[ok]) ** -0.5))
    scale = np.minimum(scale, _MAX_SCALE)
    index, tril = block_info if dim > _MAX_DENSE_DIM else (None, None)
    note = f", dense on the {len(index)} coordinates of small sites" if index is not None else ""
    return Whitening(center_j, None, jnp.asarray(scale), index, tril), {
        **info,
        "preconditioner": (
            f"laplace (subsample MAP, diagonal: prior Hessian + rows' Fisher{note}){where}"
        ),
    }


_BLOCK_SITE_SIZE = 8  # global sites this small join the dense block of a large model


def _dadvi_whitening(
    bm, batch, factor, start, num_draws, info, full=None
) -> tuple[Whitening, dict]:
    """Whitening at a mean-field DADVI fit on the subsample (likelihood scaled to N).

    The joint MAP of a hierarchical model is degenerate: the density rises without
    bound (centred) or the search runs to σ → 0 with its effects (non-centred, the
    region σ·z ≈ 0), and the curvature there says nothing about the posterior's width;
    whitening at it left the flights fit 5 posterior sds off after 6,000 steps.  The
    mean-field ELBO with a fixed set of M base draws ε_1..ε_M (DADVI; Giordano, Ingram
    & Broderick 2023),

        L(m, s) = (1/M) Σ_j [G(m + s∘ε_j) + (N/n) Σ_{i≤n} ℓ_i(m + s∘ε_j)] + Σ_d log s_d,

    has an optimum where the MAP has none (the entropy keeps every scale away from 0),
    found by L-BFGS in coordinates scaled by the search point's curvature.  The fit is
    whitened by it: centre m, scales s (each coordinate's q sd), and for the small
    global sites (intercepts, slopes, group scales: ``_block``) the dense factor of the
    ELBO's Hessian in m, E_q[−∇² log p] averaged over the same draws, which undoes the
    posterior correlations of raw-scale predictors that a diagonal cannot.  The
    stochastic fit then starts at q_DADVI and corrects it with every row."""
    dim = bm.global_dim
    value_and_grad, _, diagonal_fn, hessian_rows = _map_fns(bm)
    dadvi_fn = _dadvi_fn(bm)
    draws = np.random.default_rng(1).standard_normal((num_draws, dim))
    draws -= draws.mean(axis=0)  # moment-matched means: the fixed-draw ELBO is centred
    draws_j = jnp.asarray(draws)
    curvature = np.asarray(diagonal_fn(jnp.asarray(start), factor, batch))
    good = np.isfinite(curvature) & (curvature > 0)
    unit = np.minimum(np.where(good, np.abs(curvature) ** -0.5, 1.0), _MAX_SCALE)
    x0 = np.concatenate([start, np.log(unit)])
    # Means in units of the curvature's scale; log-scales as they are (O(1) already).
    units = np.concatenate([unit, np.ones(dim)])

    def scaled(w):
        value, grad = dadvi_fn(jnp.asarray(x0 + units * w), factor, batch, draws_j)
        return value, np.asarray(grad) * units

    t0 = time.perf_counter()
    w, value, grad, steps = minimize_on_host(scaled, np.zeros(2 * dim), _DADVI_STEPS, _DADVI_TOL)
    x = x0 + units * w
    info = {
        **info,
        "dadvi_steps": int(steps),
        "dadvi_draws": int(num_draws),
        "dadvi_seconds": time.perf_counter() - t0,
    }
    if not (np.isfinite(value) and np.all(np.isfinite(x))):
        return Whitening(jnp.asarray(start), None, jnp.asarray(unit)), {
            **info,
            "preconditioner": "diagonal curvature at the MAP search's point (DADVI failed)",
        }
    center, scale = x[:dim], np.minimum(np.exp(x[dim:]), _MAX_SCALE)
    where = "" if steps < _DADVI_STEPS else f" (not converged in {steps} steps)"
    if dim > _MAX_DENSE_DIM:
        dense = _dense_dadvi(bm, batch, factor, center, scale, draws_j, info, full)
        if dense is not None:
            return dense
    center_j = jnp.asarray(center)
    # Dense on every coordinate of a small model, else on those of the smaller sites,
    # smallest first while the block stays within _MAX_DENSE_DIM: the intercept and the
    # effects of a factor with few groups lie on a ridge (a + σ z_j: only their sum is
    # well determined), which per-coordinate Adam crawls along (measured: 12 carrier-
    # like groups left outside the block, the intercept stopped 0.31 sd off).
    if dim <= _MAX_DENSE_DIM:
        index = np.arange(dim)
    else:
        chosen: list = []
        for site in sorted(bm.global_sites, key=lambda s: s.size):
            if sum(s.size for s in chosen) + site.size > _MAX_DENSE_DIM:
                break
            chosen.append(site)
        index = np.concatenate([np.arange(s.start, s.start + s.size) for s in chosen] or [[]])
    tril = None
    if 2 <= index.size <= _MAX_DENSE_DIM:
        basis = jax.nn.one_hot(jnp.asarray(index, dtype=int), dim, dtype=center_j.dtype)
        block = np.zeros((index.size, index.size))
        for eps in draws:
            rows = np.asarray(hessian_rows(center_j + scale * eps, factor, batch, basis))
            block += rows[:, index] / num_draws
        block = 0.5 * (block + block.T)
        eigval, eigvec = np.linalg.eigh(block)
        if np.all(eigval > 0) and np.all(np.isfinite(eigvec)):
            # Symmetric (E_q H)^(-1/2): unlike a Cholesky factor, independent of the
            # order of the sites (see _whitening).
            tril = (eigvec * eigval**-0.5) @ eigvec.T
    if tril is None:
        index = None
    note = (
        ""
        if index is None
        else ", dense E_q[Hessian] on every coordinate"
        if index.size == dim
        else f", dense E_q[Hessian] on the {len(index)} coordinates of the smaller sites"
    )
    return Whitening(
        center_j,
        None,
        jnp.asarray(scale),
        None if index is None else jnp.asarray(index),
        None if tril is None else jnp.asarray(tril),
    ), {
        **info,
        "preconditioner": (
            f"mean-field DADVI on the subsample ({num_draws} fixed draws{where}){note}"
        ),
    }


def _dense_dadvi(bm, batch, factor, center, scale, draws_j, info, full=None):
    """``(Whitening, info)`` whitened by the dense Hessian at the subsample DADVI fit's
    means, or None where neither the exact structured Hessian nor
    :func:`viax.infer.chunked.dense_curvature_plan`'s memory and time allow one.

    A model with thousands of groups (flights: 4,000 planes nested in 16 carriers) has
    ridges no diagonal or small dense block undoes: the intercept against every
    effect, a carrier's effect against its planes', each scale against its effects.
    With H at q's means (the effects' curvature scales with their group scale squared,
    so it is taken at q, not at a MAP), the DADVI fit is resumed in coordinates
    m = c + S F w (:func:`viax.infer.dadvi.host_whitening`) to a tighter tolerance,
    as the full-batch path does, and the stochastic phase is whitened by the symmetric
    H^(−1/2) on every coordinate (q's sds as the scales).

    H is, where the model has the arrowhead structure of
    :func:`viax.infer.chunked.hessian_structure` (checked on the subsample) and
    ``full`` is given, the exact Hessian over **every row**, from K columns
    and the diagonal of the uncoupled sites (flights: 128 products in one pass over the
    data).  A Hessian of a subsample is not only noisy on a non-centred model: its
    scale–effect entries hold each group's residual sum over the sampled rows, which
    balances the prior only over all rows, so it can be indefinite where the full
    one is not.

    Crossed effects (each row touching a level of a and one of b, both sites too large
    for columns) fail that structure: the rows couple z_a with z_b.  Each site is still
    uncoupled inside, so H is taken over every row the same way with the z_a × z_b
    block dropped (``within_sites`` of ``hessian_structure``; the head's columns and
    every diagonal exact).  It only whitens: the resumption on every row converges to
    the same fixed point.  On 200,000 rows × 1,500 × 1,500 levels the fit then ended
    0.24 sd (logistic) and 0.79 sd (Gaussian) off the full-batch one on σ_a, where the
    subsample's set-up (this function's fallback) had stopped 2.96 and 1.28 sd off; the
    set-up itself now ends within 0.07 sd of it (Gaussian), and the rest is the
    stochastic phase's drift, not yet explained (benchmarks/results/crossed_minibatch*.md).

    Otherwise the dense Hessian of the subsample from D products (a random part of its
    rows if all would not fit the plan's time, the sum scaled to N)."""
    from viax.infer.chunked import (
        dense_curvature_plan,
        dense_memory_fits,
        hessian_structure,
        hvp_group,
        structured_hessian,
    )
    from viax.infer.dadvi import host_whitening

    dim = bm.global_dim
    row_keys = set(bm.row_names) | {ROWS}
    hess, structure_reason = None, ""
    if full is not None and dense_memory_fits(dim):
        t0 = time.perf_counter()
        negative = _negative_log_joint(bm)
        # within_sites: crossed effects fail the exact check (see the docstring)
        structure, structure_reason = hessian_structure(
            lambda u, b: negative(u, factor, b),
            batch,
            center,
            bm.global_sites,
            within_sites=True,
        )
        if structure is not None:
            # The passes over every row within the dense curvature's time budget (its
            # three Hessians of K + 1 products stand for this one and the E_q pass);
            # zero-stride arrays give the plan the rows' shapes without the rows.
            every_row = {
                k: np.broadcast_to(np.zeros((), v.dtype), (bm.num_rows, *v.shape[1:]))
                for k, v in batch.items()
                if k in row_keys
            }
            fits, plan_reason, plan_rows = dense_curvature_plan(dim, every_row, structure.products)
            if not fits or plan_rows is not None:
                structure_reason = f"{structure_reason}, not over every row ({plan_reason})"
                structure = None
        if structure is not None:
            probes = jnp.asarray(structure.probes(dim, np.float64))

            def hessian_at(u, structure=structure, probes=probes):
                products = full.products(jnp.asarray(u), probes)
                hess = np.asarray(structured_hessian(products, structure, dim))
                return 0.5 * (hess + hess.T)

            hess = hessian_at(center)
            reason = f"{structure_reason}, over every row"
            info = {**info, "hessian_seconds": time.perf_counter() - t0}
            if np.all(np.isfinite(hess)):
                passes = _full_passes_allowed(every_row, _FULL_DADVI_DRAWS)
                return _full_whitening(full, hess, center, scale, info, reason, passes, hessian_at)
            hess = None
    if hess is None:
        plan, reason, rows = dense_curvature_plan(
            dim, {k: v for k, v in batch.items() if k in row_keys}
        )
        if structure_reason:
            reason = f"{structure_reason}; {reason}"
        if not plan:
            return None
        num = batch[ROWS].shape[0]
        part, part_factor = batch, factor
        if rows is not None and rows < num:  # the subsample's rows are in random order
            part = {k: (v[:rows] if k in row_keys else v) for k, v in batch.items()}
            part_factor = factor * (num / rows)
        group = hvp_group(None, {k: v for k, v in part.items() if k in row_keys}, dim)
        hess = np.asarray(_dense_hessian_fn(bm, group)(jnp.asarray(center), part_factor, part))
    hess = 0.5 * (hess + hess.T)
    if not np.all(np.isfinite(hess)):
        return None
    unit, factor_w, kind = host_whitening(hess)
    factor_w = np.eye(dim) if factor_w is None else factor_w
    dadvi_fn = _dadvi_fn(bm)
    x0 = np.concatenate([center, np.log(scale)])

    def to_x(w):
        return x0 + np.concatenate([unit * (factor_w @ w[:dim]), w[dim:]])

    def whitened(w):
        value, grad = dadvi_fn(jnp.asarray(to_x(w)), factor, batch, draws_j)
        grad = np.asarray(grad)
        return value, np.concatenate([factor_w.T @ (unit * grad[:dim]), grad[dim:]])

    w, value, _, steps = minimize_on_host(
        whitened, np.zeros(2 * dim), _DADVI_STEPS, _DADVI_DENSE_TOL
    )
    x = to_x(w)
    if not (np.isfinite(value) and np.all(np.isfinite(x))):
        return None
    center, scale = x[:dim], np.minimum(np.exp(x[dim:]), _MAX_SCALE)
    # At q's means a non-centred model's H can be indefinite along a scale and its
    # effects (a saddle of the joint density): |H|^(-1/2).
    root = _abs_inverse_sqrt(hess)
    if root is None:
        return None
    tril, negative_eigenvalues, _, _ = root
    where = "" if steps < _DADVI_STEPS else f", not converged in {steps} steps"
    return Whitening(jnp.asarray(center), jnp.asarray(tril), jnp.asarray(scale)), {
        **info,
        "dadvi_dense_steps": int(steps),
        "curvature_reason": reason,
        "hessian_negative_eigenvalues": negative_eigenvalues,
        "preconditioner": (
            f"mean-field DADVI on the subsample ({info['dadvi_draws']} fixed draws, resumed "
            f"whitened by the dense Hessian at its means{where}), dense H^(-1/2) on every "
            "coordinate"
        ),
    }


_FULL_DRAWS = 16  # antithetic pairs of draws of q for the full-data E_q[·] (32 draws)


def _abs_inverse_sqrt(matrix: np.ndarray):
    """``|M|^(-1/2)`` of a symmetric (D, D) ``M``, symmetric (see _whitening), its
    eigenvalues' magnitudes floored at 1e-13 of the largest as in
    viax.infer.dadvi.laplace_factor; with the number of eigenvalues ≤ 0, the floored
    magnitudes (D,) and the eigenvectors (D, D).  None where the eigenvectors are not
    finite."""
    eigval, eigvec = np.linalg.eigh(matrix)
    if not np.all(np.isfinite(eigvec)):
        return None
    absval = np.abs(eigval)
    absval = np.maximum(absval, 1e-13 * max(float(absval.max(initial=0.0)), 1e-300))
    return (eigvec * absval**-0.5) @ eigvec.T, int(np.sum(eigval <= 0)), absval, eigvec


def _full_whitening(full: FullData, hess, center, scale, info, reason, passes, hessian_at):
    """``(Whitening, info)``: the mean-field fit resumed on **every row** and the
    stochastic phase whitened by the ELBO's Hessian in the means there.

    For a mean-field Gaussian q = N(m, diag s²) the ELBO's Hessian in m is
    H̃ = E_q[−∇² log p̃], and at its optimum s_j⁻² = H̃_jj (Opper & Archambeau 2009;
    Price's theorem).  H̃ is taken as the exact Hessian at the subsample fit's means
    (``hess``: the arrowhead structure over every row; for crossed effects the same with
    the blocks between the large sites dropped, see :func:`_dense_dadvi`) with its
    diagonal replaced by
    E_q[diag] over every row, estimated from 16 antithetic pairs of draws of q (one
    pass), and the means are whitened by the symmetric |H̃|^(−1/2) (see
    :func:`_whitening`).  The replacement matters: at q's means a non-centred model's
    Hessian misses the curvature that q's spread gives each scale (E_q[z²] = m² + s²
    for its effects) and is indefinite, and |H(m)|^(−1/2) stretches those directions
    without bound (on flights the stochastic phase whitened so drifted 25-40 sd away
    from the full-batch fit in 4,000 steps).

    The subsample's fit is not where to start the stochastic phase: on a model with
    thousands of groups its rows scaled to N overstate each group's spread (flights: a
    group of 80 rows seen through 16 scaled by 5), so its group scales sit tens of sds
    off, and the stochastic phase, whose noise lives in the same whitened directions,
    did not bring them back in 40,000 steps (σ_tail 6 sd and the plane sds 57% off,
    R̂ 2.1).  So the fit is resumed on every row first (:func:`_full_dadvi`), in the
    coordinates whitened by |H̃|^(−1/2), where L-BFGS converges in a few hundred passes
    (flights: 209 passes), and H̃ is taken again at the resumed fit (``hessian_at``, one
    pass for the structured Hessian and one for E_q[diag]).  ``info["setup_decrement"]``:
    gᵀ|H̃|⁻¹g / D for g = E_q[∇ log p̃] over every row at the set-up's end, how far (in
    posterior sd², per coordinate) its means are from the full-data mean-field fixed
    point."""
    t0 = time.perf_counter()
    whitened = _elbo_hessian_root(full, hess, center, scale)
    if whitened is None:
        return None
    scale, (tril, negative_eigenvalues, absval, eigvec) = whitened
    info = {
        **info,
        "curvature_reason": reason,
        "hessian_negative_eigenvalues": negative_eigenvalues,
        "whitening_seconds": time.perf_counter() - t0,
    }
    resumed = _full_dadvi(full, tril, center, scale, passes) if passes >= _MIN_PASSES else None
    if passes < _MIN_PASSES:
        where = f" (not resumed on every row: {passes} passes fit the time budget)"
        info["full_dadvi_steps"] = 0
    elif resumed is None:
        where = " (its resumption on every row failed: the subsample's fit kept)"
    else:
        center, scale, full_info = resumed
        info.update(full_info)
        where = (
            f", resumed on every row ({full_info['full_dadvi_steps']} L-BFGS passes, "
            f"{_FULL_DADVI_DRAWS} fixed draws"
            + ("" if full_info["full_dadvi_converged"] else ", not converged")
            + ")"
        )
        # Whitened again where the stochastic phase starts: the curvature of a ridge
        # (the intercept against the carrier effects, 1/σ_c² from their prior) moves
        # with the group scales, which the resumption moved by tens of sds.
        # The first whitening's D x D arrays are dropped first (flights: 139 MB each;
        # kept, the peak RSS was 2,045 MB).
        t0 = time.perf_counter()
        del tril, eigvec
        hess = hessian_at(center)
        if not np.all(np.isfinite(hess)):
            return None
        again = _elbo_hessian_root(full, hess, center, scale)
        del hess
        if again is None:
            return None
        scale, (tril, negative_eigenvalues, absval, eigvec) = again
        info["hessian_negative_eigenvalues"] = negative_eigenvalues
        info["rewhitening_seconds"] = time.perf_counter() - t0
        where += ", whitened again there"
    dim = center.size
    grad = np.asarray(full.gradient(_q_draws(center, scale)))
    if not np.all(np.isfinite(grad)):
        return None
    decrement = float(np.sum((eigvec.T @ grad) ** 2 / absval)) / dim
    # hessian_structure's reason: "exact Hessian ..." unless blocks between sites dropped
    exact = reason.startswith("exact")
    if not exact:
        # Measured, not understood: see docs/guide/scale.md, "Crossed effects".
        info["caveat"] = (
            "crossed effects: the steps are whitened without the blocks between the large "
            "sites; on such models (200,000 rows, 1,500 x 1,500 levels) the group scales "
            "were seen 0.24-0.79 posterior sd from the full-batch fit while the stopping "
            "rule reported convergence: check against path='full-batch' or another seed"
        )
    return Whitening(jnp.asarray(center), jnp.asarray(tril), jnp.asarray(scale)), {
        **info,
        "setup_decrement": decrement,
        "preconditioner": (
            f"mean-field DADVI on the subsample ({info['dadvi_draws']} fixed draws){where}, "
            "whitened by E_q[Hessian] over every row ("
            + ("exact " if exact else "")
            + "structured Hessian"
            + ("" if exact else ", blocks between its large sites dropped")
            + ", E_q[diagonal] from 32 draws)"
        ),
    }


def _elbo_hessian_root(full: FullData, hess, center, scale):
    """``(scale, root)`` at q = N(center, diag scale²): H̃ = ``hess`` with its diagonal
    replaced by E_q[diag H] over every row (32 antithetic draws, one pass), q's sds at
    the mean-field fixed point H̃_jj^(−1/2), and :func:`_abs_inverse_sqrt` of H̃; None
    where either is not finite (see :func:`_full_whitening`)."""
    dim = center.size
    diag = np.asarray(full.diagonal(_q_draws(center, scale)))
    if not np.all(np.isfinite(diag)):
        return None
    matrix = hess.copy()
    index = np.arange(dim)
    matrix[index, index] = np.where(diag > 0, diag, np.abs(np.diagonal(hess)))
    root = _abs_inverse_sqrt(matrix)
    if root is None:
        return None
    return np.minimum(np.where(diag > 0, np.abs(diag) ** -0.5, scale), _MAX_SCALE), root


def _q_draws(center, scale) -> jax.Array:
    """The set-up's draws of q = N(center, diag scale²) for its E_q[·] passes over every
    row: ``_FULL_DRAWS`` antithetic pairs (2 ``_FULL_DRAWS``, D), the same base draws at
    every q of a run."""
    eps = np.random.default_rng(2).standard_normal((_FULL_DRAWS, center.size))
    return jnp.asarray(center + scale * np.concatenate([eps, -eps]))


_FULL_DADVI_DRAWS = 16  # fixed draws of the mean-field fit resumed on every row
_MIN_PASSES = 20  # fewer passes in the budget: the subsample's fit is kept


def _full_passes_allowed(every_row: dict, num_draws: int) -> int:
    """Passes over every row (value and gradient of the fixed-draw ELBO, ``num_draws``
    draws) that fit :data:`viax.infer.chunked.FULL_BATCH_SECONDS`, at most
    ``_DADVI_STEPS``: estimated from the rows' numbers as the full-batch path's budget
    is (:func:`viax.infer.chunked.full_batch_estimate`), not timed, so that the fit does
    not depend on the machine's load (flights: 327,346 rows x 16 draws x 14 numbers,
    0.37 s a pass, 400 passes; 10^7 rows x 21 numbers: 25)."""
    from viax.infer.chunked import (
        _ROW_OVERHEAD,
        _SECONDS_PER_NUMBER,
        FULL_BATCH_SECONDS,
        row_layout,
    )

    num_rows, _, width = row_layout(every_row)
    seconds = num_rows * num_draws * (width + _ROW_OVERHEAD) * _SECONDS_PER_NUMBER
    return int(min(_DADVI_STEPS, FULL_BATCH_SECONDS // max(seconds, 1e-9)))


def _full_dadvi(full: FullData, tril, center, scale, max_steps: int):
    """``(center, scale, info)`` of the mean-field DADVI fit resumed on every row from
    q = N(center, diag scale²), or None where it failed.

    The fixed-draw ELBO of :func:`_dadvi_whitening` over all N rows (one pass over
    the data per value and gradient), by L-BFGS in the coordinates m = c + W w, log s =
    log s₀ + v with W = |H̃|^(−1/2) (:func:`_full_whitening`), to max |∂L/∂(w, v)| ≤
    ``_DADVI_DENSE_TOL``, in at most ``max_steps`` passes (:func:`_full_passes_allowed`).
    The M draws are antithetic
    pairs scaled so that each coordinate's mean square is 1: the fixed-draw entropy and
    quadratic terms are then exact, where unscaled draws put each coordinate's sd off
    by about 1/√(2M) (35% at M = 16; measured on flights: 69% of the plane sds more
    than 10% off the full-batch fit after 150 passes, none with the scaled draws)."""
    dim = center.size
    eps = np.random.default_rng(3).standard_normal((_FULL_DADVI_DRAWS // 2, dim))
    eps = np.concatenate([eps, -eps])
    eps /= np.sqrt(np.mean(eps**2, axis=0))
    draws = jnp.asarray(eps)
    x0 = np.concatenate([center, np.log(scale)])

    def to_x(w):
        return x0 + np.concatenate([tril @ w[:dim], w[dim:]])

    def whitened(w):
        value, grad = full.dadvi(jnp.asarray(to_x(w)), draws)
        grad = np.asarray(grad)
        return float(value), np.concatenate([tril.T @ grad[:dim], grad[dim:]])

    t0 = time.perf_counter()
    w, value, grad, steps = minimize_on_host(
        whitened, np.zeros(2 * dim), max_steps, _DADVI_DENSE_TOL
    )
    x = to_x(w)
    if not (np.isfinite(value) and np.all(np.isfinite(x))):
        return None
    return (
        x[:dim],
        np.minimum(np.exp(x[dim:]), _MAX_SCALE),
        {
            "full_dadvi_steps": int(steps),
            "full_dadvi_converged": bool(np.max(np.abs(grad)) <= _DADVI_DENSE_TOL),
            "full_dadvi_seconds": time.perf_counter() - t0,
            "full_dadvi_max_steps": max_steps,
        },
    )


@functools.lru_cache(maxsize=64)
def _dense_hessian_fn(bm: BatchedModel, group: int):
    """Compiled dense Hessian (D_g, D_g) of ``−(G(u) + factor · Σ_B ℓ_i(u))`` at
    ``(u, factor, batch)``: :func:`_hessian_rows` columns, ``group`` at a time."""
    negative = _negative_log_joint(bm)

    def hessian(u, factor, batch):
        basis = jnp.eye(bm.global_dim, dtype=u.dtype)
        return jax.lax.map(
            lambda v: _hessian_rows(negative, u, factor, batch, v[None])[0],
            basis,
            batch_size=group,
        )

    return jit_once(hessian)


class FullData(NamedTuple):
    """Passes over every row for the set-up (:func:`_full_data`)."""

    products: Callable  # (u, probes (K, D_g)) -> H p (K, D_g), H = −∇² log p̃(u)
    gradient: Callable  # (draws (M, D_g)) -> (1/M) Σ_m ∇ log p̃(z_m) (D_g,)
    diagonal: Callable  # (draws (M, D_g)) -> (1/M) Σ_m diag H(z_m) (D_g,)
    dadvi: Callable  # (x = (m, log s) (2 D_g,), eps (M, D_g)) -> −L, −∇L: fixed-draw ELBO


def _full_data(bm, source, batch_size, seed, pc, put_batch, constants, batch) -> FullData:
    """:class:`FullData` of log p̃ = G(u) + Σ_{i≤N} ℓ_i(u): one pass over the data each
    (padded batches masked), the global terms once (on ``batch``, any batch of rows)."""

    def full_pass(fn, init):
        return _full_pass(fn, source, batch_size, seed, pc, put_batch, constants, init)

    def products(u, probes):
        local = full_pass(lambda b: _products_fn(bm, _ROWS)(u, probes, b), jnp.zeros(probes.shape))
        return local + _products_fn(bm, _GLOBAL)(u, probes, batch)

    def gradient(draws):
        zero = jnp.zeros(draws.shape[1:])
        local = full_pass(lambda b: _gradient_fn(bm, _ROWS)(draws, b), zero)
        return local + _gradient_fn(bm, _GLOBAL)(draws, batch)

    sites = tuple((site.start, site.size) for site in bm.global_sites)

    def diagonal(draws):
        zero = jnp.zeros(draws.shape[1:])
        local = full_pass(lambda b: _diagonal_fn(bm, sites, _ROWS)(draws, b), zero)
        return local + _diagonal_fn(bm, sites, _GLOBAL)(draws, batch)

    def dadvi(x, eps):
        dim = eps.shape[1]
        zero = (jnp.asarray(0.0), jnp.zeros(x.shape))
        value, grad = full_pass(lambda b: _dadvi_part_fn(bm, _ROWS)(x, eps, b), zero)
        value_g, grad_g = _dadvi_part_fn(bm, _GLOBAL)(x, eps, batch)
        # The entropy Σ log s (up to a constant), on the host's side of the sum.
        return value + value_g - jnp.sum(x[dim:]), grad + grad_g - jnp.concatenate(
            [jnp.zeros(dim), jnp.ones(dim)]
        )

    return FullData(products, gradient, diagonal, dadvi)


_GLOBAL, _ROWS = 0, 1  # the parts of BatchedModel.log_joint_parts


def _part(bm: BatchedModel, part: int) -> Callable:
    """``(u, batch) -> G(u)`` (``_GLOBAL``) or the batch's masked, unscaled row terms
    ``Σ_B ℓ_i(u)`` (``_ROWS``; a pass over the data sums them over every row)."""
    if part == _GLOBAL:
        return lambda u, batch: bm.log_joint_parts(u, {}, batch)[0]
    return lambda u, batch: bm.log_joint_parts(u, {}, batch, mask=batch.get(_MASK))[1]


@functools.lru_cache(maxsize=64)
def _diagonal_fn(bm: BatchedModel, sites: tuple, part: int):
    """Compiled ``(draws (M, D_g), batch) -> (1/M) Σ_m diag ∇²(−f)(z_m)`` for the part f
    of :func:`_part`: :func:`viax.infer.chunked.hessian_diagonal`, two products per
    uncoupled site."""
    from viax.infer.chunked import hessian_diagonal

    term = _part(bm, part)

    def diagonal(draws, batch):
        def one(z):
            return hessian_diagonal(lambda u: -term(u, batch), z, sites)

        # lax.map, not vmap: the per-coordinate fallback of a coupled site is a cond,
        # which vmap would turn into a select that always pays it.
        return jnp.mean(jax.lax.map(one, draws), axis=0)

    return jax.jit(diagonal)


@functools.lru_cache(maxsize=64)
def _dadvi_part_fn(bm: BatchedModel, part: int):
    """Compiled ``(x = (m, log s), eps (M, D_g), batch) -> (−(1/M) Σ_m f(m + s∘ε_m),
    its gradient in x)`` for the part f of :func:`_part` (the fixed-draw ELBO's
    expectation term; :func:`_full_dadvi`)."""
    term = _part(bm, part)

    def negative(x, eps, batch):
        dim = eps.shape[1]
        m, s = x[:dim], jnp.exp(x[dim:])
        return -jnp.mean(jax.vmap(lambda e: term(m + s * e, batch))(eps))

    return jax.jit(jax.value_and_grad(negative))


@functools.lru_cache(maxsize=64)
def _gradient_fn(bm: BatchedModel, part: int):
    """Compiled ``(draws (M, D_g), batch) -> (1/M) Σ_m ∇_u f(z_m)`` for the part f of
    :func:`_part`."""
    term = _part(bm, part)

    def gradient(draws, batch):
        return jnp.mean(jax.vmap(lambda z: jax.grad(term)(z, batch))(draws), axis=0)

    return jax.jit(gradient)


@functools.lru_cache(maxsize=64)
def _products_fn(bm: BatchedModel, part: int):
    """Compiled ``(u, probes (K, D_g), batch) -> H p`` (K, D_g) for the Hessian H of −f,
    the part f of :func:`_part`."""
    term = _part(bm, part)

    def negative(u, factor, batch):
        return -term(u, batch)

    def products(u, probes, batch):
        return _hessian_rows(negative, u, 1.0, batch, probes)

    return jax.jit(products)


@functools.lru_cache(maxsize=64)
def _dadvi_fn(bm: BatchedModel):
    """Compiled value and gradient of the negative fixed-draw ELBO of
    :func:`_dadvi_whitening` at ``x = (m, log s)`` (2 D_g,)."""
    dim = bm.global_dim

    def negative_elbo(x, factor, batch, draws):
        m, log_s = x[:dim], x[dim:]

        def one(eps):
            global_sum, local_sum = bm.log_joint_parts(m + jnp.exp(log_s) * eps, {}, batch)
            return global_sum + factor * local_sum

        return -(jnp.mean(jax.lax.map(one, draws)) + jnp.sum(log_s))

    return jit_once(jax.value_and_grad(negative_elbo))


def _block(bm, center, factor, batch, diag):
    """``(index, tril)`` of a dense whitening for the coordinates of the small global
    sites (exact Hessian rows by k Hessian-vector products), or ``(None, None)``."""
    index = np.concatenate(
        [
            np.arange(site.start, site.start + site.size)
            for site in bm.global_sites
            if site.size <= _BLOCK_SITE_SIZE
        ]
        or [np.zeros(0, int)]
    )
    if not 2 <= index.size <= _MAX_DENSE_DIM:
        return None, None
    basis = jax.nn.one_hot(jnp.asarray(index), bm.global_dim, dtype=center.dtype)
    rows = np.asarray(_map_fns(bm)[3](center, factor, batch, basis))
    block = rows[:, index]
    block = 0.5 * (block + block.T)
    try:
        tril = np.linalg.cholesky(np.linalg.inv(block))
    except np.linalg.LinAlgError:
        return None, None
    if not (np.all(np.isfinite(tril)) and np.all(np.diagonal(block) > 0)):
        return None, None
    return jnp.asarray(index), jnp.asarray(tril)


def _newton_map(value_grad_hessian, start, factor, batch) -> NewtonResult:
    """The subsample MAP by :func:`viax.infer.optimize.newton_on_host` from ``start``
    (modified Newton steps, Armijo backtracking), with one compiled program
    ``value_grad_hessian(u, factor, batch) -> (f, ∇f, ∇²f)`` for its values, gradients
    and Hessians: a point's Hessian is asked for right after its value, so the last
    evaluation is kept rather than repeated."""
    last: dict[bytes, list[np.ndarray]] = {}

    def evaluate(u):
        u = np.asarray(u, dtype=np.float64)
        if u.tobytes() not in last:
            last.clear()
            out = value_grad_hessian(u, factor, batch)
            last[u.tobytes()] = [np.asarray(a, dtype=np.float64) for a in out]
        return last[u.tobytes()]

    return newton_on_host(
        lambda u: evaluate(u)[:2],
        lambda u: evaluate(u)[2],
        np.asarray(start, dtype=np.float64),
        _NEWTON_STEPS,
        _NEWTON_TOL,
    )


@functools.lru_cache(maxsize=64)
def _map_fns(bm: BatchedModel, block: int = 32):
    """Compiled ``value_and_grad``, ``(value, gradient, dense Hessian)`` and a diagonal
    curvature of ``−(G(u) + factor · Σ_B ℓ_i(u))`` at ``(u, factor, batch)``, and
    Hessian-vector products ``(u, factor, batch, basis)``."""
    dim = bm.global_dim
    negative = _negative_log_joint(bm)
    row_keys = set(bm.row_names) | {ROWS}

    def value_grad_hessian(u, factor, batch):
        # Forward over reverse with the value and gradient as the primal's by-products
        # (one program; measured twice as fast as jax.hessian's jacfwd(jacrev) here).
        def grad_and_value(x):
            value, grad = jax.value_and_grad(negative)(x, factor, batch)
            return grad, (value, grad)

        hessian, (value, grad) = jax.jacfwd(grad_and_value, has_aux=True)(u)
        return value, grad, hessian

    def diagonal(u, factor, batch):
        # The global terms' exact diagonal (Hessian-vector products, no data), plus the
        # rows' empirical Fisher diagonal Σ_i (∂ℓ_i/∂u)² (per-row gradients, `chunk`
        # rows at a time: memory O(chunk × D), cost O(rows × D), where D Hessian-vector
        # products over the rows would cost O(rows × D × passes)).
        one_row = {k: (v[:1] if k in row_keys else v) for k, v in batch.items()}
        grad = jax.grad(lambda x: -bm.log_joint_parts(x, {}, one_row)[0])

        def hvp_diag(start):
            basis = jax.nn.one_hot(start + jnp.arange(block), dim, dtype=u.dtype)
            hv = jax.vmap(lambda v: jax.jvp(grad, (u,), (v,))[1])(basis)
            return jnp.sum(hv * basis, axis=1)

        prior = jax.lax.map(hvp_diag, jnp.arange(0, dim, block)).reshape(-1)[:dim]
        rows = batch[ROWS].shape[0]
        chunk = min(rows, 256)
        used = rows // chunk * chunk
        constant = {k: v for k, v in batch.items() if k not in row_keys}
        per_row = {
            k: v[:used].reshape((used // chunk, chunk, *v.shape[1:]))
            for k, v in batch.items()
            if k in row_keys
        }

        def row_grad(row):
            one = {**constant, **{k: v[None] for k, v in row.items()}}
            return jax.grad(lambda x: bm.log_joint_parts(x, {}, one)[1])(u)

        def chunk_sum(rows_chunk):
            return jnp.sum(jax.vmap(row_grad)(rows_chunk) ** 2, axis=0)

        fisher = jnp.sum(jax.lax.map(chunk_sum, per_row), axis=0) * (rows / used)
        return prior + factor * fisher

    return (
        jit_once(jax.value_and_grad(negative)),
        # Evaluated up to _NEWTON_STEPS times: compiled for speed (at 65,536 rows and 21
        # latents 14 ms a call, 37 ms compiled for compile time)
        jax.jit(value_grad_hessian),
        jit_once(diagonal),
        jit_once(functools.partial(_hessian_rows, negative)),
    )


def _negative_log_joint(bm: BatchedModel) -> Callable:
    """``(u, factor, batch) -> −(G(u) + factor · Σ_B ℓ_i(u))``: the global terms and the
    batch's rows scaled by ``factor`` (N/B)."""

    def negative(u, factor, batch):
        global_sum, local_sum = bm.log_joint_parts(u, {}, batch)
        return -(global_sum + factor * local_sum)

    return negative


def _hessian_rows(negative, u, factor, batch, basis) -> jax.Array:
    """``H v`` (K, D) for the K directions of ``basis`` (K, D), H the Hessian of
    ``negative`` at u: forward-over-reverse."""
    grad = jax.grad(negative)
    return jax.vmap(lambda v: jax.jvp(lambda x: grad(x, factor, batch), (u,), (v,))[1])(basis)


def _full_pass(fn, source, batch_size, seed, pc, put, constants, init):
    """Σ over every row of ``fn(batch) -> pytree`` (padded batches masked), one epoch.

    At most two batches are in flight: batch k is dispatched, then the sum up to batch
    k − 1 awaited, so the next batch is read while batch k computes.  Unbounded
    asynchronous dispatch queued hundreds of programs, and with several CPU devices on
    few cores XLA's all-reduce waited past its 40 s limit for a starved device thread
    and aborted the process (measured: 4 host devices, 2 busy cores, 10^6 rows).
    ``init``: the sum of no batches.  The sum starts at the first batch's value and adds
    in one compiled program (eager additions compiled one program per leaf and per
    placement of its operands: four for a value and a gradient)."""
    total = previous = None
    for batch in _first_epoch(source, batch_size, seed, pc, remainder="pad"):
        value = fn({**constants, **put(batch)})
        total = value if total is None else _add_trees(total, value)
        jax.block_until_ready(previous)
        previous = total
    return init if total is None else total


@jax.jit
def _add_trees(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


# -- the fit ------------------------------------------------------------------------------
def _epochs(source, batch_size, seed, start_step, num_steps, per_epoch, pc) -> Iterator:
    """The batch stream from global step ``start_step`` on: epochs chained, each in the
    order of (seed, epoch); ``num_steps`` batches in all."""
    epoch, start = divmod(start_step, per_epoch)
    left = num_steps
    while left > 0:
        for batch in source.batches(
            batch_size,
            seed=seed,
            epoch=epoch,
            start_batch=start,
            process_index=pc[0],
            process_count=pc[1],
        ):
            batch = {k: v for k, v in batch.items() if k != _MASK}
            yield batch
            left -= 1
            if left == 0:
                return
        epoch, start = epoch + 1, 0


def _analyse_cached(model_fn, source, batch_size):
    static = dict(source.static)
    scalars = {k: v for k, v in static.items() if np.ndim(v) == 0 and not hasattr(v, "dtype")}
    scalars.update(
        {k: v.item() for k, v in static.items() if hasattr(v, "dtype") and np.ndim(v) == 0}
    )
    constants = {k: np.asarray(v) for k, v in static.items() if k not in scalars}
    rows = {
        k: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
        for k, (shape, dtype) in source.columns.items()
        if k != "_index"
    }
    key = None
    try:
        key = (
            model_fn,
            tuple(sorted(scalars.items())),
            tuple((k, v.shape, str(v.dtype)) for k, v in sorted(constants.items())),
            tuple((k, v.shape, str(v.dtype)) for k, v in sorted(rows.items())),
            source.num_rows,
            batch_size,
        )
        hash(key)
    except TypeError:
        key = None
    bm = _ANALYSED.get(key) if key is not None else None
    if bm is None:
        bm = analyse(model_fn, scalars, rows, constants, source.num_rows, batch_size)
        if key is not None:
            _ANALYSED[key] = bm
    return bm, constants


_ANALYSED: dict = {}


def _subsample_batch_size(model_fn, data) -> int | None:
    """The ``subsample_size`` of a model written NumPyro's way (None otherwise)."""
    from viax.batched import _subsampled_plates

    trace = _abstract_model_trace(model_fn, data)
    plates = _subsampled_plates(trace) if trace is not None else {}
    return next(iter(plates.values()))[1] if plates else None


PATHS = ("auto", "full-batch", "minibatch")


def minibatch_route(model_fn, data, batch_size, num_epochs, path: str) -> str | None:
    """Why :func:`viax.fit` should take the minibatch path (a sentence for
    ``info["path_reason"]``), or None for the full-batch path.  Models with parameters θ
    (``numpyro.param``) are left to :mod:`viax.infer.learn`."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; use one of {', '.join(PATHS)}")
    streamed = data is not None and not isinstance(data, Mapping)
    if path == "full-batch":
        if streamed:
            raise ValueError(
                "path='full-batch' needs the data in memory (a dict of arrays); a viax.data "
                "source is read in batches: use path='minibatch' or 'auto'"
            )
        return None
    if streamed:
        return "the data are a viax.data source (read in batches)"
    if not callable(model_fn) or isinstance(model_fn, Model):
        return None
    trace = _abstract_model_trace(model_fn, data)
    if trace is None or any(site["type"] == "param" for site in trace.values()):
        return None
    if path == "minibatch":
        return "asked for (path='minibatch')"
    from viax.batched import _subsampled_plates

    if _subsampled_plates(trace):
        return "the model subsamples a plate (numpyro.plate(..., subsample_size=B))"
    if batch_size is not None or num_epochs is not None:
        return "batch_size/num_epochs given"
    # The full-batch path sums over its rows in blocks (memory bounded): what it may
    # not exceed is a time budget, and the data held twice (viax.infer.chunked).
    from viax.infer.chunked import full_batch_estimate

    fits, reason = full_batch_estimate(data)
    return None if fits else reason


def _abstract_model_trace(model_fn, data):
    try:
        from viax.batched import _abstract, _abstract_trace

        kwargs = {
            k: (_abstract(v) if np.ndim(v) > 0 else (v.item() if hasattr(v, "item") else v))
            for k, v in dict(data or {}).items()
        }
        trace, _ = _abstract_trace(model_fn, kwargs)
        return trace
    except Exception:  # noqa: BLE001  the full-batch path reports a model that fails
        return None


def fit_minibatch(
    model_fn: Callable,
    data: Any,
    *,
    family: str = "meanfield",
    rank: int | None = None,
    batch_size: int | None = None,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    num_particles: int | None = None,
    learning_rate: float = 0.03,
    local_learning_rate: float = 0.05,
    stop_rule: MCSEStop | str | None = None,
    precondition: bool = True,
    control_variate: bool = True,
    num_precondition_rows: int = 65_536,
    steps_per_chunk: int | None = None,
    devices=None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    resume: bool | str | os.PathLike = False,
    evaluate: bool = True,
    seed: int = 0,
    progress: bool = True,
    path_reason: str = "",
) -> Result:
    """Minibatch VI (see the module docstring); called by :func:`viax.fit` with
    ``batch_size``, ``path="minibatch"``, a streamed data source, or a model that
    subsamples a plate.

    Args:
        model_fn: a NumPyro model; ``model_fn(**batch)``, or NumPyro's way with
            ``numpyro.plate(name, N, subsample_size=B)`` over the whole data.
        data: a dict of arrays, or a :class:`viax.data.Source` (e.g.
            :func:`viax.data.parquet`).
        batch_size: rows per step (global over devices and processes); default the
            plate's ``subsample_size``, else min(N, 1024).
        num_epochs: passes over the data at most (default: as many as ``num_steps``
            allows; the stopping rule usually ends the run first).
        num_steps: steps at most (default 20,000).
        num_particles: draws of q per step (default 8; 2 where the draws' second-order
            control variate is on: a dense Laplace whitening, see :func:`elbo_objective`).
        steps_per_chunk: K, steps per compiled scan (default: about a tenth of an
            epoch, between 20 and 200).
        devices: devices of the "data" mesh: None (default) all, an integer n the first n
            of a single-process run, or a list of devices.
        checkpoint_path, checkpoint_every, resume: write a checkpoint (atomic ``.npz``,
            no pickle) at most every ``checkpoint_every`` seconds and at the end;
            ``resume=True`` continues from ``checkpoint_path`` (or a path given) with
            the numbers the uninterrupted run would have produced.
        evaluate: after the run, the final ELBO and PSIS k̂ from 200 draws of q: over
            many rows by a difference estimator on 8 or 32 sampled batches, its
            row-sampling error reported (``info["evaluation"]``, see :class:`_Evaluator`).

    Returns:
        a :class:`~viax.result.Result` over the global latents (``result.sample()``,
        ``summary()``); per-row latents' q in ``result.info["local"]``.
    """
    from viax.infer import checkpoint as ckpt

    if num_particles is not None and (
        isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1
    ):
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    start_time = time.perf_counter()
    # One level (Dhaka et al.'s rule): with the whitening and the control variate the
    # step-size bias is small, and each halving costs about twice the steps run so far.
    # Drifts are excused as negligible only under half the MCSE tolerance (the rule's
    # default 0.3 posterior scales let a hierarchical fit started at its subsample
    # DADVI point stop 0.36 sd from the full-batch answer while still moving: a scale
    # near 0 has gradients of low signal-to-noise, so Adam moves it slowly).
    rule_config = (
        MCSEStop(max_halvings=0, drift_tol=_DRIFT_TOL)
        if stop_rule is None
        else parse_stop_rule(stop_rule)
    )
    if rule_config == "stan":
        raise ValueError("the minibatch path stops by the MCSE rule only (stop_rule='mcse')")
    pc = vdata.process_share()
    mesh = vdata.data_mesh(devices)  # a bad devices= is refused before any tracing
    subsample = (
        _subsample_batch_size(model_fn, data) if not isinstance(data, vdata.Source) else None
    )
    if subsample is not None:
        # NumPyro's way: the model indexes the whole data; batches carry the rows only.
        whole = dict(data)
        scalars = {
            k: (v.item() if hasattr(v, "item") else v) for k, v in whole.items() if np.ndim(v) == 0
        }
        constants = {k: np.asarray(v) for k, v in whole.items() if np.ndim(v) > 0}
        batch_size = batch_size or subsample
        key = (
            model_fn,
            tuple(sorted(scalars.items())),
            tuple((k, v.shape, str(v.dtype)) for k, v in sorted(constants.items())),
            batch_size,
        )
        bm = _ANALYSED.get(key)
        if bm is None:
            bm = _ANALYSED[key] = analyse(model_fn, scalars, {}, constants, 0, batch_size)
        source = vdata.as_source({"_index": np.arange(bm.num_rows)})
    else:
        source = vdata.as_source(data)
        if source.num_rows is None:
            raise ModelError("the data source does not know its number of rows: pass num_rows")
        batch_size = batch_size or min(source.num_rows, 1024)
        bm, constants = _analyse_cached(model_fn, source, batch_size)
    num_rows = bm.num_rows
    if batch_size > num_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_rows} rows of the data")
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of devices "
            f"({num_devices}) so that every device gets the same rows"
        )
    rep = vdata.replicated(mesh)
    chunk_sharding = vdata.batch_sharding(mesh, stacked=True)
    one_sharding = vdata.batch_sharding(mesh)

    def put_rep(tree):
        return vdata.put(tree, rep)

    def put_batch(tree):
        return vdata.put({k: v for k, v in tree.items() if k != "_index"}, one_sharding)

    constants_dev = put_rep(constants)
    per_epoch = num_rows // batch_size
    max_steps = num_steps or 20_000
    if num_epochs is not None:
        max_steps = min(max_steps, num_epochs * per_epoch)
    chunk = steps_per_chunk or int(min(200, max(20, per_epoch // 10)))
    fam = make_family(family, bm.global_dim, rank)
    rng_key = jax.random.PRNGKey(seed)

    # Set-up: whitening (MAP + curvature on a subsample) and the control variate's anchor.
    t_setup = time.perf_counter()
    # Wall seconds of each phase (info["timings"]); compiles are inside their phase.
    timings: dict[str, float] = {"prepare": t_setup - start_time}
    init_u = np.zeros(bm.global_dim)
    info: dict[str, Any] = {"path": "minibatch", "path_reason": path_reason}
    resume_from = ckpt.resume_path(resume, checkpoint_path)
    saved = None
    if resume_from is not None and os.path.exists(resume_from):
        saved = ckpt.load(resume_from)
    template = _setup_template(bm, precondition, control_variate, rep)

    def build(particles):
        return build_minibatch(
            bm,
            fam,
            num_particles=particles,
            learning_rate=learning_rate,
            local_learning_rate=local_learning_rate,
            sharding=rep,
        )

    def particles_for(with_curvature: bool) -> int:
        if num_particles is not None:
            return num_particles
        return _PARTICLES_CURVATURE if with_curvature else _PARTICLES

    def noise_data(particles: int):
        """``(chunk_data_fn, its abstract arrays for a K-step chunk)`` of the host-drawn
        noise (:func:`_step_noise`), or (None, {}) for per-row latents (drawn in the step)."""
        if bm.local_sites or not bm.global_dim:
            return None, {}
        shape = (particles, fam.noise_dim)

        def chunk_data(state, num: int) -> dict:
            start = int(state.step)
            return put_rep(
                {_NOISE: _step_noise(seed, start, num, shape), _NOISE_START: np.int32(start)}
            )

        dtype = jax.dtypes.canonicalize_dtype(np.float64)
        return chunk_data, {
            _NOISE: jax.ShapeDtypeStruct((chunk, *shape), dtype, sharding=rep),
            _NOISE_START: jax.ShapeDtypeStruct((), np.int32, sharding=rep),
        }

    guessed_particles = particles_for(template is not None and len(template) > 2)
    algo = build(guessed_particles)
    # The full pass's first batch (no shuffle buffers filled for one batch); the rows do
    # not matter, only the shapes and dtypes.
    first_batch = _padded_batch(source, batch_size, seed, pc, 0)
    first_batch = {k: v for k, v in first_batch.items() if k != _MASK}

    def open_steps(start: int, stop: int):
        """The steps' batches ``start, ..., stop - 1``: chunks of K stacked batches,
        prefetched and sharded in a thread.  Returns (batch stream, chunks, stop)."""
        stream = _epochs(source, batch_size, seed, start, stop - start, per_epoch, pc)
        chunks = vdata.prefetch(
            ({k: v for k, v in b.items() if k != "_index"} for b in stream),
            # About 200 steps ready (at least 2 chunks): small chunks (a small data set's
            # epochs) leave the reader too little slack at each epoch's start.
            size=max(2, -(-_LOOKAHEAD_STEPS // chunk)),
            sharding=chunk_sharding,
            stack=chunk,
        )
        return stream, chunks, stop

    # A fresh run's first chunks are read during the set-up (the shuffle buffers filled,
    # about _LOOKAHEAD_STEPS batches stacked and placed, then the thread waits): at 10^7
    # rows from Parquet that reading was the steps' first 0.3 s.  Reopened after the
    # set-up if the step budget changes there (hierarchical models).  One process only:
    # with several, the thread would place global arrays beside the set-up's collectives.
    early = open_steps(0, max_steps) if saved is None and pc[1] == 1 else None
    # One batch for the terms that read no rows (global terms, constants' shapes).
    any_batch = {**constants_dev, **put_batch(first_batch)}
    background = None
    if saved is None and pc[1] == 1:
        # A cold fit of a small model is mostly compilation: the step's chunk compiles on
        # the other core while this thread runs the set-up (see _precompile_chunk).
        background = _precompile_chunk(
            algo,
            put_rep(_initial_state(algo, fam)(rng_key)),
            rng_key,
            {**constants_dev, **noise_data(guessed_particles)[1]},
            template,
            {k: v for k, v in first_batch.items() if k != "_index"},
            chunk,
            chunk_sharding,
        )
    if saved is not None:
        whitening = Whitening(
            *(
                jnp.asarray(saved[f"whitening/{f}"]) if f"whitening/{f}" in saved else None
                for f in Whitening._fields
            )
        )
        anchor = Anchor(*(jnp.asarray(saved[f"anchor/{f}"]) for f in Anchor._fields))
        info.update(saved["info"])
    else:
        if precondition and not bm.local_sites:
            t0 = time.perf_counter()
            wanted = min(num_rows, num_precondition_rows)
            sample = None if early is None else _rows_of_chunk(early[1], batch_size, wanted)
            if sample is None:
                sample = _rows_of(source, batch_size, wanted, seed, pc)
            sample = {k: v for k, v in sample.items() if k not in ("_index", _MASK)}
            batch = {**constants_dev, **vdata.put(sample, one_sharding)}
            num_sample_rows = sample[ROWS].shape[0] * pc[1]  # over every process
            timings["whitening_read"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            full = _full_data(bm, source, batch_size, seed, pc, put_batch, constants_dev, batch)
            whitening, pre_info = _whitening(
                bm,
                batch,
                num_sample_rows,
                init_u,
                symmetric=not isinstance(fam, FullRank),
                full=full,
            )
            timings["whitening_map"] = time.perf_counter() - t0
            del sample, batch, full  # full holds the subsample's batch
        else:
            reason = "identity (per-row latents)" if bm.local_sites else "identity (off)"
            whitening, pre_info = (
                Whitening(jnp.asarray(init_u), None, jnp.ones(bm.global_dim)),
                {"preconditioner": reason},
            )
        info.update(pre_info)
        anchor = Anchor(
            whitening.center, jnp.asarray(0.0), jnp.zeros(bm.global_dim), jnp.asarray(0.0)
        )
        if control_variate and not bm.local_sites and bm.global_dim:
            t0 = time.perf_counter()
            anchor = _anchor(
                bm, whitening.center, source, batch_size, seed, pc, put_batch, constants_dev
            )
            timings["anchor_pass"] = time.perf_counter() - t0
            info["control_variate"] = "anchor at the subsample MAP, one pass over the data"
            if _laplace_whitened(whitening, info) and info["precondition_rows"] < num_rows:
                t0 = time.perf_counter()
                whitening, anchor, info["newton_start"] = _newton_start(
                    bm,
                    whitening,
                    anchor,
                    any_batch,
                    lambda center: _anchor(
                        bm, center, source, batch_size, seed, pc, put_batch, constants_dev
                    ),
                )
                timings["newton_pass"] = time.perf_counter() - t0
        else:
            info["control_variate"] = "none" + (" (per-row latents)" if bm.local_sites else "")
    info["setup_seconds"] = time.perf_counter() - t_setup
    curvature = None
    if float(anchor.enabled) and _laplace_whitened(whitening, info):
        curvature = _curvature(bm, whitening, anchor, any_batch)
        info["control_variate"] += (
            "; the draws' second-order Taylor control variate (the whitening's Laplace H)"
        )
    setup = (whitening, anchor) if curvature is None else (whitening, anchor, curvature)
    # Host arrays (never weakly typed): the compiled chunk's signature is fixed.
    setup = jax.tree_util.tree_map(np.asarray, setup)
    if setup[0].tril is not None and len(setup[0].tril) > _F32_WHITENING_DIM:
        if not isinstance(fam, FullRank):
            setup = (setup[0]._replace(tril=setup[0].tril.astype(np.float32)), *setup[1:])
    guessed = algo
    algo = build(particles_for(curvature is not None))
    info["num_particles"] = particles_for(curvature is not None)
    if background is not None and (
        algo is not guessed
        or jax.tree_util.tree_structure(setup) != jax.tree_util.tree_structure(template)
    ):
        background = None  # compiling a program this run will not use: not waited for

    state = _initial_state(algo, fam)(rng_key)
    # ravel_pytree's flat layout, unravelled in NumPy (its jnp split and the push's
    # arithmetic compiled a program per operation)
    unravel_w = _unravel_fn(state.params["global"])
    flat_size = sum(
        int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(state.params["global"])
    )
    scale_fn = _scale_fn(fam, state.params["global"], flat_size)
    if "dadvi_steps" in info and stop_rule is None:
        # Hierarchical (whitened at DADVI): Adam's step-size bias is not small there
        # (measured on a 10k-row, 678-latent logistic model: a group scale's log ended
        # 0.30, 0.16, 0.05 sd from the full-batch fit after 0, 1, 2 halvings), so the
        # rule halves up to twice (its default), with the budget to do so.
        rule_config = dataclasses.replace(rule_config, max_halvings=_HIERARCHICAL_HALVINGS)
        if num_steps is None:
            max_steps = _HIERARCHICAL_STEPS
            if num_epochs is not None:
                max_steps = min(max_steps, num_epochs * per_epoch)
    rule = rule_config.start(flat_size, scale_fn, max_steps)
    trace: list[np.ndarray] = []
    if saved is not None:
        state = ckpt.restore_state(state, saved)
        ckpt.restore_tracker(rule, saved)
        trace = [saved["elbo_trace"]]
    state = put_rep(state)
    steps_done = int(state.step)

    # The run: chunks of K stacked batches, prefetched and sharded in a thread.
    if early is not None and (steps_done, max_steps) == (0, early[2]):
        stream, chunks, _ = early
    else:
        if early is not None:
            early[1].close()
            with contextlib.suppress(ValueError):  # a thread that did not stop runs it
                early[0].close()
        stream, chunks, _ = open_steps(steps_done, max_steps)
    early = None
    evaluation_background = None
    if pc[1] == 1 and evaluate and _Evaluator.sampled(bm, source, batch_size):
        # Compiled on the other core while the steps run (not earlier: beside the
        # set-up's own compiles it slowed them).
        evaluation_background = _precompile_evaluation(
            bm, fam, first_batch, constants_dev, one_sharding
        )
    last_save = [time.perf_counter()]
    run_start = time.perf_counter()
    if background is not None:
        background.join()
        timings["precompile_wait"] = time.perf_counter() - run_start
    run_cpu = time.process_time()  # every thread's: the prefetch thread's reading too
    steps_at_start = steps_done

    def save(state):
        ckpt.save(
            checkpoint_path,
            state,
            rule,
            np.concatenate(trace) if trace else np.zeros(0),
            whitening,
            anchor,
            {k: v for k, v in info.items() if isinstance(v, str | int | float)},
        )
        last_save[0] = time.perf_counter()

    def postfix(state, chunk_info, steps):
        objective = np.asarray(chunk_info.objective)
        mean, se = mean_and_se(objective)
        done = int(state.step)
        rate = (done - steps_at_start) * batch_size / max(time.perf_counter() - run_start, 1e-9)
        return (
            f"epoch {done / per_epoch:.2f}, {rate:.3g} rows/s, elbo {mean:.6g} ± {se:.2g}, "
            f"{rule.phase}"
        )

    def between_segments(state, applied):
        """The state the next segment starts from: the rule's step size, and per-row
        averages restarted when the rule starts averaging (also what a checkpoint
        written at a segment's end holds, so that a resumed run continues alike)."""
        if rule.step_scale != applied:
            guard = state.guard
            state = state._replace(
                guard=guard._replace(step_scale=guard.step_scale * rule.step_scale / applied)
            )
        averaging = rule.phase == "averaging"
        if averaging != bool(state.averaging):
            state = state._replace(averaging=jnp.asarray(averaging))
            if averaging:
                fresh = jax.tree_util.tree_map(jnp.zeros_like, state.local_average)
                state = state._replace(local_average=put_rep(fresh))
        return state

    converged, message, segment_outputs = False, "", []
    total_steps = steps_done
    applied = rule.step_scale
    try:
        while total_steps < max_steps:

            def check(state, chunk_info, steps, applied=applied):
                trace.append(np.asarray(chunk_info.objective))
                stop, msg = rule.update(np.asarray(chunk_info.position))
                changed = rule.step_scale != applied or (rule.phase == "averaging") != bool(
                    state.averaging
                )
                if checkpoint_path is not None and (
                    stop or changed or time.perf_counter() - last_save[0] >= checkpoint_every
                ):
                    save(between_segments(state, applied) if changed and not stop else state)
                if stop:
                    return rule.converged, msg
                if changed:
                    return False, msg or "averaging"
                return None

            output = run(
                algo.step,
                state,
                {**constants_dev, SETUP: put_rep(setup)},
                rng_key,
                max_steps - total_steps,
                chunk,
                check_fn=check,
                # The guard flags coordinates of the flat family parameters: loc first,
                # then the scale parameters, D_g at a time.
                site_of_index=lambda i: bm.site_of_index(i % bm.global_dim),
                progress=progress,
                description="viax minibatch",
                batches=chunks,
                postfix_fn=postfix,
                chunk_data_fn=noise_data(info["num_particles"])[0],
            )
            segment_outputs.append(output)
            state = output.state
            total_steps = int(state.step)
            if rule.phase == "done":
                converged, message = rule.converged, output.message
                break
            ended_by_rule = rule.step_scale != applied or (rule.phase == "averaging") != bool(
                state.averaging
            )
            state = between_segments(state, applied)
            applied = rule.step_scale
            if ended_by_rule and total_steps < max_steps:
                continue
            relative = rule.relative_mcse
            worst = robust_max(relative) if np.all(np.isfinite(relative)) else float("nan")
            message = (
                f"reached the step budget ({total_steps} steps, "
                f"{total_steps / per_epoch:.2f} epochs) before the stopping rule was met "
                f"(phase {rule.phase}, R̂ {rule.rhat:.3g}, MCSE {worst:.3g} posterior "
                f"scales, tol {rule.config.tol})"
            )
            break
    finally:
        wait_fraction = float(chunks.wait_fraction)
        chunks.close()
        try:
            # Free the epoch's readers now (a Parquet stream holds a row group's rows),
            # not when this function returns: the evaluation pass opens its own.
            stream.close()
        except ValueError:  # still running in a prefetch thread that did not stop
            pass
    if checkpoint_path is not None:
        save(state)
    run_seconds = time.perf_counter() - run_start
    timings["steps"] = run_seconds
    timings["steps_cpu"] = time.process_time() - run_cpu
    timings["steps_compile"] = float(sum(o.compile_time for o in segment_outputs))
    timings["steps_wait"] = wait_fraction * run_seconds
    t0 = time.perf_counter()
    # The answer: the stopping rule's average of the global iterates; the per-row
    # parameters' running average where it has begun.
    params_w = unravel_w(np.asarray(rule.average))
    params = _push_fn(fam)(whitening, params_w)
    local = {}
    for site in bm.local_sites:
        avg = state.local_average[site.name]
        use = (np.asarray(avg["count"]) > 0)[:, None]
        local[site.name] = {
            key: np.where(
                use, np.asarray(avg[key]), np.asarray(state.params["local"][site.name][key])
            )
            for key in ("loc", "log_scale")
        }
    elbo_trace = np.concatenate(trace) if trace else np.zeros(0)
    steps_run = total_steps - steps_at_start
    info.update(
        {
            "devices": num_devices,
            "processes": pc[1],
            "batch_size": batch_size,
            "num_rows": num_rows,
            "epochs": total_steps / per_epoch,
            "rows_per_second": steps_run * batch_size / max(run_seconds, 1e-9),
            "wait_fraction": wait_fraction,
            "steps_per_chunk": chunk,
            "local": local,
            "global_sites": [s.name for s in bm.global_sites],
            "local_sites": [s.name for s in bm.local_sites],
            "seconds_per_step": run_seconds / max(steps_run, 1),
        }
    )
    info.update(rule.summary())
    info["mcse"] = unravel_w(np.asarray(rule.mcse))
    first_batch = {k: v for k, v in any_batch.items() if k not in constants_dev}
    evaluator = _Evaluator(
        bm,
        fam,
        params,
        local,
        source,
        batch_size,
        seed,
        pc,
        put_batch,
        constants_dev,
        first_batch,
        # Its expansion at the anchor where that is near q's mean (Laplace-started).
        anchor=anchor if curvature is not None else None,
    )
    khat, elbo, elbo_se = float("nan"), float("nan"), float("nan")
    khat_note = ""
    if evaluate:
        if evaluation_background is not None:
            evaluation_background.join()
        log_weights = evaluator(_NUM_EVAL_DRAWS, seed + 1)
        if np.all(np.isfinite(log_weights)):
            khat = float(psis(log_weights)[1])
        elbo, elbo_se = mean_and_se(log_weights)
        info["num_khat_draws"] = _NUM_EVAL_DRAWS
        info["evaluation"] = dict(evaluator.last)
        khat_note = f"from {_NUM_EVAL_DRAWS} draws of q over every row"
        if evaluator.last.get("method") == "difference estimator":
            # The row-sampling error of the estimate joins the Monte Carlo error.
            elbo_se = float(np.hypot(elbo_se, evaluator.last["elbo_rows_se"]))
            khat_note = (
                f"from {_NUM_EVAL_DRAWS} draws of q; log weights from a difference "
                f"estimator on {evaluator.last['batches']} batches of rows (largest "
                "row-sampling sd of a log weight "
                f"{evaluator.last['max_log_weight_rows_sd']:.2g} nats)"
            )
    else:
        tail = elbo_trace[-max(1, len(elbo_trace) // 4) :]
        elbo, elbo_se = mean_and_se(tail)
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start_time
    info["timings"] = timings
    info["khat_note"] = khat_note
    return Result(
        method="advi",
        algorithm="minibatch",
        family=fam,
        params=params,
        elbo_trace=elbo_trace,
        elbo=float(elbo),
        elbo_se=float(elbo_se),
        converged=bool(converged),
        message=message,
        num_steps=total_steps,
        wall_time=time.perf_counter() - start_time,
        compile_time=float(segment_outputs[0].compile_time) if segment_outputs else 0.0,
        target=None,
        data={},
        info=info,
        sampler=_sampler(bm, fam, params, {**constants_dev, **first_batch}),
        log_weights_fn=evaluator,
        khat=khat if evaluate else float("nan"),
    )


def _unravel_fn(params_w: dict) -> Callable:
    """``flat (n,) -> params_w``: ravel_pytree's unravel (leaves in tree order, each
    raveled, concatenated) in NumPy."""
    leaves, treedef = jax.tree_util.tree_flatten(params_w)
    shapes = [np.shape(leaf) for leaf in leaves]
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes])

    def unravel(flat):
        flat = np.asarray(flat)
        parts = np.split(flat, ends[:-1])
        return treedef.unflatten(
            [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]
        )

    return unravel


@functools.lru_cache(maxsize=64)
def _push_fn(family: Family) -> Callable:
    """``(whitening, params_w) -> whitening.push(family, params_w)``, one compiled program."""
    return jit_once(lambda whitening, params_w: whitening.push(family, params_w))


def _scale_fn(family: Family, params_w: dict, size: int):
    """Posterior scale of each whitened coordinate for the MCSE tolerance: q's sd for a
    mean-field location (exp of its whitened log-scale), 1 for other locations, 1/√2 for
    scale parameters (their Fisher information)."""

    # Flat positions of each parameter (NumPy only: this runs between chunks), in
    # ravel_pytree's order (the leaves', concatenated): unravelling an arange would
    # compile two programs for it.
    leaves, treedef = jax.tree_util.tree_flatten(params_w)
    ends = np.cumsum([np.size(leaf) for leaf in leaves])
    assert ends[-1] == size
    index = treedef.unflatten(
        [np.arange(end - np.size(leaf), end) for leaf, end in zip(leaves, ends, strict=True)]
    )

    def scale(average):
        average = np.asarray(average)
        out = np.full(average.shape, 2**-0.5)
        if isinstance(family, MeanField):
            out[index["loc"]] = np.exp(average[index["log_scale"]])
        else:
            out[index["loc"]] = 1.0
        return out

    return scale


@functools.lru_cache(maxsize=64)
def _anchor_fn(bm: BatchedModel):
    def local_masked(u, batch):
        return bm.log_joint_parts(u, {}, batch, mask=batch.get(_MASK))[1]

    return jax.jit(jax.value_and_grad(local_masked))


_PASS_ROWS = 65_536  # rows per call of the anchor's pass over the data (about)


def _anchor(bm, center, source, batch_size, seed, pc, put_batch, constants) -> Anchor:
    """S = Σ_i ℓ_i(ẑ) and g = Σ_i ∇ℓ_i(ẑ) over every row, in batches of about
    ``_PASS_ROWS`` rows (a whole number of the run's batches, at most the data): the
    sums do not depend on the batching, and per call overheads (reading, placing,
    dispatching) dominated batches of 4,096 rows (10^6 rows: 0.25 s a pass, 0.15 s in
    batches of 65,536)."""
    fn = _anchor_fn(bm)
    per_call = max(1, min(_PASS_ROWS // batch_size, -(-source.num_rows // batch_size)))
    value, grad = _full_pass(
        lambda b: fn(center, b),
        source,
        batch_size * per_call,
        seed,
        pc,
        put_batch,
        constants,
        (jnp.asarray(0.0), jnp.zeros_like(center)),
    )
    return Anchor(center, value, grad, jnp.asarray(1.0))


def _setup_template(bm: BatchedModel, precondition: bool, control_variate: bool, sharding):
    """The abstract ``batch["_setup"]`` the set-up will most likely produce: a dense
    Laplace whitening (and with the control variates an anchor and a curvature) for a
    model of at most ``_MAX_DENSE_DIM`` global latents without scale sites or per-row
    latents (no DADVI set-up); None otherwise.  A wrong guess costs a compile on the
    other core, never a wrong number."""
    dim = bm.global_dim
    if not (
        precondition
        and not bm.local_sites
        and 0 < dim <= _MAX_DENSE_DIM
        and bm.positive_index().size == 0
    ):
        return None

    def array(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.zeros(()).dtype, sharding=sharding)

    whitening = Whitening(array(dim), array(dim, dim), array(dim))
    if not control_variate:
        return whitening, Anchor(array(dim), array(), array(dim), array())
    anchor = Anchor(array(dim), array(), array(dim), array())
    return whitening, anchor, Curvature(array(dim), array(dim, dim), array())


def _precompile_chunk(
    algo, state, rng_key, constants, setup, batch, chunk, chunk_sharding
) -> threading.Thread | None:
    """Trace and lower the run's chunk here, compile it on another thread
    (:func:`viax.infer.driver.precompile`): XLA compiles with the GIL released while
    the set-up's passes run (measured: the 10^6-row logistic regression's chunk took
    1.3 s of XLA compile, its set-up 2 s).  ``constants``: the chunk's other data (the
    constant arrays, the host noise's abstract arrays)."""
    if setup is None:
        return None
    stacked = {
        k: jax.ShapeDtypeStruct((chunk, *np.shape(v)), np.asarray(v).dtype, sharding=chunk_sharding)
        for k, v in batch.items()
    }
    args = (state, rng_key, np.int32(0), {**constants, SETUP: setup}, stacked)
    fn = batched_chunk_fn(algo.step)
    fn.lower(*args)  # traced in this thread: NumPyro's handler stack is global
    return precompile((fn, args))


@functools.lru_cache(maxsize=64)
def _initial_state(algo: Minibatch, family: Family) -> Callable:
    """``rng_key -> algo.init(family.init(), rng_key)`` as one compiled program: made op
    by op, the state's arrays compiled a dozen tiny programs (0.2 s at 21 latents)."""
    return jit_once(lambda rng_key: algo.init(family.init(), rng_key))


def _precompile_evaluation(bm, family, batch, constants, sharding):
    """Lower the final evaluation's programs here (the difference estimator's: draws of
    q, a sampled batch's remainders, the global terms; see :class:`_Evaluator`) and
    compile them on another thread, one after another: they are needed after the run,
    and their 0.4 s of compilation (the 10^6-row logistic regression) then runs beside
    the steps.  ``batch``: one of the run's batches (shapes only).  A wrong guess of a
    signature costs a compile on that thread, never a number."""
    draws, _, global_terms, remainders = _evaluation_fns(bm, family, _NUM_EVAL_DRAWS)
    f64 = jax.dtypes.canonicalize_dtype(np.float64)
    rows = {
        k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=sharding)
        for k, v in batch.items()
        if k not in ("_index", _MASK)
    }
    mask = jax.ShapeDtypeStruct((batch[ROWS].shape[0],), np.bool_, sharding=sharding)
    z = jax.ShapeDtypeStruct((_NUM_EVAL_DRAWS, bm.global_dim), f64)
    jobs = (
        (
            draws,
            (
                jax.eval_shape(family.init),
                jax.ShapeDtypeStruct((_NUM_EVAL_DRAWS, family.noise_dim), f64),
            ),
        ),
        (
            remainders,
            (
                z,
                jax.ShapeDtypeStruct((bm.global_dim,), f64),
                jax.ShapeDtypeStruct((2,), np.uint32),
                {**constants, **rows, _MASK: mask},
            ),
        ),
        (global_terms, (z, {**constants, **rows})),
    )
    for fn, args in jobs:
        fn.lower(*args)  # traced in this thread: NumPyro's handler stack is global
    return precompile(*jobs, sequential=True)


def _padded_batch(source, batch_size, seed, pc, index: int) -> dict:
    """Batch ``index`` of the full pass (``remainder="pad"``) alone: the stream started
    there (``start_batch``: the same rows as when read in sequence); a Parquet file's
    by :meth:`~viax.data.ParquetSource.padded_batches` (only the row groups holding it,
    no stream opened: batch 0 of the 10^7-row benchmark file in 0.06 CPU-s, against
    0.2-0.3 s from a stream)."""
    if isinstance(source, vdata.ParquetSource):
        (_, batch), *_ = _padded_batches(source, batch_size, seed, pc, [index])
        return batch
    stream = source.batches(
        batch_size,
        seed=seed,
        epoch=0,
        start_batch=int(index),
        process_index=pc[0],
        process_count=pc[1],
        remainder="pad",
    )
    try:
        return next(iter(stream))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _reads_alone(source) -> bool:
    """Whether batches of the full pass are read alone at little cost (arrays in memory,
    Parquet files by :meth:`~viax.data.ParquetSource.padded_batches`), not only by
    reading the pass in sequence."""
    return isinstance(source, (vdata.ArraySource, vdata.ParquetSource))


def _padded_batches(source, batch_size, seed, pc, indices) -> Iterator[tuple[int, dict]]:
    """``(k, batch k of the full pass)`` for the distinct ``indices``, in their order,
    read alone: a Parquet file's row groups each decoded once for all of them (one
    stream per batch with ``start_batch`` would open S handles and decode a group per
    stream, per batch), arrays' batches one at a time."""
    if isinstance(source, vdata.ParquetSource):
        batches = source.padded_batches(
            batch_size, indices, seed=seed, epoch=0, process_index=pc[0], process_count=pc[1]
        )
        try:
            yield from zip((int(k) for k in indices), batches, strict=True)
        finally:
            batches.close()  # its reading threads end with it
        return
    for k in indices:
        yield int(k), _padded_batch(source, batch_size, seed, pc, k)


class _SampledReader:
    """The sampled batches of one evaluation pass, read alone (:func:`_padded_batches`)
    in the order its tries take them: the first try's batches, then the second's new
    ones, so that a file's row groups are decoded once for both tries, and only as far
    as the tries go (lazily)."""

    def __init__(self, source, batch_size, seed, pc, order: list[int]):
        self.args = (source, batch_size, seed, pc)
        self.order = [int(k) for k in order]
        self.batches: Iterator[tuple[int, dict]] | None = None

    def take(self, wanted: set[int], skip: set[int]) -> Iterator[tuple[int, dict]]:
        """``(k, batch k)`` for k in ``wanted``, in the reading order.  The reading
        starts at the first call, over the batches of ``order`` not in ``skip`` (those
        evaluated already, in a pass read through)."""
        if self.batches is None:
            rest = [k for k in self.order if k not in skip]
            self.batches = _padded_batches(*self.args, rest)
        left = set(wanted)
        while left:
            k, batch = next(self.batches)
            if k in left:
                left.discard(k)
                yield k, batch

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()  # a file's reading threads end here


def _laplace_whitened(whitening: Whitening, info: dict) -> bool:
    """Whitened by a dense Laplace H at a MAP (not at a hierarchical model's DADVI
    point, whose log joint is far from quadratic in its scales)."""
    return whitening.tril is not None and "dadvi_steps" not in info


@functools.lru_cache(maxsize=64)
def _global_terms_fn(bm: BatchedModel):
    def global_terms(u, batch):
        return bm.log_joint_parts(u, {}, batch)[0]

    return jax.jit(jax.value_and_grad(global_terms))


def _newton_start(bm, whitening, anchor, batch, anchor_at):
    """One Newton step of the full-data log joint from the subsample MAP ẑ, with the
    anchor pass's exact gradient g and the whitening's Laplace H: ``ẑ + H⁻¹ g``, which is
    ``Aᵀ g`` in whitened coordinates (A Aᵀ = H⁻¹).  The subsample's MAP lies about
    sqrt(N/n − 1) posterior sds from the full data's (n subsample rows): Adam spent
    hundreds of steps crossing that distance (4 sd, 400 steps of 4,096 rows at
    10^6 rows), and the stopping rule's stationarity window waited for them to leave it.
    The step is taken only if a second pass finds the log joint risen by at least a
    quarter of the quadratic model's prediction (a trust region's ratio test); the
    anchor moves with it.  ``batch``: any batch (the global terms read no rows);
    ``anchor_at(center)``: the anchor's pass there.  Returns (whitening, anchor, a note
    for ``info``)."""
    global_fn = _global_terms_fn(bm)
    global_value, global_grad = global_fn(anchor.position, batch)
    tril = np.asarray(whitening.tril)
    step_w = tril.T @ (np.asarray(anchor.grad) + np.asarray(global_grad))
    predicted = 0.5 * float(step_w @ step_w)
    if not np.isfinite(predicted):
        return whitening, anchor, "not taken (the full-data gradient is not finite)"
    if predicted < 1e-3:
        return whitening, anchor, f"not needed (predicted gain {predicted:.2g} nats)"
    center = jnp.asarray(np.asarray(anchor.position) + tril @ step_w)
    moved = anchor_at(center)
    moved_global = float(global_fn(center, batch)[0])
    gain = float(moved.value) + moved_global - float(anchor.value) - float(global_value)
    note = (
        f"{np.max(np.abs(step_w)):.3g} sd from the subsample MAP, log joint "
        f"{gain:+.4g} nats (predicted {predicted:+.4g})"
    )
    if not (np.isfinite(gain) and gain >= 0.25 * predicted):
        return whitening, anchor, f"not taken: {note}"
    return whitening._replace(center=center), moved, f"taken: {note}"


def _curvature(bm, whitening, anchor, batch) -> Curvature:
    """The draws' control variate (:class:`Curvature`) at the anchor (``batch``: any
    batch, for the global terms' gradient)."""
    grad = np.asarray(anchor.grad) + np.asarray(_global_terms_fn(bm)(anchor.position, batch)[1])
    tril = np.asarray(whitening.tril)
    precision = np.linalg.inv(tril @ tril.T)
    precision = 0.5 * (precision + precision.T)
    return Curvature(jnp.asarray(grad), jnp.asarray(precision), jnp.asarray(1.0))


def _host_normals(seed: int, shape: tuple, *salts: int) -> np.ndarray:
    """Standard normals from NumPy's generator seeded by (seed, *salts): the base draws
    of q for the steps (:func:`_step_noise`), the final evaluation and ``result.sample``,
    made on the host because a compiled Threefry hash and float64 inverse error function
    cost 0.2 s of compilation per program, for a few thousand numbers."""
    rng = np.random.default_rng([int(seed) % 2**64, *salts])
    return rng.standard_normal(shape).astype(jax.dtypes.canonicalize_dtype(np.float64))


_SALT_SAMPLE = 0x5EED_5A3B


@functools.lru_cache(maxsize=64)
def _draw_fn(bm: BatchedModel, family: Family):
    def draw(params, eps, batch):
        z = jax.vmap(lambda e: family.transform(params, e))(eps)
        return jax.vmap(lambda u: bm.constrain_globals(u, batch))(z)

    return jit_once(draw)


def _sampler(bm, family, params, batch):
    def sampler(num_samples: int, seed: int) -> dict:
        eps = _host_normals(seed, (int(num_samples), family.noise_dim), _SALT_SAMPLE)
        draws = _draw_fn(bm, family)(params, eps, batch)
        return {k: np.asarray(v) for k, v in draws.items()}

    return sampler


@functools.lru_cache(maxsize=64)
def _evaluation_fns(bm: BatchedModel, family: Family, num_samples: int):
    """Compiled draws of q, the local terms of one (masked) batch for those draws, and
    their global terms."""

    def draws(params, eps):
        # Base draws eps (S, noise_dim) from the host (_host_normals).
        z = jax.vmap(lambda e: family.transform(params, e))(eps)
        return z, jax.vmap(lambda x: family.log_prob(params, x))(z)

    def batch_terms(z, local, key, batch):
        rows = batch[ROWS]
        mask = batch[_MASK].astype(z.dtype)
        zl, log_ql = {}, jnp.zeros(z.shape[0])
        for site in bm.local_sites:
            loc = local[site.name]["loc"][rows]
            log_scale = local[site.name]["log_scale"][rows]
            eps = jax.vmap(
                lambda r, k=site.size: jax.random.normal(
                    jax.random.fold_in(key, r), (num_samples, k)
                )
            )(rows)  # (B, S, k): a row's draws do not depend on its batch
            eps = jnp.swapaxes(eps, 0, 1)
            zl[site.name] = loc + jnp.exp(log_scale) * eps
            per_row = -0.5 * jnp.sum(eps**2, -1) - jnp.sum(log_scale, -1)
            log_ql = log_ql + (per_row - 0.5 * site.size * _LOG_2PI) @ mask
        local_sums = jax.vmap(
            lambda zg, zloc: bm.log_joint_parts(zg, zloc, batch, mask=batch[_MASK])[1]
        )(z, zl)
        return local_sums - log_ql

    def global_terms(z, batch):
        zeros = {s.name: jnp.zeros((batch[ROWS].shape[0], s.size)) for s in bm.local_sites}
        return jax.vmap(lambda zg: bm.log_joint_parts(zg, zeros, batch)[0])(z)

    def remainders(z, mu, key, batch):
        """The difference estimator's batch remainders R_c(z) (S,), with the batch's
        ℓ(μ) and ∇ℓ(μ): one program (eager arithmetic on the host side compiled a
        program per operation, and tiny ones are not kept in the persistent cache)."""
        value, grad = jax.value_and_grad(
            lambda u: bm.log_joint_parts(u, {}, batch, mask=batch.get(_MASK))[1]
        )(mu)
        terms = batch_terms(z, {}, key, batch)  # (S,) Σ_{n∈c} ℓ_n(z_s)
        return terms - value - (z - mu) @ grad, value, grad

    return jit_once(draws), jax.jit(batch_terms), jit_once(global_terms), jax.jit(remainders)


class _Evaluator:
    """log p(x, z) − log q(z) for draws of q, summed over every row in passes over the
    data (padded batches masked): ``(num_samples, seed) -> (num_samples,)``.

    Exact (every batch of the pass with every draw) for small data and for models with
    per-row latents.  Otherwise, when the pass has more than ``4 k`` batches
    (k = ``_EVAL_BATCHES``), a **difference estimator** (Quiroz et al. 2019, "Speeding up
    MCMC by efficient data subsampling", JASA; the control variate of Bardenet et al.
    2017): with μ the mean of q and, from one pass at that single point,
    A = Σ_n ℓ_n(μ) and G = Σ_n ∇ℓ_n(μ) over every row,

        Σ_n ℓ_n(z) ≈ A + Gᵀ(z − μ) + (K/k) Σ_{c ∈ C} R_c(z),
        R_c(z) = Σ_{n ∈ c} [ℓ_n(z) − ℓ_n(μ) − ∇ℓ_n(μ)ᵀ(z − μ)],

    where C is a simple random sample of k of the pass's K batches (drawn from the data
    seed: the same batches for any number of devices or processes).  Given the run's
    :class:`Anchor` (A and G at ẑ, from its pass over the data), the expansion is taken
    at ẑ instead of μ, and that pass is not repeated: ẑ is within a fraction of a
    posterior sd of μ after the Newton start, and the remainders stay second order.  It is
    unbiased over C for every draw, and its row-sampling variance
    K² (1 − k/K) Var_c(R_c(z)) / k is second order in z − μ (measured on the 10⁶-row
    logistic regression of benchmarks/synthetic_logistic.py: at most 0.2 nats, where
    the log weights spread 7.7 nats; there 200 draws over every row had cost a third
    of the fit, and half of it at 10⁷ rows).  Each log weight's row-sampling sd is
    computed; for arrays in memory and Parquet files (whose sampled batches are read
    alone) the estimate is first made on ``_EVAL_BATCHES_FIRST``
    = 8 of the k batches and kept if the largest is under a twentieth of the spread (sd)
    of the log weights, else made on all k; if the largest then exceeds a tenth of the
    spread the pass is redone exactly:
    noise of sd σ_e on log weights of spread σ_w acts like a spread of
    √(σ_w² + σ_e²), 0.5% more at σ_e = σ_w / 10, which moves neither k̂ nor the ELBO's
    se visibly.  ``last`` says which was used and the errors
    (``result.info["evaluation"]``)."""

    def __init__(
        self,
        bm,
        family,
        params,
        local,
        source,
        batch_size,
        seed,
        pc,
        put_batch,
        constants,
        first_batch=None,
        anchor: Anchor | None = None,
    ):
        self.args = (bm, family, params, local, source, batch_size, seed, pc, put_batch, constants)
        # The global terms need one batch (for the constants' shapes): the run's first,
        # kept, not read again per pass (a Parquet source refills its shuffle buffers).
        self.first_batch = first_batch
        self.last: dict[str, Any] = {}
        self._pass_rows_se: list[float] = []
        self._anchor_sums = None  # (A, G) at the expansion point
        self._center = None  # the expansion point: the anchor's, else q's mean
        if anchor is not None and float(anchor.enabled) and not bm.local_sites:
            self._center = anchor.position
            self._anchor_sums = (anchor.value, anchor.grad)

    def __call__(self, num_samples: int, seed: int) -> np.ndarray:
        if num_samples > _NUM_EVAL_DRAWS:
            # Memory O(draws × batch): passes of at most 200 draws.
            sizes = [_NUM_EVAL_DRAWS] * (num_samples // _NUM_EVAL_DRAWS)
            sizes += [num_samples % _NUM_EVAL_DRAWS] if num_samples % _NUM_EVAL_DRAWS else []
            self._pass_rows_se = []
            passes = [self._one_pass(n, seed * 100_003 + i) for i, n in enumerate(sizes)]
            if self._pass_rows_se and self.last.get("method") == "difference estimator":
                # The passes share their sampled batches, so their row-sampling errors are
                # correlated: the mean of their se's bounds the se of their mean.
                self.last["elbo_rows_se"] = float(np.mean(self._pass_rows_se))
            return np.concatenate(passes)
        self._pass_rows_se = []
        return self._one_pass(num_samples, seed)

    @staticmethod
    def sampled(bm, source, batch_size) -> bool:
        """Whether the pass samples batches (the difference estimator) or is exact."""
        if bm.local_sites:
            return False
        total = source.num_batches(batch_size, remainder="pad")
        return total is not None and total > 4 * _EVAL_BATCHES

    def _sampled_batches(self) -> tuple[int, np.ndarray] | None:
        """(K, the k sampled batch indices), or None where the pass must be exact."""
        bm, _, _, _, source, batch_size, data_seed, _, _, _ = self.args
        if not self.sampled(bm, source, batch_size):
            return None
        total = source.num_batches(batch_size, remainder="pad")
        rng = np.random.default_rng(np.random.SeedSequence([int(data_seed), _SALT_EVALUATION]))
        # In the order drawn: any prefix is a simple random sample too.
        return total, rng.choice(total, _EVAL_BATCHES, replace=False)

    def _one_pass(self, num_samples: int, seed: int) -> np.ndarray:
        plan = self._sampled_batches()
        if plan is not None:
            total, order = plan
            tries = [(_EVAL_BATCHES, _EVAL_MAX_RELATIVE_SD)]
            if _reads_alone(self.args[4]):
                # Batches of arrays or of a file are read alone (a file's sampled row
                # groups only), and the second try reuses the first's remainders: try a
                # few first.  Other sources are read through to the last sampled batch.
                tries.insert(0, (_EVAL_BATCHES_FIRST, _EVAL_MAX_RELATIVE_SD / 2))
            done: dict[int, Any] = {}  # remainders R_c(z) of the batches evaluated
            reading: list[int] = []  # the tries' batches, in the order they are taken
            for k, _ in tries:
                reading += sorted(set(order[:k].tolist()) - set(reading))
            reader = _SampledReader(*self.args[4:8], reading)
            try:
                for k, bound in tries:
                    sampled = np.sort(order[:k])
                    log_weights, sd, mean_se = self._estimate(
                        num_samples, seed, total, sampled, done, reader
                    )
                    spread = float(np.std(log_weights))
                    if float(np.max(sd)) <= bound * spread:
                        self._pass_rows_se.append(mean_se)
                        self.last = {
                            "method": "difference estimator",
                            "batches": f"{k} of {total}",
                            "max_log_weight_rows_sd": float(np.max(sd)),
                            "log_weights_sd": spread,
                            "elbo_rows_se": mean_se,
                        }
                        return log_weights
            finally:
                reader.close()
            reason = (
                f"the difference estimator's largest row-sampling sd of a log weight, "
                f"{float(np.max(sd)):.3g} nats, exceeded {_EVAL_MAX_RELATIVE_SD} x their "
                f"spread ({spread:.3g} nats): every batch evaluated"
            )
        else:
            reason = "every batch evaluated"
        self.last = {"method": "exact", "reason": reason}
        return self._exact(num_samples, seed)

    def _global_terms(self, global_terms, z):
        bm, _, _, _, source, batch_size, data_seed, pc, put_batch, constants = self.args
        if self.first_batch is None:
            self.first_batch = put_batch(
                next(iter(_first_epoch(source, batch_size, data_seed, pc)))
            )
        return global_terms(z, {**constants, **self.first_batch})

    def _exact(self, num_samples: int, seed: int) -> np.ndarray:
        bm, family, params, local, source, batch_size, data_seed, pc, put_batch, constants = (
            self.args
        )
        draws, batch_terms, global_terms, _ = _evaluation_fns(bm, family, int(num_samples))
        key = jax.random.PRNGKey(seed)  # the per-row latents' draws
        z, log_q = draws(params, _host_normals(seed, (num_samples, family.noise_dim), _SALT_SAMPLE))
        local_dev = jax.tree_util.tree_map(jnp.asarray, local)
        total = _full_pass(
            lambda b: batch_terms(z, local_dev, key, b),
            source,
            batch_size,
            data_seed,
            pc,
            put_batch,
            constants,
            jnp.zeros(num_samples),
        )
        return np.asarray(self._global_terms(global_terms, z) + total - log_q)

    def _estimate(
        self,
        num_samples: int,
        seed: int,
        total: int,
        sampled: np.ndarray,
        done: dict[int, Any] | None = None,
        reader: _SampledReader | None = None,
    ):
        """The difference estimator of the class docstring: log weights (S,), each one's
        row-sampling sd (S,), and the row-sampling se of their mean.  ``sampled``:
        increasing batch indices; ``done``: remainders R_c(z) already computed for these
        draws (``num_samples``, ``seed``) and expansion point, by batch, reused once A
        and G are known (the same compiled function on the same batch: the same
        numbers) and added to; ``reader``: where the sampled batches are read alone
        (one for the whole pass, else one for this call)."""
        bm, family, params, local, source, batch_size, data_seed, pc, put_batch, constants = (
            self.args
        )
        draws, _, global_terms, remainder_fn = _evaluation_fns(bm, family, int(num_samples))
        key = jax.random.PRNGKey(seed)
        z, log_q = draws(params, _host_normals(seed, (num_samples, family.noise_dim), _SALT_SAMPLE))
        mu = jnp.asarray(family.mean(params) if self._center is None else self._center)
        anchor = _anchor_fn(bm)
        sums = self._anchor_sums
        done = {} if done is None else done
        # Without A and G the whole pass is read (every batch adds to them, each sampled
        # one through remainder_fn): nothing is skipped.
        wanted = set(int(k) for k in sampled) - (set(done) if sums is not None else set())
        value, grad = (jnp.asarray(0.0), jnp.zeros_like(mu)) if sums is None else sums
        previous, own = None, None
        if sums is not None and not wanted:
            padded = iter(())
        elif sums is not None and _reads_alone(source):
            # A and G known: only the sampled batches are read (a file's row groups
            # holding them, each decoded once).
            if reader is None:
                reader = own = _SampledReader(source, batch_size, data_seed, pc, sorted(wanted))
            padded = reader.take(wanted, set(done))
        else:
            padded = enumerate(_first_epoch(source, batch_size, data_seed, pc, remainder="pad"))
        left = len(wanted)
        for k, batch in padded:
            if sums is not None and k not in wanted:
                continue  # A and G known: only the sampled batches are needed
            batch = {**constants, **put_batch(batch)}
            if k in wanted:
                remainder, v, g = remainder_fn(z, mu, key, batch)
                done[k] = remainder
                left -= 1
            else:
                v, g = anchor(mu, batch)
            if sums is None:
                value, grad = value + v, grad + g
            # At most two batches in flight (see _full_pass).
            jax.block_until_ready(previous)
            previous = (value, grad) if sums is None else remainder
            if sums is not None and left == 0:
                break
        if own is not None:
            own.close()
        self._anchor_sums = (value, grad)
        r = np.stack([np.asarray(done[int(k)]) for k in sampled])  # (k, S)
        k = r.shape[0]
        scale = total / k
        finite = 1.0 - k / total
        sd = np.sqrt(total**2 * finite * r.var(axis=0, ddof=1) / k)
        mean_se = float(np.sqrt(total**2 * finite * r.mean(axis=1).var(ddof=1) / k))
        z, log_q, mu = np.asarray(z), np.asarray(log_q), np.asarray(mu)
        local_sums = float(value) + (z - mu) @ np.asarray(grad) + scale * r.sum(axis=0)
        log_weights = np.asarray(self._global_terms(global_terms, z)) - log_q + local_sums
        return log_weights, sd, mean_se
