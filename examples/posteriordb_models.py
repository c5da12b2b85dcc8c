"""NumPyro versions of seven posteriordb posteriors, with their reference moments.

Each model is written from the maths in ``shared/data/README.md`` (posteriordb,
stan-dev/posteriordb, BSD-3): a flat prior is ``dist.ImproperUniform(constraint, (),
shape)``, exactly as Stan treats a parameter with no sampling statement.  Every model
takes the keys of its ``data.json`` as keyword arguments and ignores the others
(``**kwargs``), so ``model(**json.load(...))`` works.

    >>> model_fn, data, reference = load("kidiq-kidscore_interaction")  # doctest: +SKIP
    >>> result = viax.fit(model_fn, data, family="fullrank")  # doctest: +SKIP
    >>> score(result, reference)  # doctest: +SKIP
    {'mean_error_worst': ..., 'mean_error_median': ..., 'sd_ratio_worst': ..., ...}

Scoring (README, "How to score a VI fit"): for each reference parameter the error of
the posterior mean in reference standard deviations, ``|mean_q - mean_ref| / sd_ref``,
and the ratio ``sd_q / sd_ref``; the worst parameter and the median are reported.

Only :func:`load` reads files, so this module imports without ``shared/`` present.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["DATA_DIR", "MODELS", "draws_of", "load", "score", "site_of"]

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "posteriordb"


def _flat(constraint, shape=()):
    """Stan's implicit prior: an improper uniform density on ``constraint``."""
    return dist.ImproperUniform(constraint, (), shape)


