"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each)
assemble the same global batches as one process: arrays and Parquet sources."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from viax import data

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from viax import data
    assert (jax.process_count(), jax.device_count()) == (2, 4)
    mesh = data.data_mesh()
    sharding = data.batch_sharding(mesh, stacked=True)
    theta = jax.device_put(np.array([1.0, -2.0]), data.replicated(mesh))
    step = jax.jit(lambda t, c: (c["X"] @ t).sum(axis=1), out_shardings=data.replicated(mesh))
    out = {}
    sources = {
        "arrays": data.as_source({"X": np.arange(48.0).reshape(24, 2)}),
        "parquet": data.parquet(path, {"X": ["a", "b"]}, shuffle_buffer=100),
    }
    p, count = data.process_share()
    for name, src in sources.items():
        batches = src.batches(8, seed=3, epoch=1, process_index=p, process_count=count)
        sums = [
            np.asarray(step(theta, c).addressable_data(0)).tolist()
            for c in data.prefetch(batches, stack=2, sharding=sharding, remainder="drop")
        ]
        out[name] = sums
    print("RESULT" + json.dumps(out), flush=True)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _expected(src):
    x = np.stack([b["X"] for b in src.batches(8, seed=3, epoch=1)])
    sums = x @ np.array([1.0, -2.0])
    return sums.sum(axis=1).reshape(-1)[: 2 * (len(sums) // 2)]


def test_two_processes_assemble_the_one_process_batches(tmp_path):
    rng = np.random.default_rng(0)
    table = pa.table({"a": np.arange(200.0), "b": rng.normal(size=200)})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=30)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "VIAX_CACHE_DIR": "off",
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tmp_path / "d.parquet")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        line = next(s for s in stdout.splitlines() if s.startswith("RESULT"))
        results.append(json.loads(line[len("RESULT") :]))
    assert results[0] == results[1]
    sources = {
        "arrays": data.as_source({"X": np.arange(48.0).reshape(24, 2)}),
        "parquet": data.parquet(tmp_path / "d.parquet", {"X": ["a", "b"]}, shuffle_buffer=100),
    }
    for name, src in sources.items():
        np.testing.assert_allclose(
            np.ravel(results[0][name]), _expected(src), rtol=1e-12, err_msg=name
        )
