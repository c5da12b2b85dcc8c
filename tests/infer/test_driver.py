"""The driver: non-finite steps roll back with a smaller step, or raise naming where."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

import viax


@jax.custom_jvp
def _poisoned(x):
    return 0.0 * x


# A finite value whose derivative is NaN: a gradient bug in a user's model.
_poisoned.defjvp(lambda primals, tangents: (_poisoned(primals[0]), jnp.nan * tangents[0]))


def poisoned_model():
    return viax.Model(
        lambda v: -0.5 * (v["x"] ** 2 + v["b"] ** 2) + _poisoned(v["b"]),
        latents={"x": constraints.real, "b": constraints.real},
    )


def test_stochastic_divergence_raises_naming_step_and_site():
    with pytest.raises(viax.DivergenceError, match=r"step 1.*site\(s\): b") as info:
        viax.fit(poisoned_model(), optimizer="stan", eta=1.0, progress=False)
    assert info.value.step == 1 and info.value.sites == ("b",)


def test_dadvi_divergence_raises_naming_the_site():
    with pytest.raises(viax.DivergenceError, match=r"site\(s\): b"):
        viax.fit(poisoned_model(), progress=False)


def test_backoff_recovers_from_a_too_large_step():
    model = viax.Model(
        # The offset keeps the ELBO away from 0, where Stan's relative-change rule is blind.
        lambda v: jnp.where(jnp.abs(v["x"]) > 20.0, jnp.nan, -0.5 * v["x"] ** 2 - 10.0),
        latents={"x": constraints.real},
    )
    # η = 100 jumps straight into the NaN region; the driver divides the step by ten.
    result = viax.fit(model, optimizer="stan", eta=100.0, seed=0, progress=False)
    assert result.info["num_backoffs"] >= 1
    assert np.all(np.isfinite(result.elbo_trace)) and np.isfinite(result.elbo)
    assert abs(result.mean_unconstrained[0]) < 0.3
    assert abs(np.sqrt(result.cov_unconstrained[0, 0]) - 1) < 0.3
