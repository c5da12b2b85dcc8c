"""viax.data: data sources for minibatch fits, prefetching, and device sharding.

The contract the minibatch path relies on:

``as_source(data) -> Source``
    ``data`` is a mapping of NumPy arrays / ``np.memmap`` / pandas columns (row arrays
    share the leading dimension N; scalars and arrays with another leading dimension are
    *static*, passed whole with every batch), a pandas DataFrame, a
    :func:`parquet` source, or any iterable of dict batches (one pass = one epoch).

``Source``
    ``num_rows: int | None`` (N, for the N/B scaling of the likelihood),
    ``columns: {name: (row_shape, dtype)}``, ``static: {name: value}``, and
    ``batches(batch_size, *, seed, epoch, start_batch=0, process_index=0,
    process_count=1, remainder="drop") -> Iterator[Batch]``.

``Batch``
    ``{name: np.ndarray (B/P, *row_shape)}`` for this process's share of the *global*
    batch of B rows, plus ``"_rows"`` (int64 global row indices) and, with
    ``remainder="pad"``, ``"_mask"`` (bool, False on padding rows).

Guarantees (tested in ``tests/data``):

- The rows of global batch ``k`` of epoch ``e`` are a pure function of
  ``(seed, e, k)`` and of the data, never of the number of devices or processes;
  process ``p`` of ``P`` gets the slice ``[p B/P, (p+1) B/P)`` of it (B a multiple of
  P).  So the union of the process slices is the one-process batch.
- ``start_batch=k`` continues exactly as the uninterrupted stream would from batch
  ``k``; a checkpoint stores ``(epoch, batch index)``.
- ``source.num_batches(B, remainder=...)`` is the number of global batches per epoch:
  ⌊N/B⌋ (``"drop"``) or ⌈N/B⌉ (``"pad"``) for every source that knows N.
- Every batch has the same shapes: the last partial batch is dropped
  (``remainder="drop"``, default; a different set of rows each epoch) or padded with
  real rows repeated (``"pad"``, marked by ``"_mask"``; every row then appears once
  unmasked per epoch: the mode for sums over the data).  A Parquet source shuffles
  only with ``"drop"``; ``"pad"`` reads it in stream order.
- Parquet: P must divide the source's number of streams S (``num_shards``, default
  the largest of 8, 4, 2, 1 dividing B); each process reads only its streams' row
  groups.  See :mod:`viax.data.parquet_source`.
- Bad data raise :class:`DataError` (a ``ValueError``) naming the column and row.

``prefetch(iterator, *, size=2, sharding=None, stack=K)`` reads ahead in a thread,
stacks K batches (leading axis K, for a ``lax.scan`` over K steps) and places them with
``sharding``; ``.wait_fraction`` is the consumer's share of wall time spent waiting.

``data_mesh(devices=None)``, ``batch_sharding(mesh, stacked=False)``,
``replicated(mesh)``: a one-axis mesh ``"data"``, the batch axis split over it
(axis 1 for stacked chunks), a replicated sharding for parameters.

Example:
    >>> import numpy as np, viax
    >>> src = viax.data.as_source({"X": np.zeros((100, 3)), "y": np.ones(100)})
    >>> batch = next(src.batches(32, seed=0, epoch=0))
    >>> batch["X"].shape, batch["_rows"].dtype
    ((32, 3), dtype('int64'))
"""

from viax.data.parquet_source import ParquetSource, parquet, unique_values
from viax.data.prefetch import Prefetcher, prefetch, stack_batches
from viax.data.sharding import (
    DATA_AXIS,
    batch_sharding,
    data_mesh,
    process_share,
    put,
    replicated,
)
from viax.data.source import (
    MASK,
    ROWS,
    ArraySource,
    Batch,
    DataError,
    IterableSource,
    Source,
    as_source,
)

__all__ = [
    "DATA_AXIS",
    "MASK",
    "ROWS",
    "ArraySource",
    "Batch",
    "DataError",
    "IterableSource",
    "ParquetSource",
    "Prefetcher",
    "Source",
    "as_source",
    "batch_sharding",
    "data_mesh",
    "parquet",
    "prefetch",
    "process_share",
    "put",
    "replicated",
    "stack_batches",
    "unique_values",
]