def eight_schools_noncentered(J, y, sigma, **kwargs):
    """``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``, ``theta_trans ~ N(0, 1)``,
    ``theta = mu + tau * theta_trans`` (deterministic), ``y ~ N(theta, sigma)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([J]).to_event(1))
    theta = numpyro.deterministic("theta", mu + tau * theta_trans)
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def kidscore_interaction(kid_score, mom_hs, mom_iq, **kwargs):
    """``beta`` (4) flat, ``sigma ~ HalfCauchy(2.5)``,
    ``kid_score ~ N(b1 + b2 mom_hs + b3 mom_iq + b4 mom_hs mom_iq, sigma)``; unscaled."""
    beta = numpyro.sample("beta", _flat(constraints.real, (4,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * mom_hs * mom_iq
    numpyro.sample("kid_score", dist.Normal(mean, sigma).to_event(1), obs=kid_score)


def logearn_interaction_z(earn, height, male, **kwargs):
    """``beta`` (4) flat, ``sigma`` flat on (0, inf), ``z`` = standardised height
    (sample sd), ``log(earn) ~ N(b1 + b2 z + b3 male + b4 z male, sigma)``."""
    z = (height - jnp.mean(height)) / jnp.std(height, ddof=1)
    beta = numpyro.sample("beta", _flat(constraints.real, (4,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    mean = beta[0] + beta[1] * z + beta[2] * male + beta[3] * z * male
    numpyro.sample("log_earn", dist.Normal(mean, sigma).to_event(1), obs=jnp.log(earn))


def logmesquite(weight, diam1, diam2, canopy_height, total_height, density, group, **kwargs):
    """``beta`` (7) flat, ``sigma`` flat on (0, inf), ``log(weight) ~ N(b1 + b2 log diam1
    + b3 log diam2 + b4 log canopy_height + b5 log total_height + b6 log density
    + b7 group, sigma)``."""
    predictors = jnp.stack(
        [
            jnp.ones_like(diam1),
            jnp.log(diam1),
            jnp.log(diam2),
            jnp.log(canopy_height),
            jnp.log(total_height),
            jnp.log(density),
            group,
        ],
        axis=-1,
    )
    beta = numpyro.sample("beta", _flat(constraints.real, (7,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample(
        "log_weight", dist.Normal(predictors @ beta, sigma).to_event(1), obs=jnp.log(weight)
    )


def blr(X, y, D, **kwargs):
    """``beta`` (D) ``~ N(0, 10)``, ``sigma ~ HalfNormal(10)``, ``y ~ N(X beta, sigma)``."""
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([D]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(X @ beta, sigma).to_event(1), obs=y)


def low_dim_gauss_mix(y, **kwargs):
    """``mu`` (2, ordered) ``~ N(0, 2)``, ``sigma`` (2) ``~ HalfNormal(2)``,
    ``theta ~ Beta(5, 5)``, ``y[n] ~ theta N(mu1, sigma1) + (1 - theta) N(mu2, sigma2)``.

    The ordered vector has no proper NumPyro distribution, so its support comes from an
    improper uniform on ``ordered_vector`` and its N(0, 2) density from a factor, as in
    Stan (``ordered[2] mu; mu ~ normal(0, 2);``).
    """
    mu = numpyro.sample("mu", _flat(constraints.ordered_vector, (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    y = jnp.asarray(y)[:, None]
    log_weights = jnp.stack([jnp.log(theta), jnp.log1p(-theta)])
    log_components = dist.Normal(mu, sigma).log_prob(y) + log_weights  # (N, 2)
    numpyro.factor("y", jax.nn.logsumexp(log_components, axis=-1).sum())


def low_dim_gauss_mix_assignments(N, y, **kwargs):
    """:func:`low_dim_gauss_mix` with the assignments as explicit Categorical latents
    ``z[n]`` (N discrete sites in a plate) instead of summed out: the black-box VI test
    and benchmark model."""
    mu = numpyro.sample("mu", _flat(constraints.ordered_vector, (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    with numpyro.plate("n", N):
        z = numpyro.sample("z", dist.Categorical(probs=jnp.stack([theta, 1.0 - theta])))
        numpyro.sample("y", dist.Normal(mu[z], sigma[z]), obs=y)


def arma11(y, **kwargs):
    """``mu ~ N(0, 10)``, ``phi ~ N(0, 2)``, ``theta ~ N(0, 2)``,
    ``sigma ~ HalfCauchy(2.5)``; ``err_1 = y_1 - (mu + phi mu)``,
    ``err_t = y_t - (mu + phi y_{t-1} + theta err_{t-1})``, ``err ~ N(0, sigma)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    y = jnp.asarray(y)
    err_first = y[0] - (mu + phi * mu)

    def step(err_previous, y_pair):
        y_previous, y_now = y_pair
        err_now = y_now - (mu + phi * y_previous + theta * err_previous)
        return err_now, err_now

    _, err_rest = jax.lax.scan(step, err_first, (y[:-1], y[1:]))
    err = jnp.concatenate([err_first[None], err_rest])
    numpyro.factor("err", dist.Normal(0.0, sigma).log_prob(err).sum())


MODELS: dict[str, Callable[..., None]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "kidiq-kidscore_interaction": kidscore_interaction,
    "earnings-logearn_interaction_z": logearn_interaction_z,
    "mesquite-logmesquite": logmesquite,
    "sblrc-blr": blr,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "arma-arma11": arma11,
}


def load(
    name: str, data_dir: Path | str | None = None
) -> tuple[Callable[..., None], dict[str, Any], dict[str, tuple[float, float]]]:
    """``(model_fn, data, reference)`` for posterior ``name``.

    ``data`` is the posterior's ``data.json`` as a dict; ``reference`` maps Stan names
    (``"theta[1]"``, 1-based) to ``(mean, sd)`` from 10,000 NUTS draws.
    """
    if name not in MODELS:
        raise KeyError(f"unknown posterior {name!r}; known: {', '.join(MODELS)}")
    folder = Path(data_dir) / name if data_dir is not None else DATA_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no posteriordb folder at {folder}")
    data = json.loads((folder / "data.json").read_text())
    moments = json.loads((folder / "reference_moments.json").read_text())["params"]
    reference = {key: (float(v["mean"]), float(v["std"])) for key, v in moments.items()}
    return MODELS[name], data, reference


_STAN_NAME = re.compile(r"^(?P<site>[^\[\]]+)(?:\[(?P<index>[0-9, ]+)\])?$")


