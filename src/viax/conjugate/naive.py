"""The naive approach: the ELBO in closed form, maximised by gradient ascent (optax).

For a conjugate model the ELBO is analytic: ``Σ_g [E log p0 + H] + F + Σ_l H`` with
every term a function of the factors' natural parameters.  Each global factor maps its
natural parameters to R^n (``to_unconstrained``: log of positive parameters, log-Cholesky
of scale matrices, ν − (D − 1) through a softplus), and optax follows the gradient of

    L(β) = max_{q(z)} ELBO(q(β), q(z)),

the ELBO with the local factors maximised out given the globals, by the model's own
local updates (one CAVI half-sweep).  By Danskin's theorem ∇L is the ELBO's partial
gradient at those locals, so they are held constant for the gradient.  For the GMM the
local update is exact; where it iterates to a tolerance (LDA's documents, to sklearn's
mean_change_tol) the gradient is as accurate as that fit.  Following the
gradient over globals and locals together, L-BFGS stopped 14 nats short of the optimum on
the tests' two-component GMM (or reached it, depending on the run's round-off) and ran a
surplus component's parameters out to 1e13; over the globals alone it reaches CAVI's
optimum on both.  Steps run in compiled ``lax.scan`` chunks; the run stops when a
chunk's relative ELBO gain falls under ``tol`` and has converged if the gradient is
then below ``gtol`` too.  A run can be checkpointed (the free parameters and the
optimiser's whole state, so a resumed run takes the uninterrupted one's steps).

This is the baseline that CAVI and SVI improve on (Blei et al. 2017 §4: coordinate
updates use the geometry the gradient ignores); they must reach the same optimum.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from viax.conjugate.checkpoint import (
    data_fingerprint,
    resume_checkpoint,
    resume_path,
    save_checkpoint,
)
from viax.conjugate.engine import (
    ConjugateModel,
    check_conjugate_model,
    check_globals,
    compiled,
    elbo,
    fit_locals,
    global_means,
    global_terms,
    local_terms,
    make_sampler,
    progress_bar,
    to_device,
    to_device_tree,
    to_numpy_tree,
)
from viax.conjugate.xla import jit
from viax.result import Result

__all__ = ["naive"]


def _to_free(model, global_natural):
    factors = model.global_factors()
    return {n: factors[n].to_unconstrained(eta) for n, eta in global_natural.items()}


def _from_free(model, free):
    factors = model.global_factors()
    return {n: factors[n].from_unconstrained(u) for n, u in free.items()}


# The ELBO's global terms <η0 − η, μ> + A(η) − A(η0) cancel: where a step sends some η
# far out (an empty component's sticks to 1e24), float64 leaves none of the ELBO's
# digits and returns values like +3e10, which a line search accepts as progress.  Where
# the terms' magnitudes exceed the starting |ELBO| by this factor (2e-16 · 1e9: errors
# over 2e-7 of it), the loss is +inf: outside the domain, and the line search steps back.
# The anchor is the start, not the value itself, which is garbage there too.
_MAX_CANCELLATION = 1e9


def _global_magnitude(model, global_natural, global_mean):
    """Σ_g |<η0, μ>| + |<η, μ>| + |A(η)| + |A(η0)|, each inner product taken over the
    statistics' absolute values: a bound on the size of the terms the ELBO sums."""
    factors, prior = model.global_factors(), model.prior()
    total = 0.0
    for name, eta in global_natural.items():
        factor, mean = factors[name], tuple(jnp.abs(m) for m in global_mean[name])
        for natural in (eta, prior[name]):
            total = total + jnp.sum(factor.inner(tuple(jnp.abs(e) for e in natural), mean))
            total = total + jnp.sum(jnp.abs(factor.log_normalizer(natural)))
    return total


def _best_locals(model, batch, global_natural):
    """The locals that maximise the ELBO given the globals (closed-form updates from the
    model's start), held constant for the gradient: by Danskin's theorem the gradient of
    max_locals ELBO is the partial gradient at the maximiser."""
    gm = global_means(model, global_natural)
    local = model.init_locals(None, batch, gm)
    local, _ = fit_locals(model, gm, local, batch)
    return jax.lax.stop_gradient(local)


