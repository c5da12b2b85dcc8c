"""Minibatch VI: exact answers on conjugate models, O(|B|) steps, the same numbers on
1 or 4 devices and 1 or 2 processes, and an exact resume after ``kill -9``."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import viax
from viax.batched import analyse
from viax.families.gaussian import MeanField
from viax.infer import checkpoint
from viax.infer.driver import batched_chunk_fn
from viax.infer.minibatch import Anchor, Whitening, build_minibatch, fit_minibatch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subsampled_regression(X, y):
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0], subsample_size=64) as i:
        numpyro.sample("y", dist.Normal(X[i] @ beta, 1), obs=y[i])


def regression_data(n=1024, seed=0):
    rng = np.random.default_rng(seed)
    # Raw scales: the second predictor is 100 times the first.
    X = rng.normal(size=(n, 2)) * np.array([1.0, 100.0])
    y = X @ np.array([1.0, -0.02]) + rng.normal(size=n)
    return X, y


def exact_posterior(X, y):
    cov = np.linalg.inv(X.T @ X + np.eye(X.shape[1]) / 100)
    return cov @ X.T @ y, np.sqrt(np.diag(cov))


def test_numpyro_subsample_plate_model_gives_the_exact_posterior():
    """A model written NumPyro's way (plate with subsample_size, data indexed by the
    plate's indices) fits unchanged; conjugate, so q's exact optimum is the posterior's
    marginals (mean-field of a Gaussian: means exact, sds 1/sqrt(precision_jj))."""
    X, y = regression_data()
    result = viax.fit(subsampled_regression, {"X": X, "y": y}, seed=0, progress=False)
    assert result.info["path"] == "minibatch"
    assert "subsamples a plate" in result.info["path_reason"]
    assert result.info["batch_size"] == 64
    mean, _ = exact_posterior(X, y)
    precision = X.T @ X + np.eye(2) / 100
    meanfield_sd = 1 / np.sqrt(np.diag(precision))
    sd = np.sqrt(np.diag(np.linalg.inv(precision)))
    # MCSE tol 0.1 posterior scales, plus the step-size bias: within 0.15 sd.
    np.testing.assert_array_less(np.abs(result.mean_unconstrained - mean) / sd, 0.15)
    np.testing.assert_allclose(np.sqrt(np.diag(result.cov_unconstrained)), meanfield_sd, rtol=0.1)
    assert result.converged and result.info["mcse_max_relative"] <= 0.1
    assert np.isfinite(result.khat) and result.khat < 0.7
    assert result.sample(10)["beta"].shape == (10, 2)


def local_model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    with numpyro.plate("N", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, 1))
        numpyro.sample("y", dist.Normal(z, 1), obs=y)


def _chunk_seconds(num_rows, batch_size=32, steps=100, repeats=3):
    y = jnp.zeros(num_rows)
    rows = {"y": jax.ShapeDtypeStruct((batch_size,), y.dtype)}
    bm = analyse(local_model, {}, rows, {}, num_rows, batch_size)
    family = MeanField(bm.global_dim)
    whitening = Whitening(jnp.zeros(1), None, jnp.ones(1))
    anchor = Anchor(jnp.zeros(1), jnp.asarray(0.0), jnp.zeros(1), jnp.asarray(0.0))
    algo = build_minibatch(bm, family, num_particles=1)
    data = {"_setup": (whitening, anchor)}
    state = algo.init(family.init(), jax.random.PRNGKey(0))
    run_chunk = batched_chunk_fn(algo.step)
    rng = np.random.default_rng(0)
    index = rng.integers(0, num_rows - batch_size, steps)[:, None] + np.arange(batch_size)
    chunk = {"y": jnp.asarray(rng.normal(size=(steps, batch_size))), "_rows": jnp.asarray(index)}
    key = jax.random.PRNGKey(0)
    state, _ = run_chunk(state, key, np.int32(0), data, chunk)  # compile
    jax.block_until_ready(state)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        state, info = run_chunk(state, key, np.int32(0), data, chunk)
        jax.block_until_ready(state)
        best = min(best, time.perf_counter() - start)
    assert int(state.step) == steps * (repeats + 1)
    # Only the batch's rows moved: the others keep their initial parameters.
    touched = np.zeros(num_rows, bool)
    touched[index.ravel()] = True
    loc = np.asarray(state.params["local"]["z"]["loc"])[:, 0]
    assert np.all(loc[~touched] == 0) and np.any(loc[touched] != 0)
    return best


def test_step_cost_does_not_grow_with_the_rows():
    """Per-row parameters and their Adam moments live at full size (N, 1) and are
    gathered/scattered by the batch's rows, in place (the chunk donates its state):
    10^6 rows cost a step what 10^3 rows do."""
    small = _chunk_seconds(1_000)
    large = _chunk_seconds(1_000_000)
    # One O(N) pass over the ~10 full-size arrays (80 MB) would take ~20 ms per step.
    assert large < 3 * small + 0.01, (small, large)


def test_local_latents_reach_their_conjugate_answer():
    """Per-row latents z_i with q_i stored by row; the mean-field optimum of this
    Gaussian model is known: q(μ) = N(m, 1/(N/2 + 1/100)), q(z_i) = N((m + y_i)/2, 1/2).
    The run ends at its budget before the rule finds the iterates stationary, so the
    answer is the last iterate: its noise (Adam's jitter, about lr per touch of a row)
    sets the tolerances."""
    rng = np.random.default_rng(1)
    y = rng.normal(3.0, np.sqrt(2.0), size=256)
    result = fit_minibatch(
        local_model,
        {"y": y},
        batch_size=64,
        num_steps=3000,
        num_particles=4,
        learning_rate=0.01,
        local_learning_rate=0.02,
        evaluate=False,
        progress=False,
    )
    precision = y.size / 2 + 1 / 100
    m = y.sum() / 2 / precision
    assert result.info["local_sites"] == ["z"] and result.info["global_sites"] == ["mu"]
    assert abs(result.mean_unconstrained[0] - m) < 0.1 / np.sqrt(precision)
    local = result.info["local"]["z"]
    np.testing.assert_allclose(local["loc"][:, 0], (m + y) / 2, atol=0.2)
    np.testing.assert_allclose(np.exp(local["log_scale"][:, 0]), np.sqrt(0.5), rtol=0.2)
    assert abs(np.mean(local["loc"][:, 0] - (m + y) / 2)) < 0.02


_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import numpy as np
    import jax
    {prelude}
    import numpyro, numpyro.distributions as dist
    import viax
    from viax.infer.minibatch import fit_minibatch
    from viax.infer.stopping import MCSEStop

    def model(X, y):
        beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("N", X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ beta, 1), obs=y)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 2)) * np.array([1.0, 100.0])
    y = X @ np.array([1.0, -0.02]) + rng.normal(size=512)

    def show(values):
        return ",".join("%.17g" % v for v in values)

    def fit(devices=None, steps=60, **kw):
        # The whitening's MAP on 128 of the 512 rows: the set-up's full-data Newton step
        # (and its second pass) runs too.
        r = fit_minibatch(model, {{"X": X, "y": y}}, batch_size=32, num_steps=steps,
                          steps_per_chunk=20, stop_rule=MCSEStop(tol=1e-9, max_halvings=0),
                          num_precondition_rows=128, evaluate=False, progress=False,
                          devices=devices, **kw)
        assert r.info["newton_start"].startswith("taken"), r.info["newton_start"]
        return np.concatenate([np.ravel(v) for v in r.params.values()] +
                              [r.elbo_trace])
    {body}
    """
)


