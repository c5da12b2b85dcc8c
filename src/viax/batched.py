"""A NumPyro model seen one batch of rows at a time.

Minibatch VI needs three things from a model that a full-batch fit does not: which
sample sites are *local* (one term per data row: the likelihood, per-row latents)
and which are *global* (priors, hyperparameters, group effects); the log joint of a
batch split into those two parts; and per-row latents kept apart from the global
vector, so that they can be stored at full size and touched at batch size.

The log joint of all N rows is ``log p = G(z_g) + Σ_{i≤N} ℓ_i(z_g, z_i)``; a batch B
of rows gives the unbiased estimate ``G + (N/|B|) Σ_{i∈B} ℓ_i`` (Hoffman et al. 2013;
Titsias & Lázaro-Gredilla 2014).  :meth:`BatchedModel.log_joint_parts` returns
``(G, Σ_{i∈B} ℓ_i)`` with the log-Jacobians of the unconstraining bijections included
(global ones in G, per-row ones in the local sum), and the algorithm applies N/|B|.

Two ways of writing the model work unchanged:

* **rows as arguments** (viax's way): ``model(X, y)`` with ``numpyro.plate("N",
  X.shape[0])``.  It is called with the batch's rows; the local sites are those in a
  plate whose size follows the batch (found by tracing the model, abstractly, at two
  batch sizes), or whose leading dimension does.
* **NumPyro's way**: ``numpyro.plate("N", N, subsample_size=B)`` indexing the whole
  data by the plate's indices.  The model is called with all the data and the
  plate's indices are set to the batch's rows; the plate scales its sites by N/|B|
  itself, which :meth:`log_joint_parts` divides out again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import Independent, Normal
from numpyro.distributions.constraints import _GreaterThan
from numpyro.distributions.distribution import ExpandedDistribution
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.reparam import LocScaleReparam
from numpyro.primitives import Messenger

from viax.model import ModelError, Site

__all__ = ["BatchedModel", "LocalSite", "analyse"]

ROWS = "_rows"  # the key of a batch's global row indices
MASK = "_mask"  # False on the padding rows of a last, partial batch


class LocalSite(NamedTuple):
    """A latent with one value per data row: unconstrained values (num_rows, size)."""

    name: str
    row_shape: tuple[int, ...]  # unconstrained shape of one row's value
    size: int  # prod(row_shape)


class _plate_rows(Messenger):
    """Sets the indices of the subsampled plate ``name`` to ``rows``; the plate then
    scales its sites by size / len(rows) itself."""

    def __init__(self, fn, name: str, rows):
        self.name, self.rows = name, rows
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "plate" and msg["name"] == self.name:
            msg["value"] = self.rows
            msg["args"] = (msg["args"][0], self.rows.shape[0])


@dataclass(frozen=True, eq=False)
class BatchedModel:
    """A model split into global and local parts; see the module docstring.

    ``batch`` arguments are dicts of the row arrays of one batch (leading dimension
    |B|) with the batch's global row indices under ``"_rows"``, merged with the
    constant (whole) arrays of the data.
    """

    model_fn: Callable
    static_data: tuple  # ((name, python scalar), ...)
    row_names: tuple[str, ...]  # arrays cut into batches (empty for a subsampled plate)
    num_rows: int  # N
    subsample_plate: str | None  # NumPyro's way: the plate whose indices are the rows
    global_sites: tuple[Site, ...]
    local_sites: tuple[LocalSite, ...]
    local_names: frozenset  # every site (latent or observed) counted as local
    unravel_global: Callable = field(repr=False)
    # Global Normal sites fitted non-centred (``{name}_decentered`` is the latent; the
    # user's site is recomputed as a deterministic ``loc + scale · decentered``).
    noncentred: tuple[str, ...] = ()
    positive: frozenset = frozenset()  # global sites bounded below (scales): u = log(x - a)

    @property
    def global_dim(self) -> int:
        return int(sum(s.size for s in self.global_sites))

    def positive_index(self) -> np.ndarray:
        """Flat indices (into the global vector) of the sites bounded below."""
        return np.concatenate(
            [
                np.arange(s.start, s.start + s.size)
                for s in self.global_sites
                if s.name in self.positive
            ]
            or [np.zeros(0, int)]
        ).astype(int)

    def site_of_index(self, index: int) -> str:
        for site in self.global_sites:
            if site.start <= index < site.start + site.size:
                return site.name
        raise IndexError(index)

    def _trace(self, global_u, local_u: Mapping[str, jax.Array], batch: Mapping[str, Any]):
        """The model's trace at unconstrained values, and the log-Jacobians by site
        (arrays over the site's batch shape, scaled like the site)."""
        rows = batch[ROWS]
        values = dict(self.unravel_global(global_u))
        for site in self.local_sites:
            values[site.name] = local_u[site.name].reshape((rows.shape[0], *site.row_shape))
        log_dets: dict[str, jax.Array] = {}

        def substitute_fn(msg):
            if msg["type"] != "sample" or msg["name"] not in values:
                return None
            u = values[msg["name"]]
            bijection = biject_to(msg["fn"].support)
            x = bijection(u)
            log_det = bijection.log_abs_det_jacobian(u, x)
            log_det = sum_rightmost(
                log_det, jnp.ndim(log_det) - jnp.ndim(x) + len(msg["fn"].event_shape)
            )
            scale = msg["scale"]
            log_dets[msg["name"]] = log_det * (1.0 if scale is None else scale)
            return x

        model = handlers.substitute(self.model_fn, substitute_fn=substitute_fn)
        if self.subsample_plate is not None:
            model = _plate_rows(model, self.subsample_plate, rows)
        # Keys with a leading underscore are the algorithm's (rows, mask, set-up).
        kwargs = {
            **dict(self.static_data),
            **{k: v for k, v in batch.items() if not k.startswith("_")},
        }
        trace = handlers.trace(model).get_trace(**kwargs)
        return trace, log_dets

    def log_joint_parts(self, global_u, local_u, batch, mask=None) -> tuple[jax.Array, jax.Array]:
        """``(G, Σ_{i∈B} ℓ_i)``: the global terms and the *unscaled* sum of the batch's
        local terms, log-Jacobians included.  ``global_u`` (D_g,), ``local_u[site]``
        (|B|, size); ``mask`` (|B|,) weighs each row's local terms (0 for padding)."""
        trace, log_dets = self._trace(global_u, local_u, batch)
        global_sum, local_sum = 0.0, 0.0
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            term = site["fn"].log_prob(site["value"])
            if site["scale"] is not None:
                term = term * site["scale"]
            if name in self.local_names:
                local_sum = local_sum + _row_sum(name, term, mask)
                if name in log_dets:
                    local_sum = local_sum + _row_sum(name, log_dets[name], mask)
            else:
                global_sum = global_sum + jnp.sum(term) + jnp.sum(log_dets.get(name, 0.0))
        if self.subsample_plate is not None:
            # The plate scaled its sites by N/|B|: undo it, the algorithm applies it.
            local_sum = local_sum * (batch[ROWS].shape[0] / self.num_rows)
        return jnp.asarray(global_sum), jnp.asarray(local_sum)

    def constrain_globals(self, global_u, batch) -> dict:
        """Constrained values of the global latents at ``global_u`` (D_g,)."""
        rows = batch[ROWS].shape[0]
        zeros = {s.name: jnp.zeros((rows, s.size)) for s in self.local_sites}
        trace, _ = self._trace(global_u, zeros, batch)
        hidden = {f"{name}_decentered" for name in self.noncentred}
        out = {s.name: trace[s.name]["value"] for s in self.global_sites if s.name not in hidden}
        out.update({name: trace[name]["value"] for name in self.noncentred})
        return out


def _row_sum(name, term, mask):
    """Σ of a local site's terms, row i weighted by mask[i] (rows on the leading axis)."""
    term = jnp.asarray(term)
    if mask is None:
        return jnp.sum(term)
    if term.ndim == 0 or term.shape[0] != mask.shape[0]:
        raise ModelError(
            f"site {name!r}: its log density has shape {term.shape}, without the rows on "
            "the leading axis; put the rows' plate outermost (one term per row)"
        )
    return jnp.sum(term * mask.astype(term.dtype).reshape((-1,) + (1,) * (term.ndim - 1)))


def _abstract_trace(model_fn, kwargs: dict):
    """The model's trace with abstract arrays (``jax.eval_shape``: nothing runs)."""
    captured = {}

    def discover(dynamic):
        seeded = handlers.substitute(
            handlers.seed(model_fn, jax.random.PRNGKey(0)), substitute_fn=init_to_uniform(radius=2)
        )
        trace = handlers.trace(seeded).get_trace(**{**static, **dynamic})
        captured["trace"] = trace
        return {
            name: biject_to(site["fn"].support).inv(site["value"])
            for name, site in trace.items()
            if _is_latent(site)
        }

    static = {k: v for k, v in kwargs.items() if not hasattr(v, "shape")}
    dynamic = {k: v for k, v in kwargs.items() if hasattr(v, "shape")}
    try:
        shapes = jax.eval_shape(discover, dynamic)
    except ModelError:
        raise
    except Exception as err:  # the user's model raised: say so, with its message
        raise ModelError(
            f"the model raised while tracing it with a batch of the data: "
            f"{type(err).__name__}: {err}"
        ) from err
    return captured["trace"], shapes


def _is_latent(site) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_deterministic", False)
    )


