"""Conjugate exponential-family models: CAVI, SVI and the naive closed-form ELBO.

One engine (:mod:`viax.conjugate.engine`): a model is written once as its expected
log joint in the factors' mean parameters, and ``jax.grad`` of it gives every
coordinate update, ``λ* = ∂E_q[log p]/∂μ``.  On top of it:

- :func:`cavi` (full-data coordinate ascent), :func:`svi` (Hoffman et al. 2013),
  :func:`naive` (gradient ascent on the closed-form ELBO with optax), each returning
  :class:`viax.result.Result`;
- the models in :mod:`viax.conjugate.models`;
- scikit-learn estimators :class:`GaussianMixture`, :class:`LDA`,
  :class:`LinearRegression` (they need scikit-learn, ``pip install 'viax[sklearn]'``,
  and are imported on first use, so that the rest imports without it).
"""

from viax.conjugate.cavi import ElboDecreaseError, cavi
from viax.conjugate.checkpoint import load_checkpoint, save_checkpoint
from viax.conjugate.engine import ConjugateModel, conjugate_model
from viax.conjugate.expfam import (
    Beta,
    Categorical,
    Dirichlet,
    Factor,
    Gamma,
    MultivariateNormal,
    Normal,
    NormalGamma,
    NormalWishart,
    TiedNormalWishart,
    Wishart,
)
from viax.conjugate.models import (
    GaussianMixtureModel,
    LDAModel,
    LinearRegressionModel,
    UnitVarianceMixtureModel,
)
from viax.conjugate.naive import naive
from viax.conjugate.svi import svi

__all__ = [
    "LDA",
    "Beta",
    "Categorical",
    "ConjugateModel",
    "ConvergenceWarning",
    "Dirichlet",
    "ElboDecreaseError",
    "Factor",
    "Gamma",
    "GaussianMixture",
    "GaussianMixtureModel",
    "LDAModel",
    "LinearRegression",
    "LinearRegressionModel",
    "MultivariateNormal",
    "Normal",
    "NormalGamma",
    "NormalWishart",
    "TiedNormalWishart",
    "UnitVarianceMixtureModel",
    "Wishart",
    "cavi",
    "conjugate_model",
    "load_checkpoint",
    "naive",
    "save_checkpoint",
    "svi",
]

# The estimators are scikit-learn estimators: import sklearn only when one is used.
_ESTIMATORS = ("LDA", "ConvergenceWarning", "GaussianMixture", "LinearRegression")


def __getattr__(name: str):
    if name in _ESTIMATORS:
        from viax.conjugate import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'viax.conjugate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ESTIMATORS})
