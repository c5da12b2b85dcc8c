"""Parquet: rows streamed from Apache Parquet files as Arrow record batches, memory flat
in the number of rows.

How an epoch is read (all of it a pure function of ``(seed, epoch)`` and of the files,
never of the number of processes):

1. The row groups of all files are put in a random order drawn from ``(seed, epoch)``;
   read in that order, after ``transform``, they form one virtual sequence of N rows.
2. The sequence is cut into S equal *streams* (``num_shards``), each of L = ⌊N/S⌋
   consecutive rows (a row group on a cut is read, in part, by both of its streams).
3. Each stream reads its rows (a row group's piece at a time; with a ``transform``,
   in blocks of ``read_block`` rows), and feeds a shuffle buffer of
   ``shuffle_buffer / S`` rows plus one draw: its slots start with the stream's first
   rows; every G sub-batches of b = B/S rows (G b ≈ 4096 rows, at most a quarter of
   the buffer: :func:`_draw_unit`) it draws G b distinct slots at random, hands their
   rows out in that order as its next G sub-batches, and refills those slots with its
   next rows (so the draws depend on the row count only, never on where blocks end).
4. Global batch k is the concatenation of sub-batch k of streams 0, ..., S-1; an epoch
   has ⌊L/b⌋ = ⌊N/B⌋ batches (the rest of each stream, under b rows, and the N mod S
   rows past the last stream are dropped: a different set each epoch).
   ``remainder="pad"`` instead reads every row once, in stream order, for sums over the
   data.

Process p of P runs only streams ``[p S/P, (p+1) S/P)``, i.e. reads only its share of
the row groups, and what it gets is exactly rows ``[p B/P, (p+1) B/P)`` of the global
batch: the global batch is the same set of rows in the same order for every P that
divides S.  The price of that guarantee is that S is fixed by the data, not by the run:
P must divide S (default 8; pass ``num_shards`` for more hosts).

Row positions are counted after ``transform``, which may drop rows.  Knowing them takes
the number of rows each row group keeps: the metadata without a transform, else one
counting pass over the files (once per source, on first use: every process reads all
row groups that once).  With the counts, resuming at batch k replays the buffer's draws
on row positions alone and reads only the rows left in the buffer.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from viax.data.source import (
    MASK,
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
PACKED = "_packed"  # a block's packed rows (see _Buffer); never in a batch handed out
_BUFFER_BYTES = 128 * 2**20  # default shuffle buffer: at most this many bytes in all
_DRAW_ROWS = 4096  # rows a stream draws from its buffer at once (see _draw_unit)
_SHARE_BYTES = 32 * 2**20  # row groups cut between streams up to this size decoded once


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


def _draw_unit(capacity: int, b: int) -> int:
    """G, the sub-batches a stream draws from its shuffle buffer at once: about
    ``_DRAW_ROWS`` rows, at most a quarter of the buffer, at least one sub-batch.

    Why not one sub-batch at a time: a draw costs a dozen NumPy calls whatever its size,
    and with S = 8 streams a sub-batch is only B/8 rows (512 for B = 4096): drawn one at a
    time, the buffer cost 0.23 CPU-µs per row, as much as decoding the Parquet file.  G is
    a function of the batch size, the number of streams and the buffer only, so the
    batch order still does not depend on the process count."""
    return max(1, min(_DRAW_ROWS // b, capacity // (4 * b)))


class _Rows:
    """The rows of a stream in order, handed out k at a time across block boundaries
    (views where a block covers the request)."""

    def __init__(self, blocks: Iterator[dict[str, np.ndarray]]) -> None:
        self.blocks = blocks
        self.pending: dict[str, np.ndarray] | None = None
        self.offset = 0
        self.taken = 0  # rows handed out so far

    def take(self, k: int) -> dict[str, np.ndarray] | None:
        """The next (at most) k rows; ``None`` at the end of the stream."""
        parts = []
        need = k
        while need > 0:
            if self.pending is None:
                self.pending = next(self.blocks, None)
                self.offset = 0
                if self.pending is None:
                    break
            n = len(self.pending[ROWS])
            t = min(n - self.offset, need)
            if t == n:
                parts.append(self.pending)
            else:
                parts.append({c: v[self.offset : self.offset + t] for c, v in self.pending.items()})
            self.offset += t
            need -= t
            if self.offset >= n:
                self.pending = None
        self.taken += k - need
        return _concat(parts) if parts else None


class _Buffer:
    """A shuffle buffer of fixed slots: it starts with the stream's first rows in its
    slots; a draw takes m distinct occupied slots uniformly at random, in random order,
    and the stream's next rows refill those very slots, so no row moves inside the
    buffer.  The slots hold packed rows (every column of a row in one record, see
    :func:`_packed_rows`): a draw is one gather and one scatter of whole rows, not one
    per column (the columns of a random row would be as many cache misses).  Once the
    stream is exhausted the emptied slots are tracked in ``live``.  The draws depend on
    the row count alone (``rng.choice`` on the number of occupied slots), so replaying
    them on row positions reproduces them."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.packed: np.ndarray | None = None  # (slots,) packed rows
        self.records: np.ndarray | None = None  # the same memory, one np.void per row
        self.live: np.ndarray | None = None  # occupied slots, once not all are

    def fill(self, where: np.ndarray, block: dict[str, np.ndarray]) -> None:
        """Write the rows of ``block`` into slots ``where`` (allocating on first use)."""
        rows = _packed_rows(block)
        if self.packed is None:
            self.packed = np.empty(self.slots, rows.dtype)
            self.records = self.packed.view(np.dtype((np.void, rows.dtype.itemsize)))
        self.records[where] = rows.view(self.records.dtype)

    def start(self, rows: _Rows) -> None:
        first = rows.take(self.slots)
        if first is None:
            raise AssertionError("a Parquet stream has no rows")  # the epoch's count fits
        n = len(first[ROWS])
        self.fill(np.arange(n), first)
        self.live = None if n == self.slots else np.arange(n)

    def draw(self, rng: np.random.Generator, m: int, rows: _Rows) -> dict[str, np.ndarray]:
        """m rows drawn at random (distinct), their slots refilled from ``rows``."""
        if self.live is None:
            chosen = rng.choice(self.slots, m, replace=False)
        else:
            chosen = self.live[rng.choice(len(self.live), m, replace=False)]
        out = _fields(self.records.take(chosen).view(self.packed.dtype))
        new = rows.take(m)
        filled = 0 if new is None else len(new[ROWS])
        if filled:
            self.fill(chosen[:filled], new)
        if filled < m:  # the stream ran out: those slots stay empty
            live = np.arange(self.slots) if self.live is None else self.live
            keep = np.ones(self.slots, bool)
            keep[chosen[filled:]] = False
            self.live = live[keep[live]]
        return out


