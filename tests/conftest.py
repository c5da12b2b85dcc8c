"""Shared fixtures: float64 on (importing viax does it), the shared data folder, the
examples on sys.path."""

import os
import sys
from pathlib import Path

import pytest

# Every test compiles afresh (tests/test_cache.py checks the on-disk cache itself).
os.environ["VIAX_CACHE_DIR"] = "off"

import viax  # noqa: E402, F401  (turns on float64 before any test builds arrays)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests import the example models as a user would run them: `import eight_schools`.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "posteriordb").is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (CI has it)")
    return SHARED_DATA