def _split_stan_name(stan_name: str) -> tuple[str, tuple[int, ...]]:
    """``"beta[1]"`` -> ``("beta", (0,))``; ``"Sigma[2,1]"`` -> ``("Sigma", (1, 0))``."""
    match = _STAN_NAME.match(stan_name)
    if match is None:
        raise ValueError(f"cannot parse parameter name {stan_name!r}")
    index = match.group("index")
    if index is None:
        return match.group("site"), ()
    return match.group("site"), tuple(int(i) - 1 for i in index.split(","))


def site_of(stan_name: str) -> str:
    """The NumPyro site that holds a Stan parameter: ``"theta[3]"`` -> ``"theta"``."""
    return _split_stan_name(stan_name)[0]


def draws_of(result_or_draws: Any, num_samples: int = 4000, seed: int = 0) -> dict:
    """Draws as ``{site: (num_samples, *shape)}`` from a viax Result (anything with
    ``.sample(n, seed)``) or a dict of draws, returned as numpy arrays."""
    if isinstance(result_or_draws, Mapping):
        return {k: np.asarray(v) for k, v in result_or_draws.items()}
    return {k: np.asarray(v) for k, v in result_or_draws.sample(num_samples, seed).items()}


def score(
    result_or_draws: Any,
    reference: Mapping[str, tuple[float, float]],
    num_samples: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score draws against reference moments.

    Args:
        result_or_draws: a viax Result (draws from ``.sample``, deterministic sites
            included) or ``{site: array (num_samples, *shape)}``.
        reference: Stan name (1-based) -> (mean, sd).

    Returns:
        ``mean_error_worst``, ``mean_error_median`` (``|mean_q - mean_ref| / sd_ref``),
        ``sd_ratio_worst`` (the ratio farthest from 1 on a log scale),
        ``sd_ratio_median``, ``sd_ratio_min``, ``sd_ratio_max``, ``worst_parameter``
        and the per-parameter ``mean_error`` and ``sd_ratio`` dicts.
    """
    draws = draws_of(result_or_draws, num_samples, seed)
    mean_error, sd_ratio = {}, {}
    for stan_name, (ref_mean, ref_sd) in reference.items():
        site, index = _split_stan_name(stan_name)
        if site not in draws:
            raise KeyError(f"reference parameter {stan_name!r}: no site {site!r} in the draws")
        values = draws[site]
        values = values[(slice(None), *index)] if index else values
        if values.ndim != 1:
            raise ValueError(f"{stan_name!r} does not name one element of {site!r}")
        mean_error[stan_name] = float(abs(values.mean() - ref_mean) / ref_sd)
        sd_ratio[stan_name] = float(values.std(ddof=1) / ref_sd)
    errors = np.array(list(mean_error.values()))
    ratios = np.array(list(sd_ratio.values()))
    worst_ratio = ratios[np.argmax(np.abs(np.log(ratios)))]
    return {
        "mean_error_worst": float(errors.max()),
        "mean_error_median": float(np.median(errors)),
        "sd_ratio_worst": float(worst_ratio),
        "sd_ratio_median": float(np.median(ratios)),
        "sd_ratio_min": float(ratios.min()),
        "sd_ratio_max": float(ratios.max()),
        "worst_parameter": max(mean_error, key=mean_error.get),
        "mean_error": mean_error,
        "sd_ratio": sd_ratio,
    }


if __name__ == "__main__":
    import sys

    import viax

    names = sys.argv[1:] or list(MODELS)
    for name in names:
        model_fn, data, reference = load(name)
        for family in ("meanfield", "fullrank"):
            result = viax.fit(model_fn, data, family=family, progress=False)
            s = score(result, reference)
            print(
                f"{name:45s} {family:9s} worst |mean err|/sd {s['mean_error_worst']:.3f} "
                f"({s['worst_parameter']}), median {s['mean_error_median']:.3f}, "
                f"sd ratio {s['sd_ratio_min']:.2f}-{s['sd_ratio_max']:.2f}"
            )
