"""Minibatch learning over a "data" mesh: 1 and 4 host CPU devices give the same θ, and
devices that cannot share the batch are refused before compiling."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import viax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Amortized probabilistic PCA (W, μ, σ params; an affine encoder for z),
# 60 rows, batches of 20 (5 rows a device), 10 epochs = 30 Adam steps in 2 chunks.
_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax, re
    import viax
    from examples.ppca import ppca  # run from the repository root

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2)) @ rng.normal(size=(2, 4)) + 0.5 * rng.normal(size=(60, 4))

    def fit(**kw):
        return viax.fit(ppca, {"x": x}, encoder=viax.MLPEncoder(hidden_sizes=()),
                        objective=viax.ELBO(num_samples=4), batch_size=20, num_epochs=10,
                        optimizer=optax.adam(1e-2), seed=1, progress=False, **kw)

    def show(r):
        theta = np.concatenate([np.ravel(r.model_params[k]) for k in ("W", "mu", "sigma")])
        return ",".join("%.17g" % v for v in np.concatenate([theta, r.elbo_trace]))

    assert len(jax.devices()) == 4
    for kw, match in (({"batch_size": 30}, "batch_size 30 .* multiple .* devices \\\\(4\\\\)"),
                      ({"batch_size": None, "num_epochs": None, "devices": 4},
                       "full-batch learning runs on one")):
        try:
            viax.fit(ppca, {"x": x}, encoder=viax.MLPEncoder(), progress=False,
                     **{**{"batch_size": 20, "num_epochs": 1}, **kw})
        except ValueError as e:
            assert re.search(match, str(e)), str(e)
        else:
            raise AssertionError(f"{kw} was not refused")
    one, four = fit(devices=1), fit()
    assert (one.info["devices"], four.info["devices"]) == (1, 4)
    print(show(one) + "\\n" + show(four))
    """
)


def test_one_and_four_devices_learn_the_same_theta():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=REPO,
        env={
            **os.environ,
            "VIAX_CACHE_DIR": "off",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, four = (np.asarray([float(v) for v in line.split(",")]) for line in proc.stdout.split())
    # θ (8 + 4 + 1 numbers) and the 30 per-step ELBO estimates: the row order and the
    # draws depend on the seed alone; only the order of the gradient's row sums differs.
    assert one.size == 13 + 30
    np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-12)
    assert not np.array_equal(one[:13], np.zeros(13))


def _local(x):
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_more_devices_than_the_process_has_are_refused():
    with pytest.raises(ValueError, match="devices=64: this process has"):
        viax.fit(
            _local,
            {"x": np.ones(4)},
            encoder=viax.MLPEncoder(),
            batch_size=64,
            devices=64,
            progress=False,
        )
