"""Fixtures shared by the conjugate-model tests."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def X():
    """Three Gaussian clusters in 2-D (100, 150 and 80 points) for the GMM tests."""
    rng = np.random.default_rng(0)
    return np.concatenate(
        [
            rng.normal(-3, 1, (100, 2)),
            rng.normal(2, 0.5, (150, 2)),
            rng.normal([0, 4], 0.7, (80, 2)),
        ]
    )
