"""The robust default: Laplace-preconditioned, deterministic ADVI.

Stochastic first-order steps crawl along the narrow ridges of ill-conditioned
posteriors (a regression on unscaled predictors has a posterior covariance with a
condition number of 10⁶ or more), so a fixed budget of Adam or Stan-ADVI steps ends
many posterior sds away.  Here instead:

1. **MAP** of log p̃(u) by L-BFGS in the unconstrained space, float64, run on the
   host around a compiled gradient (compiling the whole loop took longer than running
   it).  Where L-BFGS stops short of its tolerance and D ≤ 500, modified Newton steps
   with the exact Hessian finish the search (:func:`~viax.infer.optimize.newton_on_host`):
   regressions on raw-scale predictors have posterior correlations of 1 − 1e-5 and
   beyond and Hessian condition numbers of 1e10 to 1e23, which L-BFGS's curvature pairs
   and its gradient test in units cannot resolve.
2. **Laplace preconditioner** from the Hessian H at the MAP: the fit runs in
   whitened coordinates ``u = c + A w`` with A = chol(H⁻¹) (full rank), or with the
   means whitened by the same A and the scales by diag(H)^(−1/2) (mean-field, low rank;
   D ≤ 500, above that the means by the diagonal too, and no D × D Hessian is formed:
   its exact diagonal comes from a few Hessian-vector products per site,
   :func:`~viax.infer.chunked.hessian_diagonal`), where the posterior is close to
   N(0, I) and every direction has the same curvature.  Every test is free of units:
   H is scaled to unit diagonal before its eigenvalues are judged
   (:func:`laplace_factor`), and the MAP counts as found when the Newton decrement
   gᵀH⁻¹g (its squared distance from the mode in posterior sds) is under 1e-3.  A
   point short of that but within the typical set (decrement ≤ D) still gives the
   preconditioner, its Hessian made positive definite; a model whose MAP does not
   exist (a funnel) or whose search ended at a non-finite point falls back to A = I
   at the initial point.
3. **DADVI** (Giordano, Ingram & Broderick 2023): the ELBO with a *fixed* set of
   base draws ε₁…ε_M is a deterministic function of λ, maximised by L-BFGS to a
   tight tolerance, so "converged" means the optimum was found, not that a noisy
   trace flattened.  The draws are moment-matched (sample mean 0, sample covariance
   I), so for a Gaussian posterior the fixed-draw objective equals the exact ELBO up
   to a constant and the answer is exact for any M > D.
4. The Monte Carlo error of the fixed draws is measured, not assumed: refits with
   independent draw sets (compiled code reused) give the spread of the fitted means.
   DADVI's linear-response formula assumes i.i.d. draws and overstates the error of
   moment-matched ones tenfold, so it is not used.

Everything is pure and compiled; L-BFGS iterations are the steps of the driver.  The
target may be a :class:`~viax.infer.chunked.ChunkedTarget` (the sum over rows taken in
blocks, data laid out by its ``blocked``): memory O(block × draws) for every program
here, the final ELBO's 1000 draws taken ``draw_group`` at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from viax.estimators.reparam import elbo_from_noise
from viax.families.gaussian import Family, FullRank
from viax.infer.chunked import (
    HessianStructure,
    hessian_diagonal,
    hvp_group,
    log_density_many,
    structured_hessian,
)
from viax.infer.driver import Guard, guard_init, jit_once
from viax.infer.optimize import LBFGSState, lbfgs
from viax.model import Target

__all__ = [
    "DENSE_HESSIAN_MAX_DIM",
    "MAP_DECREMENT_OK",
    "DADVIInfo",
    "DADVIState",
    "Preconditioner",
    "Setup",
    "base_draws",
    "build_dadvi",
    "build_setup",
    "curvature_block",
    "host_whitening",
    "laplace_diagonal",
    "laplace_factor",
]

_MAX_DENSE_DIM = 2000  # above this the Hessian is not formed: diagonal/identity preconditioning


class Preconditioner(NamedTuple):
    center: jax.Array  # (D,)
    tril: jax.Array | None  # (D, D) lower triangular (full rank), or None
    scale: jax.Array  # (D,), used when tril is None
    log_det: jax.Array  # log |det A|
    # (D, D) lower triangular or None: other families' means are whitened by the full
    # Laplace factor (loc = center + L loc_w) while their scales stay diagonal.
    loc_tril: jax.Array | None = None
    # D > DENSE_HESSIAN_MAX_DIM: the means of the small sites (intercepts, slopes,
    # scales: block_index (b,)) whitened by the dense factor of their Hessian block
    # (b, b), the rest by the diagonal.
    block_index: jax.Array | None = None
    block_tril: jax.Array | None = None

    def to_position(self, w):
        return self.center + (self.tril @ w if self.tril is not None else self.scale * w)

    def push(self, family: Family, params_w: dict) -> dict:
        """Family params in the original coordinates from those in whitened ones."""
        if self.tril is not None and isinstance(family, FullRank):
            return family.affine_tril(params_w, self.center, self.tril)
        params = family.affine(params_w, self.center, self.scale)
        if self.loc_tril is not None:
            params = {**params, "loc": self.center + self.loc_tril @ params_w["loc"]}
        if self.block_tril is not None:
            index = self.block_index
            block = self.center[index] + self.block_tril @ params_w["loc"][index]
            params = {**params, "loc": params["loc"].at[index].set(block)}
        return params


class Setup(NamedTuple):
    preconditioner: Preconditioner
    draws: jax.Array  # (num_draws, noise_dim) moment-matched base draws
    map_position: jax.Array
    map_steps: jax.Array
    map_ok: jax.Array  # MAP converged (Newton decrement small) and Hessian positive definite
    hessian_min_eig: jax.Array  # smallest eigenvalue of the Jacobi-scaled Hessian (unit diagonal)
    map_decrement: jax.Array  # gᵀ H₊⁻¹ g at the MAP: squared Mahalanobis distance to the mode
    laplace: jax.Array  # the preconditioner uses the curvature (else identity at the start)


# Newton decrement gᵀH₊⁻¹g at the MAP (its squared distance to the mode in posterior
# sds) under which the MAP counts as found: 0.03 sd.
MAP_DECREMENT_OK = 1e-3
# Eigenvalues of the Jacobi-scaled Hessian (unit diagonal) below this fraction of the
# largest are floored: a posterior correlation of 1 − 1e-8 gives 2e-8, so only directions
# that float64 cannot resolve are touched.
_EIGEN_FLOOR = 1e-13
# Up to this dimension the set-up forms the dense Hessian (D Hessian-vector products);
# above, its exact diagonal (hessian_diagonal: a few products per site).
DENSE_HESSIAN_MAX_DIM = 500


def laplace_factor(hess: jax.Array, grad: jax.Array):
    """``(tril, scale, decrement, min_eig, positive_definite)`` from a Hessian (D, D)
    and gradient (D,) of −log p̃ at a point.

    With S = diag(|H_ii|)^(−1/2) and S H S = V Λ Vᵀ (unit diagonal: its eigenvalues
    measure correlation, not units, so a slope of sd 1e-3 beside an intercept of sd
    1e3 loses no precision), H₊ = S⁻¹ V |Λ|₊ Vᵀ S⁻¹ with |Λ|₊ = max(|λ|, floor · max|λ|)
    is H made positive definite.  ``tril`` = chol(H₊⁻¹) = S chol(V |Λ|₊⁻¹ Vᵀ);
    ``scale`` = diag(H₊)^(−1/2) (the mean-field optimum of a Gaussian);
    ``decrement`` = gᵀ H₊⁻¹ g, the squared distance in posterior sds of the point
    from the mode of the quadratic model."""
    diag = jnp.abs(jnp.diagonal(hess))
    good = jnp.isfinite(diag) & (diag > 0)
    s = jnp.where(good, 1.0 / jnp.sqrt(jnp.where(good, diag, 1.0)), 1.0)
    scaled = s[:, None] * hess * s[None, :]
    eigval, eigvec = jnp.linalg.eigh(0.5 * (scaled + scaled.T))
    top = jnp.max(jnp.abs(eigval))
    positive_definite = eigval[0] > _EIGEN_FLOOR * top
    modified = jnp.maximum(jnp.abs(eigval), _EIGEN_FLOOR * jnp.maximum(top, 1e-300))
    cov_scaled = (eigvec / modified) @ eigvec.T
    tril = s[:, None] * jnp.linalg.cholesky(0.5 * (cov_scaled + cov_scaled.T))
    scale = s / jnp.sqrt(jnp.sum(eigvec**2 * modified, axis=1))
    decrement = jnp.sum((eigvec.T @ (s * grad)) ** 2 / modified)
    return tril, scale, decrement, eigval[0], positive_definite


def laplace_diagonal(diag: jax.Array, grad: jax.Array):
    """:func:`laplace_factor` from the diagonal (D,) of the Hessian alone: ``tril`` is
    None, ``scale`` = |H_ii|^(−1/2) (the mean-field optimum of a Gaussian with that
    Hessian; 1 where H_ii is 0 or not finite), ``decrement`` = Σ g_i² / |H_ii|, and the
    smallest eigenvalue of the Jacobi-scaled diagonal is the smallest sign(H_ii)."""
    magnitude = jnp.abs(diag)
    good = jnp.isfinite(magnitude) & (magnitude > 0)
    safe = jnp.where(good, magnitude, 1.0)
    scale = jnp.where(good, 1.0 / jnp.sqrt(safe), 1.0)
    decrement = jnp.sum(jnp.where(good, grad**2 / safe, grad**2))
    min_eig = jnp.min(jnp.where(good, jnp.sign(diag), 0.0))
    return None, scale, decrement, min_eig, jnp.all(good & (diag > 0))


_LBFGS_MEMORY = 10
_LBFGS_MEMORY_LARGE = 30  # D > DENSE_HESSIAN_MAX_DIM
_SHIFTS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)


def host_whitening(hess: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(scale, factor, kind)`` on the host, for a dense Hessian H (D, D) of −log p̃:
    the map u = c + S F w, S = diag(scale) = diag(|H_ii|)^(−1/2) (Jacobi), turns H into
    (about) I in w: gradient g_w = Fᵀ S g, Newton decrement ‖g_w‖².

    F = C⁻ᵀ with C = chol(S H S + shift·I) for the smallest shift of :data:`_SHIFTS`
    that makes it positive definite (D³/3 flops: 2-6 s at D = 4,170 here, ``kind``
    "cholesky").  Where none does, F is None (I: ``kind`` "diagonal", the Jacobi
    scaling alone): at the start of a non-centred hierarchical model every effect is 0,
    a saddle where each scale's row of H holds its effects' gradients.  There the
    saddle-free |H| (eigh, 25-150 s at D = 4,170) was tried and measured worse: on 30,000
    flights rows its round stopped at 1,000 L-BFGS steps where the diagonal's converged
    in 640."""
    diag = np.abs(np.diagonal(hess))
    good = np.isfinite(diag) & (diag > 0)
    scale = np.where(good, 1.0 / np.sqrt(np.where(good, diag, 1.0)), 1.0)
    scaled = scale[:, None] * hess * scale[None, :]
    scaled = 0.5 * (scaled + scaled.T)
    eye = np.eye(scaled.shape[0])
    for shift in _SHIFTS:
        try:
            chol = np.linalg.cholesky(scaled + shift * eye)
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(chol)):
            return scale, scipy.linalg.solve_triangular(chol, eye, lower=True).T, "cholesky"
    return scale, None, "diagonal"


