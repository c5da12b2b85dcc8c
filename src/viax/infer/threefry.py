"""JAX's default random numbers, bit for bit, in straight-line code for CPU programs.

On a CPU, ``jax.random`` lowers the Threefry-2x32 hash (Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3") as a rolled loop of five iterations: a compact
program, but each iteration is a separate kernel that copies its state, so drawing
the 78,400 uniforms of one dynamically binarized MNIST batch took 0.93 ms against
0.26 ms for the same hash unrolled (300 draws in a ``lax.scan``, 2-core machine; see
docs/guide/learning.md, "Benchmark").  The functions here compute the same 20
rounds unrolled, on the same counters, so they return exactly the arrays of
:func:`jax.random.split`, :func:`jax.random.uniform` and :func:`jax.random.normal`
(tests/infer/test_learn_step.py checks bit equality).  They fall back to ``jax.random``
wherever that equality is not assured: a typed key, a PRNG other than the default
threefry2x32, ``jax_threefry_partitionable`` off, or 2^32 values or more.

Each function is jitted (shape and dtype static), as jax.random's are: called outside
a trace it runs as one compiled program, not op by op.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normal", "normal_at", "split", "uniform"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _exact(key, size: int) -> bool:
    """True when the straight-line hash reproduces ``jax.random`` for this key."""
    return (
        not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        and key.dtype == jnp.uint32
        and key.shape == (2,)
        and jax.config.jax_default_prng_impl == "threefry2x32"
        and jax.config.jax_threefry_partitionable
        and size < 2**32
    )


def _rotate_left(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def _hash(key, x1, x2):
    """Threefry-2x32 of the counter pairs (x1, x2) under ``key`` (uint32 (2,)): the 20
    rounds of jax's ``_threefry2x32_lowering``, unrolled."""
    k1, k2 = key[0], key[1]
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x = [x1 + ks[0], x2 + ks[1]]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = _rotate_left(x[1], r) ^ x[0]
        x = [x[0] + ks[(i + 1) % 3], x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)]
    return x[0], x[1]


def _counters(shape):
    """(high, low) 32-bit halves of a row-major iota over ``shape`` (size < 2^32)."""
    low = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return jnp.zeros(shape, jnp.uint32), low


@functools.partial(jax.jit, static_argnums=1)
def split(key, num: int = 2):
    """``jax.random.split(key, num)`` for a raw threefry key: (num, 2) uint32."""
    if not _exact(key, 2 * num):
        return jax.random.split(key, num)
    bits1, bits2 = _hash(key, *_counters((num,)))
    return jnp.stack([bits1, bits2], axis=1)


def _bits(key, shape, width: int):
    return _combine(*_hash(key, *_counters(shape)), width)


def _combine(bits1, bits2, width: int):
    """The hash's two 32-bit words as ``width``-bit random words."""
    if width == 32:
        return bits1 ^ bits2
    return (bits1.astype(jnp.uint64) << np.uint64(32)) | bits2.astype(jnp.uint64)


def _unit_floats(bits, dtype):
    """Floats uniform on [0, 1) from random words of ``dtype``'s width: the mantissa's
    bits under the exponent of 1.0, minus 1 (as ``jax.random.uniform``)."""
    finfo = jnp.finfo(dtype)
    uint = jnp.uint32 if finfo.bits == 32 else jnp.uint64
    one = np.array(1.0, dtype).view(uint)
    float_bits = (bits >> np.array(finfo.bits - finfo.nmant, uint)) | one
    return jax.lax.bitcast_convert_type(float_bits, dtype) - jnp.array(1.0, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def uniform(key, shape, dtype, minval=0.0, maxval=1.0):
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` for float32 or float64."""
    shape = tuple(shape)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)) or not _exact(
        key, math.prod(shape)
    ):
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    floats = _unit_floats(_bits(key, shape, jnp.finfo(dtype).bits), dtype)
    minval = jnp.asarray(minval, dtype)
    maxval = jnp.asarray(maxval, dtype)
    return jax.lax.max(minval, floats * (maxval - minval) + minval)


@functools.partial(jax.jit, static_argnums=(1, 2))
def normal(key, shape, dtype):
    """``jax.random.normal(key, shape, dtype)`` for float32 or float64: √2 erf⁻¹(u), u
    uniform on (−1, 1)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return jax.random.normal(key, shape, dtype)
    low = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    u = uniform(key, shape, dtype, low, np.array(1.0, dtype))
    return jax.lax.mul(np.array(np.sqrt(2), dtype), jax.lax.erf_inv(u))


@functools.partial(jax.jit, static_argnums=3)
def normal_at(key, high, low, dtype):
    """Standard normals indexed by explicit 64-bit counters ``(high, low)`` (uint32 arrays
    of one shape): element i is a function of ``(key, high[i], low[i])`` alone, so a
    number does not depend on which other counters are drawn with it, nor in what shape.

    Counter-based generation (Salmon et al. 2011): the held-out evidence draws the noise
    of row n's draw s from the counter (n, s·k + j), whatever rows and draws a compiled
    chunk holds, so its chunk shape cannot change its answer.  The bits become a uniform
    on (−1, 1) and √2 erf⁻¹(u) as in :func:`normal`; float32 reads one 32-bit word of the
    hash, float64 both.  Not ``jax.random``'s numbers for any shape: a separate stream."""
    dtype = jnp.dtype(dtype)
    key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = _hash(key.reshape(-1)[:2].astype(jnp.uint32), high, low)
    floats = _unit_floats(_combine(*words, jnp.finfo(dtype).bits), dtype)  # [0, 1)
    low_bound = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    u = jax.lax.max(jnp.asarray(low_bound), floats * np.array(1.0 - low_bound, dtype) + low_bound)
    return jax.lax.mul(np.array(np.sqrt(2), dtype), jax.lax.erf_inv(u))
