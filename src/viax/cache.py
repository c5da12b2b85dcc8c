"""Compiled code kept on disk, so a fresh process refits a model without compiling.

Compilation is most of a small model's fit (seconds; the optimisation itself takes
milliseconds), and a script is usually run many times on the same model.  On import
viax points JAX's persistent compilation cache at ``$VIAX_CACHE_DIR`` (default
``$XDG_CACHE_HOME/viax/jax``, else ``~/.cache/viax/jax``), keeping every program
that took at least 0.1 s to compile.  Entries are keyed by the program, the compile
options, the JAX version and the device, so a stale entry is never used; they are
small (tens of kB per model) and safe to delete at any time.  The cache is bounded
(1 GiB, least recently used entries evicted first), and with a bound JAX reads and
writes it under a file lock, so processes running side by side share it safely.  Give
it a directory of its own: JAX's eviction expects every entry to carry the access-time
file it writes beside it, which entries from an unbounded JAX cache lack.

Turn it off with ``VIAX_CACHE_DIR=off`` in the environment (before importing viax)
or :func:`set_cache_dir` ``(None)``.  A cache directory the user configured for JAX
themselves is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["cache_dir", "default_cache_dir", "set_cache_dir"]

_MIN_COMPILE_SECONDS = 0.1
_MAX_BYTES = 1 << 30
_OFF = {"", "0", "off", "false", "no", "none"}
_SET_BY_VIAX = False


def default_cache_dir() -> Path | None:
    """The directory named by ``VIAX_CACHE_DIR``, or the per-user default; None if off."""
    value = os.environ.get("VIAX_CACHE_DIR")
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "viax" / "jax"


def cache_dir() -> Path | None:
    """The directory JAX's compilation cache now uses (None when off)."""
    value = jax.config.jax_compilation_cache_dir
    return Path(value) if value else None


def set_cache_dir(path: str | os.PathLike | None) -> Path | None:
    """Keep compiled programs in ``path`` (created if needed); ``None`` turns it off.

    Returns the directory in use.  An unusable directory (read-only, not creatable)
    leaves the cache off rather than failing."""
    global _SET_BY_VIAX
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        _SET_BY_VIAX = False
        return None
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            return cache_dir()
    except OSError:
        return cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", _MAX_BYTES)
    _SET_BY_VIAX = True
    return path


def _enable_on_import() -> None:
    if jax.config.jax_compilation_cache_dir:  # the user's own choice wins
        return
    path = default_cache_dir()
    if path is not None:
        set_cache_dir(path)