def _python(prelude, body, env=None, **kwargs):
    script = _SCRIPT.format(prelude=textwrap.dedent(prelude), body=textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "VIAX_CACHE_DIR": "off", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _output(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return np.asarray([float(v) for v in out.split()[-1].split(",")])


def test_one_and_four_devices_and_two_processes_give_the_same_numbers():
    """Batches sharded over a "data" mesh of 4 CPU devices, and over 2 processes
    (jax.distributed, gloo collectives) give the 1-device numbers: the row order is a
    function of the seed alone and the parameters are replicated."""
    four = _python(
        "",
        """
        one = fit(devices=jax.devices()[:1])
        four = fit()
        assert len(jax.devices()) == 4
        print(show(one) + "\\n" + show(four))
        """,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        _python(
            f"""
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address="localhost:{port}",
                                       num_processes=2, process_id={i})
            """,
            """
            out = fit()
            assert jax.process_count() == 2 and len(jax.devices()) == 2
            print(show(out))
            """,
        )
        for i in range(2)
    ]
    out, err = four.communicate(timeout=120)
    assert four.returncode == 0, err[-3000:]
    one, four_devices = (
        np.asarray([float(v) for v in line.split(",")]) for line in out.split()[-2:]
    )
    np.testing.assert_allclose(four_devices, one, rtol=1e-6)
    for proc in procs:
        np.testing.assert_allclose(_output(proc), one, rtol=1e-6)


def test_resume_after_kill_gives_the_uninterrupted_numbers(tmp_path, kill_at_checkpoint):
    """A run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends
    with the numbers of the run that was never interrupted."""
    path, other = str(tmp_path / "run.npz"), str(tmp_path / "other.npz")
    victim = _python(
        "",
        f"""
        from viax.infer import checkpoint
        save = checkpoint.save
        def slow_save(*args, **kwargs):  # a slow disk: time to kill mid-run
            save(*args, **kwargs)
            import time; time.sleep(0.3)
        checkpoint.save = slow_save
        fit(steps=400, checkpoint_path={path!r}, checkpoint_every=0.0)
        """,
    )
    step = kill_at_checkpoint(victim, lambda: checkpoint.load(path)["step"], 60, timeout=90)
    assert 60 <= step < 400
    both = _python(
        "",
        f"""
        resumed = fit(steps=400, checkpoint_path={path!r}, resume=True)
        fresh = fit(steps=400, checkpoint_path={other!r})
        print(show(resumed) + "\\n" + show(fresh))
        """,
    )
    out, err = both.communicate(timeout=120)
    assert both.returncode == 0, err[-3000:]
    resumed, fresh = (np.asarray([float(v) for v in line.split(",")]) for line in out.split()[-2:])
    np.testing.assert_allclose(resumed, fresh, rtol=1e-12)


NUM_GROUPS = 8


def centred_logistic(x, g, y):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("groups", NUM_GROUPS):
        alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha[g] + b * x), obs=y)


