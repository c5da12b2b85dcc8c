"""Shared fixtures: float64 on (importing viax does it), the shared data folder."""

from pathlib import Path

import pytest

import viax  # noqa: F401  (turns on float64 before any test builds arrays)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "posteriordb").is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (CI has it)")
    return SHARED_DATA
