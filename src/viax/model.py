"""Models: a NumPyro model function or a plain log joint, seen as a density on R^D.

Every latent site is mapped to the real line by NumPyro's ``biject_to(support)``
and the log-Jacobian is added, so the algorithms only ever see

    log p̃(u) = log p(x, T(u)) + log |det J_T(u)|,   u ∈ R^D,

as a function of one flat vector ``u`` and the data.  The support is looked up
afresh at every evaluation (NumPyro's ``_unconstrain_reparam``), so a support
that depends on another latent, ``Uniform(0, 1 - a)``, follows ``a``.

Data is split once: Python scalars are *static* (they may set shapes, e.g. a plate
size ``J``) and arrays are *dynamic* arguments of the compiled functions, so a
second fit with new data of the same shapes reuses the compiled code.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import _unconstrain_reparam, constrain_fn, log_density

from viax.infer.driver import jit_once

__all__ = [
    "PARAMS_KEY",
    "Model",
    "ModelError",
    "ParamSite",
    "Site",
    "Target",
    "build_target",
    "data_argument",
    "prepare_data",
]

# The data key under which learned model parameters θ (constrained, by site name) enter
# a Target's log density: a dynamic input, so the same compiled code serves every θ.
PARAMS_KEY = "__viax_model_params__"


class ModelError(ValueError):
    """The model or its data cannot be used: raised before anything is compiled."""


@dataclass(frozen=True)
class Model:
    """A plain log joint over a dict of named, constrained latents.

    Args:
        log_joint_fn: ``log_joint_fn(values, **data) -> scalar``, ``values`` maps each
            latent name to its constrained value.
        latents: ``{"name": constraint}`` for a scalar or ``{"name": (constraint, shape)}``,
            with constraints from ``numpyro.distributions.constraints``.

    Example:
        >>> from numpyro.distributions import constraints
        >>> m = Model(lambda v: -0.5 * v["x"] ** 2, latents={"x": constraints.real})
    """

    log_joint_fn: Callable[..., Any]
    latents: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not callable(self.log_joint_fn):
            raise ModelError("Model: log_joint_fn must be callable")
        if not self.latents:
            raise ModelError("Model: `latents` is empty; name at least one latent")
        for name, spec in self.latents.items():
            constraint, _ = _latent_spec(name, spec)
            _bijection(name, constraint)

    def __hash__(self):
        return hash((self.log_joint_fn, tuple(self.latents)))

    def __eq__(self, other):
        return (
            isinstance(other, Model)
            and other.log_joint_fn is self.log_joint_fn
            and tuple(other.latents.items()) == tuple(self.latents.items())
        )

    def as_numpyro(self) -> Callable[..., None]:
        """The same density as a NumPyro model: flat priors plus one factor."""
        specs = {name: _latent_spec(name, spec) for name, spec in self.latents.items()}
        log_joint_fn = self.log_joint_fn

        def numpyro_model(**data):
            values = {
                name: numpyro.sample(name, dist.ImproperUniform(c, (), shape))
                for name, (c, shape) in specs.items()
            }
            numpyro.factor("log_joint", log_joint_fn(values, **data))

        return numpyro_model


def _latent_spec(name, spec):
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ModelError(f"latent {name!r}: expected constraint or (constraint, shape)")
        constraint, shape = spec
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
    else:
        constraint, shape = spec, ()
    if not isinstance(constraint, constraints.Constraint):
        raise ModelError(
            f"latent {name!r}: {constraint!r} is not a numpyro constraint "
            "(use numpyro.distributions.constraints.real, .positive, ...)"
        )
    return constraint, shape


def _bijection(name, constraint):
    try:
        return biject_to(constraint)
    except NotImplementedError as err:
        raise ModelError(
            f"site {name!r}: no bijection to the real line for constraint {constraint!r}"
        ) from err


class Site(NamedTuple):
    """One latent site: its constrained shape and its slice of the flat vector."""

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    start: int
    size: int
    is_discrete: bool


class ParamSite(NamedTuple):
    """One ``numpyro.param`` site (a ``numpyro.contrib.module`` network is one site whose
    value is a pytree of weights): its constraint and its initial value."""

    name: str
    constraint: Any
    init_value: Any  # constrained pytree, as the model's init gives it


class PreparedData(NamedTuple):
    static: tuple[tuple[str, Any], ...]  # hashable: (name, python scalar)
    dynamic: dict[str, jax.Array]  # arrays, passed to compiled functions

    def merged(self, dynamic=None) -> dict[str, Any]:
        return {**dict(self.static), **(self.dynamic if dynamic is None else dynamic)}

    def signature(self):
        """Hashable key of everything that forces a recompile."""
        shapes = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(self.dynamic.items()))
        return self.static, shapes


def prepare_data(model_fn: Callable, data: Mapping[str, Any] | None) -> PreparedData:
    """Check ``data`` against the model's signature and split it static/dynamic.

    ``data``: a mapping, or a pandas DataFrame whose columns are the model's arguments;
    a DataFrame or Series as one argument's value becomes its NumPy array.

    Raises ModelError for data that is not a mapping, a missing argument, an unexpected
    key (unless the model takes ``**kwargs``), a non-finite value, and values that are not
    real numbers (strings, dates, complex numbers, ragged lists), before anything runs.
    """
    params = inspect.signature(model_fn).parameters
    data = _as_mapping(data)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n, p in named.items() if p.default is p.empty and n not in data]
    if missing:
        raise ModelError(f"data is missing model argument(s): {', '.join(missing)}")
    extra = [k for k in data if k not in named]
    if extra and not has_var_kw:
        raise ModelError(
            f"data key(s) {', '.join(extra)} are not arguments of the model; "
            "add **kwargs to the model to ignore them"
        )
    static, dynamic = [], {}
    for key, value in data.items():
        # A string is passed through to an option whose default is a string.
        option = isinstance(value, str) and key in named and isinstance(named[key].default, str)
        if value is None or isinstance(value, bool) or option:
            static.append((key, value))
            continue
        array = _numeric_array(key, value)
        if np.issubdtype(array.dtype, np.number) and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ModelError(f"data[{key!r}] holds {bad} NaN or infinite value(s)")
        if array.ndim == 0:
            static.append((key, array.item()))
        else:
            dynamic[key] = jnp.asarray(array)
    return PreparedData(tuple(sorted(static)), dynamic)


def _as_mapping(data) -> dict:
    """``data`` as a dict of the model's arguments: a mapping, or a pandas DataFrame
    whose columns are the arguments (each column one argument); anything else is refused
    by name, before it reaches the model."""
    if data is None:
        return {}
    if _is_dataframe(data):
        return {str(column): data[column] for column in data.columns}
    if isinstance(data, Mapping):
        return dict(data)
    raise ModelError(
        f"data must be a mapping from the model's argument names to values (a dict, or a "
        f"pandas DataFrame whose columns are the model's arguments), got "
        f"{type(data).__name__}; e.g. data={{'y': y}} for model(y) (minibatches: a "
        "viax.data source or an iterable of dict batches)"
    )


def data_argument(data):
    """:func:`viax.fit`'s ``data`` as given, a DataFrame as the dict of its columns; a
    ModelError, before anything runs, for a value that is neither a mapping nor a stream
    of dict batches (a list of numbers, an array, a string, a number)."""
    if data is None or isinstance(data, Mapping):
        return data
    if _is_dataframe(data):
        return _as_mapping(data)
    plain = isinstance(data, str | bytes | int | float | complex | np.ndarray | np.generic)
    batches = isinstance(data, list | tuple) and data and all(isinstance(b, Mapping) for b in data)
    if plain or isinstance(data, list | tuple) and not batches:
        _as_mapping(data)  # raises, naming the type
    return data


def _is_dataframe(value) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "columns")


def _numeric_array(key: str, value) -> np.ndarray:
    """``value`` as a real-valued NumPy array, or a ModelError naming what it is."""
    if isinstance(value, str | bytes):
        raise ModelError(
            f"data[{key!r}] is a string ({value!r:.40}), not numbers; pass an array (a string "
            "is only passed through to an argument whose default is a string)"
        )
    if _is_dataframe(value):
        bad = [str(c) for c in value.select_dtypes(exclude=["number", "bool"]).columns]
        if bad:
            raise ModelError(
                f"data[{key!r}] is a DataFrame with non-numeric column(s) {', '.join(bad)}; "
                "encode them as numbers first (e.g. pandas.get_dummies)"
            )
        value = value.to_numpy()  # one argument: the (rows, columns) matrix
    elif type(value).__name__ == "Series":
        value = value.to_numpy()
    try:
        array = np.asarray(value)
    except ValueError as err:  # NumPy >= 1.24 refuses ragged nested lists
        raise ModelError(f"data[{key!r}] is not a rectangular array ({err})") from None
    if array.dtype == object:
        raise ModelError(
            f"data[{key!r}] is not an array of numbers (a {type(value).__name__} of "
            "objects): ragged lists and nested containers are not supported"
        )
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ModelError(f"data[{key!r}] holds complex numbers; viax models take real data")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ModelError(
            f"data[{key!r}] has dtype {array.dtype} (strings or dates?), not numbers; "
            "encode it as numbers first"
        )
    return array


@dataclass(frozen=True, eq=False)
class Target:
    """A model seen as an unconstrained log density of one flat vector.

    ``log_density(u, data)``, ``constrain(u, data)`` take ``data``: dict of the
    dynamic arrays; the static data is baked in.  ``u`` has shape ``(dim,)``.
    """

    model_fn: Callable
    static_data: tuple
    sites: tuple[Site, ...]
    deterministic: tuple[str, ...]
    init_position: jax.Array  # (dim,)
    unravel_fn: Callable = field(repr=False)
    discrete_sites: tuple[str, ...] = ()
    # numpyro.param sites: held at their initial value unless ``data[PARAMS_KEY]`` gives
    # their (constrained) values, which is how the learning path feeds θ in.
    param_sites: tuple[ParamSite, ...] = ()
    # (site, argument): latent sites whose obs= argument was None (_latent_from_none).
    latent_from_none: tuple[tuple[str, str], ...] = ()

    @property
    def dim(self) -> int:
        return int(self.init_position.shape[0])

    @property
    def latent_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def _kwargs(self, data):
        return {**dict(self.static_data), **{k: v for k, v in data.items() if k != PARAMS_KEY}}

    def _values(self, position, data) -> dict:
        # Latents (unconstrained, by name) and model parameters θ (constrained): numpyro's
        # _unconstrain_reparam returns a non-sample site's entry as it is.
        initial = {site.name: site.init_value for site in self.param_sites}
        return {**self.unravel_fn(position), **initial, **dict(data.get(PARAMS_KEY, {}))}

    def log_density(self, position: jax.Array, data: Mapping[str, jax.Array]) -> jax.Array:
        """log p_θ(x, T(u)) + log|J_T(u)| at ``u`` of shape (dim,); θ from
        ``data[PARAMS_KEY]`` where given, else the model's initial values."""
        params = self._values(position, data)
        model = handlers.substitute(
            self.model_fn, substitute_fn=lambda site: _unconstrain_reparam(params, site)
        )
        value, _ = log_density(model, (), self._kwargs(data), {})
        return value

    def constrain(self, position: jax.Array, data: Mapping[str, jax.Array]) -> dict:
        """Constrained latents and deterministic sites at ``u`` (dim,)."""
        params = self._values(position, data)
        values = constrain_fn(
            self.model_fn, (), self._kwargs(data), params, return_deterministic=True
        )
        return {
            k: v for k, v in values.items() if k in self.latent_names or k in self.deterministic
        }

    def site_of_index(self, index: int) -> str:
        for site in self.sites:
            if site.start <= index < site.start + site.size:
                return site.name
        raise IndexError(index)


