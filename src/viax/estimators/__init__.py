"""Gradient estimators and objectives."""
