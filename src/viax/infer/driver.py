"""One driver for every algorithm: compiled ``lax.scan`` chunks, checks in between.

An algorithm is a pair of pure functions ``init(...) -> State`` and
``step(state, rng_key, data) -> (State, Info)``.  Every State carries a ``guard``
(:class:`Guard`): a step whose objective or gradient is not finite is *not*
applied, and the guard records where it happened.  Between chunks the driver
updates the progress bar, asks the algorithm's ``check`` whether to stop, and on a
non-finite step rolls back to the state at the start of the chunk with a step size
ten times smaller; after ``max_backoffs`` such retries it raises
:class:`DivergenceError` naming the step and the sites.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "DivergenceError",
    "Guard",
    "RunOutput",
    "guard_init",
    "guarded_update",
    "abstract",
    "batched_chunk_fn",
    "chunk_fn",
    "jit_once",
    "precompile",
    "run",
]

# For code that runs once or a few times per fit, XLA's backend optimisation costs more
# than it saves: level 0 halves the compile time of a model-sized program.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit`` tuned for compile time: setup, finalisation, sampling."""
    return jax.jit(fn, compiler_options=_FAST_COMPILE, **jit_kwargs)


def precompile(*jobs: tuple[Callable, tuple], sequential: bool = False) -> threading.Thread:
    """Compile each ``(jitted, args)`` of ``jobs`` (args: arrays or
    ``jax.ShapeDtypeStruct``s; static arguments as values) in the background; return
    the thread to join before the first call.  ``sequential``: the jobs compiled
    one after another in the one thread (programs needed later, kept off the cores
    that the caller and the first programs use).

    XLA compiles with the GIL released, so these compiles overlap with the caller's own;
    the later calls find the programs in JAX's cache.  Tracing runs the model through
    NumPyro's effect handlers, whose stack is a process-wide global, so the jobs are
    traced one after another in this one thread (the caller must not trace a model
    meanwhile); only their compiles run side by side.  A failure is dropped: the call
    compiles afresh and reports it."""

    def compile_quietly(lowered):
        try:
            lowered.compile()
        except Exception:  # noqa: BLE001  the foreground call raises it properly
            pass

    def work():
        lowered = []
        for jitted, args in jobs:
            try:
                lowered.append(jitted.lower(*args))
            except Exception:  # noqa: BLE001
                pass
        if sequential:
            for low in lowered:
                compile_quietly(low)
            return
        others = [threading.Thread(target=compile_quietly, args=(low,)) for low in lowered[1:]]
        for thread in others:
            thread.start()
        if lowered:
            compile_quietly(lowered[0])
        for thread in others:
            thread.join()

    thread = threading.Thread(target=work, name="viax-precompile", daemon=True)
    thread.start()
    return thread


def abstract(tree):
    """``jax.ShapeDtypeStruct`` leaves for a pytree of arrays or of lowering out_info."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class DivergenceError(RuntimeError):
    """The objective or its gradient stayed non-finite after backing off the step size."""

    def __init__(self, message: str, step: int | None = None, sites: tuple[str, ...] = ()):
        super().__init__(message)
        self.step = step
        self.sites = sites


class Guard(NamedTuple):
    step: jax.Array  # int: steps taken (accepted or not)
    step_scale: jax.Array  # multiplies every update; the driver divides it by 10 on backoff
    num_nonfinite: jax.Array  # int: steps whose objective or gradient was not finite
    first_nonfinite_step: jax.Array  # int, -1 when none
    nonfinite_mask: jax.Array  # bool (dim,): coordinates whose gradient was not finite


def guard_init(dim: int, step_scale: float = 1.0) -> Guard:
    # Explicit dtypes: a weakly typed carry would make the second chunk recompile.
    return Guard(
        step=jnp.asarray(0, jnp.int32),
        step_scale=jnp.asarray(step_scale, jnp.float64),
        num_nonfinite=jnp.asarray(0, jnp.int32),
        first_nonfinite_step=jnp.asarray(-1, jnp.int32),
        nonfinite_mask=jnp.zeros(dim, dtype=bool),
    )


def guarded_update(guard: Guard, value, flat_grad, apply_fn: Callable, old):
    """``apply_fn(old)`` where the step is finite, else ``old``: (chosen, guard, finite).

    ``value`` is the step's objective and ``flat_grad`` its gradient (one entry per
    coordinate or site).  The update runs under ``lax.cond``, so a finite step pays
    only for the update: a ``where`` over the whole state cost more than the full-rank
    family's gradient."""
    grad_finite = jnp.isfinite(flat_grad)
    finite = jnp.isfinite(value) & jnp.all(grad_finite)
    chosen = jax.lax.cond(finite, apply_fn, lambda o: o, old)
    guard = guard._replace(
        step=guard.step + 1,
        num_nonfinite=guard.num_nonfinite + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where(
            (guard.first_nonfinite_step < 0) & ~finite, guard.step + 1, guard.first_nonfinite_step
        ),
        nonfinite_mask=guard.nonfinite_mask | ~grad_finite,
    )
    return chosen, guard, finite