def noncentred_logistic(x, g, y):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("groups", NUM_GROUPS):
        z = numpyro.sample("z", dist.Normal(0, 1))
    alpha = mu + tau * z
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha[g] + b * x), obs=y)


def test_hierarchical_normal_sites_are_fitted_non_centred():
    """A centred hierarchical prior alpha_j ~ N(mu, tau) has no joint MAP (a funnel:
    log p ~ -(J - 1) log tau as tau -> 0), so the whitening had no centre (measured on
    2,000 rows, 8 groups, raw-scale x: the MAP search ran 500 steps into the funnel and
    the fit put tau at 0.143 against NUTS's 0.084 +- 0.066).  The minibatch analysis
    non-centres it: the same log density as the hand-written non-centred model at every
    point (no fit needed to check that, exactly), draws under the user's names."""
    rng = np.random.default_rng(0)
    n, batch_size = 512, 64
    x = rng.normal(12, 4, n)
    g = rng.integers(0, NUM_GROUPS, n).astype(np.int32)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(2 - 0.1 * x))).astype(float)
    data = {"x": x, "g": g, "y": y}
    rows = {k: jax.ShapeDtypeStruct((batch_size,), v.dtype) for k, v in data.items()}
    auto = analyse(centred_logistic, {}, rows, {}, n, batch_size)
    hand = analyse(noncentred_logistic, {}, rows, {}, n, batch_size)
    assert auto.noncentred == ("alpha",)
    assert [s.name for s in auto.global_sites] == ["alpha_decentered", "b", "mu", "tau"]
    assert hand.noncentred == ()  # its only Normal with a computed scale is none
    batch = {k: v[:batch_size] for k, v in data.items()}
    batch["_rows"] = np.arange(batch_size)
    u = rng.normal(size=NUM_GROUPS + 3)
    u_hand = np.concatenate([u[NUM_GROUPS:], u[:NUM_GROUPS]])  # z sorts last
    np.testing.assert_allclose(
        auto.log_joint_parts(jnp.asarray(u), {}, batch),
        hand.log_joint_parts(jnp.asarray(u_hand), {}, batch),
        rtol=1e-12,
    )
    draws = auto.constrain_globals(jnp.asarray(u), batch)
    assert sorted(draws) == ["alpha", "b", "mu", "tau"]
    np.testing.assert_allclose(
        draws["alpha"], draws["mu"] + draws["tau"] * u[:NUM_GROUPS], rtol=1e-12
    )
    centred = analyse(centred_logistic, {}, rows, {}, n, batch_size, noncentre=False)
    assert centred.noncentred == () and "alpha" in [s.name for s in centred.global_sites]