_BLOCK_SITE_SIZE = 8  # sites this small join the dense block of a large model
_MAX_BLOCK = 64


def curvature_block(target) -> np.ndarray:
    """Flat indices of the small sites (at most :data:`_BLOCK_SITE_SIZE` coordinates
    each, :data:`_MAX_BLOCK` in all) whose Hessian block is kept dense when D >
    :data:`DENSE_HESSIAN_MAX_DIM`: on raw scales an intercept and the slopes are
    correlated to 1 − 1e-6, which no diagonal undoes (the minibatch whitening's block)."""
    index = []
    for site in sorted(target.sites, key=lambda s: s.start):
        if 0 < site.size <= _BLOCK_SITE_SIZE and len(index) + site.size <= _MAX_BLOCK:
            index.extend(range(site.start, site.start + site.size))
    return np.asarray(index if len(index) > 1 else [], dtype=np.int32)


def build_setup(
    target: Target,
    family: Family,
    dense: bool | None = None,
    curvature_stride: int = 1,
    curvature_structure: HessianStructure | None = None,
):
    """``(map_objective, hessian, prepare)``: the negative log density and its gradient
    ``(u, data) -> (value, grad)`` for the MAP search (run on the host by
    :func:`~viax.infer.optimize.minimize_on_host`), its Hessian ``(u, data) -> (D, D)``
    (for :func:`~viax.infer.optimize.newton_on_host` where L-BFGS does not converge, and
    for the preconditioner: one compiled program serves both; for D >
    :data:`DENSE_HESSIAN_MAX_DIM` its exact diagonal (D,) instead, from
    :func:`~viax.infer.chunked.hessian_diagonal`, and the preconditioner is diagonal:
    :func:`laplace_diagonal`), and the traceable rest of
    the setup from the MAP and its Hessian: the preconditioner (the base draws, from
    :func:`base_draws`, are an input).

    The preconditioner uses the curvature at the point the MAP search ended when the
    MAP was found (``map_ok``), and also when it was not but the point lies within the
    posterior's typical set by the Hessian's own measure (decrement ≤ D), with the
    Hessian made positive definite (:func:`laplace_factor`); otherwise (no mode, as in
    a funnel, or a non-finite point) it is the identity at the initial point.

    ``dense`` (default: D ≤ :data:`DENSE_HESSIAN_MAX_DIM`; the fit passes
    :func:`~viax.infer.chunked.dense_curvature_plan`'s memory and time budget) forms the
    dense Hessian from D Hessian-vector products, :func:`~viax.infer.chunked.hvp_group`
    at a time, and whitens the means of every family by its factor; from every
    ``curvature_stride``-th block of rows of a :class:`~viax.infer.chunked.ChunkedTarget`
    (:meth:`~viax.infer.chunked.ChunkedTarget.log_density`'s estimate; the fit's budget
    picks the stride) when that is over 1.  With a ``curvature_structure``
    (:func:`~viax.infer.chunked.hessian_structure`, checked by the fit) the same exact
    dense Hessian comes from its K columns and the diagonal of its uncoupled sites,
    K + (sites) products over every row instead of D
    (:func:`~viax.infer.chunked.structured_hessian`)."""
    if dense is None:
        dense = target.dim <= DENSE_HESSIAN_MAX_DIM

    def map_objective(position, data):
        return jax.value_and_grad(lambda u: -target.log_density(u, data))(position)

    def hessian(position, data):
        dim = position.shape[0]

        def negative(u):
            if curvature_stride > 1:
                return -target.log_density(u, data, curvature_stride)
            return -target.log_density(u, data)

        # Forward-over-reverse columns H e_i: compiles faster than jax.hessian here.
        grad_fn = jax.grad(negative)

        def column(v):
            return jax.jvp(grad_fn, (position,), (v,))[1]

        def columns(basis):
            # All products at once would hold (count / group) times a block's memory.
            group = hvp_group(target, data, basis.shape[0])
            if group >= basis.shape[0]:
                return jax.vmap(column)(basis)
            return jax.lax.map(column, basis, batch_size=group)

        if not dense:
            # No D × D matrix (4,170 latents × 327k rows took 77 GB): its exact diagonal
            # from a few Hessian-vector products, and the dense block of the small sites.
            sites = tuple((s.start, s.size) for s in target.sites)
            diag = hessian_diagonal(negative, position, sites)
            block = curvature_block(target)
            if block.size == 0:
                return diag, jnp.zeros((0, 0), position.dtype)
            hess = columns(jnp.eye(dim, dtype=position.dtype)[block])[:, block]
            return diag, 0.5 * (hess + hess.T)
        if curvature_structure is not None:
            probes = jnp.asarray(curvature_structure.probes(dim, position.dtype))
            hess = structured_hessian(columns(probes), curvature_structure, dim)
        else:
            hess = columns(jnp.eye(dim, dtype=position.dtype))
        return 0.5 * (hess + hess.T)

    def prepare(center, value, grad, hess, map_steps, init_position, draws, sd=None) -> Setup:
        # value, gradient and Hessian of −log p̃ at center come from the host's search:
        # no model evaluation is compiled here, only linear algebra.  ``sd`` (D,): a
        # re-whitening at a mean-field q's mean (center) keeps its sds as the scales.
        dim = init_position.shape[0]
        block, block_tril = None, None
        if isinstance(hess, tuple):  # D > DENSE_HESSIAN_MAX_DIM: diagonal + small block
            diag, block_hess = hess
            tril, scale, decrement, min_eig, positive_definite = laplace_diagonal(diag, grad)
            block = curvature_block(target)
            if block.size:
                block_tril, block_scale, block_decrement, block_min, block_pd = laplace_factor(
                    block_hess, grad[block]
                )
                outside = np.ones(dim, bool)
                outside[block] = False
                decrement = laplace_diagonal(diag[outside], grad[outside])[2] + block_decrement
                scale = scale.at[block].set(block_scale)
                min_eig = jnp.minimum(min_eig, block_min)
                positive_definite = positive_definite & block_pd
            if isinstance(family, FullRank):
                tril = jnp.diag(scale)
                if block.size:
                    tril = tril.at[np.ix_(block, block)].set(block_tril)
        else:
            tril, scale, decrement, min_eig, positive_definite = laplace_factor(hess, grad)
        finite = (
            jnp.isfinite(value)
            & jnp.all(jnp.isfinite(center))
            & jnp.all(jnp.isfinite(grad))
            & jnp.all(jnp.stack([jnp.all(jnp.isfinite(h)) for h in jax.tree.leaves(hess)]))
            & jnp.all(jnp.isfinite(scale))
            & (jnp.all(jnp.isfinite(tril)) if tril is not None else True)
        )
        ok = finite & positive_definite & (decrement <= MAP_DECREMENT_OK)
        laplace = finite & (decrement <= dim)
        if sd is not None:
            # q's sds, except any that collapsed (a first phase from a poor start can
            # drive a log-scale to −∞): those restart from the Laplace scale.
            laplace = finite
            scale = jnp.where(jnp.isfinite(sd) & (sd > 1e-8 * scale), sd, scale)
        map_position = center
        center = jnp.where(laplace, center, init_position)
        if tril is not None:
            tril = jnp.where(laplace, tril, jnp.eye(dim))
        scale = jnp.where(laplace, scale, 1.0)
        if isinstance(family, FullRank):
            log_det = jnp.sum(jnp.log(jnp.diagonal(tril)))
            precond = Preconditioner(center, tril, jnp.ones(dim), log_det)
        else:
            loc_tril = tril if dense else None
            if block_tril is not None:
                block_tril = jnp.where(laplace, block_tril, jnp.eye(block.size))
                block = jnp.asarray(block)
            precond = Preconditioner(
                center,
                None,
                scale,
                jnp.sum(jnp.log(scale)),
                loc_tril,
                block if block_tril is not None else None,
                block_tril,
            )
        return Setup(precond, draws, map_position, map_steps, ok, min_eig, decrement, laplace)

    return map_objective, hessian, prepare