class RunOutput(NamedTuple):
    state: Any
    trace: np.ndarray  # objective per step, (num_steps,)
    num_steps: int
    converged: bool
    message: str
    wall_time: float
    compile_time: float
    num_backoffs: int
    seconds_per_step: float  # steady cost: median over chunks after the first, loop included


_CHUNK_FNS: dict[tuple[Callable, bool], Callable] = {}


def chunk_fn(step_fn: Callable, fast_compile: bool = False) -> Callable:
    """``jit(scan(step))`` cached per step function, so refits reuse compiled code.

    ``fast_compile`` trades run time for compile time: right for an algorithm that
    converges in tens of steps (the deterministic default), wrong for the thousands of
    steps of a stochastic one, whose per-step cost is three times higher at XLA's
    optimisation level 0."""
    key = (step_fn, fast_compile)
    fn = _CHUNK_FNS.get(key)
    if fn is None:

        def run_chunk(state, rng_key, chunk_index, num_steps, data):
            # Keys are derived inside the program: eager jax.random calls would each
            # compile a program of their own.
            keys = jax.random.split(jax.random.fold_in(rng_key, chunk_index), num_steps)
            return jax.lax.scan(lambda s, k: step_fn(s, k, data), state, keys)

        fn = _CHUNK_FNS[key] = (jit_once if fast_compile else jax.jit)(run_chunk, static_argnums=3)
    return fn


def batched_chunk_fn(step_fn: Callable) -> Callable:
    """``jit(scan(step))`` over a chunk of K pre-stacked batches, for a minibatch
    algorithm whose ``step(state, rng_key, data, batch)`` takes one batch: ``chunk`` is a
    pytree with leading axis K (the scan axis), ``data`` is passed whole to every step.
    Cached per step function like :func:`chunk_fn`.  The state is donated: its buffers
    (per-row parameters at full size) are updated in place, never copied per chunk."""
    key = (step_fn, "batched")
    fn = _CHUNK_FNS.get(key)
    if fn is None:

        def run_chunk(state, rng_key, chunk_index, data, chunk):
            num_steps = jax.tree_util.tree_leaves(chunk)[0].shape[0]
            keys = jax.random.split(jax.random.fold_in(rng_key, chunk_index), num_steps)
            return jax.lax.scan(lambda s, xs: step_fn(s, xs[0], data, xs[1]), state, (keys, chunk))

        fn = _CHUNK_FNS[key] = jax.jit(run_chunk, donate_argnums=0)
    return fn


