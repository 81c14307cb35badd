"""The zigzag layout and each device's share of the work (``jattn.sharding``'s implementation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .. import _checks
from .._blockwise import Ring, visited_blocks
from .._options import StaticOptions, window_pair
from .._tiling import default_block_size
from ._config import LAYOUTS


def _zigzag_order(num_shards: int) -> np.ndarray:
    """Chunk order of the zigzag layout: shard ``i`` holds chunks ``i`` and ``2P - 1 - i``."""
    return np.array([c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)])


def _permute_chunks(x: Array, num_shards: int, axis: int, order: np.ndarray, name: str) -> Array:
    x = jnp.asarray(x)
    _checks.check_positive_int("num_shards", num_shards)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {x.ndim}")
    axis %= x.ndim
    n = x.shape[axis]
    if n % (2 * num_shards):
        raise ValueError(
            f"{name}: the sequence axis ({n}) must divide into 2 * num_shards = {2 * num_shards} equal chunks"
        )
    chunks = x.reshape(*x.shape[:axis], 2 * num_shards, n // (2 * num_shards), *x.shape[axis + 1 :])
    index = (slice(None),) * axis + (jnp.asarray(order),)
    sharding = getattr(jax.typeof(chunks), "sharding", None)
    if (
        sharding is not None
        and getattr(sharding, "mesh", None) is not None
        and any(a is not None for a in sharding.spec)
    ):
        # Sharded over explicit mesh axes: say where the result lives (XLA moves the chunks between devices).
        return chunks.at[index].get(out_sharding=sharding).reshape(x.shape, out_sharding=jax.typeof(x).sharding)
    return chunks[index].reshape(x.shape)


def zigzag(x: Array, num_shards: int, axis: int) -> Array:
    """``jattn.sharding.zigzag``."""
    return _permute_chunks(x, num_shards, axis, _zigzag_order(num_shards), "zigzag")


def unzigzag(x: Array, num_shards: int, axis: int) -> Array:
    """``jattn.sharding.unzigzag``."""
    return _permute_chunks(x, num_shards, axis, np.argsort(_zigzag_order(num_shards)), "unzigzag")


def visited_blocks_per_device(
    q_seq: int, kv_seq: int, num_shards: int, *, is_causal, local_window_size, layout, block_q, block_kv
) -> np.ndarray:
    """``jattn.sharding.visited_blocks_per_device``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    _checks.check_positive_int("num_shards", num_shards)
    _checks.check_positive_int("block_q", block_q, allow_none=True)
    _checks.check_positive_int("block_kv", block_kv, allow_none=True)
    block_q, block_kv = block_q or default_block_size(), block_kv or default_block_size()
    chunks = 2 if layout == "zigzag" else 1
    for name, n in (("q_seq", q_seq), ("kv_seq", kv_seq)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % (num_shards * chunks):
            raise ValueError(f"{name} must be a positive multiple of {num_shards * chunks}; got {n!r}")
    static = StaticOptions(scale=1.0, is_causal=bool(is_causal), local_window_size=window_pair(local_window_size))
    ring = Ring("sequence", num_shards, chunks)
    return visited_blocks(static, ring, q_seq, kv_seq, block_q=block_q, block_kv=block_kv)
