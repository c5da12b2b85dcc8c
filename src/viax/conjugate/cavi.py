"""CAVI: full-data coordinate ascent, the exact ELBO after every sweep.

One sweep (Blei et al. 2017, Algorithm 1): fit the local factors given the globals
(``η_l ← ∂F/∂μ_l``), then the global block (``η_g ← η0_g + ∂F/∂μ_g``), then the ELBO in
closed form.  Each sweep is one compiled call; the host reads its ELBO and stops.
Coordinate ascent cannot lower the ELBO, so a decrease beyond round-off raises: it
means a wrong model.

Models whose local fit restarts every sweep and iterates to a tolerance (LDA, as
sklearn's batch E-step: warm starts ended in poorer optima) are not exact coordinate
ascent: a restarted fit can land below the previous sweep's locals, and the ELBO dipped
by ~2e-6 relative on small corpora.  Such a sweep is redone from the previous locals
(warm), whose fixed-point steps cannot lower the ELBO; only a decrease after that raises.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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
    fit_locals,
    global_means,
    make_sampler,
    prior_log_normalizer,
    progress_bar,
    to_device_tree,
    to_numpy_tree,
    update_globals,
)
from viax.conjugate.xla import SMALL_LOCALS
from viax.result import Result

__all__ = ["ElboDecreaseError", "cavi", "cavi_sweep"]

# A sweep may lower the ELBO by round-off only: relative 1e-9 of its size (float64
# sums over 10^5 points lose ~1e-12 relative; 1e-9 leaves room for ill-conditioned
# Cholesky factors) plus an absolute 1e-9 for ELBOs near zero.
_DECREASE_RTOL = 1e-9
_DECREASE_ATOL = 1e-9


def _decreased(value: float, previous: float) -> bool:
    return value - previous < -(_DECREASE_RTOL * abs(value) + _DECREASE_ATOL)


class ElboDecreaseError(RuntimeError):
    """A CAVI sweep lowered the ELBO beyond round-off: the model's updates are wrong."""


def cavi_sweep(
    model: ConjugateModel,
    global_natural,
    global_mean,
    local_natural,
    batch,
    prior_constant=None,
    restart=True,
):
    """One sweep: locals, then globals.  Returns (global, global_mean, local, elbo_after).

    The locals start from ``model.init_locals`` where the model restarts them and
    ``restart`` (a traced bool) holds, else from ``local_natural``."""
    if model.restart_locals:
        start = model.init_locals(None, batch, global_mean)
        local_natural = jax.tree.map(
            lambda new, old: jnp.where(restart, new, old), start, local_natural
        )
    local_natural, _ = fit_locals(model, global_mean, local_natural, batch)
    global_natural, global_mean, _, elbo_after = update_globals(
        model, global_natural, global_mean, local_natural, batch, 1.0, prior_constant
    )
    return global_natural, global_mean, local_natural, elbo_after


def _sweep(
    model, global_natural, global_mean, prior_constant, local_natural, batch, fresh, restart
):
    """One sweep: (globals, their means, the prior's normaliser, locals, ELBO after).

    ``fresh`` (the first sweep): the means and the constant are computed here from the
    globals, not taken from the arguments (placeholders then), so that one compiled
    program serves the whole run; a sweep returns them for the next.  ``restart``: see
    :func:`cavi_sweep`."""
    global_mean, prior_constant = jax.lax.cond(
        fresh,
        lambda: (global_means(model, global_natural), prior_log_normalizer(model)),
        lambda: (global_mean, prior_constant),
    )
    g, gm, local, value = cavi_sweep(
        model, global_natural, global_mean, local_natural, batch, prior_constant, restart
    )
    return g, gm, prior_constant, local, value


# The sweeps run one compiled call each, from Python, not in a lax.while_loop: XLA on
# CPU runs a loop body's large fusions on one thread, so the loop was 1.7× slower per
# sweep (18.5 against 11.1 ms on 10^5 points, 2 cores), far more than the ~0.1 ms of a
# call and the read of its ELBO.
_sweep_compiled = compiled(_sweep)


def _init(model: ConjugateModel, batch, seed: int, global_natural=None):
    """(globals, locals) of the model's start, or the locals for given globals."""
    key = jax.random.PRNGKey(seed)
    key_g, key_l = jax.random.split(key)
    if global_natural is None:
        global_natural = model.init_globals(key_g, batch)
    local_natural = model.init_locals(key_l, batch, global_means(model, global_natural))
    return global_natural, local_natural


