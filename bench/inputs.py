"""Benchmark inputs, drawn with NumPy on the host and put on the default device.

NumPy rather than ``jax.random``: eager ``jax.random`` compiles a few small
programs per new shape, which would add seconds to a quick run for nothing.
"""

from __future__ import annotations

import jax
import numpy as np


def normal(shape: tuple[int, ...], dtype: str, *, seed: int = 0) -> jax.Array:
    """Standard normal samples of ``shape`` in ``dtype`` (any JAX dtype name, bfloat16 included)."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jax.device_put(x.astype(jax.numpy.dtype(dtype)))
