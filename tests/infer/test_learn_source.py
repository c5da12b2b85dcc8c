"""Learning θ from viax.data sources (viax.infer.learn): streamed batches, per-batch
transforms, checkpoints (kill -9 and resume), several processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pyarrow as pa
import pyarrow.parquet as pq
from ppca import closed_form, ppca  # examples/ppca.py

import viax
from viax.infer.learn import dynamic_binarization, fit_learn

REPO = Path(__file__).resolve().parents[2]


def _ppca_data(n=60, d=4):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(d, 2)) * np.array([2.0, 1.0])
    return rng.normal(size=(n, 2)) @ w.T + 0.5 * rng.normal(size=(n, d)) + 1.0


def test_ppca_from_parquet_agrees_with_memory_and_the_closed_form(tmp_path):
    """The same minibatch fit from a Parquet file and from the arrays in memory: both
    reach the maximum-likelihood θ of Tipping & Bishop.  Their batch orders differ (the
    source's row groups and shuffle buffer against an on-device permutation), so they
    agree statistically, not to rounding.  Tolerances: over seeds 0-3 at this budget
    (1500 Adam steps of 30 rows, cosine decay from 2e-2) the largest errors measured
    were 1.8e-3 (σ²), 3.4e-3 (W Wᵀ, relative), 1.4e-3 (μ) and an ELBO 0.015 nats under
    the log-likelihood (3.6 se), from either source; the bounds are 2-4 times those."""
    x = _ppca_data()
    s2, ww, log_lik = closed_form(x, q=2)
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({f"x{i}": x[:, i] for i in range(4)}), path, row_group_size=20)
    steps = 1500
    results = {}
    for name, data in (
        ("parquet", viax.data.parquet(path, {"x": [f"x{i}" for i in range(4)]})),
        ("memory", {"x": x}),
    ):
        results[name] = fit_learn(
            ppca,
            data,
            encoder=viax.MLPEncoder(hidden_sizes=()),
            objective=viax.ELBO(num_samples=16),
            batch_size=30,
            num_epochs=steps // 2,
            optimizer=optax.adam(optax.cosine_decay_schedule(2e-2, steps)),
            progress=False,
        )
    streamed = results["parquet"]
    assert streamed.info["source_rows"] == streamed.info["rows_in_memory"] == 60
    assert streamed.num_steps == steps and streamed.elbo_trace.size == steps
    for result in results.values():
        p = result.model_params
        assert abs(p["sigma"] ** 2 / s2 - 1) < 4e-3
        assert np.linalg.norm(p["W"] @ p["W"].T - ww) < 1e-2 * np.linalg.norm(ww)
        np.testing.assert_allclose(p["mu"], x.mean(0), atol=6e-3)
        assert log_lik - 0.05 < result.elbo < log_lik + 3 * result.elbo_se


def test_dynamic_binarization_and_early_stopping_on_a_source():
    """A fresh Bernoulli draw of each grey level per batch (Burda et al.), on a source:
    the maximum of the expected log-likelihood of Bernoulli(p_d) is p_d = the mean grey
    level of column d.  Tolerance 0.02: about 10^4 effective draws per column in the
    last few hundred steps give an sd near 0.005 (measured error 0.004 without the
    rule, 0.007 with it).  EarlyStopping watches held-out rows given by the user (here
    one fixed binarization of the same grey levels): 8 checks, one per chunk of 125
    epochs, and the bound still improving at the end."""
    rng = np.random.default_rng(1)
    grey = rng.uniform(size=(64, 3)) * np.array([0.4, 1.0, 0.4]) + np.array([0.0, 0.0, 0.6])

    def bernoulli(x):
        logits = numpyro.param("logits", jnp.zeros(x.shape[1]))
        with numpyro.plate("rows", x.shape[0]):
            numpyro.sample("z", dist.Normal(0, 1))  # a latent for the encoder to amortize
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    result = fit_learn(
        bernoulli,
        viax.data.as_source({"x": grey}),
        encoder=viax.MLPEncoder(hidden_sizes=()),
        batch_size=32,
        num_epochs=1000,
        optimizer=optax.adam(optax.cosine_decay_schedule(3e-2, 2000)),
        transform_batch=dynamic_binarization,
        stop_rule=viax.EarlyStopping(validation_data={"x": grey}),
        evaluate=False,
        progress=False,
    )
    p = 1 / (1 + np.exp(-result.model_params["logits"]))
    np.testing.assert_allclose(p, grey.mean(0), atol=0.02)
    assert len(result.info["validation"]) == 8 and "still improving" in result.message


_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import jax
    {prelude}
    import numpyro, numpyro.distributions as dist
    import viax
    from viax.infer import learn

    def ppca(x):
        w = numpyro.param("W", 0.1 * np.ones((x.shape[1], 1)))
        mu = numpyro.param("mu", np.zeros(x.shape[1]))
        s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        with numpyro.plate("rows", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            numpyro.sample("x", dist.Normal(z @ w.T + mu, s).to_event(1), obs=x)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 1)) @ np.array([[2.0, -1.0, 0.5]])
    X = X + 0.5 * rng.normal(size=(512, 3))

    def show(values):
        return ",".join("%.17g" % v for v in values)

    def fit(data=None, batch_size=8, num_epochs=10, **kw):
        # 64 steps per epoch: 5 chunks of two epochs.
        r = learn.fit_learn(ppca, {{"x": X}} if data is None else data,
                            encoder=viax.MLPEncoder(hidden_sizes=()), batch_size=batch_size,
                            num_epochs=num_epochs, evaluate=False, progress=False, **kw)
        return np.concatenate([np.ravel(v) for v in r.model_params.values()] + [r.elbo_trace])
    {body}
    """
)