_TARGETS: dict[Any, Target] = {}


def _hash_key(model_fn, prepared: PreparedData):
    try:
        key = (model_fn, prepared.signature())
        hash(key)
    except TypeError:
        return None
    return key


def build_target(
    model: Callable | Model, data: Mapping[str, Any] | None, seed: int = 0, check: bool = True
):
    """Trace the model once and return ``(Target, dynamic data, initial position)``.

    ``check=False`` skips evaluating the log density at the initial point (u = 0 is
    returned unchecked): for a caller that checks it on a sample of the rows itself
    (minibatch learning, where one evaluation on every row costs a third of an epoch).

    The Target is cached on (model, static data, shapes of the arrays), so fits that
    differ only in the values of the data arrays share one Target and its compiled
    code.
    """
    _refuse_conjugate(model, "this is")
    model_fn = _numpyro_fn(model) if isinstance(model, Model) else model
    if not callable(model_fn):
        raise ModelError(f"model must be a NumPyro model function or viax.Model, got {model!r}")
    prepared = prepare_data(model_fn, data)
    key = _hash_key(model_fn, prepared)
    target = _TARGETS.get(key) if key is not None else None
    if target is None:
        target = _trace(model_fn, prepared, seed)
        if key is not None:
            _TARGETS[key] = target
    _warn_latent_from_none(target)
    if not check:
        return target, prepared.dynamic, target.init_position
    init_position = _check_finite_at(target, prepared.dynamic, target.init_position, seed)
    return target, prepared.dynamic, init_position