class _SharedGroups:
    """The row groups that an epoch cuts between streams of this process (the last of
    one stream, the first of the next): decoded and assembled once, kept until every
    stream has read its piece, instead of decoded once per stream (7 of 23 decodes of
    an epoch of the 10⁶-row benchmark file, 7 of 160 at 10⁷ rows).  Only groups of at
    most ``_SHARE_BYTES`` assembled, so memory stays at a few groups; only without a
    ``transform`` (whose blocks are cut by ``read_block``)."""

    def __init__(self, pieces: list[list[tuple[int, int, int]]], source: ParquetSource):
        row_bytes = 8 + sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in source.columns.values()
        )
        uses: dict[int, int] = {}
        for stream in pieces:
            for g, start, stop in stream:
                if (start, stop) != (0, int(source.counts[g])):
                    uses[g] = uses.get(g, 0) + 1
        self.left = {
            g: n
            for g, n in uses.items()
            if n > 1 and int(source.counts[g]) * row_bytes <= _SHARE_BYTES
        }
        self.blocks: dict[int, dict[str, np.ndarray] | None] = {}
        self.lock = threading.Lock()

    def take(self, g: int, decode: Callable[[], list]) -> dict[str, np.ndarray] | None:
        """Group g's assembled rows (one block), decoded by the first stream to ask."""
        with self.lock:
            found = g in self.blocks
            block = self.blocks.get(g)
        if not found:
            blocks = decode()
            block = _concat(blocks) if blocks else None
        with self.lock:
            self.left[g] -= 1
            if self.left[g] > 0:
                self.blocks[g] = block
            else:
                self.blocks.pop(g, None)
        return block


