"""Full-batch sums over the rows in blocks: memory O(block × draws), not O(N × draws).

The full-batch objective of DADVI is the log joint of all N rows at each of M fixed
draws,

    log p̃(u_m) = G(u_m) + Σ_{k<K} Σ_{i∈B_k} ℓ_i(u_m),   m = 1…M,

where G holds the global terms (priors, group effects, log-Jacobians) and ℓ_i the
terms of row i (:meth:`viax.batched.BatchedModel.log_joint_parts`).  Evaluated as one
program over all rows, every intermediate of the model is an (M, N) array: 10⁶ rows ×
64 draws of a logistic regression held 9.2 GB.  Here the rows are cut into K blocks of
B rows (the last padded with masked copies of the final row, so that one compiled body
serves every block) and the inner sum is a ``lax.scan`` over the blocks whose body is
wrapped in ``jax.checkpoint``: the reverse pass recomputes each block's
intermediates instead of storing them, so the gradient's memory is O(B × M) too (the
rematerialisation of Chen et al. 2016, "Training deep nets with sublinear memory
cost").  Value, gradient and Hessian-vector products are those of the unchunked
density up to the order of summation (1e-12 relative; tested).

Small data pay nothing: when the rows fit in one block (``rows × draws × numbers per
row ≤ BLOCK_ELEMENTS``), or in ``WHOLE_ELEMENTS`` (256 MB per array), no chunked target
is built.  A model that cannot be cut into
blocks (per-row latents, a subsampled plate, a model that uses its rows outside their
plate) is fitted unchunked, with the reason in ``info["chunks_reason"]``; the chunked
density is checked against the whole one at two points before it is used.

:func:`hessian_diagonal` gives the exact diagonal of a Hessian from a few
Hessian-vector products: one probe per site whose coordinates no term couples (the
plane effects of a hierarchical model: each row touches one plane), checked, and
one product per coordinate only for sites that fail the check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from viax.batched import MASK, ROWS, BatchedModel, analyse
from viax.model import ModelError, Target

__all__ = [
    "BLOCK_ELEMENTS",
    "WHOLE_ELEMENTS",
    "FULL_BATCH_SECONDS",
    "ChunkedTarget",
    "DENSE_CURVATURE_MEMORY",
    "DENSE_CURVATURE_SECONDS",
    "dense_curvature_plan",
    "dense_memory_fits",
    "full_batch_estimate",
    "hvp_group",
    "HessianStructure",
    "hessian_diagonal",
    "hessian_structure",
    "structured_hessian",
    "log_density_many",
    "plan_chunks",
    "row_layout",
]

# rows × draws × (numbers per row + _ROW_OVERHEAD) in one block: 2^22 float64 numbers
# are 32 MB for each array of that size the model holds per block.
BLOCK_ELEMENTS = 2**22
# Data up to this many (rows × draws × numbers per row) are evaluated whole, as before
# blocks existed: 256 MB per array, which the whole-data program always handled, and
# cutting them costs a second compiled program and the check (+0.3-0.45 s on the
# 569-row × 1024-draw logistic regression of benchmarks/speed.py).
WHOLE_ELEMENTS = 2**25
_ROW_OVERHEAD = 8  # intermediates per row and draw beyond the row's own numbers
_MIN_BLOCK = 64
_CHECK_RTOL = 1e-8  # chunked against whole log density at two points
_PROBE_BLOCK = 32  # Hessian-vector products at once when a site is probed per coordinate


def row_layout(arrays: Mapping[str, Any]) -> tuple[int, tuple[str, ...], int]:
    """``(N, row names, numbers per row)``: the rows are the leading dimension of the
    largest arrays (that of the most rows); arrays with another leading dimension are
    constants (group-level data)."""
    shaped = {k: v for k, v in arrays.items() if np.ndim(v) > 0}
    if not shaped:
        return 0, (), 0
    num_rows = max(int(np.shape(v)[0]) for v in shaped.values())
    names = tuple(sorted(k for k, v in shaped.items() if np.shape(v)[0] == num_rows))
    width = sum(int(np.prod(np.shape(arrays[k])[1:], dtype=int)) for k in names)
    return num_rows, names, width


# The path's budget: a full-batch fit expected to take longer than this (or data that do
# not fit twice in memory) goes to the minibatch path.
FULL_BATCH_SECONDS = 600.0
# One L-BFGS step of DADVI costs about this per row, draw and number of the row (plus
# _ROW_OVERHEAD): flights, 327,346 rows x 64 draws x (6 + 8), 2.2 s a step on this
# project's shared 2-core machine (7e-9), a quiet core about half that.
_SECONDS_PER_NUMBER = 5e-9
_EXPECTED_PASSES = 200  # L-BFGS steps of a large-data fit, the MAP search included


def _available_memory() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def full_batch_estimate(data: Mapping[str, Any] | None, num_draws: int = 64) -> tuple[bool, str]:
    """``(fits, reason)``: whether a full-batch fit of ``data`` fits the budget of
    :data:`FULL_BATCH_SECONDS` and memory, and a sentence saying why (for
    ``info["path_reason"]``).  Memory is bounded by the blocks whatever the rows, so
    the rows' own bytes (held twice: as given and in blocks) are the memory test; the
    time is ``_EXPECTED_PASSES`` passes over rows × draws × numbers per row."""
    arrays = {k: np.asarray(v) for k, v in (data or {}).items() if np.ndim(v) > 0}
    num_rows, _, width = row_layout(arrays)
    if num_rows == 0:
        return True, "no data rows: full batch"
    numbers = num_rows * num_draws * (width + _ROW_OVERHEAD)
    seconds = _EXPECTED_PASSES * numbers * _SECONDS_PER_NUMBER
    data_bytes = sum(a.nbytes for a in arrays.values())
    available = _available_memory()
    if 2 * data_bytes > 0.5 * available:
        return False, (
            f"the data ({data_bytes / 1e9:.1f} GB, held twice by the full-batch blocks) "
            f"would take more than half the {available / 1e9:.1f} GB of memory available"
        )
    if seconds > FULL_BATCH_SECONDS:
        return False, (
            f"a full-batch fit would take about {seconds:.3g} s ({_EXPECTED_PASSES} passes "
            f"over {num_rows} rows x {num_draws} draws), over its {FULL_BATCH_SECONDS:.3g} s "
            "budget"
        )
    blocks = math.ceil(num_rows / block_size_for(num_rows, width, num_draws))
    memory = "one block" if blocks == 1 else f"about {blocks} blocks of rows, memory bounded"
    return True, (
        f"{num_rows} rows x {num_draws} draws: about {seconds:.3g} s within the "
        f"{FULL_BATCH_SECONDS:.3g} s budget ({memory})"
    )


# The dense D × D curvature (the Hessian from D Hessian-vector products, and its
# factorisation) is formed when _DENSE_COPIES float64 D × D matrices fit in this
# fraction of the available memory and _DENSE_HESSIANS Hessians plus one
# eigendecomposition are expected within DENSE_CURVATURE_SECONDS; otherwise the exact
# diagonal and a dense block of the small sites (:func:`hessian_diagonal`).
DENSE_CURVATURE_MEMORY = 0.25
DENSE_CURVATURE_SECONDS = 300.0
_DENSE_COPIES = 8  # H, its scaled copy, eigenvectors, the factor, XLA's workspace
_DENSE_HESSIANS = 3  # at the start of the MAP search, after its first round, at the MAP
# A batch of Hessian-vector products costs about this many passes of _SECONDS_PER_NUMBER
# per direction (forward-over-reverse; measured: 4,170 products over 30,000 flights rows
# in 61 s on the shared machine at load 5, i.e. 7 such passes; a quiet machine ~half).
_HVP_PASSES = 4.0
# eigh of a D × D float64 matrix takes about this × D³ seconds: 4,170 in 25-35 s on this
# project's shared 2-core machine (NumPy and XLA alike).
_EIGH_SECONDS_PER_CUBE = 4.5e-10
# The dense Hessian reads at least this many rows when it reads a sample of them.
_MIN_CURVATURE_ROWS = 16384


def dense_curvature_plan(
    dim: int, data: Mapping[str, Any] | None, products: int | None = None
) -> tuple[bool, str, int | None]:
    """``(dense, reason, rows)``: whether the set-up forms the dense D × D Hessian of the
    log density (memory and time budget) or its exact diagonal plus a dense block of the
    small sites, a sentence saying why (``info["curvature_reason"]``), and the rows the
    dense Hessian reads (None: all).

    A hierarchical posterior has long ridges no diagonal undoes: an intercept against
    every group effect, a carrier's effect against those of its planes, a scale against
    its effects.  Their dense curvature costs D²·8 bytes (139 MB at D = 4,170) and D
    Hessian-vector products, each about :data:`_HVP_PASSES` passes over the rows, so it
    is chosen by that memory and time, not by D alone.  Where the passes over every
    row would not fit the time, the Hessian reads every k-th block of rows, at least
    :data:`_MIN_CURVATURE_ROWS` (it only preconditions: the optimum does not depend on
    it, the number of steps does).  ``products``: Hessian-vector products per Hessian
    (default D; fewer for a :class:`HessianStructure`)."""
    arrays = {k: v for k, v in (data or {}).items() if np.ndim(v) > 0}
    num_rows, _, width = row_layout(arrays)
    products = dim if products is None else products
    per_number = _DENSE_HESSIANS * products * _HVP_PASSES * _SECONDS_PER_NUMBER

    def seconds(rows):  # the Hessians' passes over ``rows`` rows, and one eigh
        numbers = max(rows * (width + _ROW_OVERHEAD), dim)
        return per_number * numbers + _EIGH_SECONDS_PER_CUBE * float(dim) ** 3

    memory = _DENSE_COPIES * 8.0 * float(dim) ** 2
    available = _available_memory()
    if memory > DENSE_CURVATURE_MEMORY * available:
        return (
            False,
            (
                f"Hessian diagonal: {dim} x {dim} dense curvature ({memory / 1e9:.3g} GB in "
                f"{_DENSE_COPIES} copies) over {DENSE_CURVATURE_MEMORY:.0%} of the "
                f"{available / 1e9:.3g} GB available"
            ),
            None,
        )
    rows = num_rows
    if seconds(num_rows) > DENSE_CURVATURE_SECONDS:
        spare = DENSE_CURVATURE_SECONDS - seconds(0)
        rows = int(max(0.0, spare) / (per_number * (width + _ROW_OVERHEAD)))
    least = min(num_rows, _MIN_CURVATURE_ROWS)
    if rows < least or seconds(rows) > DENSE_CURVATURE_SECONDS:
        return (
            False,
            (
                f"Hessian diagonal: the dense curvature would take about {seconds(least):.3g} s "
                f"({_DENSE_HESSIANS} x {products} Hessian-vector products over {least} rows), "
                f"over its {DENSE_CURVATURE_SECONDS:.3g} s budget"
            ),
            None,
        )
    sample = "" if rows >= num_rows else f" from about {rows} of the {num_rows} rows"
    return (
        True,
        (
            f"dense Hessian{sample}: {dim} x {dim} ({memory / 1e9:.3g} GB in {_DENSE_COPIES} "
            f"copies), about {seconds(rows):.3g} s within the {DENSE_CURVATURE_SECONDS:.3g} s "
            "budget"
        ),
        (None if rows >= num_rows else rows),
    )


def dense_memory_fits(dim: int) -> bool:
    """Whether :data:`_DENSE_COPIES` D × D float64 matrices fit in
    :data:`DENSE_CURVATURE_MEMORY` of the available memory (the first test of
    :func:`dense_curvature_plan`)."""
    return _DENSE_COPIES * 8.0 * float(dim) ** 2 <= DENSE_CURVATURE_MEMORY * _available_memory()


def hvp_group(target, data: Mapping[str, Any], dim: int) -> int:
    """Hessian-vector products taken at once (``jax.lax.map``'s batch size) when the
    dense Hessian is formed: ``draw_group`` for a :class:`ChunkedTarget` (its blocks
    are sized for that many draws); for a whole target all ``dim`` when dim × rows ×
    numbers per row is within :data:`WHOLE_ELEMENTS` (as before blocks existed), else
    as many as fit in :data:`BLOCK_ELEMENTS` (4,170 products over 30k rows at once held
    gigabytes)."""
    if isinstance(target, ChunkedTarget):
        return max(1, min(dim, target.draw_group))
    arrays = {k: v for k, v in (data or {}).items() if np.ndim(v) > 0}
    num_rows, _, width = row_layout(arrays)
    per_direction = max(1, num_rows * (width + _ROW_OVERHEAD))
    if dim * per_direction <= WHOLE_ELEMENTS:
        return dim
    return max(1, min(dim, BLOCK_ELEMENTS // per_direction))


def block_size_for(num_rows: int, width: int, num_draws: int) -> int:
    """Rows per block so that one block of ``num_draws`` draws holds about
    :data:`BLOCK_ELEMENTS` numbers per array; the blocks balanced over the rows."""
    block = max(_MIN_BLOCK, BLOCK_ELEMENTS // (max(num_draws, 1) * (width + _ROW_OVERHEAD)))
    if block >= num_rows:
        return num_rows
    num_blocks = math.ceil(num_rows / block)
    return math.ceil(num_rows / num_blocks)


@dataclass(frozen=True, eq=False)
class ChunkedTarget:
    """The log density of ``target`` with its sum over rows taken block by block.

    ``log_density(u, data)`` takes the *blocked* data of :meth:`blocked`
    (``{"blocks": {name: (K, B, ...), "_rows", "_mask"}, "constants": {...}}``) and
    returns the same number as ``target.log_density(u, arrays)``.  Everything else
    (sites, constraints) is the target's."""

    target: Target
    batched: BatchedModel
    row_names: tuple[str, ...]
    num_rows: int
    block_size: int
    num_blocks: int
    draw_group: int  # draws evaluated at once by log_density_many (the block's budget)

    @property
    def dim(self) -> int:
        return self.target.dim

    @property
    def sites(self):
        return self.target.sites

    def site_of_index(self, index: int) -> str:
        return self.target.site_of_index(index)

    def describe(self) -> str:
        return f"{self.num_rows} rows in {self.num_blocks} blocks of {self.block_size}"

    def blocked(self, arrays: Mapping[str, Any]) -> dict:
        """The data laid out in blocks (host copy of the row arrays, padded)."""
        total = self.block_size * self.num_blocks
        pad = total - self.num_rows
        blocks = {}
        for name in self.row_names:
            array = np.asarray(arrays[name])
            if pad:
                array = np.concatenate([array, np.repeat(array[-1:], pad, axis=0)])
            blocks[name] = jnp.asarray(
                array.reshape(self.num_blocks, self.block_size, *array.shape[1:])
            )
        index = np.arange(total)
        blocks[ROWS] = jnp.asarray(np.minimum(index, self.num_rows - 1).astype(np.int32)).reshape(
            self.num_blocks, self.block_size
        )
        blocks[MASK] = jnp.asarray(index < self.num_rows).reshape(self.num_blocks, self.block_size)
        constants = {k: v for k, v in arrays.items() if k not in self.row_names}
        return {"blocks": blocks, "constants": constants}

    def curvature_stride(self, rows: int) -> int:
        """Every how many blocks the dense curvature reads to see about ``rows`` rows."""
        wanted = max(1, math.ceil(rows / self.block_size))
        return max(1, self.num_blocks // wanted)

    def log_density(
        self, position: jax.Array, data: Mapping[str, Any], stride: int = 1
    ) -> jax.Array:
        """G(u) + Σ_k Σ_{i∈B_k} mask_i ℓ_i(u) for ``u`` (D,); see the module docstring.

        ``stride`` > 1: only every stride-th block, its row sum scaled by N / (rows
        read), an estimate of the same density for the dense curvature of a large data
        set (:func:`dense_curvature_plan`: a preconditioner, so an estimate serves)."""
        blocks, constants = data["blocks"], data["constants"]
        bm = self.batched
        scale = None
        if stride > 1:
            blocks = {k: v[::stride] for k, v in blocks.items()}
            scale = self.num_rows / jnp.sum(blocks[MASK]).astype(position.dtype)

        def parts(block):
            batch = {**constants, **{k: v for k, v in block.items() if k != MASK}}
            return bm.log_joint_parts(position, {}, batch, block[MASK])

        # The global terms from the first block (its local part is dead code, removed).
        global_sum, _ = parts({k: v[0] for k, v in blocks.items()})

        def body(total, block):
            return total + parts(block)[1], None

        local_sum, _ = jax.lax.scan(
            jax.checkpoint(body, prevent_cse=False), jnp.zeros((), position.dtype), blocks
        )
        return global_sum + (local_sum if scale is None else scale * local_sum)


def log_density_many(target, positions: jax.Array, data) -> jax.Array:
    """``target.log_density`` at each of ``positions`` (S, D): all at once for a plain
    target; ``draw_group`` at a time for a :class:`ChunkedTarget`, whose blocks are sized
    for that many draws (1000 draws of the final ELBO would otherwise hold 1000/M times
    the block's memory)."""

    def one(u):
        return target.log_density(u, data)

    if isinstance(target, ChunkedTarget) and positions.shape[0] > target.draw_group:
        return jax.lax.map(one, positions, batch_size=target.draw_group)
    return jax.vmap(one)(positions)


_PLANS: dict = {}


def plan_chunks(
    target: Target, arrays: Mapping[str, Any], num_draws: int, position
) -> tuple[ChunkedTarget | None, str]:
    """``(chunked target or None, reason)``: the blocks for a full-batch fit with
    ``num_draws`` draws, or None with the reason the density is evaluated whole (the
    rows fit in one block, or the model cannot be cut; the reason names it)."""
    num_rows, names, width = row_layout(arrays)
    if num_rows == 0:
        return None, "no data rows"
    block = block_size_for(num_rows, width, num_draws)
    if block >= num_rows:
        return None, f"{num_rows} rows x {num_draws} draws fit in one block"
    elements = num_rows * num_draws * (width + _ROW_OVERHEAD)
    if elements <= WHOLE_ELEMENTS:
        return None, (
            f"{num_rows} rows x {num_draws} draws evaluated whole ({elements / 2**20:.3g} M "
            f"numbers per array, within {WHOLE_ELEMENTS / 2**20:.3g} M)"
        )
    if target.param_sites:
        return None, "not chunked: the model has numpyro.param sites"
    num_blocks = math.ceil(num_rows / block)
    key = (target, num_rows, names, block, num_blocks)
    if key in _PLANS:
        return _PLANS[key]
    out = _plan(target, arrays, names, num_rows, block, num_blocks, num_draws, position)
    _PLANS[key] = out
    return out


def _plan(target, arrays, names, num_rows, block, num_blocks, num_draws, position):
    static = dict(target.static_data)
    rows = {
        k: jax.ShapeDtypeStruct((block, *np.shape(arrays[k])[1:]), jnp.asarray(arrays[k]).dtype)
        for k in names
    }
    constants = {k: v for k, v in arrays.items() if k not in names}
    try:
        # noncentre=False: the same parametrisation (and flat vector) as the target.
        bm = analyse(target.model_fn, static, rows, constants, num_rows, block, noncentre=False)
    except ModelError as err:
        return None, f"not chunked: {err}"
    if bm.local_sites:
        local = ", ".join(s.name for s in bm.local_sites)
        return None, f"not chunked: per-row latent(s) {local} (one value per row)"
    ours = sorted((s.start, s.name, s.size) for s in target.sites if not s.is_discrete)
    theirs = sorted((s.start, s.name, s.size) for s in bm.global_sites)
    if ours != theirs:
        return None, "not chunked: the row blocks see other latent sites than the whole model"
    chunked = ChunkedTarget(
        target, bm, names, num_rows, block, num_blocks, draw_group=max(1, num_draws)
    )
    blocked = chunked.blocked(arrays)
    whole_fn = jax.jit(target.log_density)
    chunked_fn = jax.jit(chunked.log_density)
    rng = np.random.default_rng(0)
    for u in (np.asarray(position), np.asarray(position) + 0.1 * rng.standard_normal(target.dim)):
        whole = float(whole_fn(u, arrays))
        try:  # a row term without the rows on its leading axis shows only when traced
            part = float(chunked_fn(u, blocked))
        except ModelError as err:
            return None, f"not chunked: {err}"
        if not (math.isfinite(whole) and abs(part - whole) <= _CHECK_RTOL * (1.0 + abs(whole))):
            return None, (
                f"not chunked: the log density summed over row blocks ({part:.10g}) is not the "
                f"whole one ({whole:.10g}); does the model use its rows outside their plate?"
            )
    return chunked, f"{chunked.describe()} ({num_draws} draws)"


def hessian_diagonal(
    fn: Callable[[jax.Array], jax.Array], position: jax.Array, sites: tuple
) -> jax.Array:
    """The exact diagonal of the Hessian of ``fn`` at ``position`` (D,) from few
    Hessian-vector products (traceable; ``sites``: ``(start, size)`` of each latent).

    A site of one coordinate is probed by its unit vector.  For a larger site s the
    products with its indicator 1_s and with r ⊙ 1_s (fixed weights r in [1, 2)) give,
    for j ∈ s, (H 1_s)_j = H_jj + Σ_{k∈s, k≠j} H_jk and (H r)_j = r_j H_jj + Σ r_k H_jk:
    where no term couples two coordinates of s (each row of a hierarchical model touches
    one of its groups; an iid prior), (H r)_j = r_j (H 1_s)_j and (H 1_s)_j is the
    diagonal.  A site that fails that check (to 1e-8 of its largest entry) is probed
    one coordinate at a time, :data:`_PROBE_BLOCK` products at once.  Cost: two
    products per site where the check holds (a pass over the data each), against D for
    the dense Hessian; memory O(D) per product."""
    dim = position.shape[0]
    grad_fn = jax.grad(fn)

    def hvp(v):
        return jax.jvp(grad_fn, (position,), (v,))[1]

    probes, layout, vector = [], [], []
    for start, size in sites:
        if size == 0:
            continue
        mask = jnp.zeros(dim, position.dtype).at[start : start + size].set(1.0)
        if size == 1:
            layout.append((start, size, len(probes), None))
            probes.append(mask)
            continue
        weights = 1.0 + np.mod(np.arange(size) * 0.6180339887498949, 1.0)
        weighted = jnp.zeros(dim, position.dtype).at[start : start + size].set(weights)
        layout.append((start, size, len(probes), jnp.asarray(weights)))
        probes.extend([mask, weighted])
        vector.append(np.arange(start, start + size))
    products = jax.vmap(hvp)(jnp.stack(probes))
    diag = jnp.zeros(dim, position.dtype)
    coupled = jnp.zeros(dim, bool)
    for start, size, index, weights in layout:
        first = products[index, start : start + size]
        diag = diag.at[start : start + size].set(first)
        if weights is None:
            continue
        second = products[index + 1, start : start + size]
        scale = jnp.max(jnp.abs(first))
        bad = jnp.any(~(jnp.abs(second - weights * first) <= 1e-8 * scale + 1e-300))
        bad = bad | ~jnp.all(jnp.isfinite(first))
        coupled = coupled.at[start : start + size].set(bad)
    if not vector:
        return diag
    # The coordinates of coupled sites one at a time, _PROBE_BLOCK products at once (one
    # compiled body for every site; blocks of uncoupled sites are skipped at run time).
    coords = np.concatenate(vector)
    count = math.ceil(coords.size / _PROBE_BLOCK)
    padded = np.full(count * _PROBE_BLOCK, dim)
    padded[: coords.size] = coords
    padded = jnp.asarray(padded.reshape(count, _PROBE_BLOCK))

    def one_block(index):
        needed = jnp.any(jnp.where(index < dim, coupled[jnp.minimum(index, dim - 1)], False))

        def products_of_block():
            basis = jax.nn.one_hot(index, dim, dtype=position.dtype)  # index dim: zero row
            return jnp.sum(jax.vmap(hvp)(basis) * basis, axis=1)

        return jax.lax.cond(
            needed, products_of_block, lambda: jnp.zeros(_PROBE_BLOCK, position.dtype)
        )

    per_coordinate = jax.lax.map(one_block, padded).reshape(-1)[: coords.size]
    return diag.at[coords].set(jnp.where(coupled[coords], per_coordinate, diag[coords]))


# The structured Hessian forms at most this many columns (Hessian-vector products by
# unit vectors); everything else must be the diagonal of sites no term couples.
_STRUCTURE_MAX_COLUMNS = 1024
_STRUCTURE_RTOL = 1e-7  # the check's tolerance, relative to the largest product entry


class HessianStructure(NamedTuple):
    """Where the Hessian H of −log p̃ is known to vanish: every entry between two
    coordinates of ``diagonal_sites`` (``(start, size)`` each) is zero except the
    diagonal, so H is fixed by its ``columns`` (flat indices, the rest) and that
    diagonal.  A hierarchical model's effects of one grouping (each row touches one
    group; iid prior) are such a site: its Hessian is an arrowhead, a dense head of the
    globals and the small groupings, a diagonal tail of the large one."""

    columns: tuple[int, ...]  # K flat indices (a tuple: the structure keys compiled code)
    diagonal_sites: tuple[tuple[int, int], ...]

    @property
    def products(self) -> int:
        """Hessian-vector products per Hessian: one per column, one per diagonal site."""
        return len(self.columns) + len(self.diagonal_sites)

    def probes(self, dim: int, dtype) -> np.ndarray:
        """(products, D): the unit vectors of the columns, then each site's indicator."""
        count = len(self.columns)
        basis = np.zeros((self.products, dim), dtype)
        basis[np.arange(count), np.asarray(self.columns, dtype=int)] = 1.0
        for k, (start, size) in enumerate(self.diagonal_sites):
            basis[count + k, start : start + size] = 1.0
        return basis


def structured_hessian(products: jax.Array, structure: HessianStructure, dim: int) -> jax.Array:
    """The dense (D, D) Hessian from the ``products`` H p of ``structure.probes``
    (traceable): H[K, :] = H[:, K]ᵀ = the columns' products, and for j in a diagonal
    site s, H_jj = (H 1_s)_j (no other coordinate of s is coupled to j).  Exact, from
    K + (number of diagonal sites) passes over the rows instead of D (:func:`hessian_structure`
    checks the structure first)."""
    count = len(structure.columns)
    hess = jnp.zeros((dim, dim), products.dtype)
    for k, (start, size) in enumerate(structure.diagonal_sites):
        index = jnp.arange(start, start + size)
        hess = hess.at[index, index].set(products[count + k, start : start + size])
    if count:
        columns = jnp.asarray(structure.columns)
        hess = hess.at[columns, :].set(products[:count])
        hess = hess.at[:, columns].set(products[:count].T)
    return hess


def hessian_structure(
    negative_fn: Callable[[jax.Array, Any], jax.Array],
    data: Any,
    position: np.ndarray,
    sites: tuple,
    max_columns: int = _STRUCTURE_MAX_COLUMNS,
    seed: int = 0,
    within_sites: bool = False,
) -> tuple[HessianStructure | None, str]:
    """``(structure or None, reason)``: the largest site taken as diagonal, and the
    next largest (each of more than one coordinate) until at most ``max_columns``
    coordinates are left for columns, then checked at a random point near
    ``position`` (one batch of products): for a random direction r supported on the
    diagonal sites, (H r)_j must equal (H 1_s)_j r_j for every j of every such site s,
    to :data:`_STRUCTURE_RTOL` of the largest entry.  Any coupling inside a site or
    between two of them breaks that equality (with probability one for a generic point
    and r), so a structure that passes gives the exact Hessian
    (:func:`structured_hessian`).

    ``within_sites``: where that check fails, check each diagonal site alone (one more
    direction r_s per site, supported on s, in the same batch of products), so that a
    coupling **between** two of them passes (the same sites chosen).  Crossed effects
    (each row touching one level of a and one of b) pass that check and fail the exact
    one; :func:`structured_hessian` then gives the exact head (the columns), the exact
    diagonal of each site and zero for the blocks between two diagonal sites: an
    approximation, for whitening only.

    ``negative_fn(u, data)``: −log p̃; ``sites``: the target's sites (name, start, size)."""
    dim = int(np.size(position))
    order = sorted((s for s in sites if s.size > 1), key=lambda s: -s.size)
    chosen, covered, names = [], 0, []
    for site in order:
        if chosen and dim - covered <= max_columns:
            break
        chosen.append((site.start, site.size))
        names.append(f"{site.name} ({site.size})")
        covered += site.size
    if not chosen or dim - covered > max_columns:
        return None, (
            f"no structure: more than {max_columns} coordinates outside the sites that could "
            "be diagonal"
        )
    in_diagonal = np.zeros(dim, bool)
    for start, size in chosen:
        in_diagonal[start : start + size] = True
    columns = tuple(int(i) for i in np.flatnonzero(~in_diagonal))
    structure = HessianStructure(columns, tuple(chosen))
    rng = np.random.default_rng(seed)
    point = np.asarray(position, np.float64) + 0.1 * rng.standard_normal(dim)
    indicators = structure.probes(dim, np.float64)[len(columns) :]
    # Row 0: one direction over every diagonal site (the exact check); with
    # ``within_sites`` one more per site, in the same batch of products.
    directions = np.where(in_diagonal, rng.standard_normal(dim), 0.0)[None]
    if within_sites:
        directions = np.vstack([directions, rng.standard_normal((len(chosen), dim)) * indicators])
    count = directions.shape[0]
    probes = jnp.asarray(np.vstack([directions, indicators]))

    @jax.jit
    def products_at(u, probes, data):
        grad_fn = jax.grad(lambda v: negative_fn(v, data))
        return jax.vmap(lambda p: jax.jvp(grad_fn, (u,), (p,))[1])(probes)

    out = np.asarray(products_at(jnp.asarray(point), probes, data))
    diag = np.sum(out[count:] * indicators, axis=0)

    def check_error(rows, support):
        expected = diag * directions[rows]
        got = np.where(support, out[rows], 0.0)
        scale = max(float(np.max(np.abs(got))), float(np.max(np.abs(expected))), 1e-300)
        return float(np.max(np.abs(got - expected))) / scale

    error = check_error(slice(0, 1), in_diagonal[None])
    names = ", ".join(names)
    if np.isfinite(error) and error <= _STRUCTURE_RTOL:
        return structure, (
            f"exact Hessian from {len(columns)} columns and the diagonal of "
            f"{len(chosen)} uncoupled site(s) ({names}; checked to {error:.1g} relative)"
        )
    coupled = f"no structure: the sites ({names}) are coupled (check error {error:.2g} relative)"
    if not within_sites:
        return None, coupled
    inside = check_error(slice(1, count), indicators > 0)
    if not (np.isfinite(inside) and inside <= _STRUCTURE_RTOL):
        return None, f"{coupled}, inside a site too (check error {inside:.2g} relative)"
    return structure, (
        f"Hessian from {len(columns)} columns and the diagonals of {len(chosen)} site(s), "
        f"each uncoupled inside ({names}; checked to {inside:.1g} relative), the blocks "
        f"between those sites dropped (coupled: check error {error:.2g} relative)"
    )