def _numpyro_fn(model: Model) -> Callable:
    # One function object per Model, so compiled code is reused across fits.
    fn = _NUMPYRO_FNS.get(model)
    if fn is None:
        fn = _NUMPYRO_FNS[model] = model.as_numpyro()
    return fn


_NUMPYRO_FNS: dict[Model, Callable] = {}


def _trace(model_fn, prepared: PreparedData, seed: int) -> Target:
    """Discover the sites abstractly (``jax.eval_shape``: nothing runs or compiles)."""
    static = dict(prepared.static)
    captured = {}

    def discover(dynamic):
        seeded = handlers.substitute(
            handlers.seed(model_fn, jax.random.PRNGKey(0)), substitute_fn=init_to_uniform(radius=2)
        )
        # Param sites' initial values are checked as they appear: a NaN scale would
        # otherwise fail later inside the distribution, without the param's name.
        tracer = handlers.trace(_ParamChecker(seeded))
        captured["returned"] = tracer(**static, **dynamic)
        trace = captured["trace"] = tracer.trace
        return {
            name: _bijection(name, site["fn"].support).inv(site["value"])
            for name, site in trace.items()
            if _is_latent(site) and not site["fn"].support.is_discrete
        }

    try:
        shapes = jax.eval_shape(discover, prepared.dynamic)
    except ModelError:
        raise
    except Exception as err:  # the user's model raised: say so, with its message
        # A function that builds a conjugate model (the CLI's cavi/svi/naive model files)
        # fails on traced arrays: say which methods it is for.
        _refuse_conjugate(_returned_concretely(model_fn, prepared), "the model function returns")
        raise ModelError(
            f"the model raised while tracing it with the data: {type(err).__name__}: {err}"
        ) from err
    _refuse_conjugate(captured["returned"], "the model function returns")
    trace = captured["trace"]
    latent_sites = [site for site in trace.values() if _is_latent(site)]
    if not latent_sites:
        raise ModelError("the model has no latent sample sites: nothing to infer")
    discrete = tuple(s["name"] for s in latent_sites if s["fn"].support.is_discrete)
    zeros = {name: jnp.zeros(x.shape) for name, x in shapes.items()}
    init_position, unravel_fn = ravel_pytree(zeros)
    # ravel_pytree orders by sorted name; Site.start follows that order.
    sites, offsets, offset = [], {}, 0
    for name in sorted(zeros):
        offsets[name] = offset
        offset += int(np.prod(zeros[name].shape, dtype=int))
    for s in latent_sites:
        name = s["name"]
        u_shape = tuple(zeros[name].shape) if name in zeros else ()
        size = int(np.prod(u_shape, dtype=int)) if name in zeros else 0
        sites.append(
            Site(
                name,
                tuple(jnp.shape(s["value"])),
                u_shape,
                offsets.get(name, -1),
                size,
                name in discrete,
            )
        )
    deterministic = tuple(s["name"] for s in trace.values() if s["type"] == "deterministic")
    return Target(
        model_fn,
        prepared.static,
        tuple(sites),
        deterministic,
        jnp.asarray(init_position, dtype=float),
        unravel_fn,
        discrete,
        param_sites=_param_sites(model_fn, prepared, trace),
        latent_from_none=_latent_from_none(model_fn, prepared, [s["name"] for s in latent_sites]),
    )


