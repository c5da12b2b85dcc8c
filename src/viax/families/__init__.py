"""Variational families."""

from viax.families.gaussian import FAMILIES, Family, FullRank, LowRank, MeanField, make_family

__all__ = ["FAMILIES", "Family", "FullRank", "LowRank", "MeanField", "make_family"]