def _elbo(free, model, batch):
    """(L(β), the global terms' magnitude) at the free global parameters."""
    global_natural = _from_free(model, free)
    local_natural = _best_locals(model, batch, global_natural)
    gm = global_means(model, global_natural)
    value = global_terms(model, global_natural, gm) + local_terms(model, gm, local_natural, batch)
    return value, _global_magnitude(model, global_natural, gm)


def _guard(value, magnitude, scale):
    """−value, or +inf where the terms' ``magnitude`` leaves no digits of an ELBO of
    size ``scale``."""
    return jnp.where(magnitude <= _MAX_CANCELLATION * scale, -value, jnp.inf)


def _negative_elbo(free, model, batch, scale):
    return _guard(*_elbo(free, model, batch), scale)


def _run_chunk(free, opt_state, scale, model, batch, *, optimizer, chunk_size: int):
    def loss(u):
        return _negative_elbo(u, model, batch, scale)

    # L-BFGS's line search ends with the loss and gradient at the point it accepts and
    # keeps them in its state: reusing them saves one loss-and-gradient per step.
    stored = optax.tree.get(opt_state, "value") is not None
    value_and_grad = (
        optax.value_and_grad_from_state(loss)
        if stored
        else lambda u, state: jax.value_and_grad(loss)(u)
    )

    def step(carry, _):
        free, opt_state = carry
        value, grad = value_and_grad(free, state=opt_state)
        updates, opt_state = optimizer.update(
            grad, opt_state, free, value=value, grad=grad, value_fn=loss
        )
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
        return (optax.apply_updates(free, updates), opt_state), (-value, largest)

    (free, opt_state), (trace, largest) = jax.lax.scan(
        step, (free, opt_state), None, length=chunk_size
    )
    return free, opt_state, trace, largest[-1]


