"""Conjugate exponential-family models: CAVI, SVI and the naive closed-form ELBO."""

from viax.conjugate.cavi import ElboDecreaseError, cavi
from viax.conjugate.models import GaussianMixtureModel, UnitVarianceMixtureModel

__all__ = ["ElboDecreaseError", "GaussianMixtureModel", "UnitVarianceMixtureModel", "cavi"]