# The seed is traced, not static: a program per seed recompiled each new random_state.
_init_jit = jax.jit(_init)


def cavi(
    model: ConjugateModel,
    data,
    *,
    max_iter: int = 200,
    tol: float = 1e-8,
    atol: float = 0.0,
    seed: int = 0,
    init: tuple[dict, dict] | None = None,
    progress: bool = True,
    log_every: int = 0,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: str | Path | bool | None = None,
) -> Result:
    """Coordinate ascent VI on the full data.

    Args:
        model: a conjugate model (``viax.conjugate.models``).
        data: raw data the model's ``prepare`` accepts (arrays, scipy.sparse), or a
            batch it already prepared.
        max_iter: at most this many sweeps.
        tol, atol: converged when the gain of a sweep is below ``max(tol·|ELBO|, atol)``.
        seed: for the model's initialisation.
        init: ``(global_natural, local_natural)`` to start from instead; locals
            ``None``: the model's start for them given the globals.
        progress: a progress bar of the sweeps with the running ELBO.
        log_every: also print a line (sweep, seconds, ELBO, its change) every this many
            sweeps; 0 for none.
        checkpoint_path, checkpoint_every: write the globals, the locals, the ELBO
            trace and a fingerprint of the data every k sweeps and at the end
            (atomically, no pickle: :mod:`viax.conjugate.checkpoint`).
        resume: a checkpoint path (or True: ``checkpoint_path``) to continue from, on
            the same data: ``max_iter`` counts the sweeps before it too, and the run
            gives the numbers of an uninterrupted one.

    Returns:
        :class:`viax.result.Result` with ``method="cavi"``; ``params`` holds
        ``{"global": ..., "local": ...}`` natural parameters; ``elbo_trace`` one exact ELBO
        per sweep (a resumed run's included); ``info["warm_redone"]`` the sweeps redone
        from the previous locals, ``info["first_sweep"]`` the sweeps before a resume.

    Raises:
        ElboDecreaseError: a sweep lowered the ELBO beyond round-off.

    Example:
        >>> from viax.conjugate import cavi
        >>> from viax.conjugate.models import LinearRegressionModel
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(50, 2)); y = X @ [1.0, -2.0]
        >>> result = cavi(LinearRegressionModel.default(2), (X, y))
        >>> bool(result.converged)
        True
    """
    check_conjugate_model(model, "viax.cavi")
    _check_arguments(max_iter, tol, atol, log_every, checkpoint_every)
    start = time.perf_counter()
    batch = data if _is_prepared(data) else model.prepare(data)
    path = resume_path(resume, checkpoint_path)
    fingerprint = data_fingerprint(batch) if checkpoint_path or path else ""
    trace: list[float] = []
    if path is not None:
        if init is not None:
            raise ValueError("give init or resume, not both")
        init, trace = _resumed(model, path, fingerprint)
        if len(trace) >= max_iter:
            raise ValueError(
                f"the checkpoint holds {len(trace)} sweeps, max_iter={max_iter}: nothing to do"
            )
    global_natural, local_natural = _start(model, batch, seed, init, "resume" if trace else "init")
    # Exponential families: mean parameters have the natural ones' shapes, so the
    # globals stand in for their means in the first call (see _sweep).
    state = (global_natural, global_natural, np.float64(0.0), local_natural)
    # Few local parameters: a sweep costs little next to its compilation (xla.py).
    small = sum(np.size(x) for x in jax.tree.leaves(local_natural)) <= SMALL_LOCALS
    compile_time, first_sweep, converged, warm_redone = 0.0, len(trace), False, 0
    previous = trace[-1] if trace else -np.inf
    last_log = time.perf_counter()

    def save():
        save_checkpoint(
            checkpoint_path,
            state[0],
            len(trace),
            jax.random.PRNGKey(seed),
            model.name,
            local_natural=state[3],
            elbo_trace=trace,
            method="cavi",
            fingerprint=fingerprint,
        )

    bar = progress_bar("cavi", "sweep", int(max_iter), first_sweep, progress)
    with bar:
        for sweep in range(first_sweep, int(max_iter)):
            state, value, seconds, redone = _sweep_redone(
                model, state, batch, sweep == first_sweep, previous, small
            )
            compile_time += seconds
            warm_redone += redone
            trace.append(value)
            _check_sweep(value, previous, len(trace))
            gain = value - previous
            bar.set_postfix_str(f"elbo {value:.8g}", refresh=False)
            bar.update(1)
            if log_every and len(trace) % log_every == 0:
                now = time.perf_counter()
                bar.write(
                    f"  sweep {len(trace)}\t{now - last_log:.5f} s\tELBO {value:.10g}"
                    + (f"\tchange {gain:.5g}" if np.isfinite(gain) else "")
                )
                last_log = now
            if checkpoint_path is not None and len(trace) % checkpoint_every == 0:
                save()
            # The first sweep has no previous ELBO to compare with; tol = atol = 0 runs
            # all max_iter sweeps.
            threshold = max(tol * abs(value), atol)
            if np.isfinite(previous) and threshold > 0 and gain < threshold:
                converged = True
                break
            previous = value
    if checkpoint_path is not None and len(trace) % checkpoint_every != 0:
        save()
    global_natural, _, _, local_natural = state
    steps = len(trace)
    return Result(
        method="cavi",
        algorithm="coordinate-ascent",
        family="conjugate-meanfield",
        params={"global": to_numpy_tree(global_natural), "local": to_numpy_tree(local_natural)},
        elbo_trace=np.asarray(trace),
        elbo=trace[-1],
        elbo_se=0.0,
        converged=converged,
        message=(
            f"relative ELBO gain below tol after {steps} sweeps"
            if converged
            else f"reached max_iter={max_iter} sweeps"
        ),
        num_steps=steps,
        wall_time=time.perf_counter() - start,
        compile_time=compile_time,
        target=None,
        data={},
        info={
            "model": model,
            "compile_time_run": compile_time,
            "warm_redone": warm_redone,
            "first_sweep": first_sweep,
        },
        sampler=make_sampler(model, global_natural),
    )


