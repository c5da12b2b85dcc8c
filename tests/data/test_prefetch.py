"""Prefetch: stacking, device placement over a 4-device mesh, errors from the thread."""

import gc
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from viax import data
from viax.data import DataError


def test_prefetch_stacks_and_propagates_errors():
    src = data.as_source({"x": np.arange(40.0).reshape(20, 2)})

    def failing():
        yield from src.batches(4, seed=0, epoch=0)
        raise DataError("disk on fire")

    chunks = data.prefetch(failing(), stack=2, size=1)
    first = next(chunks)
    assert first["x"].shape == (2, 4, 2)
    expected = list(src.batches(4, seed=0, epoch=0))
    np.testing.assert_array_equal(np.asarray(first["x"][1]), expected[1]["x"])
    assert next(chunks)["x"].shape == (2, 4, 2)
    with pytest.raises(DataError, match="disk on fire"):  # raised before the 5th batch
        next(chunks)
    with pytest.raises(StopIteration):
        next(chunks)
    assert 0.0 <= chunks.wait_fraction <= 1.0
    dropped = data.prefetch(src.batches(4, seed=0, epoch=0), stack=2, remainder="drop")
    assert [c["x"].shape[0] for c in dropped] == [2, 2]
    kept = data.prefetch(src.batches(4, seed=0, epoch=0), stack=2)
    assert [c["x"].shape[0] for c in kept] == [2, 2, 1]


def test_prefetch_close_stops_the_thread():
    def endless():
        while True:
            yield {"x": np.zeros(3)}

    before = threading.active_count()
    with data.prefetch(endless(), size=2, to_device=False) as chunks:
        assert next(chunks)["x"].shape == (3,)
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(chunks)
    # Ctrl-C in the consuming loop: the with block stops the thread on the way out
    with pytest.raises(KeyboardInterrupt), data.prefetch(endless(), to_device=False) as chunks:
        next(chunks)
        raise KeyboardInterrupt
    assert threading.active_count() == before


def test_prefetch_peek_looks_ahead_without_taking():
    src = data.as_source({"x": np.arange(12.0)})
    chunks = data.prefetch(src.batches(2, seed=0, epoch=0, remainder="pad"), stack=3)
    first = chunks.peek()
    assert chunks.peek() is first and chunks.wait_seconds == 0.0
    taken = [next(chunks) for _ in range(2)]
    assert taken[0] is first and taken[1]["x"].shape == (3, 2)
    assert chunks.peek() is None  # the end
    with pytest.raises(StopIteration):
        next(chunks)


def test_prefetch_dropped_without_close_stops_the_thread():
    # A fit that raises during its set-up drops a prefetcher it started early: the
    # thread must not keep it (and its queued chunks) alive.
    def endless():
        while True:
            yield {"x": np.zeros(3)}

    chunks = data.prefetch(endless(), size=2, to_device=False)
    next(chunks)
    thread = chunks._thread
    del chunks
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_stacked_chunks_are_adopted_by_the_cpu_device():
    # 64-byte aligned chunks: device_put on CPU aliases them rather than copying
    batches = [{"x": np.full((4, 3), i, np.float32), "n": np.arange(4) + i} for i in range(5)]
    chunk = data.stack_batches(batches)
    assert chunk["x"].ctypes.data % 64 == 0 and chunk["n"].ctypes.data % 64 == 0
    np.testing.assert_array_equal(chunk["x"], np.stack([b["x"] for b in batches]))
    assert chunk["n"].dtype == batches[0]["n"].dtype


SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from viax import data
    assert jax.device_count() == 4
    mesh = data.data_mesh()
    src = data.as_source({"x": np.arange(48.0).reshape(24, 2), "w": np.ones(24)})
    sharding = data.batch_sharding(mesh, stacked=True)
    chunks = list(data.prefetch(src.batches(8, seed=0, epoch=0), stack=3, sharding=sharding))
    assert [c["x"].shape for c in chunks] == [(3, 8, 2)]
    x = chunks[0]["x"]
    assert x.sharding == sharding
    assert sorted(s.data.shape for s in x.addressable_shards) == [(3, 2, 2)] * 4
    expected = np.stack([b["x"] for b in src.batches(8, seed=0, epoch=0)])
    np.testing.assert_array_equal(np.asarray(x), expected)
    # a replicated parameter times a sharded batch: XLA sums over the devices
    theta = jax.device_put(np.array([1.0, -1.0]), data.replicated(mesh))
    total = jax.jit(lambda t, c: (c["x"] @ t).sum())(theta, chunks[0])
    np.testing.assert_allclose(float(total), (expected @ np.array([1.0, -1.0])).sum())
    try:
        next(data.prefetch(src.batches(6, seed=0, epoch=0), sharding=data.batch_sharding(mesh)))
    except data.DataError as e:
        assert "split evenly over the devices" in str(e), e
    else:
        raise AssertionError("a batch of 6 rows on 4 devices was accepted")
    print("ok")
    """
)


def test_prefetch_shards_over_four_cpu_devices():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    import os

    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, **env, "VIAX_CACHE_DIR": "off"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