def run(
    step_fn: Callable,
    state: Any,
    data: dict,
    rng_key: jax.Array,
    num_steps: int,
    chunk_size: int,
    check_fn: Callable[[Any, Any, int], tuple[bool, str] | None] | None = None,
    site_of_index: Callable[[int], str] | None = None,
    progress: bool = True,
    description: str = "viax",
    max_backoffs: int = 5,
    objective_name: str = "elbo",
    fast_compile: bool = False,
    batches: Iterator | None = None,
    postfix_fn: Callable[[Any, Any, int], str] | None = None,
    chunk_data_fn: Callable[[Any, int], dict] | None = None,
) -> RunOutput:
    """Run ``step_fn`` for up to ``num_steps`` steps in chunks of ``chunk_size``.

    ``check_fn(state, chunk_info, steps_done)`` is called after each chunk with the
    stacked Info of its steps; it returns ``None`` to go on, or ``(converged, message)``
    to stop: converged, or stuck with no hope of progress.

    Minibatch algorithms pass ``batches``: an iterator of chunks of K stacked batches
    (e.g. :func:`viax.data.prefetch` with ``stack=K``, which fills the next chunk while
    this one runs); each chunk is one compiled scan of K steps of
    ``step_fn(state, rng_key, data, batch)`` (``chunk_size`` is then unused), and the run
    also ends when the iterator does.  ``postfix_fn(state, chunk_info, steps_done)``
    gives the progress bar's text after each chunk.  ``chunk_data_fn(state, K)``, with
    ``batches``: arrays added to ``data`` for the chunk about to run from ``state`` (e.g.
    noise drawn on the host for its K steps); the same shapes for every full chunk, so
    the compiled chunk is reused.
    """
    run_chunk = chunk_fn(step_fn, fast_compile) if batches is None else batched_chunk_fn(step_fn)
    pending = None  # the next chunk of batches
    num_nonfinite = int(state.guard.num_nonfinite)
    chunk_size = max(1, min(chunk_size, num_steps))
    traces, steps_done, backoffs, chunk_index = [], 0, 0, 0
    converged, message = False, f"reached the maximum of {num_steps} steps"
    durations: list[float] = []  # seconds per step of each chunk, bar and check included
    start = time.perf_counter()
    with tqdm(total=num_steps, desc=description, disable=not progress, leave=False) as bar:
        while steps_done < num_steps:
            t0 = time.perf_counter()
            if batches is None:
                n = min(chunk_size, num_steps - steps_done)
                new_state, info = run_chunk(state, rng_key, np.int32(chunk_index), n, data)
            else:
                pending = next(batches, None) if pending is None else pending
                if pending is None:
                    message = f"reached the end of the data after {steps_done} steps"
                    break
                n = jax.tree_util.tree_leaves(pending)[0].shape[0]
                chunk_data = data if chunk_data_fn is None else {**data, **chunk_data_fn(state, n)}
                new_state, info = run_chunk(
                    state, rng_key, np.int32(chunk_index), chunk_data, pending
                )
            chunk_index += 1
            objective = np.asarray(info.objective)
            if batches is not None and int(new_state.guard.num_nonfinite) > num_nonfinite:
                # The donated state is gone, and the guard did not apply the non-finite
                # steps: carry on from the chunk's end with a smaller step.
                backoffs += 1
                if backoffs > max_backoffs:
                    _raise_divergence(new_state.guard, site_of_index, objective_name)
                num_nonfinite = int(new_state.guard.num_nonfinite)
                new_state = new_state._replace(
                    guard=new_state.guard._replace(step_scale=new_state.guard.step_scale * 0.1)
                )
                bar.set_postfix_str(f"non-finite {objective_name}: step size / 10")
            elif batches is None and int(new_state.guard.num_nonfinite) > int(
                state.guard.num_nonfinite
            ):
                backoffs += 1
                if backoffs > max_backoffs:
                    _raise_divergence(new_state.guard, site_of_index, objective_name)
                # Retry the chunk from its last finite state with a smaller step.
                state = state._replace(
                    guard=state.guard._replace(step_scale=state.guard.step_scale * 0.1)
                )
                bar.set_postfix_str(f"non-finite {objective_name}: step size / 10")
                continue
            state, pending = new_state, None
            traces.append(objective)
            steps_done += n
            bar.update(n)
            if postfix_fn is not None:
                bar.set_postfix_str(postfix_fn(state, info, steps_done))
            else:
                bar.set_postfix_str(f"{objective_name} {objective[-1]:.4g}")
            verdict = check_fn(state, info, steps_done) if check_fn is not None else None
            durations.append((time.perf_counter() - t0) / n)
            if verdict is not None:
                converged, message = verdict
                break
    wall_time = time.perf_counter() - start
    # The first chunk pays for compilation; later chunks give the steady cost per step.
    steady = float(np.median(durations[1:])) if len(durations) > 1 else 0.0
    compile_time = max(0.0, (durations[0] - steady) * chunk_size) if durations else 0.0
    trace = np.concatenate(traces) if traces else np.zeros(0)
    return RunOutput(
        state, trace, steps_done, converged, message, wall_time, compile_time, backoffs, steady
    )


def _raise_divergence(guard: Guard, site_of_index, objective_name):
    step = int(guard.first_nonfinite_step)
    mask = np.asarray(guard.nonfinite_mask)
    sites: tuple[str, ...] = ()
    if site_of_index is not None and mask.any():
        sites = tuple(dict.fromkeys(site_of_index(int(i)) for i in np.flatnonzero(mask)))
    where = f"; non-finite gradient in site(s): {', '.join(sites)}" if sites else ""
    raise DivergenceError(
        f"the {objective_name} or its gradient became non-finite at step {step} and stayed "
        f"so after backing off the step size{where}",
        step=step,
        sites=sites,
    )
