"""Data sources: batch order independent of the process count, resume, memmaps,
iterables, and clear errors for bad data."""

import numpy as np
import pandas as pd
import pytest

from viax import data
from viax.data import DataError


def _arrays(n=103, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"X": rng.normal(size=(n, d)), "y": rng.integers(0, 2, n), "scale": 2.5}


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_process_slices_union_to_the_one_process_batch(remainder):
    src = data.as_source(_arrays())
    one = list(src.batches(12, seed=3, epoch=1, remainder=remainder))
    assert len(one) == (8 if remainder == "drop" else 9) == src.num_batches(12, remainder=remainder)
    for count in (2, 3, 4):
        shares = [
            list(
                src.batches(
                    12, seed=3, epoch=1, process_index=p, process_count=count, remainder=remainder
                )
            )
            for p in range(count)
        ]
        for k, batch in enumerate(one):
            joined = _concat([shares[p][k] for p in range(count)])
            for name in batch:
                np.testing.assert_array_equal(joined[name], batch[name])
    # each batch's rows are the data at those rows; an epoch (drop) visits distinct rows
    rows = np.concatenate([b["_rows"] for b in one[:8]])
    assert len(set(rows.tolist())) == 96
    np.testing.assert_array_equal(one[0]["X"], _arrays()["X"][one[0]["_rows"]])
    if remainder == "pad":
        assert one[-1]["_mask"].sum() == 103 - 96 and one[0]["_mask"].all()


def test_order_depends_on_seed_and_epoch_only():
    src = data.as_source(_arrays())
    a = next(src.batches(10, seed=0, epoch=0))["_rows"]
    assert np.array_equal(a, next(src.batches(10, seed=0, epoch=0))["_rows"])
    assert not np.array_equal(a, next(src.batches(10, seed=0, epoch=1))["_rows"])
    assert not np.array_equal(a, next(src.batches(10, seed=1, epoch=0))["_rows"])


def test_resume_from_start_batch_continues_the_stream():
    for src in (data.as_source(_arrays()), data.as_source(_blocks(), num_rows=103)):
        full = list(src.batches(8, seed=5, epoch=2, process_index=1, process_count=2))
        rest = list(
            src.batches(8, seed=5, epoch=2, start_batch=4, process_index=1, process_count=2)
        )
        assert len(rest) == len(full) - 4
        for a, b in zip(full[4:], rest, strict=True):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])


def test_static_data_and_dataframe():
    src = data.as_source(_arrays())
    assert set(src.columns) == {"X", "y"} and src.static == {"scale": 2.5}
    assert type(src.static["scale"]) is float  # Python scalars stay static Python values
    assert src.columns["X"] == ((3,), np.dtype(float))
    # a matrix of leading dimension N forced static, a DataFrame as a mapping
    forced = data.as_source({"x": np.zeros(4), "P": np.eye(4)}, static=["P"])
    assert list(forced.columns) == ["x"] and forced.static["P"].shape == (4, 4)
    frame = pd.DataFrame({"a": np.arange(6.0), "b": np.arange(6)})
    batch = next(data.as_source(frame).batches(3, seed=0, epoch=0))
    np.testing.assert_array_equal(batch["a"], batch["_rows"].astype(float))


def test_memmap_source_reads_the_same_batches(tmp_path):
    arrays = _arrays(n=50, d=4)
    mm = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(50, 4))
    mm[:] = arrays["X"]
    mm.flush()
    mapped = data.as_source({"X": np.load(tmp_path / "X.npy", mmap_mode="r"), "y": arrays["y"]})
    memory = data.as_source({"X": arrays["X"].astype(np.float32), "y": arrays["y"]})
    for a, b in zip(
        mapped.batches(16, seed=1, epoch=0), memory.batches(16, seed=1, epoch=0), strict=True
    ):
        assert type(a["X"]) is np.ndarray
        np.testing.assert_array_equal(a["X"], b["X"])
        np.testing.assert_array_equal(a["_rows"], b["_rows"])


def _blocks():
    rng = np.random.default_rng(1)
    sizes = [10, 33, 7, 40, 13]
    return [{"x": rng.normal(size=(n, 2)), "t": rng.normal(size=n)} for n in sizes]


def test_iterable_source_rebatches_in_stream_order():
    blocks = _blocks()
    src = data.as_source(blocks)
    assert src.num_rows is None and src.columns["x"] == ((2,), np.dtype(float))
    batches = list(src.batches(16, seed=0, epoch=0))
    assert len(batches) == 103 // 16
    np.testing.assert_array_equal(_concat(batches)["_rows"], np.arange(96))
    np.testing.assert_array_equal(
        _concat(batches)["x"], np.concatenate([b["x"] for b in blocks])[:96]
    )
    # DataFrames and Arrow record batches are blocks too
    frames = [pd.DataFrame({"t": b["t"]}) for b in blocks]
    np.testing.assert_array_equal(
        _concat(list(data.as_source(frames).batches(16, seed=0, epoch=0)))["t"],
        np.concatenate([b["t"] for b in blocks])[:96],
    )
    import pyarrow as pa

    arrow = [pa.record_batch({"t": b["t"]}) for b in blocks]
    assert len(list(data.as_source(arrow).batches(16, seed=0, epoch=0))) == 6
    # a generator serves one epoch, then says so
    once = data.as_source(b for b in blocks)
    assert len(list(once.batches(16, seed=0, epoch=0))) == 6
    with pytest.raises(DataError, match="one-shot"):
        list(once.batches(16, seed=0, epoch=1))


def test_bad_data_errors():
    x = np.zeros((20, 2))
    x[13, 1] = np.nan
    with pytest.raises(DataError, match=r"column 'x' has a non-finite value \(nan\) at row 13"):
        list(data.as_source({"x": x}).batches(5, seed=0, epoch=0))
    blocks = _blocks()
    blocks[3] = {"x": np.zeros((40, 3)), "t": np.zeros(40)}
    with pytest.raises(DataError, match=r"batch 3 does not match.*'x': got rows of shape \(3,\)"):
        list(data.as_source(blocks).batches(16, seed=0, epoch=0))
    with pytest.raises(DataError, match="different numbers of rows"):
        list(data.as_source([{"x": np.zeros(3), "t": np.zeros(4)}]).batches(2, seed=0, epoch=0))
    with pytest.raises(DataError, match="does not split evenly over 3 processes"):
        data.as_source({"x": np.zeros(20)}).batches(8, seed=0, epoch=0, process_count=3)
    with pytest.raises(DataError, match="exceeds the 20 rows"):
        data.as_source({"x": np.zeros(20)}).batches(32, seed=0, epoch=0)
    with pytest.raises(DataError, match="cannot read data of type str"):
        data.as_source("flights.parquet")


def test_pad_fills_a_batch_larger_than_the_data():
    (batch,) = data.as_source({"x": np.arange(5.0)}).batches(12, seed=0, epoch=0, remainder="pad")
    assert batch["x"].shape == (12,) and batch["_mask"].sum() == 5
    np.testing.assert_array_equal(np.sort(batch["_rows"][batch["_mask"]]), np.arange(5))
