"""Parquet sources: a file written here round-trips through shuffled, column-selected
batches; the batch order does not depend on the process count; resume; bad input."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from viax import data
from viax.data import DataError

N = 1000


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return {
        "a": np.arange(N, dtype=np.float64),
        "b": rng.normal(size=N),
        "c": rng.integers(0, 3, N),
        "s": np.array(["x", "y", "z"])[rng.integers(0, 3, N)],
        "unused": rng.normal(size=N),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory, table):
    """Two files (600 + 400 rows) in row groups of 64 rows."""
    path = tmp_path_factory.mktemp("pq")
    whole = pa.table(table)
    pq.write_table(whole.slice(0, 600), path / "part-0.parquet", row_group_size=64)
    pq.write_table(whole.slice(600), path / "part-1.parquet", row_group_size=64)
    return path


def _rows(batches):
    return np.concatenate([b["_rows"] for b in batches])


def test_round_trip_with_shuffling_and_column_selection(folder, table):
    src = data.parquet(folder, {"X": ["a", "b"], "y": "c"})
    assert src.num_rows == N and src.read == ["a", "b", "c"]
    assert src.columns == {"X": ((2,), np.dtype(float)), "y": ((), np.dtype(np.int64))}
    batches = list(src.batches(32, seed=0, epoch=0))
    assert len(batches) == src.num_batches(32) == 31  # 8 streams of 125 rows, 4 x 4 each
    rows = _rows(batches)
    assert len(np.unique(rows)) == len(rows) == 992  # an epoch: distinct rows
    for b in batches:  # every row carries its own data
        np.testing.assert_array_equal(b["X"], np.stack([table["a"], table["b"]], 1)[b["_rows"]])
        np.testing.assert_array_equal(b["y"], table["c"][b["_rows"]])
    # shuffled: far from file order, and a new order each epoch
    assert abs(np.corrcoef(rows, np.arange(len(rows)))[0, 1]) < 0.2
    assert not np.array_equal(rows, _rows(src.batches(32, seed=0, epoch=1)))
    # in file order without shuffling
    plain = data.parquet(folder, ["a"], shuffle=False, num_shards=1)
    np.testing.assert_array_equal(_rows(plain.batches(100, seed=0, epoch=0)), np.arange(N))


def test_same_global_batches_for_any_process_count_and_resume(folder):
    src = data.parquet(folder, {"X": ["a", "b"]}, shuffle_buffer=200, read_block=50)
    one = list(src.batches(32, seed=4, epoch=2))
    for count in (2, 4, 8):
        shares = [
            list(src.batches(32, seed=4, epoch=2, process_index=p, process_count=count))
            for p in range(count)
        ]
        for k, batch in enumerate(one):
            np.testing.assert_array_equal(
                np.concatenate([shares[p][k]["X"] for p in range(count)]), batch["X"]
            )
    rest = list(src.batches(32, seed=4, epoch=2, start_batch=10, process_index=1, process_count=2))
    full = list(src.batches(32, seed=4, epoch=2, process_index=1, process_count=2))
    for a, b in zip(full[10:], rest, strict=True):
        np.testing.assert_array_equal(a["_rows"], b["_rows"])
    # record-batch boundaries and reading threads do not change the order
    other = data.parquet(folder, {"X": ["a", "b"]}, shuffle_buffer=200, read_block=7)
    np.testing.assert_array_equal(_rows(other.batches(32, seed=4, epoch=2)), _rows(one))
    threaded = data.parquet(folder, {"X": ["a", "b"]}, shuffle_buffer=200, num_threads=3)
    np.testing.assert_array_equal(_rows(threaded.batches(32, seed=4, epoch=2)), _rows(one))
    with pytest.raises(DataError, match="3 processes cannot split the 8 streams"):
        src.batches(48, seed=0, epoch=0, process_count=3)


def test_transform_categories_and_dropped_rows(folder, table):
    vocabulary = data.unique_values(folder, "s")
    np.testing.assert_array_equal(vocabulary, ["x", "y", "z"])

    def transform(block):
        keep = block["c"] != 0
        out = {k: v[keep] for k, v in block.items()}
        out["code"] = np.searchsorted(vocabulary, out["s"])
        out["log_a"] = np.log1p(out["a"])
        return out

    src = data.parquet(
        folder, {"X": ["log_a", "b"], "k": "code"}, transform=transform, read=["a", "b", "c", "s"]
    )
    assert src.num_rows == int((table["c"] != 0).sum())
    batches = list(src.batches(32, seed=1, epoch=0))
    assert len(batches) == src.num_batches(32) == (src.num_rows // 8) // 4 == 21
    rows = _rows(batches)
    assert (table["c"][rows] != 0).all() and len(np.unique(rows)) == len(rows)
    codes = np.concatenate([b["k"] for b in batches])
    np.testing.assert_array_equal(vocabulary[codes], table["s"][rows])
    # resuming with a transform: the counts come from the counting pass
    np.testing.assert_array_equal(
        _rows(src.batches(32, seed=1, epoch=0, start_batch=15)), rows[15 * 32 :]
    )


def test_pad_is_a_full_pass_for_any_process_count(folder, table):
    kept = np.flatnonzero(table["c"] != 0)
    src = data.parquet(
        folder,
        {"a": "a"},
        transform=lambda b: {k: v[b["c"] != 0] for k, v in b.items()},
        read=["a", "c"],
    )
    one = list(src.batches(48, seed=2, epoch=0, remainder="pad"))
    assert len(one) == src.num_batches(48, remainder="pad") == 15  # streams of 85 or 84 rows
    rows = _rows(one)[np.concatenate([b["_mask"] for b in one])]
    np.testing.assert_array_equal(np.sort(rows), kept)  # every kept row once
    for b in one:
        np.testing.assert_array_equal(b["a"], table["a"][b["_rows"]])
    shares = [
        list(src.batches(48, seed=2, epoch=0, process_index=p, process_count=4, remainder="pad"))
        for p in range(4)
    ]
    for k, batch in enumerate(one):
        for name in ("_rows", "_mask"):
            joined = np.concatenate([shares[p][k][name] for p in range(4)])
            np.testing.assert_array_equal(joined, batch[name])
    resumed = list(src.batches(48, seed=2, epoch=0, start_batch=9, remainder="pad"))
    np.testing.assert_array_equal(_rows(resumed), _rows(one[9:]))


def test_categories_become_integer_codes(folder, table, tmp_path):
    src = data.parquet(folder, {"k": "s", "a": "a"}, categories={"s": None})
    np.testing.assert_array_equal(src.categories["s"], ["x", "y", "z"])
    batch = next(src.batches(64, seed=0, epoch=0))
    np.testing.assert_array_equal(src.categories["s"][batch["k"]], table["s"][batch["_rows"]])
    with pytest.raises(DataError, match=r"missing from its categories= vocabulary: \['z'\]"):
        data.parquet(folder, {"k": "s"}, categories={"s": ["x", "y"]})
    with_null = pa.table({"s": pa.array(["x", None, "y", "x"]), "v": np.arange(4.0)})
    pq.write_table(with_null, tmp_path / "null.parquet")
    with pytest.raises(DataError, match="column 's' is null at null.parquet row group 0, row 1"):
        data.parquet(tmp_path / "null.parquet", {"k": "s"}, categories={"s": None})
    kept = data.parquet(
        tmp_path / "null.parquet",
        {"k": "s", "v": "v"},
        categories={"s": None},
        transform=lambda b: {k: v[b["s"] >= 0] for k, v in b.items()},
    )
    np.testing.assert_array_equal(np.sort(next(kept.batches(3, seed=0, epoch=0))["v"]), [0, 2, 3])


def test_bad_input_is_named(folder, tmp_path, table):
    with pytest.raises(DataError, match=r"column 'zz' not in .*; available: a, b, c, s, unused"):
        data.parquet(folder, {"X": ["a", "zz"]})
    with pytest.raises(DataError, match="'late' .* nor made by transform="):
        data.parquet(folder, {"y": "late"}, transform=lambda b: b)
    with pytest.raises(DataError, match="transform= looked up column 'c', which is not read"):
        data.parquet(folder, {"y": "late"}, transform=lambda b: {"late": b["c"] > 0})
    with pytest.raises(DataError, match="column 's' holds object values"):
        data.parquet(folder, ["s"])
    bad = dict(table, b=table["b"].copy())
    bad["b"][70] = np.nan
    pq.write_table(pa.table(bad), tmp_path / "nan.parquet", row_group_size=64)
    src = data.parquet(tmp_path / "nan.parquet", {"X": ["a", "b"]})
    with pytest.raises(
        DataError,
        match=r"column 'b' has a non-finite value \(nan\) at nan.parquet row group 1, "
        r"row 6 of the group \(global row 70\)",
    ):
        list(src.batches(32, seed=0, epoch=0))
    with pytest.raises(DataError, match="no such Parquet file"):
        data.parquet(tmp_path / "absent.parquet", ["a"])


def test_streams_hold_numpy_rows_not_arrow_buffers(tmp_path):
    """Arrow decodes a row group whole; a stream keeps the rows it needs as NumPy arrays
    and drops Arrow's memory (before: each of the S streams held its decoded group, the
    compressed bytes and a pre-buffer cache, 27 MB per stream on 5.5 MB groups).  And a
    padded pass reads a block only when it is short of a sub-batch (before: one block
    per sub-batch, the stream piled up in memory)."""
    rng = np.random.default_rng(1)
    n, groups = 4096, 8
    table = pa.table({f"x{j}": rng.normal(size=n * groups) for j in range(8)})
    path = tmp_path / "wide.parquet"
    pq.write_table(table, path, row_group_size=n)
    group_bytes = n * 8 * 8
    src = data.parquet(path, {"X": [f"x{j}" for j in range(8)]}, read_block=256)
    batches = src.batches(64, seed=0, epoch=0)
    next(batches)  # every one of the 8 streams has read into its row group
    held = pa.total_allocated_bytes()
    assert held < group_bytes / 4, held
    reads = []
    original = src._read_piece

    def counting(*args):
        for block in original(*args):
            reads.append(len(block["_rows"]))
            yield block

    src._read_piece = counting
    padded = src.batches(64, seed=0, epoch=0, remainder="pad")
    for _ in range(8):  # 8 sub-batches of 8 rows per stream: one 256-row block each
        next(padded)
    assert len(reads) == 8, reads


def test_buffer_draws_several_sub_batches_at_once_and_resumes_inside_a_draw(folder):
    """With a buffer of 125 rows per stream and sub-batches of 4 rows, a stream draws
    G = 7 sub-batches at once; resuming at batch 10 (inside the second draw) replays the
    draws on positions and gives the uninterrupted stream's batches, for 1 or 2
    processes; an epoch still holds distinct rows, in an order far from the file's."""
    from viax.data.parquet_source import _draw_unit

    assert _draw_unit(125, 4) == 7 and _draw_unit(16384, 512) == 8 and _draw_unit(10, 4) == 1
    src = data.parquet(folder, {"X": ["a", "b"]}, shuffle_buffer=1000)
    full = list(src.batches(32, seed=3, epoch=1))
    rows = _rows(full)
    assert len(np.unique(rows)) == len(rows) == 992
    assert abs(np.corrcoef(rows, np.arange(len(rows)))[0, 1]) < 0.2
    for count in (1, 2):
        for p in range(count):
            share = list(src.batches(32, seed=3, epoch=1, process_index=p, process_count=count))
            rest = list(
                src.batches(
                    32, seed=3, epoch=1, start_batch=10, process_index=p, process_count=count
                )
            )
            for a, b in zip(share[10:], rest, strict=True):
                np.testing.assert_array_equal(a["_rows"], b["_rows"])
                np.testing.assert_array_equal(a["X"], b["X"])