def _check_arguments(max_iter, tol, atol, log_every, checkpoint_every) -> None:
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not (tol >= 0 and atol >= 0):
        raise ValueError(f"tol and atol must be >= 0, got {tol}, {atol}")
    if log_every < 0:
        raise ValueError(f"log_every must be >= 0, got {log_every}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")


def _start(model: ConjugateModel, batch, seed: int, init, what: str):
    """(globals, locals) to start from: the model's, or ``init``'s (its locals
    ``None``: the model's given its globals), checked against the model."""
    if init is None:
        return _init_jit(model, batch, int(seed))
    check_globals(model, init[0], what)
    if init[1] is None:
        return _init_jit(model, batch, int(seed), init[0])
    rows = np.shape(batch["mask"])[0]
    if any(np.shape(x)[:1] != (rows,) for x in jax.tree.leaves(init[1])):
        raise ValueError(
            f"the starting local parameters must have one row per data point ({rows}), "
            f"got shapes {jax.tree.map(np.shape, init[1])}"
        )
    return init


def _sweep_redone(model, state, batch, first: bool, previous: float, small: bool):
    """One sweep from ``state`` = (globals, their means, the prior's normaliser,
    locals): (the new state, its ELBO, seconds compiling, whether it was redone warm
    because a restarted local fit lowered the ELBO; see the module docstring)."""
    args = (model, *state, batch, np.bool_(first))
    (*new, value), seconds = _sweep_compiled(*args, np.bool_(True), fast_compile=small)
    redone = bool(model.restart_locals and _decreased(float(value), previous))
    if redone:
        # The same program, the locals started from the previous ones.
        (*new, value), _ = _sweep_compiled(*args, np.bool_(False), fast_compile=small)
    return tuple(new), float(value), seconds, redone


def _check_sweep(value: float, previous: float, sweep: int) -> None:
    if not np.isfinite(value):
        raise FloatingPointError(f"CAVI produced a non-finite ELBO at sweep {sweep}")
    if _decreased(value, previous):
        raise ElboDecreaseError(
            f"CAVI sweep {sweep} lowered the ELBO from {previous:.10g} to "
            f"{value:.10g} (by {previous - value:.3g}): coordinate ascent cannot do "
            "that, so the model's expected log joint or its factors are wrong"
        )


def _resumed(model: ConjugateModel, path, fingerprint: str):
    """((globals, locals), ELBO trace) of a CAVI checkpoint of this model and data."""
    saved = resume_checkpoint(path, "cavi", model.name, fingerprint)
    if "local_natural" not in saved:
        raise ValueError(f"{path} holds no local parameters: not a complete CAVI checkpoint")
    trace = list(map(float, saved["elbo_trace"]))
    start = to_device_tree((saved["global_natural"], saved["local_natural"]))
    return start, trace


def _is_prepared(data) -> bool:
    return isinstance(data, dict) and "mask" in data
