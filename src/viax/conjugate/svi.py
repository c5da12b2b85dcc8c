"""Stochastic variational inference (Hoffman, Blei, Wang & Paisley 2013, Algorithm 1).

Per minibatch B of a data set of N points:

1. fit the local factors of B to convergence given the globals λ;
2. form the intermediate global ``λ̂ = η0 + (N/|B|) ∂F_B/∂μ`` — the engine's gradient
   with the local terms scaled by N/|B|;
3. ``λ ← (1 − ρ_t) λ + ρ_t λ̂``, ``ρ_t = (t + τ)^(−κ)``, t = 1, 2, …, κ ∈ (0.5, 1]
   (Robbins–Monro: Σρ = ∞, Σρ² < ∞), τ = ``learning_offset`` ≥ 0.

Batches come from an array or scipy.sparse matrix (rows, reshuffled each epoch by the
seed), or from any iterable of batches (then ``num_data`` is required; nothing but the
current batch is held, so memory does not grow with the corpus).  Each step is one
compiled call.  Checkpoints (``checkpoint_path``, every ``checkpoint_every`` steps) hold
λ, t and the RNG key; ``resume=`` restarts from one, skipping the batches already used,
so a killed and resumed run gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from viax.conjugate.checkpoint import resume_checkpoint, resume_path, save_checkpoint
from viax.conjugate.engine import (
    ConjugateModel,
    all_finite,
    check_conjugate_model,
    check_globals,
    compiled,
    fit_locals,
    global_means,
    global_terms,
    local_terms,
    make_sampler,
    max_extent,
    prepare_all,
    prior_log_normalizer,
    progress_bar,
    to_device,
    to_device_tree,
    to_numpy_tree,
    update_globals,
)
from viax.conjugate.xla import jit
from viax.result import Result

__all__ = ["SviInfo", "SviState", "check_learning_rate", "exact_elbo", "svi", "svi_step"]


class SviState(NamedTuple):
    global_natural: dict
    step: jax.Array  # int: steps done
    rng_key: jax.Array  # fixed; step t's local initialisation uses fold_in(rng_key, t)


class SviInfo(NamedTuple):
    elbo_estimate: jax.Array  # at the globals before the step
    step_size: jax.Array  # ρ_t
    local_sweeps: jax.Array


def check_learning_rate(learning_decay: float, learning_offset: float) -> None:
    if not (0.5 < learning_decay <= 1.0):
        raise ValueError(
            f"learning_decay (κ) must be in (0.5, 1] for the Robbins–Monro conditions, "
            f"got {learning_decay}"
        )
    if not (np.isfinite(learning_offset) and learning_offset >= 0):
        raise ValueError(f"learning_offset (τ) must be >= 0, got {learning_offset}")


def svi_step(
    model: ConjugateModel,
    state: SviState,
    batch,
    num_data,
    offset,
    decay,
    prior_constant=None,
    local_start=None,
):
    """One SVI step on a prepared batch; pure and compiled by :func:`svi`.
    ``prior_constant``: Σ_g A(η0_g) (:func:`prior_log_normalizer`), computed once by
    :func:`svi` rather than in every step (for LDA it is a log-gamma over K × V).
    ``local_start``: the batch's starting local natural parameters (default
    ``model.init_locals``)."""
    gm = global_means(model, state.global_natural)
    key = jax.random.fold_in(state.rng_key, state.step)
    local = model.init_locals(key, batch, gm) if local_start is None else local_start
    local, sweeps = fit_locals(model, gm, local, batch)
    scale = num_data / jnp.sum(batch["mask"])
    target, _, estimate, _ = update_globals(
        model, state.global_natural, gm, local, batch, scale, prior_constant
    )
    rho = (state.step + 1.0 + offset) ** (-decay)
    new = jax.tree.map(lambda old, tgt: (1.0 - rho) * old + rho * tgt, state.global_natural, target)
    return SviState(new, state.step + 1, state.rng_key), SviInfo(estimate, rho, sweeps)


_step_compiled = compiled(svi_step)
# Module-level, the model an argument: a refit reuses the compiled initialisation.
_init_globals = jax.jit(lambda key, model, batch: model.init_globals(key, batch))


def _local_terms_chunk(model, global_natural, batch):
    gm = global_means(model, global_natural)
    local = model.init_locals(None, batch, gm)
    local, _ = fit_locals(model, gm, local, batch)
    return local_terms(model, gm, local, batch), local


_chunk_compiled = compiled(_local_terms_chunk)
_prior_constant = jit(prior_log_normalizer, fast_compile=True)
_global_terms_jit = jit(
    lambda model, g: global_terms(model, g, global_means(model, g)), fast_compile=True
)


def local_chunks(model: ConjugateModel, global_natural, data, chunk_size: int):
    """Fit the locals of ``data`` in chunks of ``chunk_size`` rows (deterministic start);
    yields (local_terms, local_natural, num_rows) per chunk."""
    n = _num_rows(data)
    starts = range(0, n, chunk_size)

    def raw_chunks():
        return (_take_rows(data, np.arange(start, min(n, start + chunk_size))) for start in starts)

    extent = max_extent(model, raw_chunks())
    batches = prepare_all(model, raw_chunks(), chunk_size, extent)
    for start, batch in zip(starts, batches, strict=True):
        (value, local), _ = _chunk_compiled(model, global_natural, batch)
        yield value, local, min(n, start + chunk_size) - start


def exact_elbo(model: ConjugateModel, global_natural, data, chunk_size: int = 1024) -> float:
    """The full-data ELBO at the given globals with every local factor fitted."""
    total = float(_global_terms_jit(model, global_natural))
    for value, _, _ in local_chunks(model, global_natural, data, chunk_size):
        total += float(value)
    return total


def _raise_nonfinite(estimates, step0: int, checkpoint_path, saved_step: int):
    """Raise FloatingPointError naming the first step whose ELBO estimate (or, if all
    are finite, whose global parameters) went non-finite."""
    trace = np.asarray(jax.device_get(estimates), np.float64)
    bad = np.flatnonzero(~np.isfinite(trace))
    where = (
        f"the ELBO estimate became non-finite at step {step0 + int(bad[0]) + 1}"
        if bad.size
        else f"the global parameters became non-finite by step {step0 + len(estimates)}"
    )
    kept = (
        f"; the checkpoint {checkpoint_path} (step {saved_step}) holds the last finite state"
        if checkpoint_path is not None and saved_step > 0
        else ""
    )
    raise FloatingPointError(f"SVI diverged: {where}{kept}")


def _pad_rows(tree, rows: int):
    """Each array of ``tree`` padded with zero rows to ``rows`` rows."""

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])

    return jax.tree.map(pad, tree)


def _is_array_data(data) -> bool:
    if isinstance(data, tuple):
        return all(isinstance(d, np.ndarray) or sp.issparse(d) for d in data)
    return isinstance(data, np.ndarray) or sp.issparse(data) or isinstance(data, jax.Array)


def _num_rows(data) -> int:
    return _num_rows(data[0]) if isinstance(data, tuple) else int(data.shape[0])


def _take_rows(data, idx):
    if isinstance(data, tuple):
        return tuple(_take_rows(d, idx) for d in data)
    return data[idx]


def _array_batches(data, batch_size: int, num_epochs: int, seed: int, shuffle: bool):
    n = _num_rows(data)
    for epoch in range(num_epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            yield _take_rows(data, np.sort(order[start : start + batch_size]))


def svi(
    model: ConjugateModel,
    data,
    *,
    batch_size: int = 256,
    num_epochs: int = 1,
    num_data: int | None = None,
    learning_offset: float = 10.0,
    learning_decay: float = 0.7,
    seed: int = 0,
    shuffle: bool = True,
    init: dict | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: str | Path | bool | None = None,
    callback: Callable[[int, SviInfo], None] | None = None,
    evaluate: bool = True,
    local_start: Callable[[int], dict] | None = None,
    progress: bool = True,
) -> Result:
    """Stochastic VI over minibatches.

    Args:
        model: a conjugate model.
        data: an array / scipy.sparse matrix (or a tuple of them, rows aligned), cut into
            batches of ``batch_size`` rows for ``num_epochs`` passes; or any iterable of
            raw batches (then ``num_data``, the data-set size N, is required).
        learning_offset, learning_decay: τ ≥ 0 and κ ∈ (0.5, 1] of ρ_t = (t + τ)^(−κ)
            (sklearn's names; its defaults 10 and 0.7).
        seed: batch order and local initialisation.
        init: global natural parameters to start from (default: the model's init).
        checkpoint_path, checkpoint_every: write a checkpoint every k steps and at the end.
        resume: a checkpoint path (or True: ``checkpoint_path``) to continue from; the
            data must be given again, the batches already used are skipped.
        callback: ``callback(step, info)`` after each step (info holds device arrays).
        evaluate: for array data, compute the exact full-data ELBO at the end.
        local_start: ``local_start(num_points)`` → the starting local natural parameters
            of the next batch's ``num_points`` real points (host arrays, called once per
            step in order; padding rows are added as zeros); default the model's
            ``init_locals``.  The LDA estimator draws sklearn's random γ start with it.
        progress: a progress bar of the steps with the latest ELBO estimate.

    Returns:
        Result with ``method="svi"``; ``elbo_trace`` is the per-step unbiased estimate
        at the globals before each step; ``elbo`` the exact full-data ELBO when the data
        is an array (``elbo_se`` 0), else the mean of the last 10 estimates
        (``elbo_se`` NaN).
    """
    check_conjugate_model(model, "viax.svi")
    check_learning_rate(learning_decay, learning_offset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    start_time = time.perf_counter()
    array_data = _is_array_data(data)
    if num_data is not None and not num_data >= 1:
        raise ValueError(f"num_data must be >= 1, got {num_data}")
    if array_data:
        num_data = _num_rows(data) if num_data is None else num_data
        if num_data == 0:
            raise ValueError("empty data: no rows")
        batches: Iterable = _array_batches(data, batch_size, num_epochs, seed, shuffle)
        # Every batch padded to the largest one: one compiled shape.
        extent = max_extent(model, _array_batches(data, batch_size, num_epochs, seed, shuffle))
    else:
        if num_data is None:
            raise ValueError("num_data (the data-set size N) is required when data is an iterator")
        batches = iter(data)
        extent = None
    if not num_data >= 1:
        raise ValueError(f"num_data must be >= 1, got {num_data}")

    path = resume_path(resume, checkpoint_path)
    if path is not None:
        saved = resume_checkpoint(path, "svi", model.name)
        global_natural = to_device_tree(saved["global_natural"])
        step0 = saved["step"]
        rng_key = to_device(saved["rng_key"])
        batches = itertools.islice(batches, step0, None)
    else:
        rng_key = jax.random.PRNGKey(seed)
        init_key, rng_key = jax.random.split(rng_key)
        if init is None:
            # The model's initialisation may look at data (k-means for mixtures): give
            # it the first batch, then put that batch back in front.
            try:
                first = next(batches)
            except StopIteration:
                raise ValueError("no batches: the data or the iterator is empty") from None
            batches = itertools.chain([first], batches)
            global_natural = _init_globals(init_key, model, model.prepare(first, pad_to=batch_size))
        else:
            global_natural = to_device_tree(init)
        step0 = 0
    check_globals(model, global_natural, "resume" if step0 else "init")

    state = SviState(global_natural, to_device(step0, np.int32), rng_key)
    offset = to_device(learning_offset, np.float64)
    decay = to_device(learning_decay, np.float64)
    total = to_device(num_data, np.float64)
    prior_constant = _prior_constant(model)
    estimates, compile_time = [], 0.0
    # Steps are dispatched without waiting for them; the host reads an ELBO estimate
    # (for the bar, and to stop a diverged run) at most once a second.
    last_read, saved_step = time.perf_counter(), 0
    total_steps = num_epochs * -(-_num_rows(data) // batch_size) if array_data else None
    bar = progress_bar("svi", "batch", total_steps, step0, progress)
    with bar:
        for batch in prepare_all(model, batches, batch_size, extent):
            start = None
            if local_start is not None:
                mask = np.asarray(batch["mask"])
                start = _pad_rows(local_start(int(mask.sum())), mask.shape[0])
            (state, info), seconds = _step_compiled(
                model, state, batch, total, offset, decay, prior_constant, start
            )
            compile_time += seconds
            estimates.append(info.elbo_estimate)
            step = step0 + len(estimates)
            if callback is not None:
                callback(step, info)
            due = checkpoint_path is not None and step % checkpoint_every == 0
            if due or time.perf_counter() - last_read > 1.0:
                latest = float(info.elbo_estimate)
                if not (np.isfinite(latest) and all_finite(state.global_natural)):
                    _raise_nonfinite(estimates, step0, checkpoint_path, saved_step)
                bar.set_postfix_str(f"elbo ≈ {latest:.6g}", refresh=False)
                last_read = time.perf_counter()
            bar.update(1)
            if due:
                save_checkpoint(checkpoint_path, state.global_natural, step, rng_key, model.name)
                saved_step = step
    num_steps = step0 + len(estimates)
    if not estimates and step0 == 0:
        raise ValueError("no batches: the data or the iterator is empty")
    trace = np.asarray(jax.device_get(estimates), np.float64) if estimates else np.zeros(0)
    if not (np.all(np.isfinite(trace)) and all_finite(state.global_natural)):
        _raise_nonfinite(estimates, step0, checkpoint_path, saved_step)
    if checkpoint_path is not None and num_steps % checkpoint_every != 0:
        save_checkpoint(checkpoint_path, state.global_natural, num_steps, rng_key, model.name)
    global_natural = state.global_natural
    if array_data and evaluate:
        value, se, exact = exact_elbo(model, global_natural, data, max(batch_size, 1024)), 0.0, True
    else:
        value, se, exact = (
            (float(np.mean(trace[-10:])) if trace.size else float("nan")),
            float("nan"),
            False,
        )
    return Result(
        method="svi",
        algorithm="stochastic-natural-gradient",
        family="conjugate-meanfield",
        params={"global": to_numpy_tree(global_natural)},
        elbo_trace=trace,
        elbo=value,
        elbo_se=se,
        converged=False,
        message=(
            f"{num_steps} steps ({len(estimates)} in this call) of a fixed step-size "
            "schedule; SVI has no convergence test"
        ),
        num_steps=num_steps,
        wall_time=time.perf_counter() - start_time,
        compile_time=compile_time,
        target=None,
        data={},
        info={
            "model": model,
            "elbo_exact": exact,
            "num_data": num_data,
            "learning_offset": learning_offset,
            "learning_decay": learning_decay,
            "first_step": step0,
        },
        sampler=make_sampler(model, global_natural),
    )
