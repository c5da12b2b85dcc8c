"""Conjugate models: each is its expected log joint in mean parameters."""

from viax.conjugate.models.gmm import GaussianMixtureModel, UnitVarianceMixtureModel

__all__ = ["GaussianMixtureModel", "UnitVarianceMixtureModel"]
