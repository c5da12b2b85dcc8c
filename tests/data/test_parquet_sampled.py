"""Batches of a Parquet file's full pass read alone (``ParquetSource.padded_batches``):
the same batches as the pass read in sequence, each row group decoded at most once; the
minibatch fit's final evaluation from a file gives the numbers of the pass read through."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from viax import data
from viax.data import DataError, ParquetSource
from viax.infer import minibatch as mb


@pytest.fixture
def decoded(monkeypatch):
    """The row groups decoded (``ParquetSource._decode`` calls), in order."""
    groups: list[int] = []
    decode = ParquetSource._decode

    def spy(self, handle, g, start, stop):
        groups.append(g)
        return decode(self, handle, g, start, stop)

    monkeypatch.setattr(ParquetSource, "_decode", spy)
    return groups


def _drop_twos(block):
    """A transform that drops rows (a third of them) and makes a column."""
    keep = block["c"] != 2
    out = {k: v[keep] for k, v in block.items()}
    out["twice"] = 2 * out["a"]
    return out


def test_padded_batches_are_the_full_pass_batches_at_their_indices(tmp_path, decoded):
    """1,037 rows in 21 row groups of 50 (1037 = 8 x 129 + 5: streams of 130 and 129
    rows, the last batch padded); with and without a transform that drops rows, for one
    process and each of two, batch size 32 (4 rows a stream) and 2,048 (256 a stream:
    the padding repeats the stream's 130 rows); indices in any order, the last included:
    the batches (values, dtypes, key order, mask) of the sequential pass at those
    indices, in the order asked, each row group decoded at most once."""
    rng = np.random.default_rng(0)
    n = 1037
    table = {"a": np.arange(n, dtype=float), "b": rng.normal(size=n), "c": rng.integers(0, 3, n)}
    pq.write_table(pa.table(table), tmp_path / "d.parquet", row_group_size=50)
    for transform in (None, _drop_twos):
        columns = {"X": ["a", "b"], "y": "c"} | ({"t": "twice"} if transform else {})
        src = data.parquet(tmp_path / "d.parquet", columns, transform=transform, read_block=20)
        for batch_size in (32, 2048):
            for share in ((0, 1), (0, 2), (1, 2)):
                index, count = share
                every = list(
                    src.batches(
                        batch_size,
                        seed=3,
                        epoch=0,
                        process_index=index,
                        process_count=count,
                        remainder="pad",
                    )
                )
                last = len(every) - 1
                assert not every[last]["_mask"].all()  # padded
                wanted = rng.permutation(np.unique([0, last, *rng.integers(0, last + 1, 6)]))
                decoded.clear()
                got = list(
                    src.padded_batches(
                        batch_size, wanted, seed=3, process_index=index, process_count=count
                    )
                )
                assert len(decoded) == len(set(decoded)), decoded
                assert len(got) == len(wanted)
                for k, batch in zip(wanted, got, strict=True):
                    expected = every[k]
                    assert list(batch) == list(expected)
                    for name, value in expected.items():
                        assert batch[name].dtype == value.dtype, name
                        np.testing.assert_array_equal(batch[name], value)
    with pytest.raises(DataError, match="distinct batch indices"):
        src.padded_batches(32, [3, 3], seed=0)
    with pytest.raises(DataError, match=r"in \[0, 21\)"):
        src.padded_batches(32, [21], seed=0)


def logistic(X, y):
    a = numpyro.sample("a", dist.Normal(0, 10))
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ beta), obs=y)


def test_evaluation_from_a_file_reads_only_the_sampled_batches(tmp_path, monkeypatch, decoded):
    """A fit on 2,999 rows of a file (row groups of 16, batches of 32: a pass of 94
    batches, 16 sampled, 4 first): once the sums A and G are known, the difference
    estimator's batches are read alone, the first try's and then the rest of the
    second's, no row group decoded twice, and the log weights, their row-sampling sds
    and the ELBO's se are those of the pass read through (bit for bit), in two tries
    (the first's remainders reused) as in one; so are a whole pass's log weights and its
    summary (``result.info["evaluation"]``)."""
    monkeypatch.setattr(mb, "_EVAL_BATCHES", 16)
    monkeypatch.setattr(mb, "_EVAL_BATCHES_FIRST", 4)
    rng = np.random.default_rng(1)
    n = 2999
    X = rng.normal(size=(n, 2))
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + X @ np.array([1.0, -2.0]))))).astype(float)
    table = pa.table({"x0": X[:, 0], "x1": X[:, 1], "y": y})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=16)
    src = data.parquet(tmp_path / "d.parquet", {"X": ["x0", "x1"], "y": "y"})
    result = mb.fit_minibatch(
        logistic,
        src,
        batch_size=32,
        num_steps=100,
        steps_per_chunk=50,
        precondition=False,
        evaluate=False,
        progress=False,
    )
    evaluator = result.log_weights_fn
    monkeypatch.setattr(mb, "_EVAL_MAX_RELATIVE_SD", np.inf)  # never exact: compared as is
    assert evaluator.sampled(evaluator.args[0], src, 32)
    evaluator(200, 5)  # the sums A and G at q's mean, from the pass read through
    total, order = evaluator._sampled_batches()
    assert total == src.num_batches(32, remainder="pad") == 94
    first, second = np.sort(order[:4]), np.sort(order[:16])

    decoded.clear()
    done: dict = {}
    reader = mb._SampledReader(src, 32, 0, (0, 1), [*first, *sorted(set(second) - set(first))])
    alone_first = evaluator._estimate(200, 5, total, first, done, reader)
    alone_second = evaluator._estimate(200, 5, total, second, done, reader)
    reader.close()
    assert len(decoded) == len(set(decoded)) < len(src.groups)

    # The summary of a pass (its tries made equal: read through there is one).
    monkeypatch.setattr(mb, "_EVAL_BATCHES_FIRST", 16)
    alone = evaluator(200, 5)
    last = dict(evaluator.last)
    assert last["batches"] == "16 of 94"
    monkeypatch.setattr(mb, "_reads_alone", lambda source: False)  # read through
    np.testing.assert_array_equal(evaluator(200, 5), alone)
    assert evaluator.last == last
    for sampled, alone in ((first, alone_first), (second, alone_second)):
        through = evaluator._estimate(200, 5, total, sampled)
        for a, b in zip(alone, through, strict=True):
            np.testing.assert_array_equal(a, b)
