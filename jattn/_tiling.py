"""Block tiling shared by the blockwise kernel and ``jattn.masks.block_mask``: the grid and block kinds."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

SKIP, FULL, PARTIAL = 0, 1, 2

DEFAULT_BLOCK_SIZES: dict[str, int] = {"cpu": 512, "gpu": 512, "tpu": 512}
"""The blockwise kernel's default query and key/value block size per backend (``block_q=None`` /
``block_kv=None`` pick it; the actual block is then fitted to the sequence, see :func:`fitted_block`).
CPU: 512 is the size every row of the Performance page's tables ran with (``docs/performance.md``,
``bench/results/README.json``); no committed ``bench/`` sweep over block sizes has chosen another.
GPU and TPU: no ``bench/`` run there yet, so they start from the CPU value."""

FALLBACK_BLOCK_SIZE = 512
"""The block size on a backend missing from :data:`DEFAULT_BLOCK_SIZES`."""


def default_block_size(backend: str | None = None) -> int:
    """The default block size of ``backend`` (default: JAX's default backend); see :data:`DEFAULT_BLOCK_SIZES`.

    >>> default_block_size("cpu")
    512
    """
    if backend is None:
        import jax  # a local import: _tiling is imported by masks, before any backend is needed

        backend = jax.default_backend()
    return DEFAULT_BLOCK_SIZES.get(backend, FALLBACK_BLOCK_SIZE)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Static tiling: sequence lengths, block sizes and the padded lengths."""

    q_seq: int
    kv_seq: int
    block_q: int
    block_kv: int

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_seq / self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_seq / self.block_kv)

    @property
    def q_padded(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def kv_padded(self) -> int:
        return self.num_kv_blocks * self.block_kv


def fitted_block(seq: int, block: int) -> int:
    """The block size the kernel uses along an axis of length ``seq`` when asked for ``block``.

    ``block`` clipped to ``seq``; when that does not divide ``seq``, the largest
    divisor of ``seq`` not below half of it, if there is one. A block that divides
    the axis needs no padding, and padding K/V copies them whole: a decode step
    over a cache of 8000 positions would copy the cache on every call.

    >>> fitted_block(8192, 512), fitted_block(8000, 512), fitted_block(97, 512), fitted_block(4099, 512)
    (512, 500, 97, 512)
    """
    block = min(block, seq)
    for size in range(block, (block + 1) // 2 - 1, -1):
        if seq % size == 0:
            return size
    return block


def kinds_of(any_visible, all_visible):
    """SKIP, FULL or PARTIAL from per-block "any position visible" and "every real position visible"."""
    return jnp.where(~any_visible, SKIP, jnp.where(all_visible, FULL, PARTIAL)).astype(jnp.int32)
