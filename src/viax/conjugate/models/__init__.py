"""Conjugate models, each written once as its expected log joint in mean parameters."""

from viax.conjugate.models.gmm import GaussianMixtureModel, UnitVarianceMixtureModel
from viax.conjugate.models.lda import LDAModel
from viax.conjugate.models.linear import LinearRegressionModel

__all__ = ["GaussianMixtureModel", "LDAModel", "LinearRegressionModel", "UnitVarianceMixtureModel"]