def _subsampled_plates(trace) -> dict[str, tuple[int, int]]:
    return {
        name: (int(site["args"][0]), int(site["args"][1]))
        for name, site in trace.items()
        if site["type"] == "plate"
        and site["args"][1] is not None
        and site["args"][1] != site["args"][0]
    }


def _frames(site) -> set[str]:
    return {frame.name for frame in site.get("cond_indep_stack", ())}


def _normal_base(fn):
    """The Normal under a site's Independent/expand wrappers, or None."""
    while isinstance(fn, Independent | ExpandedDistribution):
        fn = fn.base_dist
    return fn if type(fn) is Normal else None


def _latent_scale_sites(trace, local: set) -> tuple[str, ...]:
    """Global Normal latents whose scale is computed from the model's inputs (other
    latents, or data), not a constant: in the abstract trace such a scale is a tracer.

    Centred, ``θ_j ~ N(μ, τ)`` puts a funnel into the joint density: ``log p`` grows
    like ``−(J − 1) log τ`` as ``τ → 0`` with ``θ_j → μ``, so the MAP that the
    whitening is centred on does not exist and a mean-field q fits the funnel's
    neck.  Non-centred, ``θ_j = μ + τ ε_j, ε_j ~ N(0, 1)``, the density is bounded
    (Papaspiliopoulos, Roberts & Sköld 2007; Betancourt & Girolami 2015).  A scale that
    is data (a tracer too) only rescales a coordinate: harmless."""
    names = []
    for name, site in trace.items():
        if not _is_latent(site) or name in local:
            continue
        base = _normal_base(site["fn"])
        if base is not None and isinstance(base.scale, jax.core.Tracer):
            names.append(name)
    return tuple(names)