def base_draws(rng_key, num_draws: int, noise_dim: int) -> np.ndarray:
    """N(0, I) draws (M, d) moment-matched to sample mean 0 and covariance I.

    Drawn by NumPy from a seed taken from ``rng_key``: one host call instead of a
    threefry program to compile (about 0.15 s of a cold fit)."""
    key = rng_key if rng_key.dtype == jnp.uint32 else jax.random.key_data(rng_key)
    rng = np.random.default_rng([int(k) for k in np.asarray(key).ravel()])
    eps = rng.standard_normal((num_draws, noise_dim))
    eps = eps - eps.mean(axis=0)
    if num_draws > noise_dim + 1 and noise_dim <= _MAX_DENSE_DIM:
        chol = np.linalg.cholesky(eps.T @ eps / num_draws)
        return scipy.linalg.solve_triangular(chol, eps.T, lower=True).T
    return eps / np.sqrt(np.mean(eps**2, axis=0))


class DADVIState(NamedTuple):
    optimizer: LBFGSState  # over family params in whitened coordinates
    guard: Guard


class DADVIInfo(NamedTuple):
    objective: jax.Array  # fixed-draw ELBO (in the original coordinates)
    grad_norm: jax.Array
    accepted: jax.Array


class DADVI(NamedTuple):
    map_objective: Callable  # (u, data) -> (−log p̃(u), gradient), for the host L-BFGS
    hessian: Callable  # (u, data) -> (D, D) Hessian of −log p̃, for the host Newton steps
    # (center, value, grad, hessian, map_steps, init_position, data, draws[, sd])
    #     -> (Setup, DADVIState); value/grad/hessian of −log p̃ at center
    setup: Callable
    # The base draws come from the fit's key (base_draws), finalize's from fold_in 1.
    step: Callable  # (state, rng_key, inputs) -> (state, info); inputs = (data, setup)
    finalize: Callable  # (params_w, inputs, rng_key) -> (params, elbo terms)
    initial: Callable  # inputs -> (loss, grad) at the start, for error reports only
    # D > DENSE_HESSIAN_MAX_DIM: flat indices of the dense Hessian block (hessian
    # returns (diagonal, block)); empty otherwise
    curvature_block: np.ndarray = np.zeros(0, np.int32)
    dense: bool = True  # hessian returns the dense (D, D) matrix


