"""Parquet: rows streamed from Apache Parquet files as Arrow record batches, memory flat
in the number of rows.

How an epoch is read (all of it a pure function of ``(seed, epoch)`` and the files'
metadata, never of the number of processes):

1. The row groups of all files are put in a random order drawn from ``(seed, epoch)``;
   read in that order they form one virtual sequence of T rows.
2. The sequence is cut into S equal *streams* (``num_shards``), each of L = ⌊T/S⌋
   consecutive rows (a row group on a cut is read, in part, by both of its streams).
3. Each stream reads its rows in record batches of ``read_block`` rows, applies
   ``transform``, and feeds a shuffle buffer of ``shuffle_buffer / S`` rows; every
   sub-batch is b = B/S rows drawn at random from the buffer (the buffer is refilled
   to the same size before each draw, so its content depends on the row sequence only).
4. Global batch k is the concatenation of sub-batch k of streams 0, ..., S-1; an epoch
   has ⌊L/b⌋ batches (the rest of each stream, under b + S rows in all, is dropped;
   a different set each epoch).

Process p of P runs only streams ``[p S/P, (p+1) S/P)``, i.e. reads only its share of
the row groups, and what it gets is exactly rows ``[p B/P, (p+1) B/P)`` of the global
batch: the global batch is the same set of rows in the same order for every P that
divides S.  The price of that guarantee is that S is fixed by the data, not by the run:
P must divide S (default 8; pass ``num_shards`` for more hosts).

A ``transform`` may drop rows (``{k: v[keep] for k, v in block.items()}``: the block
carries ``"_rows"``, keep it aligned).  A stream short of rows then re-reads its own
rows from its start, so every process still sees ⌊L/b⌋ batches per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from viax.data.source import (
    ROWS,
    Batch,
    DataError,
    Source,
    check_finite,
    check_share,
    epoch_rng,
)

__all__ = ["ParquetSource", "parquet", "unique_values"]

_SALT_GROUPS = 0x5EED_0002
_SALT_STREAM = 0x5EED_0003
_BUFFER_BYTES = 128 * 2**20  # default shuffle buffer: at most this many bytes in all


def _files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"no *.parquet files under {path}")
        return files
    if not path.exists():
        raise DataError(f"no such Parquet file or directory: {path}")
    return [path]


def _distinct(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """b distinct uniform draws from range(n), in random order, in O(b log b) (NumPy's
    ``choice(replace=False)`` costs O(n) unless b < n/50)."""
    if 4 * b > n:
        return rng.permutation(n)[:b]
    out = np.empty(0, np.int64)
    while len(out) < b:
        candidates = np.concatenate([out, rng.integers(0, n, size=b + b // 8 + 8)])
        # keep the first occurrence of each value, in draw order
        order = np.argsort(candidates, kind="stable")
        ordered = candidates[order]
        repeat = np.zeros(len(candidates), bool)
        repeat[order[1:][ordered[1:] == ordered[:-1]]] = True
        out = candidates[~repeat][:b]
    return out


class _Pool:
    """A shuffle buffer: rows appended at the end, b rows taken at random positions,
    the holes filled from the tail (O(b) per draw, no O(buffer) copies).  Without a
    generator it is a FIFO queue (no shuffling)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.arrays: dict[str, np.ndarray] | None = None
        self.size = 0

    def add(self, block: Mapping[str, np.ndarray], n: int) -> None:
        if self.arrays is None:
            self.arrays = {
                k: np.empty((max(n, self.capacity), *v.shape[1:]), v.dtype)
                for k, v in block.items()
            }
        allocated = len(next(iter(self.arrays.values())))
        if self.size + n > allocated:
            grow = max(self.size + n, 2 * allocated)
            for k, v in self.arrays.items():
                bigger = np.empty((grow, *v.shape[1:]), v.dtype)
                bigger[: self.size] = v[: self.size]
                self.arrays[k] = bigger
        for k, v in self.arrays.items():
            v[self.size : self.size + n] = block[k]
        self.size += n

    def take(self, rng: np.random.Generator | None, b: int) -> dict[str, np.ndarray]:
        n = self.size
        self.size = n - b
        if rng is None:
            out = {k: v[:b].copy() for k, v in self.arrays.items()}
            for v in self.arrays.values():
                v[: n - b] = v[b:n].copy()
            return out
        idx = _distinct(rng, n, b)
        tail = n - b
        taken_tail = np.zeros(b, bool)
        taken_tail[idx[idx >= tail] - tail] = True
        holes = idx[idx < tail]
        movers = tail + np.flatnonzero(~taken_tail)
        out = {}
        for k, v in self.arrays.items():
            out[k] = v[idx]
            v[holes] = v[movers]
        return out


