"""Algorithms as init/step pairs, and the driver that runs them."""
