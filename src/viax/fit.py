"""``viax.fit``: one call from a model and data to a :class:`~viax.result.Result`."""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from viax.diagnostics import KHAT_USABLE, psis
from viax.families.gaussian import FAMILIES, Family, FullRank, MeanField, make_family
from viax.infer import advi, dadvi
from viax.infer.chunked import (
    dense_curvature_plan,
    dense_memory_fits,
    full_batch_estimate,
    hessian_structure,
    plan_chunks,
)
from viax.infer.driver import DivergenceError, abstract, chunk_fn, precompile, run
from viax.infer.optimize import minimize_on_host, newton_on_host
from viax.infer.stopping import (
    MCSEStop,
    fisher_scale,
    parse_stop_rule,
    run_with_stopping,
    stop_info,
)
from viax.model import Model, ModelError, Target, _log_density_jit, build_target, data_argument
from viax.result import Result, log_weights_fn, mean_and_se

__all__ = ["METHODS", "OPTIMIZERS", "fit", "refit_dadvi_means"]

METHODS = ("advi", "bbvi")
OPTIMIZERS = ("dadvi", "stan")
_NUM_ELBO_DRAWS = 1000
_DADVI_CHUNK = 10  # L-BFGS steps per compiled chunk
_MAP_STEPS = 1000
# Up to this dimension a MAP search that L-BFGS does not finish in this many steps is
# finished by Newton steps with the dense Hessian (D Hessian-vector products each,
# cheap next to the compile); the Newton decrement tolerance is 1e-5 posterior sd.
_NEWTON_MAX_DIM = 500
_LBFGS_STEPS_BEFORE_NEWTON = 200
_NEWTON_STEPS = 50
_NEWTON_TOL = 1e-10
# Default DADVI draws: as many as fit a budget of about 2^27 flop-equivalents per
# objective evaluation (one model evaluation costs its XLA flops plus 20 per
# transcendental, plus the family's transform; ~10 ms on one core), between 64 and
# 1024.  The fixed draws' error in the means shrinks as 1/sqrt(M): on eight schools
# (mean-field) the worst mean error spreads 0.14-0.26 sd over seeds with 64 draws and
# 0.19-0.22 with 1024, which costs a cheap model nothing; on the 569 x 31 logistic
# regression it spread 0.18-0.23 with 448 draws and 0.19-0.21 with 1024 (0.5 s).
_DRAW_BUDGET = 2.0**27
_MIN_DRAWS, _MAX_DRAWS = 64, 1024


def _check_positive_int(name, value, minimum=1):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _refuse_subsampling(model, data, why: str) -> None:
    """Refuse, before compiling, a model that subsamples a plate on a path that cannot
    (NumPyro's own error would speak of HMC/NUTS)."""
    from viax.batched import _subsampled_plates
    from viax.infer.minibatch import _abstract_model_trace

    if not callable(model) or isinstance(model, Model) or not isinstance(data, Mapping | None):
        return
    trace = _abstract_model_trace(model, data)
    plates = _subsampled_plates(trace) if trace is not None else {}
    if plates:
        name, (size, batch) = next(iter(plates.items()))
        raise ModelError(
            f"plate {name!r} subsamples {batch} of its {size} rows "
            f"(numpyro.plate(..., subsample_size={batch})), but {why}: use method='advi' "
            "with the minibatch path (the default for such a model), or drop subsample_size"
        )


