"""Prefetch: a background thread reads batches ahead, stacks K of them into one chunk for
the driver's ``lax.scan`` over K steps, and moves the chunk to the devices, so a step
never waits on the disk.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from viax.data.sharding import put
from viax.data.source import DataError

__all__ = ["Prefetcher", "prefetch", "stack_batches"]

_END = object()
_POLL_S = 0.1  # how often blocked queue calls look at the stop flag


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def stack_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack K batches into one chunk: ``{name: array (K, b, ...)}``."""
    keys = batches[0].keys()
    for i, b in enumerate(batches[1:], 1):
        if b.keys() != keys:
            raise DataError(f"batch {i} of a chunk has columns {sorted(b)}, not {sorted(keys)}")
    try:
        return {k: _stacked([b[k] for b in batches]) for k in keys}
    except ValueError as error:
        shapes = {k: sorted({b[k].shape for b in batches}) for k in keys}
        raise DataError(f"batches of one chunk differ in shape: {shapes}") from error


_ALIGN = 64  # bytes: XLA's CPU client adopts a NumPy buffer so aligned instead of copying


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on a 64-byte boundary.  ``jax.device_put`` on
    CPU then aliases the array instead of copying it (NumPy's own allocations are only
    16-byte aligned): a 70 MB chunk's copy was 23 ms, a fifth of reading it from Parquet.
    Only for arrays that nobody writes to once handed to JAX."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    first = np.asarray(arrays[0])
    out = aligned_empty((len(arrays), *first.shape), np.result_type(*arrays))
    return np.stack(arrays, out=out)


class _Producer:
    """The prefetch thread's side: reads, stacks and places chunks into ``out``."""

    def __init__(self, source, stack, remainder, sharding, to_device, out, stop):
        self.source, self.stack, self.remainder = source, stack, remainder
        self.sharding, self.to_device = sharding, to_device
        self.out: queue.Queue = out
        self.stop: threading.Event = stop

    def chunks(self) -> Iterator[Any]:
        if self.stack is None:
            yield from self.source
            return
        group: list[dict[str, np.ndarray]] = []
        for batch in self.source:
            group.append(batch)
            if len(group) == self.stack:
                yield stack_batches(group)
                group = []
        if group and self.remainder == "keep":
            yield stack_batches(group)

    def place(self, chunk: Any) -> Any:
        if not self.to_device:
            return chunk
        try:
            return put(chunk, self.sharding)
        except ValueError as error:
            shapes = jax.tree_util.tree_map(np.shape, chunk)
            raise DataError(
                f"a chunk with shapes {shapes} cannot be placed with {self.sharding}: the "
                "batch axis must split evenly over the devices (make batch_size a multiple "
                f"of the device count): {error}"
            ) from error

    def offer(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for chunk in self.chunks():
                if self.stop.is_set() or not self.offer(self.place(chunk)):
                    return
            self.offer(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self.offer(_Raised(error))
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001  (closing a generator at exit; nothing to report)
                    pass


class Prefetcher(Iterator[Any]):
    """Iterator over prefetched (stacked, device-resident) chunks.  Use
    :func:`prefetch` to make one; close it (or use it as a context manager) to stop the
    thread early.

    Attributes:
        wait_fraction: the fraction of the consumer's wall time (from its first
            ``next``) spent waiting for a chunk; near 0 when reading keeps up.
        wait_seconds, wall_seconds: the two terms of that fraction.
        num_chunks: chunks handed out so far.
    """

    def __init__(
        self,
        iterator: Iterable[dict[str, np.ndarray]],
        *,
        size: int = 2,
        sharding: jax.sharding.Sharding | None = None,
        stack: int | None = None,
        remainder: str = "keep",
        to_device: bool = True,
    ):
        if size < 1:
            raise ValueError(f"prefetch size must be at least 1, got {size}")
        if stack is not None and stack < 1:
            raise ValueError(f"stack must be a positive number of batches, got {stack}")
        if remainder not in ("keep", "drop"):
            raise ValueError(f"remainder must be 'keep' or 'drop', got {remainder!r}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._peeked: Any = None
        self.wait_seconds = 0.0
        self.num_chunks = 0
        self._start: float | None = None
        # The thread holds the producer, not this object: a prefetcher dropped without
        # close() (an exception on the consumer's side) is collected, and __del__ stops it.
        producer = _Producer(
            iter(iterator), stack, remainder, sharding, to_device, self._queue, self._stop
        )
        self._thread = threading.Thread(target=producer.run, name="viax-prefetch", daemon=True)
        self._thread.start()

    # -- consumer ---------------------------------------------------------------------
    def __iter__(self) -> Prefetcher:
        return self

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return _END

    def peek(self) -> Any:
        """The next chunk without taking it (``None`` at the end, errors raised by the
        ``next`` that takes it); waits for it, but not on ``wait_fraction``'s clock: a
        consumer looks ahead before its loop starts."""
        if self._peeked is None and not self._done:
            self._peeked = self._get()
        item = self._peeked
        return None if item is None or item is _END or isinstance(item, _Raised) else item

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
        else:
            try:
                item = self._get()
            finally:
                self.wait_seconds += time.perf_counter() - now
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            self._thread.join()
            raise item.error
        self.num_chunks += 1
        return item

    @property
    def wall_seconds(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    @property
    def wait_fraction(self) -> float:
        wall = self.wall_seconds
        return self.wait_seconds / wall if wall > 0 else 0.0

    def close(self) -> None:
        """Stop the thread (it finishes the read in progress) and drop queued chunks."""
        self._done = True
        self._peeked = None
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # The thread stops after the read in progress; a source that blocks for ever
            # is left behind (the thread is a daemon) rather than hanging the caller.
            self._thread.join(timeout=60)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def prefetch(
    iterator: Iterable[dict[str, np.ndarray]],
    *,
    size: int = 2,
    sharding: jax.sharding.Sharding | None = None,
    stack: int | None = None,
    remainder: str = "keep",
    to_device: bool = True,
) -> Prefetcher:
    """Read batches ahead in a background thread.

    Args:
        iterator: batches, e.g. ``source.batches(B, seed=0, epoch=e)``.
        size: chunks held ready (memory: ``size + 1`` chunks on the devices).
        sharding: where the chunks go, e.g. ``batch_sharding(mesh, stacked=True)``;
            ``None``: the default device.  A sharding spanning several processes
            assembles the global array from each process's slice
            (``jax.make_array_from_process_local_data``).
        stack: K; stack K consecutive batches into one chunk ``{name: (K, b, ...)}`` for
            a ``lax.scan`` over K steps; ``None``: hand out single batches.
        remainder: a last chunk of fewer than K batches is handed out (``"keep"``, its
            leading axis shorter) or dropped (``"drop"``).
        to_device: ``False`` keeps NumPy arrays (reading ahead only).

    Returns:
        a :class:`Prefetcher`: an iterator with ``wait_fraction``; exceptions raised in
        the thread (a :class:`DataError`, a disk error) are raised by its ``next``.

    Example:
        >>> import numpy as np, viax
        >>> src = viax.data.as_source({"x": np.arange(12.0)})
        >>> with viax.data.prefetch(src.batches(2, seed=0, epoch=0), stack=3) as chunks:
        ...     print([c["x"].shape for c in chunks])
        [(3, 2), (3, 2)]
    """
    return Prefetcher(
        iterator,
        size=size,
        sharding=sharding,
        stack=stack,
        remainder=remainder,
        to_device=to_device,
    )