class ParquetSource(Source):
    """Rows of Parquet files, streamed.  Make one with :func:`parquet`; the module
    docstring says how an epoch is read and why it does not depend on the process
    count."""

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Mapping[str, str | Sequence[str]] | Sequence[str],
        *,
        transform: Callable[[dict[str, np.ndarray]], Mapping[str, Any]] | None = None,
        read: Sequence[str] | None = None,
        static: Mapping[str, Any] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        num_shards: int | None = None,
        read_block: int = 16384,
        num_rows: int | None = None,
        check_finite: bool = True,
        num_threads: int | None = None,
        categories: Mapping[str, Sequence[Any] | None] | None = None,
    ):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.files = _files(path)
        if not isinstance(columns, Mapping):
            columns = {str(c): str(c) for c in columns}
        if not columns:
            raise DataError("columns= names no column to read")
        self.outputs: dict[str, str | tuple[str, ...]] = {
            k: (v if isinstance(v, str) else tuple(v)) for k, v in columns.items()
        }
        self.transform = transform
        self.static = dict(static or {})
        self.shuffle = shuffle
        self.num_shards = num_shards
        if num_shards is not None and num_shards < 1:
            raise DataError(f"num_shards must be positive, got {num_shards}")
        self.read_block = int(read_block)
        self.check_finite = check_finite
        self.num_threads = num_threads

        # Row groups of all files, in file order: (file index, group index, rows, first row).
        groups = []
        first = 0
        available: list[str] | None = None
        for i, f in enumerate(self.files):
            meta = pq.ParquetFile(f).metadata
            names = list(meta.schema.to_arrow_schema().names)
            if available is None:
                available = names
            elif set(names) != set(available):
                raise DataError(
                    f"{f} has columns {sorted(names)}, unlike {self.files[0].name}: "
                    f"{sorted(available)}"
                )
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    groups.append((i, g, rows, first))
                    first += rows
        self.available = available or []
        self.groups = groups
        self.group_rows = np.array([g[2] for g in groups], dtype=np.int64)
        self.group_first = np.array([g[3] for g in groups], dtype=np.int64)
        self.total_rows = int(first)
        if self.total_rows == 0:
            raise DataError(f"{self.path} has no rows")

        wanted = sorted(
            {c for v in self.outputs.values() for c in ([v] if isinstance(v, str) else v)}
        )
        if read is not None:
            self.read = list(read)
            self._check_in_file(self.read)
        elif transform is None:
            self._check_in_file(wanted)
            self.read = wanted
        else:
            self.read = [c for c in wanted if c in self.available]
        categories = dict(categories or {})
        self._check_in_file(list(categories))
        unread = [c for c in categories if c not in self.read]
        if unread:
            raise DataError(
                f"categories= names {unread}, which are not read (read: {self.read}); "
                "name them in columns= or read="
            )
        self.categories: dict[str, np.ndarray] = {
            c: np.asarray(unique_values(self.path, c) if v is None else v)
            for c, v in categories.items()
        }
        self._codes = {c: pa.array(v) for c, v in self.categories.items()}
        self._num_rows = (
            num_rows if num_rows is not None else (None if transform else self.total_rows)
        )
        self._columns = self._first_block_columns()
        self.shuffle_buffer = (
            shuffle_buffer if shuffle_buffer is not None else self._default_buffer()
        )

    # -- description ------------------------------------------------------------------
    def _check_in_file(self, names: Sequence[str]) -> None:
        missing = [c for c in names if c not in self.available]
        if missing:
            raise DataError(
                f"column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"not in {self.path}; available: {', '.join(self.available)}"
            )

    def _default_buffer(self) -> int:
        row_bytes = sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in self._columns.values()
        )
        return int(min(2**17, max(4096, _BUFFER_BYTES // max(row_bytes + 8, 1))))

    def _first_block_columns(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        block = next(self._read_piece(0, 0, min(self.read_block, int(self.group_rows[0])), {}))
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in block.items() if k != ROWS}

    @property
    def columns(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self._columns

    @property
    def num_rows(self) -> int:
        """N.  With a ``transform`` (which may drop rows) and no ``num_rows=``, the first
        access counts the rows in one pass over the files."""
        if self._num_rows is None:
            handles: dict[int, Any] = {}
            self._num_rows = sum(
                len(block[ROWS])
                for g in range(len(self.groups))
                for block in self._read_piece(g, 0, int(self.group_rows[g]), handles)
            )
        return self._num_rows

    def where(self, row: int) -> str:
        """Describe global row ``row``: file, row group, row within the group."""
        g = int(np.searchsorted(self.group_first, row, side="right") - 1)
        f, rg, _, first = self.groups[g]
        name = self.files[f].name
        return f"{name} row group {rg}, row {row - first} of the group (global row {row})"

    # -- reading ----------------------------------------------------------------------
    def _read_piece(
        self, g: int, start: int, stop: int, handles: dict[int, Any]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Rows ``[start, stop)`` of row group ``g``, transformed and assembled, in
        blocks of at most ``read_block`` rows."""
        import pyarrow.parquet as pq

        f, rg, _, first = self.groups[g]
        if f not in handles:
            # Not memory-mapped: mapped pages would count in the RSS, growing with the file.
            handles[f] = pq.ParquetFile(self.files[f])
        offset = 0
        batches = handles[f].iter_batches(
            batch_size=self.read_block, row_groups=[rg], columns=self.read, use_threads=False
        )
        for record_batch in batches:
            n = record_batch.num_rows
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                part = record_batch.slice(lo, hi - lo)
                raw = {
                    name: self._to_numpy(name, part.column(i))
                    for i, name in enumerate(part.schema.names)
                }
                raw[ROWS] = np.arange(first + offset + lo, first + offset + hi, dtype=np.int64)
                yield self._assemble(raw, g)
            offset += n
            if offset >= stop:
                break

    def _to_numpy(self, name: str, column: Any) -> np.ndarray:
        if name not in self._codes:
            return column.to_numpy(zero_copy_only=False)
        import pyarrow.compute as pc

        codes = pc.index_in(column, value_set=self._codes[name])  # a hash lookup, in C++
        if codes.null_count > column.null_count:
            known = pc.is_in(column, value_set=self._codes[name])
            unknown = pc.filter(column, pc.invert(pc.fill_null(known, True)))
            raise DataError(
                f"column {name!r} has values missing from its categories= vocabulary: "
                f"{unknown.unique().to_pylist()[:5]}"
            )
        return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)

    def _assemble(self, raw: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
        block = raw
        if self.transform is not None:
            out = self.transform(dict(raw))
            if not isinstance(out, Mapping):
                raise DataError(f"transform returned a {type(out).__name__}, not a dict of arrays")
            block = {str(k): np.asarray(v) for k, v in out.items()}
            if ROWS not in block:
                lengths = {len(v) for k, v in block.items() if np.ndim(v)}
                if lengths and lengths != {len(raw[ROWS])}:
                    raise DataError(
                        "transform changed the number of rows but dropped '_rows'; filter "
                        "every entry alike: {k: v[keep] for k, v in block.items()}"
                    )
                block[ROWS] = raw[ROWS]
        rows = block[ROWS]
        out: dict[str, np.ndarray] = {}
        for name, spec in self.outputs.items():
            sources = [spec] if isinstance(spec, str) else list(spec)
            for c in sources:
                if c not in block:
                    produced = sorted(k for k in block if k != ROWS)
                    raise DataError(
                        f"column {c!r} (for {name!r}) is not in {self.path} "
                        f"(available: {', '.join(self.available)})"
                        + (
                            f" nor made by transform= (it returns: {', '.join(produced)})"
                            if self.transform
                            else ""
                        )
                    )
                value = block[c]
                if len(value) != len(rows):
                    raise DataError(
                        f"column {c!r} has {len(value)} rows after transform, "
                        f"'_rows' has {len(rows)}"
                    )
                if value.dtype == object or value.dtype.kind in "USM":
                    raise DataError(
                        f"column {c!r} holds {value.dtype} values ({value[:3].tolist()}...); "
                        "turn it into numbers in transform= (for categories: "
                        "np.searchsorted(viax.data.unique_values(path, column), values))"
                    )
                if self.check_finite:
                    check_finite({c: value}, lambda _, i: self.where(int(rows[i])))
                if c in self._codes and len(value) and value.min() < 0:
                    i = int(np.argmin(value))
                    raise DataError(
                        f"column {c!r} is null at {self.where(int(rows[i]))}; its code is -1 "
                        "there: drop such rows in transform= (keep = block[name] >= 0)"
                    )
            if isinstance(spec, str):
                out[name] = block[spec]
            else:
                out[name] = np.stack([block[c] for c in sources], axis=-1)
        out[ROWS] = rows.astype(np.int64, copy=False)
        return out

    def _streams(self, seed: int, epoch: int, num_shards: int) -> list[list[tuple[int, int, int]]]:
        """The pieces ``(group, start, stop)`` of each stream of the epoch."""
        order = (
            epoch_rng(seed, epoch, _SALT_GROUPS).permutation(len(self.groups))
            if self.shuffle
            else np.arange(len(self.groups))
        )
        ends = np.cumsum(self.group_rows[order])
        starts = ends - self.group_rows[order]
        length = self.total_rows // num_shards
        streams = []
        for s in range(num_shards):
            lo, hi = s * length, (s + 1) * length
            pieces = []
            for j in np.flatnonzero((ends > lo) & (starts < hi)):
                a, b = max(lo, starts[j]), min(hi, ends[j])
                pieces.append((int(order[j]), int(a - starts[j]), int(b - starts[j])))
            streams.append(pieces)
        return streams

    def shards(self, batch_size: int) -> int:
        """S, the number of streams for ``batch_size``: ``num_shards``, or the largest of
        8, 4, 2, 1 that divides the batch size."""
        if self.num_shards is not None:
            if batch_size % self.num_shards:
                raise DataError(
                    f"batch_size {batch_size} is not a multiple of num_shards {self.num_shards}"
                )
            return self.num_shards
        return next(s for s in (8, 4, 2, 1) if batch_size % s == 0)

    def num_batches(self, batch_size: int, *, remainder: str = "drop") -> int:
        s = self.shards(batch_size)
        return (self.total_rows // s) // (batch_size // s)

    def _stream(
        self, pieces: list[tuple[int, int, int]], rng, b: int, capacity: int, count: int, skip: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """The ``count - skip`` sub-batches of one stream from sub-batch ``skip`` on."""
        handles: dict[int, Any] = {}

        def blocks(first_row: int = 0):
            """Data blocks of the stream's rows from its row ``first_row`` on; ``None`` at
            the end of each pass; passes repeat (only a filtered stream needs them)."""
            while True:
                full_pass, produced, offset = first_row == 0, 0, 0
                for g, start, stop in pieces:
                    lo = start + max(first_row - offset, 0)
                    offset += stop - start
                    for block in self._read_piece(g, lo, stop, handles) if lo < stop else ():
                        produced += len(block[ROWS])
                        yield block
                if full_pass and produced == 0:
                    raise DataError(
                        "transform= dropped every row of a stream of the epoch; "
                        f"it reads row groups {sorted({p[0] for p in pieces})}"
                    )
                first_row = 0
                yield None

        def index_blocks():
            """The stream's global row indices from the metadata alone (no reading)."""
            for g, start, stop in pieces:
                first = int(self.group_first[g])
                yield {ROWS: np.arange(first + start, first + stop, dtype=np.int64)}
            while True:
                yield None

        state = {"pending": None, "exhausted": False, "absorbed": 0}

        def fill(pool: _Pool, source: Iterator) -> None:
            # Refill to exactly capacity + b rows (or to the end of the stream's rows),
            # splitting blocks, so the draws depend on the row sequence alone, not on
            # where record batches end.  Only a stream short of rows (transform= dropped
            # some) reads its rows a second time.
            while pool.size < (b if state["exhausted"] else capacity + b):
                pending = state["pending"]
                if pending is None:
                    pending = next(source)
                    state["exhausted"] = pending is None
                    if pending is None:
                        continue
                n = len(pending[ROWS])
                need = capacity + b - pool.size
                if n <= need:
                    pool.add(pending, n)
                    state["pending"] = None
                else:
                    pool.add({c: v[:need] for c, v in pending.items()}, need)
                    state["pending"] = {c: v[need:] for c, v in pending.items()}
                    n = need
                state["absorbed"] += n

        first = 0
        pool = _Pool(capacity + b)
        if skip and self.transform is None:
            # Resume without reading: with no transform the rows of the stream are known
            # from the metadata, and the draws depend on the row count alone.  Replay
            # them on row indices, then read only the rows left in the buffer.
            indices = _Pool(capacity + b)
            source = index_blocks()
            for _ in range(skip):
                fill(indices, source)
                indices.take(rng, b)
            if indices.size:
                pool.add(
                    self._rows_data(indices.arrays[ROWS][: indices.size], handles), indices.size
                )
            state["pending"] = None
            first = skip
            source = blocks(state["absorbed"])
        else:
            source = blocks()
        for k in range(first, count):
            fill(pool, source)
            out = pool.take(rng, b)
            if k >= skip:
                yield out

    def _rows_data(self, rows: np.ndarray, handles: dict[int, Any]) -> dict[str, np.ndarray]:
        """The assembled columns of the given global rows (no transform), in their order."""
        groups = np.searchsorted(self.group_first, rows, side="right") - 1
        out: dict[str, np.ndarray] = {
            c: np.empty((len(rows), *shape), dtype) for c, (shape, dtype) in self._columns.items()
        }
        out[ROWS] = rows.copy()
        for g in np.unique(groups):
            where = np.flatnonzero(groups == g)
            offsets = rows[where] - self.group_first[g]
            lo, hi = int(offsets.min()), int(offsets.max()) + 1
            parts = list(self._read_piece(int(g), lo, hi, handles))
            for c in self._columns:
                out[c][where] = np.concatenate([p[c] for p in parts])[offsets - lo]
        return out

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        remainder: str = "drop",
    ) -> Iterator[Batch]:
        check_share(batch_size, process_index, process_count)
        if remainder != "drop":
            raise DataError("a Parquet source drops the last partial batch (remainder='drop')")
        num_shards = self.shards(batch_size)
        if num_shards % process_count:
            raise DataError(
                f"{process_count} processes cannot split the {num_shards} streams of "
                f"{self.path.name}; pass num_shards= a multiple of {process_count} to "
                "viax.data.parquet (it fixes the batch order, so keep it for every run)"
            )
        b = batch_size // num_shards
        count = self.num_batches(batch_size)
        if count == 0:
            raise DataError(
                f"batch_size {batch_size} exceeds the {self.total_rows} rows of the data"
            )
        per = num_shards // process_count
        mine = range(process_index * per, (process_index + 1) * per)
        capacity = max(self.shuffle_buffer // num_shards, b) if self.shuffle else 0
        plan = self._streams(seed, epoch, num_shards)
        streams = [
            self._stream(
                plan[s],
                epoch_rng(seed, epoch, _SALT_STREAM, s) if self.shuffle else None,
                b,
                capacity,
                count,
                start_batch,
            )
            for s in mine
        ]
        threads = self.num_threads
        if threads is None:
            threads = max(1, min(len(streams), (os.cpu_count() or 1) // 2))
        return self._merge(streams, count - start_batch, min(threads, len(streams)))

    @staticmethod
    def _merge(
        streams: list[Iterator[dict[str, np.ndarray]]], count: int, threads: int
    ) -> Iterator[Batch]:
        """Sub-batch k of every stream, concatenated in stream order; with several
        threads the streams are read concurrently (Parquet decoding and NumPy copies
        release the GIL), which changes nothing in the result."""
        if threads <= 1:
            for parts in zip(*streams, strict=True):
                yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="viax-parquet") as pool:
            for _ in range(count):
                parts = list(pool.map(next, streams))
                yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parquet(
    path: str | os.PathLike,
    columns: Mapping[str, str | Sequence[str]] | Sequence[str],
    *,
    transform: Callable[[dict[str, np.ndarray]], Mapping[str, Any]] | None = None,
    read: Sequence[str] | None = None,
    static: Mapping[str, Any] | None = None,
    shuffle: bool = True,
    shuffle_buffer: int | None = None,
    num_shards: int | None = None,
    read_block: int = 16384,
    num_rows: int | None = None,
    check_finite: bool = True,
    num_threads: int | None = None,
    categories: Mapping[str, Sequence[Any] | None] | None = None,
) -> ParquetSource:
    """A data source streaming Parquet files with pyarrow; memory flat in the rows.

    Args:
        path: a ``.parquet`` file, or a directory (every ``*.parquet`` below it, sorted).
        columns: the batch's columns: ``{"X": ["dep_hour", "distance"], "y": "late"}``
            stacks the listed columns into a matrix ``X`` (rows x 2) and takes ``y`` as
            is; a list of names takes each as is.  Only the named file columns are read.
        transform: ``fn(block) -> dict`` on each block of rows, a dict of 1-D NumPy
            arrays (the file columns in ``read``, plus ``"_rows"``): make new columns
            (``late = arr_delay > 15``), integer codes for categories, log scales; it
            may drop rows if it drops them from ``"_rows"`` too.  The names in
            ``columns`` are looked up in its result.
        read: the file columns to read (default: those named in ``columns`` that the
            file has).
        static: data passed whole with every batch.
        shuffle: row groups in a random order and rows through a shuffle buffer, both
            drawn from ``(seed, epoch)``; ``False`` reads in file order.
        shuffle_buffer: rows held for shuffling, in all (default 2^17, fewer for wide
            rows: at most about 128 MB).  Memory: the buffer plus one record batch per
            stream.
        num_shards: S, the streams an epoch is cut into (see the module docstring);
            the number of processes must divide it.  Default: the largest of 8, 4, 2, 1
            dividing the batch size.  It sets the batch order: keep it across runs.
        read_block: rows per Arrow record batch read.
        num_rows: N, if known, when ``transform`` drops rows (saves a counting pass).
        check_finite: raise :class:`DataError` naming the column, file, row group and
            row of any NaN or infinity.
        num_threads: threads reading this process's streams concurrently (default: half
            the CPU cores, at most one per stream); the batches are the same for any
            number.
        categories: ``{column: vocabulary}`` turns a (string) column into integer codes,
            ``vocabulary[code]`` is the value, by a hash lookup in Arrow (fast: no
            Python strings); ``None`` as the vocabulary: its sorted distinct values
            (:func:`unique_values`, one pass over that column).  Nulls get code -1, which
            the batch may not contain (drop those rows in ``transform``); a value
            missing from a given vocabulary is an error.  ``source.categories`` keeps the
            vocabularies.

    Example:
        >>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq, tempfile, viax
        >>> path = tempfile.mkdtemp() + "/d.parquet"
        >>> pq.write_table(pa.table({"a": np.arange(100.0), "b": np.ones(100)}), path,
        ...                row_group_size=25)
        >>> src = viax.data.parquet(path, {"X": ["a", "b"]})
        >>> next(src.batches(8, seed=0, epoch=0))["X"].shape
        (8, 2)
    """
    return ParquetSource(
        path,
        columns,
        transform=transform,
        read=read,
        static=static,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        num_shards=num_shards,
        read_block=read_block,
        num_rows=num_rows,
        check_finite=check_finite,
        num_threads=num_threads,
        categories=categories,
    )


def unique_values(path: str | os.PathLike, column: str) -> np.ndarray:
    """The sorted distinct values of one column of Parquet files, read one row group at
    a time (memory: the distinct values).  A fixed vocabulary for integer codes in a
    ``transform``: ``np.searchsorted(vocabulary, block["carrier"])``.  Nulls are left
    out."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen: set = set()
    for f in _files(path):
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            raise DataError(
                f"column {column!r} not in {f}; available: {', '.join(pf.schema_arrow.names)}"
            )
        for g in range(pf.metadata.num_row_groups):
            values = pc.unique(pf.read_row_group(g, columns=[column]).column(0))
            seen.update(v for v in values.to_pylist() if v is not None)
    return np.array(sorted(seen))