def analyse(
    model_fn: Callable,
    static: dict,
    rows: Mapping[str, jax.ShapeDtypeStruct],
    constants: Mapping[str, Any],
    num_rows: int,
    batch_size: int,
    noncentre: bool = True,
) -> BatchedModel:
    """:func:`_analyse`, then, if ``noncentre`` and the model has global Normal sites
    whose scale is itself computed (a hierarchical prior), the same with those sites
    non-centred by NumPyro's ``LocScaleReparam(centered=0)``; the draws keep the
    user's site names (recomputed as ``loc + scale · {name}_decentered``)."""
    bm, trace = _analyse(model_fn, static, rows, constants, num_rows, batch_size)
    names = _latent_scale_sites(trace, set(bm.local_names)) if noncentre else ()
    if not names:
        return bm
    config = {name: LocScaleReparam(centered=0) for name in names}
    reparam_fn = handlers.reparam(model_fn, config=config)
    bm, _ = _analyse(reparam_fn, static, rows, constants, num_rows, batch_size)
    return dataclasses.replace(bm, noncentred=names)


def _refuse_params(trace) -> None:
    """A batched model is fitted for fixed θ: a ``numpyro.param`` site would silently keep
    its initial value, so it is refused by name."""
    names = [name for name, site in trace.items() if site["type"] == "param"]
    if names:
        raise ModelError(
            f"numpyro.param site(s) {', '.join(names)}: parameters θ are learned "
            "(viax.infer.learn) from data held in memory; pass the data as a dict of "
            "arrays (batch_size= minibatches them). A viax.data source is fitted for a "
            "fixed model"
        )