def check_param_value(name: str, value, constraint) -> None:
    """Refuse (ModelError) a ``numpyro.param`` initial value that viax cannot learn from:
    integer or boolean leaves (θ is learned as real numbers), leaves that are not finite,
    or a value outside the site's constraint (its unconstrained value would be NaN).
    Traced leaves (an initial value computed from the data under tracing) are skipped
    here and checked once concrete."""
    leaves = jax.tree_util.tree_leaves(value)
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer) or not (
            hasattr(leaf, "dtype") or isinstance(leaf, int | float | bool)
        ):
            continue
        array = np.asarray(leaf)
        if array.dtype.kind in "biu":
            raise ModelError(
                f"param site {name!r} has an initial value of dtype {array.dtype}; viax learns "
                "params as real numbers: give a float initial value (e.g. 3.0), or pass a "
                "fixed integer as data"
            )
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise ModelError(
                f"param site {name!r}: its initial value is not finite "
                f"({np.count_nonzero(~np.isfinite(array))} of {array.size} entries NaN or inf)"
            )
    if len(leaves) == 1 and not isinstance(leaves[0], jax.core.Tracer):
        array = np.asarray(leaves[0])
        if array.dtype.kind == "f" and constraint is not constraints.real:
            try:
                # Evaluated now, also while the model is being traced (jnp would stage it).
                with jax.ensure_compile_time_eval():
                    inside = bool(np.all(np.asarray(constraint(jnp.asarray(array)))))
            except Exception:  # noqa: BLE001  a constraint that cannot check this shape
                inside = True
            if not inside:
                raise ModelError(
                    f"param site {name!r}: its initial value is outside its constraint "
                    f"{constraint} (value {array if array.size <= 6 else array.shape})"
                )
            try:
                with jax.ensure_compile_time_eval():
                    unconstrained = np.asarray(biject_to(constraint).inv(jnp.asarray(array)))
            except Exception:  # noqa: BLE001  no bijection: _bijection names the site
                unconstrained = np.zeros(1)
            if not np.all(np.isfinite(unconstrained)):
                # On the boundary (0 for unit_interval, a zero weight of a simplex): θ is
                # optimised unconstrained, where that point is at infinity, so the
                # gradient vanishes and θ stays there.
                raise ModelError(
                    f"param site {name!r}: its initial value lies on the boundary of its "
                    f"constraint {constraint} (value {array if array.size <= 6 else array.shape})"
                    ", at infinity for the unconstrained θ that viax optimises: start inside"
                )