def naive(
    model: ConjugateModel,
    data,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 5000,
    chunk_size: int = 250,
    tol: float = 1e-10,
    gtol: float = 1e-2,
    seed: int = 0,
    init: tuple[dict, dict] | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: str | Path | bool | None = None,
) -> Result:
    """Maximise the closed-form ELBO over the global natural parameters with optax,
    the locals maximised out in closed form.

    Args:
        optimizer: an optax transformation (default ``optax.lbfgs()``, whose line search
            uses the extra ``value``/``value_fn`` arguments; first-order ones like
            ``optax.adam(1e-2)`` ignore them).
        num_steps, chunk_size: at most ``num_steps`` steps, checked every chunk.
        tol, gtol: the run stops when a chunk raises the ELBO by less than
            ``tol · |ELBO|``; it has converged if then every component of the ELBO's
            gradient over the free parameters is within ``gtol`` (nats per unit).  A
            run that stops with a larger gradient has stalled (L-BFGS can creep along an
            ill-conditioned direction, e.g. a surplus component's weight); it is
            reported as not converged, with the gradient in ``info["grad_max"]``.
        init: ``(global_natural, local_natural)``; default the model's initialisation
            (the same start as :func:`viax.conjugate.cavi`).  Only the globals are used:
            the locals follow from them.
        progress: a progress bar of the steps with the running ELBO.
        checkpoint_path, checkpoint_every: after the chunk that passes every
            ``checkpoint_every`` steps, and at the end, write the globals, the free
            parameters, the optimiser's state, the ELBO trace and a fingerprint of the
            data (atomically, no pickle: :mod:`viax.conjugate.checkpoint`).
        resume: a checkpoint path (or True: ``checkpoint_path``) to continue from, on
            the same data, with the same kind of optimizer and ``chunk_size``:
            ``num_steps`` counts the steps before it too, and the run takes the
            uninterrupted one's steps.

    Returns:
        Result with ``method="naive"`` and ``params`` as natural parameters;
        ``info["first_step"]``: the steps before a resume.
    """
    check_conjugate_model(model, "viax.naive")
    if num_steps < 1 or chunk_size < 1:
        raise ValueError(f"num_steps and chunk_size must be >= 1, got {num_steps}, {chunk_size}")
    if not (tol >= 0 and gtol >= 0):
        raise ValueError(f"tol and gtol must be >= 0, got {tol}, {gtol}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    start = time.perf_counter()
    optimizer = _DEFAULT_OPTIMIZER if optimizer is None else optimizer
    batch = data if isinstance(data, dict) and "mask" in data else model.prepare(data)
    path = resume_path(resume, checkpoint_path)
    if path is not None and init is not None:
        raise ValueError("give init or resume, not both")
    if init is not None:
        check_globals(model, init[0])
    fingerprint = data_fingerprint(batch) if checkpoint_path or path else ""
    run, start_fn = _chunk_fn(optimizer)
    key = jax.random.PRNGKey(seed)
    traces: list[np.ndarray] = []
    if path is not None:
        free, opt_state, scale, traces = _resumed(
            model, batch, key, start_fn, path, fingerprint, chunk_size, num_steps
        )
    else:
        free, opt_state = start_fn(model, batch, key, init)
        # The guard's scale: the starting |ELBO|, from the program that also ends the run.
        scale = to_device(max(abs(float(_finish(model, batch, free)[2])), 1.0))
    steps = first_step = sum(len(t) for t in traces)
    previous = float(traces[-1][-1]) if traces else -np.inf
    compile_time, stopped, grad_max = 0.0, False, np.inf

    def save(global_natural):
        save_checkpoint(
            checkpoint_path,
            global_natural,
            steps,
            key,
            model.name,
            elbo_trace=np.concatenate(traces) if traces else np.zeros(0),
            method="naive",
            fingerprint=fingerprint,
            extra=_pack(free, opt_state, scale, stopped, chunk_size),
        )

    bar = progress_bar("naive", "step", num_steps, steps, progress)
    with bar:
        while steps < num_steps:
            (new_free, new_opt_state, trace, grad_max), seconds = run(
                free, opt_state, scale, model, batch, chunk_size=chunk_size
            )
            compile_time += seconds
            trace, grad_max = np.asarray(trace), float(grad_max)
            if not np.all(np.isfinite(trace)):
                where = steps + int(np.argmin(np.isfinite(trace))) + 1
                raise FloatingPointError(f"the naive ELBO became non-finite at step {where}")
            free, opt_state = new_free, new_opt_state
            traces.append(trace)
            steps += chunk_size
            current = float(trace[-1])
            bar.set_postfix_str(f"elbo {current:.8g}", refresh=False)
            bar.update(chunk_size)
            stopped = current - previous < tol * abs(current)
            passed = steps // checkpoint_every > (steps - chunk_size) // checkpoint_every
            if checkpoint_path is not None and passed and not stopped and steps < num_steps:
                save(_finish(model, batch, free)[0])
            if stopped:
                break
            previous = current
    converged = stopped and grad_max <= gtol
    global_natural, local_natural, final = _finish(model, batch, free)
    if checkpoint_path is not None:
        save(global_natural)
    final = float(final)
    return Result(
        method="naive",
        algorithm="closed-form-elbo-gradient",
        family="conjugate-meanfield",
        params={"global": to_numpy_tree(global_natural), "local": to_numpy_tree(local_natural)},
        elbo_trace=np.concatenate(traces),
        elbo=final,
        elbo_se=0.0,
        converged=converged,
        message=(
            f"relative ELBO gain of a {chunk_size}-step chunk below tol after {steps} steps"
            if converged
            else f"stalled after {steps} steps: the ELBO gained less than tol over a "
            f"{chunk_size}-step chunk while its gradient is still {grad_max:.3g} (> gtol="
            f"{gtol:g}): not an optimum; CAVI reaches it on conjugate models"
            if stopped
            else f"reached num_steps={num_steps}"
        ),
        num_steps=steps,
        wall_time=time.perf_counter() - start,
        compile_time=compile_time,
        target=None,
        data={},
        info={
            "model": model,
            "optimizer": optimizer,
            "grad_max": grad_max,
            "first_step": first_step,
        },
        sampler=make_sampler(model, global_natural),
    )


def _pack(free, opt_state, scale, stopped: bool, chunk_size: int) -> dict:
    """The run's state as named arrays for a checkpoint's ``extra``."""
    out = {f"free/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(free))}
    out |= {f"opt/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    return out | {"scale": np.asarray(scale), "stopped": stopped, "chunk_size": chunk_size}


def _unpack(extra: dict, prefix: str, like, path):
    """The tree shaped as ``like`` (ShapeDtypeStructs) from ``extra``'s ``prefix/i``
    arrays, or a ValueError where they do not fit it."""
    leaves, treedef = jax.tree.flatten(like)
    saved = [extra.get(f"{prefix}/{i}") for i in range(len(leaves))]
    fits = len([k for k in extra if k.startswith(prefix + "/")]) == len(leaves) and all(
        s is not None and s.shape == x.shape and s.dtype == x.dtype
        for s, x in zip(saved, leaves, strict=True)
    )
    if not fits:
        what = "free parameters" if prefix == "free" else "optimizer state"
        raise ValueError(
            f"{path}: its {what} does not fit this run's (another model shape or another "
            "kind of optimizer): resume with the model and optimizer that wrote it"
        )
    return to_device_tree(jax.tree.unflatten(treedef, saved))


def _resumed(model, batch, key, start_fn, path, fingerprint, chunk_size, num_steps):
    """(free, optimizer state, scale, [ELBO trace]) of a naive checkpoint of this
    model and data."""
    saved = resume_checkpoint(path, "naive", model.name, fingerprint)
    extra, steps = saved["extra"], saved["step"]
    if int(extra["chunk_size"]) != chunk_size:
        raise ValueError(
            f"{path} was written with chunk_size={int(extra['chunk_size'])}: resume with "
            "the same chunks (the run checks convergence at their ends)"
        )
    if bool(extra["stopped"]):
        raise ValueError(f"{path}: that run stopped at step {steps} (its ELBO settled)")
    if steps >= num_steps:
        raise ValueError(
            f"the checkpoint holds {steps} steps, num_steps={num_steps}: nothing to do"
        )
    free_like, opt_like = jax.eval_shape(start_fn, model, batch, key, None)
    free = _unpack(extra, "free", free_like, path)
    opt_state = _unpack(extra, "opt", opt_like, path)
    return free, opt_state, to_device(extra["scale"]), [np.asarray(saved["elbo_trace"])]


@partial(jit, fast_compile=True)
def _finish(model, batch, free):
    """(globals, their best locals, the exact ELBO) at the free parameters."""
    global_natural = _from_free(model, free)
    local_natural = _best_locals(model, batch, global_natural)
    return global_natural, local_natural, elbo(model, global_natural, local_natural, batch)


_CHUNK_FNS: dict = {}
# One default object: the compiled chunk is keyed by the optimizer's identity, so a new
# optax.lbfgs() per call would recompile (~15 s) on every refit.
_DEFAULT_OPTIMIZER = optax.lbfgs()


def _chunk_fn(optimizer):
    # One compiled chunk per optimizer object: it is closed over, not traced.
    key = id(optimizer)
    if key not in _CHUNK_FNS:

        def fn(free, opt_state, scale, model, batch, *, chunk_size):
            return _run_chunk(
                free, opt_state, scale, model, batch, optimizer=optimizer, chunk_size=chunk_size
            )

        def start(model, batch, key, init):
            if init is None:
                # The same key split as cavi's start: the same globals.
                global_natural = model.init_globals(jax.random.split(key)[0], batch)
            else:
                global_natural = init[0]
            free = _to_free(model, global_natural)
            return free, optimizer.init(free)

        # The start in one program: run eagerly, optax's L-BFGS init, the means and the
        # transforms were ~100 small compiles (8 s on a 2-core machine).
        chunk = compiled(fn, static_argnames=("chunk_size",))
        _CHUNK_FNS[key] = (optimizer, (chunk, jax.jit(start)))
    return _CHUNK_FNS[key][1]