def fit(
    model: Callable | Model,
    data: Mapping[str, Any] | None = None,
    *,
    method: str = "advi",
    family: str = "meanfield",
    rank: int | None = None,
    optimizer: str | optax.GradientTransformation | None = None,
    num_steps: int | None = None,
    num_particles: int | None = None,
    num_draws: int | None = None,
    tol_rel_obj: float = 0.01,
    eval_elbo: int = 100,
    eta: float | None = None,
    stick_the_landing: bool = False,
    seed: int = 0,
    progress: bool = True,
    estimator: str = "auto",
    rao_blackwell: bool = True,
    control_variate: bool | str = True,
    stop_rule: str | MCSEStop = "mcse",
    encoder: Any = None,
    objective: Any = None,
    batch_size: int | None = None,
    num_epochs: int | None = None,
    path: str = "auto",
    devices: Any = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
) -> Result:
    """Fit a Gaussian variational approximation to the posterior of ``model``.

    A model with ``numpyro.param`` sites (θ), or a fit given ``encoder`` or
    ``objective``, is fitted by :func:`viax.infer.learn.fit_learn`: θ learned jointly with q
    (``result.model_params``), full batch by L-BFGS on fixed draws unless
    ``batch_size``/``num_epochs``/an optax optimizer asks for minibatches.

    Args:
        model: a NumPyro model function, called as ``model(**data)``, or a
            :class:`viax.Model` wrapping a plain log joint.
        data: keyword arguments of the model (arrays, lists or scalars).
        method: ``"advi"``, or ``"bbvi"`` (black-box VI: mean-field q with discrete
            factors for discrete latents, score-function gradients; see
            :func:`viax.infer.bbvi.fit_bbvi`; optimizer ``None`` (Adam at rate 0.1, or
            ``eta``; AdaGrad with ``stop_rule="stan"``), "adagrad", "stan" or optax;
            num_particles default 16).
        family: ``"meanfield"``, ``"fullrank"`` or ``"lowrank"`` (with ``rank``).
        optimizer: ``None``/``"dadvi"`` (default, robust): MAP + Laplace
            preconditioning + deterministic ADVI by L-BFGS on ``num_draws`` fixed,
            moment-matched base draws.  ``"stan"``: Stan's stochastic ADVI (adaptive
            step-size sequence, η search), stopped by ``stop_rule``.  An optax
            ``GradientTransformation``: stochastic ADVI with it, at most ``num_steps``
            steps, stopped by ``stop_rule``.
        num_steps: maximum steps (L-BFGS iterations for dadvi; default 1000 for
            dadvi, 10000 for the stochastic optimisers).
        num_particles: draws per stochastic gradient (default 1, as Stan).
        num_draws: fixed base draws for dadvi.  Default: as many as a compute budget
            of about 2^27 flops per objective evaluation allows (from XLA's cost
            analysis of the model), between max(64, D + 2) and 1024.
        tol_rel_obj, eval_elbo: Stan's convergence rule (stochastic optimisers).
        eta: Stan step size; ``None`` searches {100, 10, 1, 0.1, 0.01}.
        stick_the_landing: drop the score term of log q (stochastic optimisers).
        seed: integer seed; the same seed gives the same numbers.
        progress: show a progress bar with the running ELBO.
        estimator: bbvi only: ``"auto"`` (reparameterisation for continuous sites, score
            function for discrete ones), ``"score"`` or ``"reparam"``.
        rao_blackwell: bbvi only: each factor's score-function cost keeps only its
            Markov blanket.
        control_variate: bbvi only: ``True`` (leave-one-out a_i), ``"ema"`` (baseline)
            or ``False``.
        stop_rule: stochastic optimisers and bbvi: ``"mcse"`` (default: stationarity by
            R̂, then the averaged iterate until its Monte Carlo error is under 0.1
            posterior scales, with step-size halving; Dhaka et al. 2020, Welandawe et al.
            2022; :mod:`viax.infer.stopping`, docs/guide/stopping.md), an
            ``MCSEStop(...)`` with other settings, or ``"stan"`` (relative ELBO change
            under ``tol_rel_obj``; an optax optimizer then runs its whole budget).
            ``info["stop_rule"]``, ``info["stop_reason"]``, ``info["mcse"]`` and
            ``info["mcse_max_relative"]`` report the outcome.  Minibatch learning with an
            encoder: ``viax.EarlyStopping(...)`` (held-out rows; docs/guide/learning.md).
        encoder: amortize the local latents of the data plate: ``viax.MLPEncoder(...)``
            (or ``viax.ModuleEncoder``); see docs/guide/learning.md.
        objective: ``viax.ELBO(...)`` or ``viax.IWAE(num_samples=K)`` (DReG gradients).
        batch_size, num_epochs: minibatch training (Adam, or an optax ``optimizer``).
        path: ``"auto"`` (default), ``"full-batch"`` or ``"minibatch"``.  Without θ,
            encoder or objective, minibatch VI (:func:`viax.infer.minibatch.fit_minibatch`:
            whitened, variance-reduced, averaged, stopped by the MCSE) runs when asked,
            when ``batch_size`` is given, when ``data`` is a :mod:`viax.data` source
            (e.g. ``viax.data.parquet``), when the model subsamples a plate, or when a
            full-batch fit would exceed its time budget (10 minutes, estimated; its
            memory is bounded: large data are summed in row blocks,
            :mod:`viax.infer.chunked`); ``info["path"]`` and ``info["path_reason"]`` say
            which and why, as does the progress bar.  See docs/guide/scale.md.
        devices, checkpoint_path, resume: minibatch path: the devices of its "data"
            mesh (default all), an atomic checkpoint file, and resuming from it.
            Minibatch learning takes them too (every device of every process by
            default, a count in a single process, or a list; docs/guide/learning.md).

    Returns:
        A :class:`~viax.result.Result`.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
        ...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> result = fit(model, {"y": [0.1, -0.3, 0.5]}, progress=False)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    data = data_argument(data)
    for name, count in (("num_draws", num_draws), ("num_particles", num_particles)):
        _check_memory(name, count, 3, {})  # a lower bound (one latent, no data), before tracing
    from viax.infer.learn import EarlyStopping

    early_stopping = isinstance(stop_rule, EarlyStopping)  # learning only (viax.infer.learn)
    if not early_stopping:
        parse_stop_rule(stop_rule)
    if method == "bbvi":
        _refuse_subsampling(model, data, "method='bbvi' evaluates every row each step")
    elif path == "full-batch":
        _refuse_subsampling(model, data, "path='full-batch' evaluates every row each step")
    # A streamed source whose model has numpyro.param sites learns θ (viax.infer.learn).
    streamed = data is not None and not isinstance(data, Mapping)
    learns_stream = streamed and method == "advi" and _source_has_params(model, data)
    if (
        method == "advi"
        and encoder is None
        and objective is None
        and not early_stopping
        and not learns_stream
    ):
        from viax.infer.minibatch import fit_minibatch, minibatch_route

        reason = minibatch_route(model, data, batch_size, num_epochs, path)
        if reason is not None:
            result = fit_minibatch(
                model,
                data,
                family=family,
                rank=rank,
                batch_size=batch_size,
                num_epochs=num_epochs,
                num_steps=_check_positive_int("num_steps", num_steps),
                stop_rule=None if stop_rule == "mcse" else stop_rule,
                devices=devices,
                checkpoint_path=checkpoint_path,
                resume=resume,
                seed=_check_positive_int("seed", seed, minimum=0),
                progress=progress,
                path_reason=reason,
            )
            return _checked(result)
    learning = {"encoder": encoder, "objective": objective, "batch_size": batch_size}
    learning["num_epochs"] = num_epochs
    learning["stop_rule"] = stop_rule if early_stopping else None
    if method == "bbvi" and any(v is not None for v in learning.values()):
        given = ", ".join(k for k, v in learning.items() if v is not None)
        raise ValueError(f"{given}: only method='advi' learns models (viax.infer.learn)")
    if method == "bbvi":
        from viax.infer.bbvi import fit_bbvi

        result = fit_bbvi(
            model,
            data,
            family=family,
            optimizer=None if optimizer == "dadvi" else optimizer,
            num_steps=_check_positive_int("num_steps", num_steps),
            num_particles=num_particles,
            tol_rel_obj=_check_positive_float("tol_rel_obj", tol_rel_obj),
            eval_elbo=_check_positive_int("eval_elbo", eval_elbo),
            eta=None if eta is None else _check_positive_float("eta", eta),
            estimator=estimator,
            rao_blackwell=rao_blackwell,
            control_variate=control_variate,
            seed=_check_positive_int("seed", seed, minimum=0),
            progress=progress,
            stop_rule=stop_rule,
        )
        return _checked(result)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    if optimizer is None:
        optimizer = "dadvi"
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)} "
            "or an optax.GradientTransformation"
        )
    if not isinstance(optimizer, str | optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be a name or an optax GradientTransformation, got {optimizer!r}"
        )
    num_steps = _check_positive_int("num_steps", num_steps)
    num_particles = _check_positive_int("num_particles", num_particles)
    num_draws = _check_positive_int("num_draws", num_draws, minimum=2)
    rank = _check_positive_int("rank", rank)
    eval_elbo = _check_positive_int("eval_elbo", eval_elbo)
    tol_rel_obj = _check_positive_float("tol_rel_obj", tol_rel_obj)
    if eta is not None:
        eta = _check_positive_float("eta", eta)
    seed = _check_positive_int("seed", seed, minimum=0)

    if early_stopping and (checkpoint_path is not None or resume):
        from viax.infer.learn import EARLY_STOPPING_CHECKPOINTS

        raise ValueError(EARLY_STOPPING_CHECKPOINTS)  # before the target compiles anything
    from viax.infer.minibatch import PATHS, minibatch_route

    if streamed:
        minibatch_route(model, data, batch_size, num_epochs, path)  # refuses "full-batch"
    elif path not in PATHS:
        raise ValueError(f"unknown path {path!r}; use one of {', '.join(PATHS)}")
    asks_minibatch = batch_size is not None or num_epochs is not None
    asks_minibatch = asks_minibatch or isinstance(optimizer, optax.GradientTransformation)
    if path == "full-batch" and asks_minibatch and _learns(model, data, learning):
        raise ValueError(
            "path='full-batch' learns by L-BFGS on the whole data, but batch_size, "
            "num_epochs or an optax optimizer ask for minibatches: drop one"
        )
    full_batch = not asks_minibatch and path != "minibatch"
    if (checkpoint_path is not None or resume) and not streamed and full_batch:
        if _learns(model, data, learning):  # refused before the target compiles anything
            raise ValueError(
                "checkpoint_path/resume: full-batch learning (L-BFGS on fixed draws) writes "
                "no checkpoints; pass batch_size=... to learn by minibatches, which does"
            )
    # A source (learning, as routed above) is read in batches: no full-data target here.
    target, arrays, init_position = None, None, None
    if not streamed:
        target, arrays, init_position = build_target(model, data, seed=seed)
    if streamed or target.param_sites or any(v is not None for v in learning.values()):
        from viax.infer.learn import fit_learn

        if optimizer == "stan":
            raise ValueError(
                "optimizer='stan' does not learn model parameters; use the default (L-BFGS on "
                "fixed draws) or an optax optimizer with batch_size="
            )

        result = fit_learn(
            model,
            data,
            **learning,
            family=family,
            rank=rank,
            num_steps=num_steps,
            num_draws=num_draws,
            optimizer=None if isinstance(optimizer, str) else optimizer,
            seed=seed,
            progress=progress,
            devices=devices,
            checkpoint_path=checkpoint_path,
            resume=resume,
            path=path,
        )
        return _checked(result)
    if target.discrete_sites:
        raise ModelError(
            f"site(s) {', '.join(target.discrete_sites)} are discrete; ADVI needs continuous "
            "latents (marginalise them out, e.g. with numpyro's enumeration)"
        )
    fam = make_family(family, target.dim, rank)
    for name, count in (("num_draws", num_draws), ("num_particles", num_particles)):
        _check_memory(name, count, fam.noise_dim + 2 * target.dim, arrays)
    rng_key = jax.random.PRNGKey(seed)
    if optimizer == "dadvi":
        why = "asked for" if path == "full-batch" else "within the time budget"
        output = _fit_dadvi(
            target,
            fam,
            arrays,
            init_position,
            rng_key,
            num_steps or 1000,
            num_draws,
            progress,
            path_why=why,
        )
    else:
        output = _fit_stochastic(
            target,
            fam,
            arrays,
            init_position,
            rng_key,
            optimizer,
            num_steps,
            num_particles or 1,
            tol_rel_obj,
            eval_elbo,
            eta,
            stick_the_landing,
            progress,
            stop_rule=stop_rule,
        )
    params, run_output, algorithm, info = output
    info["seconds_per_step"] = run_output.seconds_per_step
    info["path"] = "full-batch"
    info["path_reason"] = (
        "asked for (path='full-batch')" if path == "full-batch" else full_batch_estimate(data)[1]
    )
    if "elbo_terms" in info:
        log_weights = info.pop("elbo_terms")
        draw_log_weights = info.pop("draw_log_weights")
    else:
        sampler = log_weights_fn(target, fam, _NUM_ELBO_DRAWS)

        def draw_log_weights(key):
            return sampler(params, key, arrays)[1]

        log_weights = draw_log_weights(jax.random.PRNGKey(seed + 1))
    # The draws of the final ELBO estimate double as importance draws for k̂.
    log_weights = np.asarray(log_weights)
    khat = psis(log_weights)[1] if not np.isnan(log_weights).any() else float("nan")
    if khat >= KHAT_USABLE:
        # From 1000 draws k̂ is noisy and biased upwards (a q whose k̂ is 0.25 from 20,000
        # draws scores up to 0.76 from 1000): confirm on ten times as many before warning.
        log_weights = _more_log_weights(draw_log_weights, seed, log_weights, khat, info)
        khat = psis(log_weights)[1] if not np.isnan(log_weights).any() else float("nan")
    info["num_khat_draws"] = log_weights.size
    elbo, elbo_se = mean_and_se(log_weights)
    if not np.isfinite(elbo):
        info["nonfinite_elbo"] = True
    result = Result(
        method=method,
        algorithm=algorithm,
        family=fam,
        params=params,
        elbo_trace=run_output.trace,
        elbo=elbo,
        elbo_se=elbo_se,
        converged=run_output.converged,
        message=run_output.message,
        num_steps=run_output.num_steps,
        wall_time=run_output.wall_time + info.pop("setup_time", 0.0),
        compile_time=run_output.compile_time,
        target=target,
        data=arrays,
        info=info,
        khat=khat,
    )
    return _checked(result)


_CONFIRM_SECONDS = 10.0  # a batch slower than this confirms a k̂ >= 1 on one batch only


def _more_log_weights(draw_log_weights, seed, log_weights, khat, info, batches: int = 9):
    """``log_weights`` (S,) and ``batches`` more batches from ``draw_log_weights(key)``,
    the program that drew the first (no new compile, no eager key arithmetic).

    The upward bias of S = 1000 draws lifts a usable k̂ to about 0.8 at most, so a k̂ of 1
    or more needs no ten-fold confirmation where a batch is slow (on a million rows one
    batch takes a minute or more, and nine of them were most of the call): one more
    batch, and ``info["khat_draws_reason"]`` says so."""
    more = []
    for i in range(batches):
        key = np.random.default_rng([seed, i]).integers(0, 2**32, 2, dtype=np.uint32)
        started = time.perf_counter()
        more.append(np.asarray(draw_log_weights(key)))
        seconds = time.perf_counter() - started
        if i == 0 and khat >= 1.0 and seconds > _CONFIRM_SECONDS:
            info["khat_draws_reason"] = (
                f"k-hat {khat:.2f} from {log_weights.size} draws confirmed on "
                f"{2 * log_weights.size}, not {(batches + 1) * log_weights.size}: one batch "
                f"of draws took {seconds:.0f} s"
            )
            break
    return np.concatenate([log_weights, *more])


# Beyond this, a mean or sd of q in the unconstrained space has run off (float64 ends at
# 1.8e308; no posterior of real data sits at 1e100).
_RUNAWAY = 1e100


def _source_has_params(model, data) -> bool:
    """Whether a :mod:`viax.data` source's model has ``numpyro.param`` sites, from an
    abstract trace on two rows of the source's column shapes (nothing read or
    compiled)."""
    if not callable(model) or isinstance(model, Model):
        return False
    from viax import data as vdata
    from viax.infer.minibatch import _abstract_model_trace

    source = vdata.as_source(data)
    rows = {
        name: np.zeros((2, *shape), dtype)
        for name, (shape, dtype) in source.columns.items()
        if not name.startswith("_")
    }
    trace = _abstract_model_trace(model, {**dict(source.static), **rows})
    return trace is not None and any(site["type"] == "param" for site in trace.values())


def _learns(model, data, learning: dict) -> bool:
    """Whether the call goes to :mod:`viax.infer.learn` (an encoder, an objective, an
    early-stopping rule, or ``numpyro.param`` sites in an abstract trace: nothing compiled)."""
    if any(learning[k] is not None for k in ("encoder", "objective", "stop_rule")):
        return True
    from viax.infer.minibatch import _abstract_model_trace

    trace = _abstract_model_trace(model, data) if callable(model) else None
    return trace is not None and any(site["type"] == "param" for site in trace.values())


def _checked(result: Result) -> Result:
    """Every path's result, a runaway or non-finite fit flagged as not converged, with
    the warnings an untrusted fit gets (they point at the caller of :func:`fit`)."""
    result = _flag_runaway(result)
    _warn_untrusted(result)
    return result


def _flag_runaway(result: Result) -> Result:
    """``result``, not converged, when its answer is not finite or its q ran off: a
    non-finite ELBO, or a site whose mean or sd (unconstrained) is not finite or beyond
    1e100 — an improper posterior (flat priors, too little data) does that, and no stopping
    rule makes it an answer."""
    causes = []
    try:
        mean = np.asarray(result.family.mean(result.params), dtype=float)
        sd = np.asarray(result.family.stddev(result.params), dtype=float)
        if mean.shape != sd.shape:
            raise ValueError("not one Gaussian over the latents")
    except Exception:  # noqa: BLE001  a family without moments: its parameters then
        leaves = [np.ravel(np.asarray(x, dtype=float)) for x in jax.tree.leaves(result.params)]
        mean = np.concatenate(leaves or [np.zeros(1)])
        sd = np.zeros_like(mean)
    off = ~(np.isfinite(mean) & np.isfinite(sd) & (np.abs(mean) < _RUNAWAY) & (sd < _RUNAWAY))
    if off.any():
        sites = {}
        for i in np.flatnonzero(off):
            try:
                name = result.target.site_of_index(int(i))
            except Exception:  # noqa: BLE001  no site for it (a family's own parameters)
                name = "params"
            sites.setdefault(name, f"{name} (mean {mean[i]:.3g}, sd {sd[i]:.3g})")
        causes.append(
            f"q ran off to infinity in site(s) {', '.join(sites.values())}: the posterior "
            "may be improper (flat priors, too little data); give the model proper priors"
        )
    if not np.isfinite(result.elbo):
        causes.append(f"the ELBO of the final q is {result.elbo} (not finite)")
    if not causes:
        return result
    message = "; ".join(causes) + f" [the run stopped with: {result.message}]"
    info = {**result.info, "runaway": "; ".join(causes)}
    return dataclasses.replace(result, converged=False, message=message, info=info)


def _available_memory() -> float:
    """Bytes of memory available now (Linux MemAvailable, else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 1024.0 * float(line.split()[1])
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _check_memory(name: str, count: int | None, per_draw: int, arrays) -> None:
    """Refuse ``count`` Monte Carlo draws that cannot fit in memory, before compiling:
    each draw holds about ``per_draw`` numbers of q plus one number per data element
    (the model's terms), 8 bytes each."""
    if not isinstance(count, numbers.Integral):
        return  # None (the default), or refused by the argument checks
    data_size = sum(int(np.size(x)) for x in jax.tree.leaves(arrays))
    needed = 8.0 * count * (per_draw + data_size)
    available = _available_memory()
    if needed > available:
        raise ValueError(
            f"{name}={count} needs about {needed / 2**30:.3g} GiB (8 bytes x {count} draws x "
            f"{per_draw + data_size} numbers per draw), more than the {available / 2**30:.3g} "
            f"GiB of memory available; use fewer (the default is chosen for you when None)"
        )


def _warn_untrusted(result: Result) -> None:
    caveat = (result.info or {}).get("caveat")
    if caveat:  # a kind of model on which the method is known to go wrong unflagged
        warnings.warn(f"viax.fit: {caveat}", RuntimeWarning, stacklevel=4)
    if not result.converged:
        warnings.warn(
            f"viax.fit did not converge: {result.message}; its k-hat verdict is 'not "
            "converged', whatever k-hat says",
            RuntimeWarning,
            stacklevel=4,
        )
    if not result.khat < KHAT_USABLE:
        family = getattr(result.family, "name", result.family)
        if result.method == "advi" and result.algorithm in ("stan", "optax"):
            advice = "try the default optimizer (MAP + Laplace + DADVI)"
        elif family in ("meanfield", "lowrank"):
            advice = "try family='fullrank'"
        else:
            advice = "the posterior is far from Gaussian where q lives: check the model"
        warnings.warn(
            f"viax.fit: PSIS k-hat = {result.khat:.2f} > {KHAT_USABLE}: q is too far from the "
            f"posterior for its draws or ELBO to be trusted (Yao et al. 2018); {advice}",
            RuntimeWarning,
            stacklevel=4,
        )


def _fit_dadvi(
    target: Target,
    family: Family,
    data,
    init_position,
    rng_key,
    max_steps,
    num_draws,
    progress,
    path_why: str = "",
):
    start = time.perf_counter()
    num_draws = num_draws or default_num_draws(target, family, data, init_position)
    # Large data: the sums over rows in blocks (memory O(block x draws)); small data
    # are evaluated whole, as before (chunks_reason says which and why).
    # Dense D x D curvature where its memory and Hessian passes fit a budget (the ridges
    # of hierarchical models need it), else the diagonal + a dense block of small sites.
    dense, curvature_reason, curvature_rows = dense_curvature_plan(target.dim, data)
    arrays = data
    chunked, chunks_reason = plan_chunks(target, data, num_draws, init_position)
    if chunked is not None:
        target, data = chunked, chunked.blocked(data)
    # A long run over many rows is worth XLA's optimiser; a short one is not.
    fast_compile = chunked is None or chunked.num_rows * num_draws < 2**24
    structure = None
    if target.dim > dadvi.DENSE_HESSIAN_MAX_DIM and dense_memory_fits(target.dim):
        # A large hierarchical model's Hessian is an arrowhead (each row touches one
        # plane: the plane effects' block is diagonal), so the exact dense Hessian costs
        # K + 1 products over every row, not D over a sample of rows: a row-sampled
        # Hessian misses the planes whose rows it skips (flights: MAP not found).
        structure, why = _curvature_structure(target, data, init_position)
        if structure is not None:
            fits, reason, rows = dense_curvature_plan(target.dim, arrays, structure.products)
            if fits and rows is None:
                dense, curvature_rows, curvature_reason = True, None, f"{why}; {reason}"
            else:
                structure, why = None, f"{why}, not used: {reason}"
        if structure is None:
            curvature_reason += f" ({why})"
    stride = 1
    if dense and curvature_rows is not None and chunked is not None:
        stride = chunked.curvature_stride(curvature_rows)
    elif dense and curvature_rows is not None:  # rows evaluated whole: read them all
        curvature_reason += " (reads every row: the data are evaluated whole)"
    algo = dadvi.build_dadvi(
        target, family, dense=dense, curvature_stride=stride, curvature_structure=structure
    )
    draws = dadvi.base_draws(rng_key, num_draws, family.noise_dim)
    # A cold fit is mostly compilation: while this thread finds the MAP and compiles
    # and runs the rest of the setup (Laplace), the L-BFGS chunk and the finalisation
    # compile on the other core.  Everything is traced first: NumPyro's handler stack
    # is global, so no two threads may trace a model at once.
    algo.map_objective.lower(init_position, data)
    hess0 = abstract(algo.hessian.lower(init_position, data).out_info)
    map_steps0 = np.int32(0)
    value0 = np.float64(0.0)
    lowered = algo.setup.lower(
        init_position, value0, init_position, hess0, map_steps0, init_position, data, draws
    )
    setup_out, state_out = abstract(lowered.out_info)
    key_aval = abstract(rng_key)
    inputs_out = (abstract(data), setup_out)
    background = precompile(
        (
            chunk_fn(algo.step, fast_compile),
            (state_out, key_aval, np.int32(0), min(_DADVI_CHUNK, max_steps), inputs_out),
        ),
        (algo.finalize, (state_out.optimizer.position, inputs_out, key_aval)),
    )
    center, value, grad, hess, map_steps, newton_steps = _find_map(algo, data, init_position)
    setup, state = algo.setup(
        center, value, grad, hess, np.int32(map_steps), init_position, data, draws
    )
    inputs = (data, setup)
    info: dict[str, Any] = {
        "num_draws": num_draws,
        "chunks": chunks_reason,
        "curvature_reason": curvature_reason,
        "curvature": (
            "dense Hessian"
            + (f" (rows of every {stride}th block of {chunked.num_blocks})" if stride > 1 else "")
            + (
                f" (exact: {len(structure.columns)} columns + diagonal)"
                if structure is not None
                else ""
            )
            if not isinstance(hess, tuple)
            else f"Hessian diagonal + dense block of {algo.curvature_block.size} coordinates"
        ),
        "map_ok": bool(setup.map_ok),
        "map_steps": int(setup.map_steps),
        "map_newton_steps": newton_steps,
        "map_decrement": float(setup.map_decrement),
        "preconditioner": (
            ("laplace" if bool(setup.map_ok) else "laplace (MAP not converged)")
            if bool(setup.laplace)
            else "identity"
        ),
        "setup_time": time.perf_counter() - start,
    }
    history: list[float] = []

    def check(state, chunk_info, steps_done):
        if not np.isfinite(float(state.optimizer.value)):
            # The first step, at the starting point, was never accepted.
            _, grad = algo.initial(inputs)
            _raise_nonfinite_gradient(target, grad["loc"], 0)
            raise DivergenceError(
                "the fixed-draw ELBO is not finite at the starting point (the Laplace "
                "approximation puts mass where the log density is not finite); try "
                "optimizer='stan' or another seed",
                step=0,
            )
        grad_norm = float(np.asarray(chunk_info.grad_norm)[-1])
        last = float(np.asarray(chunk_info.objective)[-1])
        previous = history[-1] if history else -np.inf
        history.append(last)
        if not np.isfinite(grad_norm):
            _raise_nonfinite_gradient(target, state.optimizer.grad["loc"], steps_done)
        if grad_norm < 1e-7:
            return True, f"L-BFGS: gradient max-norm {grad_norm:.2g} < 1e-7"
        if float(state.optimizer.step_size) < 1e-10:
            # No step along the L-BFGS direction decreases the objective any more.
            return grad_norm < 1e-3, f"L-BFGS: no further decrease, gradient {grad_norm:.2g}"
        if abs(last - previous) <= 1e-12 * (1.0 + abs(last)):
            return True, "L-BFGS: fixed-draw ELBO unchanged (relative 1e-12) over 10 steps"
        return None

    background.join()  # never compile the same program twice at once
    description = (
        "viax dadvi full-batch"
        + (f" ({path_why})" if path_why else "")
        + (f", {chunked.num_blocks} blocks of {chunked.block_size} rows" if chunked else "")
    )

    def run_for(state, steps):
        return run(
            algo.step,
            state,
            inputs,
            rng_key,
            steps,
            _DADVI_CHUNK,
            check_fn=check,
            site_of_index=target.site_of_index,
            progress=progress,
            description=description,
            fast_compile=fast_compile,
        )

    rewhiten = (
        algo.dense
        and isinstance(family, MeanField)
        and target.dim >= _REWHITEN_MIN_DIM
        and max_steps > 2 * _REWHITEN_STEPS
    )
    output = run_for(state, _REWHITEN_STEPS if rewhiten else max_steps)
    rewhitenings: list[int] = []
    while rewhiten and not output.converged and output.num_steps < max_steps:
        # A hierarchical model's MAP is a poor place to whiten q at: the curvature of
        # the effects scales with their group scale squared, which q puts elsewhere
        # (measured on 30,000 flights rows: 1,000 L-BFGS steps whitened at the MAP did
        # not converge; the non-centred MAP of the first 100,000 flights rows puts
        # σ_tail at 9.2, where q puts it near 0.15).  Whiten again at q's mean, by the dense Hessian
        # there, with q's sds as the scales, and go on from the same q; again every
        # _REWHITEN_EVERY steps while q still moves (each costs one Hessian).
        first = output
        rewhitenings.append(first.num_steps)
        params = setup.preconditioner.push(family, output.state.optimizer.position)
        mean = np.asarray(family.mean(params), dtype=np.float64)
        sd = jax.numpy.asarray(family.stddev(params))
        value, grad = algo.map_objective(mean, data)
        hess = algo.hessian(mean, data)
        steps = np.int32(map_steps)
        setup, state = algo.setup(mean, value, grad, hess, steps, init_position, data, draws, sd)
        inputs = (data, setup)
        budget = max_steps - first.num_steps
        if len(rewhitenings) < _REWHITEN_TIMES:
            budget = min(budget, _REWHITEN_EVERY)
        output = run_for(state, budget)
        output = output._replace(
            trace=np.concatenate([first.trace, output.trace]),
            num_steps=first.num_steps + output.num_steps,
            wall_time=first.wall_time + output.wall_time,
            compile_time=first.compile_time + output.compile_time,
        )
        if len(rewhitenings) >= _REWHITEN_TIMES:
            break
    if rewhitenings:
        info["rewhitened_after"] = rewhitenings[0]
        info["rewhitenings"] = rewhitenings
    params_w = output.state.optimizer.position
    params, terms = algo.finalize(params_w, inputs, rng_key)
    info["elbo_terms"] = np.asarray(terms)
    info["draw_log_weights"] = lambda key: algo.finalize(params_w, inputs, key)[1]
    info["fixed_draw_elbo"] = float(output.trace[-1]) if len(output.trace) else float("nan")
    info["init_position"] = init_position
    info["max_steps"] = max_steps
    return params, output, "dadvi", info


def _curvature_structure(target, data, init_position):
    """:func:`viax.infer.chunked.hessian_structure` of −log p̃ over ``data`` (whole or
    blocked, as ``target`` reads them): ``(structure or None, reason)``."""
    return hessian_structure(
        lambda u, d: -target.log_density(u, d), data, np.asarray(init_position), target.sites
    )


def _find_map(algo, data, init_position) -> tuple:
    """``(center, value, grad, hessian, lbfgs_steps + newton_steps, newton_steps)``:
    the MAP in the unconstrained space and −log p̃, its gradient and Hessian there.
    L-BFGS first (one gradient a step: most posteriors converge in tens of steps);
    where it stops short of its tolerance (predictors on raw scales: its gradient test
    in units cannot see the mode, its curvature pairs cannot resolve the ridge in
    float64, or the first gradient is so large that the step size underflows) and
    D ≤ ``_NEWTON_MAX_DIM``, modified Newton steps with the exact Hessian from its best
    point, stopped by the scale-free Newton decrement (``newton_on_host``).  Above that
    dimension no dense Hessian is formed: L-BFGS runs in coordinates scaled by the
    Hessian's exact diagonal at the start, and ``hessian`` is that diagonal (D,) at the
    end (:func:`viax.infer.chunked.hessian_diagonal`), unless the dense curvature fits
    its budget (``algo.dense``): then :func:`_whitened_map_search`."""
    dim = int(np.size(init_position))
    newton = algo.dense and dim <= _NEWTON_MAX_DIM
    tol = 1e-6

    def value_and_grad(u):
        return algo.map_objective(u, data)

    if algo.dense and not newton:
        return _whitened_map_search(value_and_grad, lambda u: algo.hessian(u, data), init_position)
    if not newton:
        # No dense Hessian here: L-BFGS in coordinates scaled by the exact Hessian
        # diagonal at the start, u = u0 + w / sqrt|H_ii| (Jacobi), so that a slope on a
        # raw scale (curvature 1e11 on the flights' distance) and a group effect
        # (curvature 1) move alike; the tolerance is then in those units.
        start = np.asarray(init_position, dtype=np.float64)
        diag, block_hess = algo.hessian(start, data)
        diag = np.abs(np.asarray(diag, dtype=np.float64))
        unit = np.where(np.isfinite(diag) & (diag > 0), 1.0 / np.sqrt(diag), 1.0)
        # The small sites (intercept, slopes, scales) by the dense factor of their block.
        block = algo.curvature_block
        factor = np.eye(block.size)
        if block.size and np.all(np.isfinite(block_hess)):
            factor = np.asarray(dadvi.laplace_factor(block_hess, np.zeros(block.size))[0])

        def to_u(w):
            u = start + unit * w
            u[block] = start[block] + factor @ w[block]
            return u

        def scaled(w):
            value, grad = value_and_grad(to_u(w))
            grad = np.asarray(grad, dtype=np.float64)
            grad_w = unit * grad
            grad_w[block] = factor.T @ grad[block]
            return value, grad_w

        # Start 1e-4 (scaled units) off u0: at u = 0 every logit of a logistic regression
        # is exactly 0, where NumPyro's Bernoulli(logits) has a wrong gradient (its
        # max(x, 0) and |x| have derivative 0 at 0: the slope of softplus is lost), and
        # the search went uphill from there (flights: stopped at its start).
        offset = 1e-4 * np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
        w, _, _, steps = minimize_on_host(scaled, offset, _MAP_STEPS, tol)
        center = to_u(w)
        value, grad = value_and_grad(center)
        grad = np.asarray(grad, dtype=np.float64)
        return center, np.float64(value), grad, algo.hessian(center, data), steps, 0
    center, value, grad, steps = minimize_on_host(
        value_and_grad,
        np.asarray(init_position),
        _LBFGS_STEPS_BEFORE_NEWTON,
        tol,
    )
    if not np.isfinite(value) or np.max(np.abs(grad), initial=0.0) <= tol:
        return center, np.float64(value), grad, algo.hessian(center, data), steps, 0
    # The Hessian program (traced before the background compiles began) is the one the
    # preconditioner needs anyway: Newton steps add no compile.
    found = newton_on_host(
        value_and_grad, lambda u: algo.hessian(u, data), center, _NEWTON_STEPS, _NEWTON_TOL
    )
    return (
        found.position,
        np.float64(found.value),
        found.grad,
        found.hessian,
        steps + found.num_steps,
        found.num_steps,
    )


_REWHITEN_STEPS = 50  # DADVI steps of a mean-field q before it is re-whitened at its mean
_REWHITEN_EVERY = 200  # and again after this many more while it has not converged,
_REWHITEN_TIMES = 4  # at most this many times in all
# Below this many latents a fit's extra steps cost less than re-whitening's second
# compiled set-up (the speed benchmark's eight schools and logistic regression).
_REWHITEN_MIN_DIM = 100
# Rounds of the large-D MAP search (each one Hessian): the 100,000 first flights rows
# took 4 diagonal rounds to leave the saddle of the non-centred start, then 1 whitened.
_WHITENED_ROUNDS = 10
_DIAGONAL_ROUND_STEPS = 200  # dense Hessians of the large-D MAP search, the final one included
_WHITENED_TOL = 1e-4  # max |gradient| in whitened units (posterior sds) of each round


def _whitened_map_search(value_and_grad, hessian_fn, init_position) -> tuple:
    """:func:`_find_map` for D > ``_NEWTON_MAX_DIM`` with a dense Hessian in budget:
    rounds of L-BFGS in coordinates whitened by the Hessian at the round's start,
    u = c + S F w (:func:`viax.infer.dadvi.host_whitening`), where the posterior's
    ridges (an intercept against every group effect, nested groups, a scale against its
    effects) are round and the gradient test is in posterior sds; a round ends at
    ``_WHITENED_TOL``, and the search when the Newton decrement ‖Fᵀ S g‖² at the new
    point, by its own Hessian, is under ``MAP_DECREMENT_OK`` / 10.  Each round costs one
    Hessian (D products) and a Cholesky factor (the diagonal alone where H is not
    positive definite, as at the start of a non-centred model); L-BFGS's
    memory then only has to learn how the curvature changed along the way.  The last
    slot of the tuple counts the Hessians, not Newton steps."""
    dim = int(np.size(init_position))
    # 1e-4 off u0: NumPyro's Bernoulli(logits) has a zero gradient at logit 0 (below).
    center = np.asarray(init_position, dtype=np.float64) + 1e-4 * np.where(
        np.arange(dim) % 2 == 0, 1.0, -1.0
    )
    value, grad = value_and_grad(center)
    value, grad = float(value), np.asarray(grad, dtype=np.float64)
    hess = np.asarray(hessian_fn(center), dtype=np.float64)
    steps, hessians = 0, 1
    for _ in range(_WHITENED_ROUNDS - 1):
        if not (np.isfinite(value) and np.all(np.isfinite(hess))):
            break
        scale, factor, kind = dadvi.host_whitening(hess)
        if kind == "cholesky":
            grad_w = factor.T @ (scale * grad)
            if float(grad_w @ grad_w) <= 0.1 * dadvi.MAP_DECREMENT_OK:
                break
        start = center

        factor = np.eye(dim) if factor is None else factor

        def to_u(w, start=start, scale=scale, factor=factor):
            return start + scale * (factor @ w)

        def whitened(w, to_u=to_u, scale=scale, factor=factor):
            value, grad = value_and_grad(to_u(w))
            return value, factor.T @ (scale * np.asarray(grad, dtype=np.float64))

        # A diagonal round (H not positive definite) only has to leave the saddle: its
        # end point's Hessian whitens the next round (measured on 30,000 flights rows:
        # 1,000 diagonal steps ended 8 nats above the MAP, gradient 5 in sds).
        budget = _MAP_STEPS if kind == "cholesky" else _DIAGONAL_ROUND_STEPS
        w, _, _, count = minimize_on_host(whitened, np.zeros(dim), budget, _WHITENED_TOL)
        steps += count
        point = to_u(w)
        new_value, new_grad = value_and_grad(point)
        if not float(new_value) <= value:  # no progress: keep the round's start
            break
        center, value, grad = point, float(new_value), np.asarray(new_grad, dtype=np.float64)
        hess = np.asarray(hessian_fn(center), dtype=np.float64)
        hessians += 1
    return center, np.float64(value), grad, hess, steps, hessians


def default_num_draws(target: Target, family: Family, data, position) -> int:
    """DADVI's fixed draws for this model: the budget above, at least D + 2 (up to 512)
    so that the draws can be moment-matched."""
    floor = int(min(max(_MIN_DRAWS, family.noise_dim + 2), 512))
    try:
        # The log density is already compiled (the finiteness check at the initial
        # point), so its lowering is cached; the cost analysis takes milliseconds.
        cost = _log_density_jit(target).lower(position, data).cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        per_draw = float(cost.get("flops", 0.0)) + 20.0 * float(cost.get("transcendentals", 0.0))
    except Exception:  # noqa: BLE001  no cost model on this backend: the floor
        return floor
    dim = family.noise_dim  # the transform: L @ eps for full rank, elementwise otherwise
    per_draw += dim * dim if isinstance(family, FullRank) else 4.0 * dim
    budget = int(_DRAW_BUDGET / max(per_draw, 1.0)) // 32 * 32
    return int(max(floor, min(budget, _MAX_DRAWS)))


def refit_dadvi_means(result: Result, num_repeats: int, seed: int) -> np.ndarray:
    """Means of q (num_repeats, D) from DADVI refits with independent base draws."""
    info = result.info
    means = []
    for key in jax.random.split(jax.random.PRNGKey(seed), num_repeats):
        params, *_ = _fit_dadvi(
            result.target,
            result.family,
            result.data,
            info["init_position"],
            key,
            info["max_steps"],
            info["num_draws"],
            progress=False,
        )
        means.append(np.asarray(result.family.mean(params)))
    return np.stack(means)


def _raise_nonfinite_gradient(target: Target, grad_loc, step: int):
    bad = np.flatnonzero(~np.isfinite(np.asarray(grad_loc)))
    if bad.size == 0:
        return
    sites = tuple(dict.fromkeys(target.site_of_index(int(i)) for i in bad))
    raise DivergenceError(
        f"non-finite gradient at step {step} in site(s): {', '.join(sites)}", step=step, sites=sites
    )


def _fit_stochastic(
    target,
    family,
    data,
    init_position,
    rng_key,
    optimizer,
    num_steps,
    num_particles,
    tol_rel_obj,
    eval_elbo,
    eta,
    stick_the_landing,
    progress,
    stop_rule="mcse",
):
    stan = optimizer == "stan"
    transform = advi.stan_advi(1.0) if stan else optimizer
    algo = advi.build_stochastic(target, family, transform, num_particles, stick_the_landing)
    params = family.init(loc=init_position)
    flat, unravel = ravel_pytree(params)
    config = parse_stop_rule(stop_rule)
    info: dict[str, Any] = {}
    key_eta, key_eval, key_run = jax.random.split(rng_key, 3)
    if stan:
        if eta is None:
            eta, scores = advi.adapt_eta(algo, params, key_eta, data)
            info["eta_trials"] = scores
        info["eta"] = eta
    max_steps = num_steps or 10_000
    state = algo.init(params, eta if stan else 1.0)
    description = "viax advi" if stan else "viax optax"
    tracker = None
    if config != "stan":
        # The default rule (viax.infer.stopping): R̂ stationarity, iterate averaging,
        # stop on the Monte Carlo error of the average in units of q's Fisher scale
        # (q's sd for a mean), the same scale draws at every check.
        tracker = config.start(
            flat.size,
            scale=lambda average: fisher_scale(family, unravel(average), key_eval),
            max_steps=max_steps,
            elbo_fn=lambda average: float(algo.elbo(unravel(average), key_eta, data)),
        )
        output = run_with_stopping(
            algo.step,
            state,
            data,
            key_run,
            max_steps,
            eval_elbo,
            tracker,
            lambda chunk_info: np.asarray(chunk_info.iterate),
            site_of_index=target.site_of_index,
            progress=progress,
            description=description,
        )
        info.update(stop_info(tracker, unravel, output.converged, flat.size))
        info["num_backoffs"] = output.num_backoffs
        params = unravel(jax.numpy.asarray(tracker.average))
        return params, output, "stan" if stan else "optax", info
    rule = advi.StanConvergence(
        tol_rel_obj, max_steps, eval_elbo, float(algo.elbo(params, key_eval, data))
    )
    eval_keys = iter(jax.random.split(key_eval, max_steps // eval_elbo + 2))

    def check(state, chunk_info, steps_done):
        if stan:
            # Stan's rule: a fresh estimate at the current q.
            elbo = float(algo.elbo(state.params, next(eval_keys), data))
            stop, message = rule.update(elbo, steps_done)
            return (True, message) if stop else None
        # A fixed-budget run only reports the verdict, so it runs long chunks and feeds
        # the rule the mean of each eval_elbo block of per-step estimates: free, where
        # fresh draws would cost a model pass.
        objective = np.asarray(chunk_info.objective)
        first = steps_done - objective.size
        for end in range(eval_elbo, objective.size + 1, eval_elbo):
            rule.update(float(objective[end - eval_elbo : end].mean()), first + end)
        return None

    output = run(
        algo.step,
        state,
        data,
        key_run,
        max_steps,
        eval_elbo if stan else eval_elbo * max(1, 1000 // eval_elbo),
        check_fn=check,
        site_of_index=target.site_of_index,
        progress=progress,
        description=description,
    )
    if not stan:
        window = np.asarray(rule.window)
        ok = window.size > 0 and (window.mean() < tol_rel_obj or np.median(window) < tol_rel_obj)
        output = output._replace(
            converged=bool(ok),
            message=(
                f"fixed budget of {output.num_steps} steps; relative ELBO change "
                f"{np.median(window):.2g} (median over the window)"
                if window.size
                else "no ELBO evaluation"
            ),
        )
    info["elbo_evaluations"] = rule.history
    info["num_backoffs"] = output.num_backoffs
    info.update(stop_info(None, unravel, output.converged, flat.size))
    return output.state.params, output, "stan" if stan else "optax", info