class _ParamChecker(numpyro.primitives.Messenger):
    """Checks each param site's initial value (:func:`check_param_value`) in the trace."""

    def postprocess_message(self, msg):
        if msg["type"] == "param":
            constraint = msg["kwargs"].get("constraint", constraints.real)
            check_param_value(msg["name"], msg["value"], constraint)


class _AllParamsSeen(Exception):
    """Raised by :class:`_ParamRecorder` once it holds every param site it waits for."""


class _ParamRecorder(numpyro.primitives.Messenger):
    """Records the messages of the param sites ``names`` and stops the model at the last."""

    def __init__(self, fn, names):
        self.names = set(names)
        self.seen: dict = {}
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] == "param" and msg["name"] in self.names:
            self.seen[msg["name"]] = dict(msg)
            if len(self.seen) == len(self.names):
                raise _AllParamsSeen


def _param_sites(model_fn, prepared: PreparedData, trace) -> tuple[ParamSite, ...]:
    """The ``numpyro.param`` sites with their constraints and concrete initial values.

    The abstract trace holds tracers, so a model with params is run once more, eagerly,
    for the values (its init functions may draw from the seed's key)."""
    names = [name for name, site in trace.items() if site["type"] == "param"]
    if not names:
        return ()
    seeded = handlers.substitute(
        handlers.seed(model_fn, jax.random.PRNGKey(0)), substitute_fn=init_to_uniform(radius=2)
    )
    # The run stops at the last param site: the rest of the model (a decoder over every
    # row, the likelihood) is not needed for the initial values.
    recorder = _ParamRecorder(seeded, names)
    try:
        recorder(**dict(prepared.static), **prepared.dynamic)
    except _AllParamsSeen:
        pass
    concrete = recorder.seen
    out = []
    for name in names:
        site = concrete[name]
        constraint = site["kwargs"].get("constraint", constraints.real)
        _bijection(name, constraint)
        check_param_value(name, site["value"], constraint)
        value = jax.tree_util.tree_map(jnp.asarray, site["value"])
        out.append(ParamSite(name, constraint, value))
    return tuple(out)


def _is_latent(site) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_deterministic", False)
    )


def site_log_probs(target: Target, position, data) -> dict[str, float]:
    """Per-site summed log density at ``u``, used to name the site that is not finite."""
    params = target._values(position, data)
    model = handlers.substitute(
        target.model_fn, substitute_fn=lambda site: _unconstrain_reparam(params, site)
    )
    with warnings.catch_warnings():
        # Finding the offending site is the point: numpyro's out-of-support warning
        # would only repeat it.
        warnings.simplefilter("ignore", UserWarning)
        trace = handlers.trace(model).get_trace(**target._kwargs(data))
        values = {
            n: s["fn"].log_prob(s["value"]) for n, s in trace.items() if s["type"] == "sample"
        }
    out = {}
    for name, site in trace.items():
        if site["type"] == "sample":
            value = values[name]
            if site.get("scale") is not None:
                value = value * site["scale"]
            out[name] = float(jnp.sum(value))
    return out