def _python(prelude, body, cache):
    """A Python process running the script; ``cache``: a compilation cache directory
    of this test's own, so that the later processes load the programs the first
    compiled (and no other test's cache is used)."""
    script = _SCRIPT.format(prelude=textwrap.dedent(prelude), body=textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "VIAX_CACHE_DIR": str(cache)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(proc, count, timeout=180):
    """The last ``count`` lines of the output (gloo writes lines of its own)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return [np.asarray([float(v) for v in line.split(",")]) for line in out.split()[-count:]]


def test_resume_after_kill_and_two_processes_give_the_uninterrupted_numbers(
    tmp_path, kill_at_checkpoint
):
    """A learning run killed with SIGKILL mid-run and resumed from its last checkpoint
    ends with the numbers of the run never interrupted (θ, φ, Adam's moments, the data
    position and the draws are in the checkpoint or a function of the step); and two
    processes (jax.distributed, gloo collectives), each reading its half of every batch,
    give the one-process numbers."""
    path, other = str(tmp_path / "run.npz"), str(tmp_path / "other.npz")
    cache = tmp_path / "cache"
    victim = _python(
        "",
        f"""
        save = learn._save_checkpoint
        def slow_save(*args, **kwargs):  # a slow disk: time to kill mid-run
            save(*args, **kwargs)
            time.sleep(0.3)
        learn._save_checkpoint = slow_save
        fit(checkpoint_path={path!r}, checkpoint_every=0.0)
        """,
        cache,
    )
    step = kill_at_checkpoint(victim, lambda: np.load(path)["step"], 128, timeout=120)
    assert 128 <= step < 640
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [
        _python(
            f"""
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address="localhost:{port}",
                                       num_processes=2, process_id={i})
            """,
            """
            out = fit(viax.data.as_source({"x": X}), num_epochs=2)  # its first 128 steps
            assert jax.process_count() == 2 and len(jax.devices()) == 2
            print(show(out))
            """,
            cache,
        )
        for i in range(2)
    ]
    both = _python(
        "",
        f"""
        try:  # a checkpoint of another run is refused, naming the difference
            fit(batch_size=16, checkpoint_path={path!r}, resume=True)
            raise AssertionError("resumed another run's checkpoint")
        except ValueError as error:
            assert "batch_size=8" in str(error), error
        resumed = fit(checkpoint_path={path!r}, resume=True)
        fresh = fit(checkpoint_path={other!r})
        print(show(resumed) + "\\n" + show(fresh))
        """,
        cache,
    )
    resumed, fresh = _lines(both, 2)
    assert fresh.size == 3 + 3 + 1 + 640
    np.testing.assert_allclose(resumed, fresh, rtol=1e-12)
    for proc in processes:
        (two,) = _lines(proc, 1)
        # Two epochs: θ after 128 steps, then the objective of each step, which is a
        # function of the parameters, the batch and the draws of that step.
        np.testing.assert_allclose(two[7:], fresh[7 : 7 + 128], rtol=1e-6)


def test_a_chunk_of_a_source_holds_at_most_32_mib_of_rows():
    """The scan over stacked batches of a source is cut to _CHUNK_BYTES (2^25) of rows:
    an MNIST epoch (500 batches of 100 rows of 3,136 bytes; 106 fit) in scans of 100, a
    divisor, so the checks of the caller still come at its epochs' ends; a prime number
    of steps in scans of the budget.  Cutting the scans changes no number (checked on
    the binarization test's fit with EarlyStopping at 250, 50 and 70-step budgets: the
    same checks, values and θ; a session script)."""
    from viax.infer.learn import _steps_per_read

    assert _steps_per_read(500, 100, 3136) == 100
    assert _steps_per_read(997, 100, 3136) == 106
    assert _steps_per_read(250, 30, 32) == 250
    assert _steps_per_read(10, 1, 2**26) == 1