def _analyse(
    model_fn: Callable,
    static: dict,
    rows: Mapping[str, jax.ShapeDtypeStruct],
    constants: Mapping[str, Any],
    num_rows: int,
    batch_size: int,
) -> tuple[BatchedModel, Any]:
    """Find the global and local sites of ``model_fn`` called with batches of ``rows``
    (abstract row arrays: only their dtypes and trailing shapes are used) and the whole
    ``constants``.

    A model written NumPyro's way (a plate with ``subsample_size``) is recognised from
    a trace with all the data (``rows`` then holds nothing; ``constants`` the data)."""
    whole = {**static, **{k: _abstract(v) for k, v in constants.items()}}
    if not rows:
        trace, shapes = _abstract_trace(model_fn, whole)
        _refuse_params(trace)
        plates = _subsampled_plates(trace)
        if len(plates) > 1:
            raise ModelError(
                f"the model subsamples {len(plates)} plates ({', '.join(plates)}); minibatch "
                "VI supports one subsampled plate over the data rows"
            )
        if not plates:
            raise ModelError(
                "no data rows to batch: pass the data as arrays with one row per "
                "observation, or subsample a plate (numpyro.plate(name, N, subsample_size=B))"
            )
        ((plate, (size, _)),) = plates.items()
        local = {n for n, s in trace.items() if s["type"] == "sample" and plate in _frames(s)}
        return _build(model_fn, static, (), size, plate, trace, shapes, local), trace
    traces = []
    for size in (batch_size, batch_size + 1):
        batch = {k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype) for k, v in rows.items()}
        traces.append(_abstract_trace(model_fn, {**whole, **batch}))
    (trace, shapes), (other, _) = traces
    _refuse_params(trace)
    if _subsampled_plates(trace):
        raise ModelError(
            "the model subsamples a plate itself (subsample_size=...): pass the whole data "
            "in memory (a dict of arrays), or write the model over the batch's rows"
        )
    data_plates = {
        name
        for name, site in trace.items()
        if site["type"] == "plate"
        and name in other
        and site["args"][0] == batch_size
        and other[name]["args"][0] == batch_size + 1
    }
    local = set()
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        in_plate = bool(_frames(site) & data_plates)
        follows = np.shape(site["value"]) != np.shape(other[name]["value"])
        if in_plate or follows:
            local.add(name)
    return _build(model_fn, static, tuple(rows), num_rows, None, trace, shapes, local), trace


def _abstract(value):
    array = np.asarray(value) if not hasattr(value, "shape") else value
    return jax.ShapeDtypeStruct(array.shape, array.dtype)


def _build(model_fn, static, row_names, num_rows, plate, trace, shapes, local) -> BatchedModel:
    latents = [s for s in trace.values() if _is_latent(s)]
    if not latents:
        raise ModelError("the model has no latent sample sites: nothing to infer")
    discrete = [s["name"] for s in latents if s["fn"].support.is_discrete]
    if discrete:
        raise ModelError(
            f"site(s) {', '.join(discrete)} are discrete; minibatch VI needs continuous latents"
        )
    local_sites = []
    for s in latents:
        if s["name"] not in local:
            continue
        u_shape = tuple(shapes[s["name"]].shape)
        rows = trace[plate]["args"][1] if plate is not None else None
        if not u_shape or (rows is not None and u_shape[0] != rows):
            raise ModelError(
                f"local latent {s['name']!r} has shape {u_shape}: its leading dimension must "
                "be the data rows (put the rows' plate at dim=-1 of a scalar per row, or "
                "leftmost of a vector per row)"
            )
        local_sites.append(LocalSite(s["name"], u_shape[1:], int(np.prod(u_shape[1:], dtype=int))))
    zeros = {
        s["name"]: jnp.zeros(shapes[s["name"]].shape) for s in latents if s["name"] not in local
    }
    _, unravel = ravel_pytree(zeros)
    global_sites, offset = [], 0
    for name in sorted(zeros):  # ravel_pytree's order
        size = int(np.prod(zeros[name].shape, dtype=int))
        shape = tuple(np.shape(trace[name]["value"]))
        global_sites.append(Site(name, shape, tuple(zeros[name].shape), offset, size, False))
        offset += size
    return BatchedModel(
        model_fn=model_fn,
        static_data=tuple(sorted(static.items())),
        row_names=tuple(row_names),
        num_rows=int(num_rows),
        subsample_plate=plate,
        global_sites=tuple(global_sites),
        local_sites=tuple(local_sites),
        local_names=frozenset(local),
        unravel_global=unravel,
        positive=frozenset(
            name for name in zeros if isinstance(trace[name]["fn"].support, _GreaterThan)
        ),
    )