@functools.lru_cache(maxsize=128)
def _log_density_jit(target: Target):
    return jit_once(target.log_density)


def _check_finite_at(target: Target, data, position, seed: int = 0) -> jax.Array:
    """An initial point where the log density is finite: ``position`` (u = 0, Stan's
    ``init=0``) or else one of ten uniform(−2, 2) draws (Stan's random inits)."""
    if target.discrete_sites:
        return position  # discrete latents are checked by the algorithms that support them
    log_density = _log_density_jit(target)
    if math.isfinite(float(log_density(position, data))):
        return position
    rng = np.random.default_rng(seed)
    for _ in range(10):
        candidate = jnp.asarray(rng.uniform(-2.0, 2.0, target.dim))
        if math.isfinite(float(log_density(candidate, data))):
            return candidate
    bad = [n for n, v in site_log_probs(target, position, data).items() if not math.isfinite(v)]
    where = ", ".join(bad) if bad else "(no single site; check numpyro.factor terms)"
    raise ModelError(f"the log density is not finite at the initial point; site(s): {where}")


# -- refusals and warnings about what the user passed -------------------------------


def _refuse_conjugate(value, what: str) -> None:
    """A ModelError saying which methods fit a conjugate model, if ``value`` is one (or a
    ``(conjugate model, data)`` pair)."""
    from viax.conjugate.engine import ConjugateModel

    built = value[0] if isinstance(value, tuple) and value else value
    if isinstance(built, ConjugateModel):
        raise ModelError(
            f"{what} a viax.conjugate model ({type(built).__name__}): fit it with viax.cavi, "
            "viax.svi or viax.naive (CLI: --method cavi, svi or naive); viax.fit (methods "
            "advi, bbvi) takes a NumPyro model function or a viax.Model"
        )


def _returned_concretely(model_fn, prepared: PreparedData):
    """What ``model_fn`` returns on the concrete data (None if it raises)."""
    data = {**dict(prepared.static), **{k: np.asarray(v) for k, v in prepared.dynamic.items()}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return handlers.seed(model_fn, 0)(**data)
    except Exception:  # noqa: BLE001  only a hint for the error being raised
        return None


class _NoneData:
    """Stands in for a None argument while looking for the sites that observe it."""

    def __init__(self, argument: str):
        self.argument = argument


class _FindNoneData(numpyro.primitives.Messenger):
    """Records the sample sites given a :class:`_NoneData` as ``obs``, and samples them."""

    def __init__(self, fn):
        super().__init__(fn)
        self.found: dict[str, str] = {}

    def process_message(self, msg):
        if msg["type"] == "sample" and isinstance(msg["value"], _NoneData):
            self.found[msg["name"]] = msg["value"].argument
            msg["value"], msg["is_observed"] = None, False


def _latent_from_none(model_fn, prepared: PreparedData, latent: list[str]):
    """``((site, argument), ...)``: latent sites whose ``obs=`` is an argument that is
    None (given as None or left at a None default), found by one more abstract trace with
    a marker in place of each None; where the model uses the argument otherwise (``if y
    is None: ...``), the latent sites named like a None argument."""
    static = dict(prepared.static)
    params = inspect.signature(model_fn).parameters
    defaults = [n for n, p in params.items() if p.default is None and n not in static]
    none_args = [n for n, v in static.items() if v is None] + defaults
    none_args = [n for n in none_args if n not in prepared.dynamic]
    if not none_args:
        return ()
    markers = {n: _NoneData(n) for n in none_args}
    finder = _FindNoneData(model_fn)

    def run(dynamic):
        seeded = handlers.seed(finder, jax.random.PRNGKey(0))
        handlers.trace(seeded).get_trace(**{**static, **markers}, **dynamic)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jax.eval_shape(run, prepared.dynamic)
        found = finder.found
    except Exception:  # noqa: BLE001  the model used the argument: fall back to names
        found = {n: n for n in none_args}
    return tuple((site, arg) for site, arg in found.items() if site in latent)


def _warn_latent_from_none(target: Target) -> None:
    if target.latent_from_none:
        sites = ", ".join(f"{site} (data {arg!r} is None)" for site, arg in target.latent_from_none)
        warnings.warn(
            f"viax: site(s) {sites} became latent because their data is None: they are "
            "fitted as unknowns (drawn from the model), not observed; pass the data to "
            "condition on it",
            RuntimeWarning,
            stacklevel=4,
        )
