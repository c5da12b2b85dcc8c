"""How viax compiles the conjugate models' programs."""

from __future__ import annotations

from collections.abc import Callable

import jax

__all__ = ["FAST_COMPILE", "SMALL_LOCALS", "jit"]

# XLA's CPU "fusion emitters" (MLIR code generation for loop fusions) compile a conjugate
# model's many small fusions slower than the classic LLVM emitters, and vectorise
# transcendental functions better.  Without them, the digits GMM's CAVI sweep (~170
# fusions, N·K = 1.8·10^4 responsibilities) compiled in 1.5–2.2 s instead of 2.6–2.9 s
# and ran as fast (12.4–13.8 ms); the 10^5-point GMM's sweep (N·K = 5·10^5) compiled
# 0.9 s faster but ran 17 instead of 12 ms, and an LDA pass over NYT took 2.0 instead of
# 1.5 s.  So: off for programs that run once per fit on little data, and for sweeps
# whose local parameters are small (≤ SMALL_LOCALS elements), where compilation is most
# of a fit.  Other backends ignore the option.
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
SMALL_LOCALS = 2**16


def jit(fn: Callable, *, fast_compile: bool = False, **jit_kwargs) -> Callable:
    """``jax.jit``; ``fast_compile``: with :data:`FAST_COMPILE`, for programs whose run
    time is negligible next to their compile time."""
    if fast_compile:
        jit_kwargs = {"compiler_options": FAST_COMPILE, **jit_kwargs}
    return jax.jit(fn, **jit_kwargs)