def _fixed_draw_elbo(target, family, params, data, draws, precond: Preconditioner):
    if precond.loc_tril is not None or precond.block_tril is not None:
        # q in the original coordinates from the whitened params: the map of the means
        # is not the map of the draws, so the ELBO is taken there (no Jacobian term).
        return elbo_from_noise(
            family, lambda u: target.log_density(u, data), precond.push(family, params), draws
        )

    def log_density_fn(w):
        return target.log_density(precond.to_position(w), data)

    return elbo_from_noise(family, log_density_fn, params, draws) + precond.log_det


@functools.lru_cache(maxsize=128)
def build_dadvi(
    target: Target,
    family: Family,
    num_final_draws: int = 1000,
    dense: bool | None = None,
    curvature_stride: int = 1,
    curvature_structure: HessianStructure | None = None,
) -> DADVI:
    """L-BFGS on the fixed-draw ELBO; ``inputs = (data, setup)`` is an argument of the
    compiled step, so nothing data-dependent is baked into the code.  ``dense``: the
    set-up's curvature (:func:`build_setup`; default D ≤ :data:`DENSE_HESSIAN_MAX_DIM`),
    read from every ``curvature_stride``-th block of rows, or formed from a checked
    ``curvature_structure``."""
    if dense is None:
        dense = target.dim <= DENSE_HESSIAN_MAX_DIM

    def loss_fn(params, inputs):
        data, setup = inputs
        return -_fixed_draw_elbo(target, family, params, data, setup.draws, setup.preconditioner)

    # A large hierarchical model keeps more curvature pairs: after the Laplace whitening
    # what is left is how E_q[H] differs from H at the MAP (the scales' effects), spread
    # over many directions; 2 m D flops a step, nothing beside the rows' cost.
    memory = _LBFGS_MEMORY if target.dim <= DENSE_HESSIAN_MAX_DIM else _LBFGS_MEMORY_LARGE
    lbfgs_init, lbfgs_step = lbfgs(loss_fn, memory_size=memory)
    map_objective, hessian, prepare = build_setup(
        target, family, dense, curvature_stride, curvature_structure
    )

    def setup(center, value, grad, hess, map_steps, init_position, data, draws, sd=None):
        # Preconditioner from the MAP in one compiled program; the L-BFGS state is fresh
        # (its first step evaluates the objective), so the ELBO is compiled once.  With
        # ``sd``: a mean-field q re-whitened at its mean ``center`` (init reproduces q).
        setup = prepare(center, value, grad, hess, map_steps, init_position, draws, sd)
        state = DADVIState(lbfgs_init(family.init(), (data, setup)), guard_init(target.dim))
        return setup, state

    def step(state: DADVIState, rng_key, inputs):
        del rng_key  # deterministic
        opt, info = lbfgs_step(state.optimizer, inputs)
        return DADVIState(opt, state.guard), DADVIInfo(-info.value, info.grad_norm, info.accepted)

    def finalize(params_w, inputs, rng_key):
        data, setup = inputs
        params = setup.preconditioner.push(family, params_w)
        key = jax.random.fold_in(rng_key, 1)
        z, log_q = family.sample_and_log_prob(params, key, num_final_draws)
        return params, log_density_many(target, z, data) - log_q

    def initial(inputs):
        return jax.value_and_grad(loss_fn)(family.init(), inputs)

    return DADVI(
        jit_once(map_objective),
        jit_once(hessian),
        jit_once(setup),
        step,
        jit_once(finalize),
        jit_once(initial),
        np.zeros(0, np.int32) if dense else curvature_block(target),
        dense,
    )
