"""Bad input is refused before anything compiles, with the problem named."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import viax
from viax.model import build_target, prepare_data


def model(x, y, scale=1.0):
    w = numpyro.sample("w", dist.Normal(0, 1).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Normal(x @ w, scale), obs=y)


X = np.random.default_rng(0).normal(size=(10, 3))
Y = X @ np.array([1.0, -1.0, 0.5])


def test_missing_argument():
    with pytest.raises(viax.ModelError, match="missing model argument.*y"):
        viax.fit(model, {"x": X}, progress=False)


def test_extra_key_refused_unless_model_takes_kwargs():
    with pytest.raises(viax.ModelError, match="not arguments of the model.*kwargs"):
        viax.fit(model, {"x": X, "y": Y, "N": 10}, progress=False)

    def tolerant(x, y, **kwargs):
        model(x, y)

    assert prepare_data(tolerant, {"x": X, "y": Y, "N": 10}).static == (("N", 10),)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data(bad):
    y = Y.copy()
    y[3] = bad
    with pytest.raises(viax.ModelError, match=r"data\['y'\] holds 1 NaN or infinite"):
        viax.fit(model, {"x": X, "y": y}, progress=False)


def test_no_latent_sites():
    def observed_only(y):
        numpyro.sample("y", dist.Normal(0, 1), obs=y)

    with pytest.raises(viax.ModelError, match="no latent sample sites"):
        viax.fit(observed_only, {"y": Y}, progress=False)


def test_unknown_method_family_optimizer():
    data = {"x": X, "y": Y}
    with pytest.raises(ValueError, match="unknown method 'nuts'; valid methods: advi"):
        viax.fit(model, data, method="nuts")
    with pytest.raises(ValueError, match="valid families: meanfield, fullrank, lowrank"):
        viax.fit(model, data, family="diag")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        viax.fit(model, data, optimizer="sgd")
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        viax.fit(model, data, num_steps=0)
    with pytest.raises(ValueError, match="tol_rel_obj must be a positive number"):
        viax.fit(model, data, tol_rel_obj=-1.0)


def test_log_density_not_finite_at_init_names_the_site():
    def broken(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        # The data lie outside the support of the likelihood whatever mu is.
        numpyro.sample("y", dist.Exponential(1.0 + mu**2), obs=y)

    with pytest.raises(viax.ModelError, match=r"not finite at the initial point; site\(s\): y"):
        viax.fit(broken, {"y": np.array([-1.0, 2.0])}, progress=False)


def test_constraint_with_no_bijection():
    with pytest.raises(viax.ModelError, match="no bijection to the real line"):
        viax.Model(lambda v: 0.0, latents={"flag": constraints.boolean})
    with pytest.raises(viax.ModelError, match="not a numpyro constraint"):
        viax.Model(lambda v: 0.0, latents={"x": "real"})


def test_discrete_latent_is_refused_by_advi():
    def mixture(y):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(2.0 * z, 1.0), obs=y)

    with pytest.raises(viax.ModelError, match="site\\(s\\) z are discrete"):
        viax.fit(mixture, {"y": np.array([0.1])}, progress=False)


def test_model_that_raises_is_reported():
    def typo(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1), obs=y + undefined_name)  # noqa: F821

    with pytest.raises(viax.ModelError, match="NameError"):
        viax.fit(typo, {"y": Y}, progress=False)


def test_sites_and_flat_layout():
    def two_sites():
        numpyro.sample("sigma", dist.HalfNormal(1.0))
        numpyro.sample("beta", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.sample("p", dist.Dirichlet(np.ones(4)))

    target, _, init = build_target(two_sites, None)
    sizes = {s.name: (s.shape, s.unconstrained_shape, s.size) for s in target.sites}
    assert sizes == {"sigma": ((), (), 1), "beta": ((3,), (3,), 3), "p": ((4,), (3,), 3)}
    assert target.dim == 7 and init.shape == (7,)
    assert [target.site_of_index(i) for i in range(7)] == ["beta"] * 3 + ["p"] * 3 + ["sigma"]