class _Decoder:
    """Row groups decoded ahead on a worker thread: a stream's next piece is decoded
    and assembled (:meth:`ParquetSource._read_piece`) while the stream hands out the
    rows of its current one, and while the steps run.  On 2 cores a 10⁷-row epoch was
    read at 4.4M rows/s by one thread doing everything (decoding 36% of it), slower
    than the steps took rows from memory; Arrow's decoding and NumPy's copies release
    the GIL, so the worker runs beside the reading thread.  The content never depends on
    it: each stream still takes its blocks in order, one decode ahead at most (memory:
    one more assembled piece per stream).  The pool starts on first use and is shut
    down by :meth:`close` (the end of the epoch's iterator)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ThreadPoolExecutor | None = None

    def ahead(self, blocks: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """``blocks``, each computed on the worker while the previous one is used."""
        if self.workers < 1:
            yield from blocks
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="viax-decode")
        future = self.pool.submit(next, blocks, None)
        try:
            while True:
                block = future.result()
                if block is None:
                    return
                future = self.pool.submit(next, blocks, None)
                yield block
        finally:
            # Closed early: let the decode in progress finish before ``blocks`` can be
            # closed (a generator running on another thread cannot be).
            future.cancel()
            wait([future])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _numbers(column: Any) -> np.ndarray:
    """An Arrow array as NumPy: for integers and floats without nulls a view of its data
    buffer, else ``to_numpy``.  (pyarrow's ``to_numpy`` imports pandas on first use, a
    quarter of a second per process even for such arrays.)"""
    import pyarrow as pa

    kind = column.type
    if (
        isinstance(column, pa.Array)
        and column.null_count == 0
        and (pa.types.is_integer(kind) or pa.types.is_floating(kind))
    ):
        size = kind.bit_width // 8
        code = (
            "f" if pa.types.is_floating(kind) else "i" if pa.types.is_signed_integer(kind) else "u"
        )
        return np.frombuffer(
            column.buffers()[1],
            dtype=np.dtype(f"{code}{size}"),
            count=len(column),
            offset=column.offset * size,
        )
    return column.to_numpy(zero_copy_only=False)


def _fields(packed: np.ndarray) -> dict[str, np.ndarray]:
    """A block over packed rows: each column a (strided) view of its field, and the
    packed rows themselves under ``PACKED``."""
    out = {name: packed[name] for name in packed.dtype.names}
    out[PACKED] = packed
    return out


def _packed_rows(block: dict[str, np.ndarray]) -> np.ndarray:
    """The block's rows as one contiguous structured array (a record per row); the
    block's own when it has one."""
    if PACKED in block:
        return np.ascontiguousarray(block[PACKED])
    names = [k for k in block if k != MASK]
    dtype = np.dtype([(k, block[k].dtype, block[k].shape[1:]) for k in names])
    packed = np.empty(len(block[ROWS]), dtype)
    for k in names:
        packed[k] = block[k]
    return packed


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
        self._counts = None if transform is not None else self.group_rows.copy()
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
        import pyarrow.parquet as pq

        f, rg, _, first = self.groups[0]
        reader = pq.ParquetFile(self.files[f]).iter_batches(
            batch_size=min(self.read_block, 1024), row_groups=[rg], columns=self.read
        )
        block = self._assemble(self._raw(next(reader), first), 0)  # may be empty: shapes only
        return {
            k: (tuple(v.shape[1:]), v.dtype) for k, v in block.items() if k not in (ROWS, PACKED)
        }

    @property
    def columns(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self._columns

    @property
    def num_rows(self) -> int:
        """N, the rows after ``transform``.  With a transform, the first access counts
        them in one pass over the files (:attr:`counts`)."""
        return int(self.counts.sum())

    @property
    def counts(self) -> np.ndarray:
        """Rows of each row group after ``transform`` (int64, file order): the metadata
        without a transform; otherwise one counting pass over the files, done once."""
        if self._counts is None:
            handles: dict[int, Any] = {}
            self._counts = np.array(
                [
                    sum(len(block[ROWS]) for block in self._read_piece(g, 0, None, handles))
                    for g in range(len(self.groups))
                ],
                dtype=np.int64,
            )
            if self._counts.sum() == 0:
                raise DataError(f"transform= dropped every row of {self.path}")
        return self._counts

    def __repr__(self) -> str:
        rows = "not counted yet" if self._counts is None else int(self._counts.sum())
        cols = ", ".join(f"{k}: {s} {np.dtype(d).name}" for k, (s, d) in self.columns.items())
        return f"ParquetSource({self.path.name}, num_rows={rows}, columns={{{cols}}})"

    def where(self, row: int) -> str:
        """Describe global row ``row``: file, row group, row within the group."""
        g = int(np.searchsorted(self.group_first, row, side="right") - 1)
        f, rg, _, first = self.groups[g]
        name = self.files[f].name
        return f"{name} row group {rg}, row {row - first} of the group (global row {row})"

    # -- reading ----------------------------------------------------------------------
    def _read_piece(
        self,
        g: int,
        start: int,
        stop: int | None,
        handles: dict[int, Any],
        shared: _SharedGroups | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Rows ``[start, stop)`` of row group ``g``, counted *after* ``transform``
        (``stop=None``: to the end), transformed and assembled, in blocks of at most
        ``read_block`` rows.

        Arrow decodes a Parquet row group whole (``iter_batches`` too: it holds the
        decoded group and its compressed bytes, about 3.6 times the group's size, until
        the last batch is taken), and a stream takes hundreds of batches from one group.
        So the piece is decoded, assembled into NumPy blocks (only the rows asked for
        without a transform) and the Arrow memory dropped at once: a stream then holds
        the assembled rows of one piece, not Arrow's buffers (measured on 65,536-row
        groups of 21 float32 columns: 20 MB per stream before, 6 MB after)."""
        import pyarrow.parquet as pq

        f, rg, _, first = self.groups[g]
        if f not in handles:
            # Not memory-mapped: mapped pages would count in the RSS, growing with the file.
            # No pre-buffering: the handle would keep the coalesced compressed bytes of
            # its last row group cached (7 MB per stream on the groups above).
            handles[f] = pq.ParquetFile(self.files[f], pre_buffer=False)
        if shared is not None and g in shared.left:
            block = shared.take(g, lambda: self._decode(handles[f], g, 0, None))
            if block is not None:
                yield {k: v[start:stop] for k, v in block.items()}
            return
        yield from self._decode(handles[f], g, start, stop)

    def _decode(self, handle: Any, g: int, start: int, stop: int | None) -> list[dict]:
        """The blocks of :meth:`_read_piece`, decoded at once; no Arrow object outlives
        the call (a slice of the table would keep all of its buffers)."""
        _, rg, _, first = self.groups[g]
        table = handle.read_row_group(rg, columns=self.read, use_threads=False)
        blocks: list[dict[str, np.ndarray]] = []
        if self.transform is None:
            # One block for the whole piece: the group is decoded whole anyway, and one
            # matrix per piece costs fewer calls than one per record batch.
            stop = table.num_rows if stop is None else min(stop, table.num_rows)
            if start < stop:
                part = table.slice(start, stop - start)
                blocks.append(self._assemble(self._raw(part, first + start), g))
        else:
            kept = 0  # rows after transform before this block
            for lo in range(0, table.num_rows, self.read_block):
                part = table.slice(lo, self.read_block)
                block = self._assemble(self._raw(part, first + lo), g)
                m = len(block[ROWS])
                a, b = max(start - kept, 0), m if stop is None else min(stop - kept, m)
                kept += m
                if a < b:
                    blocks.append(
                        block if (a, b) == (0, m) else {k: v[a:b] for k, v in block.items()}
                    )
                if stop is not None and kept >= stop:
                    break
        return blocks

    def _raw(self, part: Any, first_row: int) -> dict[str, np.ndarray]:
        raw = {}
        for i, name in enumerate(part.schema.names):
            column = part.column(i)
            if name not in self._codes and getattr(column, "num_chunks", 0) == 1:
                # The chunk's own conversion: zero-copy for numbers without nulls (the
                # chunked array's conversion copies).
                column = column.chunk(0)
            if name not in self._codes:
                raw[name] = _numbers(column)
            else:
                raw[name] = self._to_numpy(name, column)
        raw[ROWS] = np.arange(first_row, first_row + part.num_rows, dtype=np.int64)
        return raw

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
            try:
                out = self.transform(dict(raw))
            except KeyError as error:
                name = error.args[0] if error.args else "?"
                if name in self.read or name == ROWS:
                    raise
                raise DataError(
                    f"transform= looked up column {name!r}, which is not read: pass "
                    f"read=[...] with every column it needs (read now: {', '.join(self.read)}; "
                    f"available: {', '.join(self.available)})"
                ) from error
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
        fields: list[tuple[str, Any]] = []
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
            columns = [np.asarray(block[c]) for c in sources]
            if isinstance(spec, str):
                fields.append((name, columns[0].dtype, columns[0].shape[1:], columns))
            else:  # the columns stacked on a last axis, as np.stack(..., axis=-1)
                shape = (*columns[0].shape[1:], len(columns))
                fields.append((name, np.result_type(*columns), shape, columns))
        # Packed rows: every column of a row in one record, so the shuffle buffer moves
        # whole rows (one gather, one scatter), and each column is a view of its field.
        dtype = np.dtype([(n, d, shape) for n, d, shape, _ in fields] + [(ROWS, np.int64)])
        packed = np.empty(len(rows), dtype)
        for name, _, _, columns in fields:
            target = packed[name]
            if len(columns) == 1 and isinstance(self.outputs[name], str):
                target[...] = columns[0]
            else:
                for j, column in enumerate(columns):
                    target[..., j] = column
        packed[ROWS] = rows
        return _fields(packed)

    def _streams(
        self, seed: int, epoch: int, num_shards: int, remainder: str
    ) -> list[list[tuple[int, int, int]]]:
        """The pieces ``(group, start, stop)`` of each stream of the epoch, in rows after
        ``transform``.  ``"drop"``: S streams of ⌊T/S⌋ rows; ``"pad"``: every row, the
        first T mod S streams one row longer."""
        counts = self.counts
        order = (
            epoch_rng(seed, epoch, _SALT_GROUPS).permutation(len(self.groups))
            if self.shuffle
            else np.arange(len(self.groups))
        )
        ends = np.cumsum(counts[order])
        starts = ends - counts[order]
        total = int(ends[-1])
        lengths = np.full(num_shards, total // num_shards)
        if remainder == "pad":
            lengths[: total % num_shards] += 1
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        streams = []
        for s in range(num_shards):
            lo, hi = bounds[s], bounds[s + 1]
            pieces = []
            for j in np.flatnonzero((ends > lo) & (starts < hi)):
                a, b = max(lo, starts[j]), min(hi, ends[j])
                if a < b:
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

    def _shared_shards(self, batch_size: int, process_index: int, process_count: int) -> int:
        """S for ``batch_size``, checked to split over the processes."""
        check_share(batch_size, process_index, process_count)
        num_shards = self.shards(batch_size)
        if num_shards % process_count:
            raise DataError(
                f"{process_count} processes cannot split the {num_shards} streams of "
                f"{self.path.name}; pass num_shards= a multiple of {process_count} to "
                "viax.data.parquet (it fixes the batch order, so keep it for every run)"
            )
        return num_shards

    def num_batches(self, batch_size: int, *, remainder: str = "drop") -> int:
        """Global batches per epoch: ⌊⌊N/S⌋ / (B/S)⌋ = ⌊N/B⌋ (``"drop"``),
        ⌈⌈N/S⌉ / (B/S)⌉ = ⌈N/B⌉ (``"pad"``), with N counted after ``transform``."""
        s = self.shards(batch_size)
        b = batch_size // s
        if remainder == "pad":
            per_stream = -(-self.num_rows // s)
            return -(-per_stream // b)
        return (self.num_rows // s) // b

    def _stream(
        self,
        pieces: list[tuple[int, int, int]],
        rng: np.random.Generator | None,
        b: int,
        capacity: int,
        count: int,
        skip: int,
        remainder: str,
        shared: _SharedGroups | None = None,
        decoder: _Decoder | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Sub-batches ``skip, ..., count - 1`` of one stream."""
        skip = min(skip, count)
        handles: dict[int, Any] = {}
        base = np.concatenate([[0], np.cumsum(self.counts)])  # first (kept) row of each group

        def read(first_row: int):
            offset = 0
            for g, start, stop in pieces:
                lo = start + max(first_row - offset, 0)
                offset += stop - start
                if lo < stop:
                    yield from self._read_piece(g, lo, stop, handles, shared)

        def blocks(first_row: int = 0):
            """Data blocks of the stream's rows from its row ``first_row`` on."""
            if decoder is None:
                return read(first_row)
            return decoder.ahead(read(first_row))

        if remainder == "pad":  # a full pass in stream order, the last sub-batch padded
            # Sub-batches are views of the blocks read (copies only across a block's end);
            # the padding is the stream's first rows, kept when read (not re-read).
            rows = _Rows(blocks(skip * b))
            head = None
            for i in range(skip, count):
                out = rows.take(b)
                n = 0 if out is None else len(out[ROWS])
                if i == 0 and n:
                    head = {k: v.copy() for k, v in out.items()}
                if n < b:
                    if head is None:
                        head = _concat(list(self._head(pieces, b, handles)))
                    if len(head[ROWS]) == 0:
                        raise DataError(
                            f"a stream of the epoch has no rows: {self.num_rows} rows "
                            "cannot fill the streams; pass a smaller num_shards="
                        )
                    reps = -(-b // len(head[ROWS]))
                    fill = {k: np.concatenate([v] * reps)[: b - n] for k, v in head.items()}
                    out = fill if out is None else _concat([out, fill])
                out = dict(out)
                out[MASK] = np.arange(b) < n
                yield out
            return

        if rng is None:  # no shuffling: the stream's rows in order
            rows = _Rows(blocks(skip * b))
            for _ in range(skip, count):
                yield rows.take(b)
            return

        # Draws of G sub-batches from a buffer of capacity + G b slots (see _Buffer).
        group = _draw_unit(capacity, b)
        sizes = [b * (min(j + group, count) - j) for j in range(0, count, group)]
        buffer = _Buffer(capacity + group * b)
        first_unit, drop = divmod(skip, group)
        if first_unit:
            # Resume without reading: the draws depend on the row counts alone, which are
            # known (metadata, or the counting pass of a transform).  Replay them on row
            # positions, then read only the rows left in the buffer.
            positions = _Rows(
                {ROWS: np.arange(base[g] + start, base[g] + stop, dtype=np.int64)}
                for g, start, stop in pieces
            )
            replay = _Buffer(buffer.slots)
            replay.start(positions)
            for m in sizes[:first_unit]:
                replay.draw(rng, m, positions)
            occupied = np.arange(buffer.slots) if replay.live is None else replay.live
            kept = replay.packed[ROWS][occupied]
            buffer.fill(occupied, self._positions_data(kept, base, handles))
            buffer.live = replay.live
            rows = _Rows(blocks(positions.taken))
        else:
            rows = _Rows(blocks())
            buffer.start(rows)
        for m in sizes[first_unit:]:
            unit = buffer.draw(rng, m, rows)
            for i in range(drop, m // b):
                yield {k: v[i * b : (i + 1) * b] for k, v in unit.items()}
            drop = 0

    def _head(self, pieces, b: int, handles: dict[int, Any]) -> Iterator[dict[str, np.ndarray]]:
        """The first (at most) b rows of a stream: its padding."""
        left = b
        for g, start, stop in pieces:
            for block in self._read_piece(g, start, min(stop, start + left), handles):
                left -= len(block[ROWS])
                yield block
            if left <= 0:
                return

    def _positions_data(
        self, positions: np.ndarray, base: np.ndarray, handles: dict[int, Any]
    ) -> dict[str, np.ndarray]:
        """The assembled rows at the given positions (``base[g] + kept row of group g``),
        in their order."""
        groups = np.searchsorted(base, positions, side="right") - 1
        out: dict[str, np.ndarray] = {
            c: np.empty((len(positions), *shape), dtype)
            for c, (shape, dtype) in self._columns.items()
        }
        out[ROWS] = np.empty(len(positions), np.int64)
        for g in np.unique(groups):
            where = np.flatnonzero(groups == g)
            offsets = positions[where] - base[g]
            lo, hi = int(offsets.min()), int(offsets.max()) + 1
            part = _concat(list(self._read_piece(int(g), lo, hi, handles)))
            for c in out:
                out[c][where] = part[c][offsets - lo]
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
        """See :meth:`Source.batches`.  ``remainder="drop"``: the shuffled epoch of the
        module docstring.  ``"pad"``: a full pass (every row once, for sums over the
        data): row groups in the epoch's order, each stream read in order, without the
        shuffle buffer, its last sub-batch padded with its own first rows (``"_mask"``
        False there)."""
        if remainder not in ("drop", "pad"):
            raise DataError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
        num_shards = self._shared_shards(batch_size, process_index, process_count)
        b = batch_size // num_shards
        count = self.num_batches(batch_size, remainder=remainder)
        if count == 0:
            raise DataError(
                f"batch_size {batch_size} exceeds the {self.num_rows} rows of the data; "
                "use a smaller batch or remainder='pad'"
            )
        per = num_shards // process_count
        mine = range(process_index * per, (process_index + 1) * per)
        shuffled = self.shuffle and remainder == "drop"
        capacity = max(self.shuffle_buffer // num_shards, b) if shuffled else 0
        plan = self._streams(seed, epoch, num_shards, remainder)
        shared = _SharedGroups([plan[s] for s in mine], self) if self.transform is None else None
        threads = self.num_threads
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // 2)
        threads = min(threads, len(mine))
        decoder = _Decoder(threads)  # its pool starts with the first decode
        streams = [
            self._stream(
                plan[s],
                epoch_rng(seed, epoch, _SALT_STREAM, s) if shuffled else None,
                b,
                capacity,
                count,
                start_batch,
                remainder,
                shared,
                decoder,
            )
            for s in mine
        ]
        return self._merge(streams, max(count - start_batch, 0), threads, decoder)

    @staticmethod
    def _merge(
        streams: list[Iterator[dict[str, np.ndarray]]],
        count: int,
        threads: int,
        decoder: _Decoder,
    ) -> Iterator[Batch]:
        """Sub-batch k of every stream, concatenated in stream order; with several
        threads the streams are read concurrently (Parquet decoding and NumPy copies
        release the GIL), which changes nothing in the result."""
        try:
            if threads <= 1:
                for parts in zip(*streams, strict=True):
                    yield _batch(parts)
                return
            with ThreadPoolExecutor(threads, thread_name_prefix="viax-parquet") as pool:
                for _ in range(count):
                    yield _batch(list(pool.map(next, streams)))
        finally:
            for stream in streams:
                stream.close()  # each waits for its decode in progress
            decoder.close()

    # -- batches of the full pass at given indices (a sample of them) -----------------
    def padded_batches(
        self,
        batch_size: int,
        indices: Sequence[int] | np.ndarray,
        *,
        seed: int,
        epoch: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Batches ``indices`` (distinct, in any order; handed out in that order) of the
        full pass ``batches(batch_size, seed=seed, epoch=epoch, remainder="pad", ...)``,
        read alone: each is the batch that pass hands out at its index (the same rows in
        the same order, the same padding and ``"_mask"``), for this process's share.

        Where the rows lie follows from the row counts alone (no reading): sub-batch k
        of stream s is its rows ``[k b, (k+1) b)`` (b = B/S), the last one padded with
        the stream's first rows, as in :meth:`batches`.  Each row group holding some of
        them is decoded once, in the order the batches need them, on up to
        ``num_threads`` threads (default: every core, at most one per stream), and only
        those rows are kept, until the last batch needing them is handed out.  Reading
        is lazy: a batch is handed out as soon as its groups are read, and groups are
        decoded at most two per thread ahead of the batches taken (stopping early
        leaves the rest unread).

        Why: the final evaluation of a minibatch fit (its difference estimator) takes
        8, then 32 of the pass's batches at random.  Read in sequence, a file is decoded
        through to the last of them (at 10⁷ rows every row group, 2,442 batches
        assembled for 32); read one at a time with ``start_batch``, each batch opens S
        new file handles and decodes a row group per stream.

        Raises:
            DataError: repeated indices or indices outside ``[0, num_batches(batch_size,
                remainder="pad"))``, a share the streams cannot be split into, a stream
                without rows.
        """
        num_shards = self._shared_shards(batch_size, process_index, process_count)
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        count = self.num_batches(batch_size, remainder="pad")
        if len(wanted) and (
            wanted.min() < 0 or wanted.max() >= count or len(np.unique(wanted)) < len(wanted)
        ):
            raise DataError(
                f"padded_batches takes distinct batch indices in [0, {count}), got "
                f"{wanted.tolist()[:8]}{'...' if len(wanted) > 8 else ''}"
            )
        b = batch_size // num_shards
        per = num_shards // process_count
        plan = self._streams(seed, epoch, num_shards, "pad")[
            process_index * per : (process_index + 1) * per
        ]
        base = np.concatenate([[0], np.cumsum(self.counts)])  # first (kept) row of each group
        positions, masks = self._pass_positions(plan, wanted, b, base)
        threads = self.num_threads
        if threads is None:
            # All cores: the evaluation that reads these computes little meanwhile (the
            # streamed epochs leave half the cores to the steps).
            threads = max(1, min(per, os.cpu_count() or 1))
        return self._read_positions(positions, masks, base, threads)

    def _pass_positions(
        self, plan: list[list[tuple[int, int, int]]], wanted: np.ndarray, b: int, base: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row positions (``base[g] +`` kept row of group g) and masks, both
        (len(wanted), len(plan) b), of the padded pass's batches ``wanted``: what
        :meth:`_stream` with ``remainder="pad"`` reads for them, worked out from the
        streams' pieces."""
        positions = np.empty((len(wanted), len(plan) * b), np.int64)
        masks = np.empty((len(wanted), len(plan) * b), bool)
        for s, pieces in enumerate(plan):
            groups = np.array([g for g, _, _ in pieces], np.int64)
            starts = np.array([start for _, start, _ in pieces], np.int64)
            cum = np.concatenate([[0], np.cumsum([stop - start for _, start, stop in pieces])])
            length = int(cum[-1])
            cols = slice(s * b, (s + 1) * b)
            for j, k in enumerate(wanted):
                n = int(np.clip(length - k * b, 0, b))
                if n < b and length == 0:
                    raise DataError(
                        f"a stream of the epoch has no rows: {self.num_rows} rows "
                        "cannot fill the streams; pass a smaller num_shards="
                    )
                # The stream's rows k b .. k b + n - 1, then its first rows, repeated.
                rows = np.concatenate(
                    [np.arange(k * b, k * b + n), np.arange(b - n) % min(b, length)]
                )
                piece = np.searchsorted(cum, rows, side="right") - 1
                positions[j, cols] = base[groups[piece]] + starts[piece] + rows - cum[piece]
                masks[j, cols] = np.arange(b) < n
        return positions, masks

    def _read_positions(
        self, positions: np.ndarray, masks: np.ndarray, base: np.ndarray, threads: int
    ) -> Iterator[Batch]:
        """Batches ``{column: rows at positions[j]} + "_mask": masks[j]``, j in order: each
        row group holding some of the positions decoded once, in the order of first
        need, up to ``2 threads`` of them ahead; its rows kept until the last batch
        needing them is out."""
        batch_groups = np.searchsorted(base, positions, side="right") - 1
        first_need: dict[int, int] = {}
        last_need: dict[int, int] = {}
        for j, groups in enumerate(batch_groups):
            for g in np.unique(groups).tolist():
                first_need.setdefault(g, j)
                last_need[g] = j
        order = sorted(first_need, key=lambda g: (first_need[g], g))
        needed = np.unique(positions)
        ends = np.searchsorted(needed, base)  # group g's needed rows: needed[ends[g]:ends[g+1]]
        local = threading.local()

        def read(g: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            """Group g's rows at the positions asked for: (positions, sorted; rows)."""
            handles = getattr(local, "handles", None)
            if handles is None:
                handles = local.handles = {}
            where = needed[ends[g] : ends[g + 1]]
            offsets = where - base[g]
            lo, hi = int(offsets[0]), int(offsets[-1]) + 1
            part = _concat(list(self._read_piece(g, lo, hi, handles)))
            return where, {c: part[c][offsets - lo] for c in [*self._columns, ROWS]}

        threads = max(1, min(threads, len(order)))
        pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="viax-parquet") if threads > 1 else None
        )
        pending: deque = deque()
        upcoming = iter(order)

        def submit() -> None:
            g = next(upcoming, None)
            if g is not None:
                pending.append((g, pool.submit(read, g) if pool is not None else g))

        parts: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        try:
            for _ in range(2 * threads):
                submit()
            for j, groups in enumerate(batch_groups):
                present = np.unique(groups).tolist()
                while any(g not in parts for g in present):
                    g, job = pending.popleft()
                    parts[g] = job.result() if pool is not None else read(job)
                    submit()
                batch: dict[str, np.ndarray] = {}
                for c in [*self._columns, ROWS]:
                    shape, dtype = self._columns[c] if c != ROWS else ((), np.dtype(np.int64))
                    batch[c] = np.empty((len(groups), *shape), dtype)
                for g in present:
                    where, rows = parts[g]
                    sel = np.flatnonzero(groups == g)
                    at = np.searchsorted(where, positions[j, sel])
                    for c, v in rows.items():
                        batch[c][sel] = v[at]
                    if last_need[g] == j:
                        del parts[g]
                batch[MASK] = masks[j].copy()
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _batch(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The streams' sub-batches joined into the batch handed out: one contiguous array
    per column (the sub-batches' columns are views of packed rows)."""
    return {
        k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else np.ascontiguousarray(v)
        for k, v in parts[0].items()
        if k != PACKED
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, np.ndarray] = {}
    if PACKED in parts[0]:  # one copy of the packed rows; the columns are its fields
        out = _fields(np.concatenate([p[PACKED] for p in parts]))
    for k in parts[0]:
        if k not in out:
            out[k] = np.concatenate([p[k] for p in parts])
    return out


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
            rows: at most about 128 MB).  Memory: the buffer, plus the rows of one
            row group per stream (Arrow decodes a row group whole; the stream keeps it
            as NumPy arrays, once): S × the row group's decoded size, so prefer row
            groups of tens of MB, not the hundreds that some writers default to.
        num_shards: S, the streams an epoch is cut into (see the module docstring);
            the number of processes must divide it.  Default: the largest of 8, 4, 2, 1
            dividing the batch size.  It sets the batch order: keep it across runs.
        read_block: rows per block handed to ``transform`` (without a transform, a
            stream's piece of a row group is one block).
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
