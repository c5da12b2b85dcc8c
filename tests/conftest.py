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


def _kill_at_checkpoint(victim, read_step, minimum: int, timeout: float) -> int:
    """Wait until the running ``victim`` process's checkpoint (``read_step()``: its
    step) reaches ``minimum`` steps, then SIGKILL it and reap it; the last step read.
    A checkpoint being replaced or not yet written reads as an error: retried."""
    import signal
    import time

    deadline, step = time.time() + timeout, 0
    while time.time() < deadline and victim.poll() is None and step < minimum:
        time.sleep(0.05)
        try:
            step = int(read_step())
        except (OSError, ValueError, KeyError, EOFError):
            continue
    assert victim.poll() is None, victim.communicate()[1][-3000:]
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()  # reaps it and closes its pipes
    return step


@pytest.fixture
def kill_at_checkpoint():
    """:func:`_kill_at_checkpoint`, for the kill -9 / resume tests."""
    return _kill_at_checkpoint
