"""Block geometry for the blockwise kernel: which (query block, key block) pairs to visit.

The structured masks of one example (causal, sliding window, lengths) give each
query row ``i`` an interval of visible keys ``[lo(i), hi(i))`` whose ends never
decrease with ``i``. From the intervals alone we get, in O(1) per block, the
range of key blocks a query block needs (and the range of query blocks a key
block needs, for the backward pass), and whether a block is fully visible (no
mask arithmetic), partly visible (masked in-kernel) or invisible (skipped).
Segment ids and a dense mask refine that with per-block summaries. Nothing of
size ``(q_seq, kv_seq)`` is built unless the caller passed a dense mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .._options import AttentionOptions

SKIP, FULL, PARTIAL = 0, 1, 2


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


def _ceil_div(a, b):
    return -(-a // b)


def _int32(x):
    """Block indices are int32 whatever jax_enable_x64 says (dynamic_slice wants one type)."""
    return jnp.asarray(x).astype(jnp.int32)


class ExampleBlocks:
    """Block classification for one example (built inside the traced kernel).

    Args:
        opts: one example's options (causal, window, and its slice of the
            per-example arrays, segment ids already padded to the grid).
        grid: the static tiling.
        dense: this example's dense mask ``(heads|1, q_padded|1, kv_padded|1)``
            padded with False, or None.
    """

    def __init__(self, opts: AttentionOptions, grid: Grid, dense: Array | None):
        self.grid = grid
        self.causal = opts.static.is_causal
        self.window = opts.static.local_window_size
        q_length, kv_length, q_ids, kv_ids = opts.arrays
        self.q_end = grid.q_seq if q_length is None else jnp.minimum(q_length, grid.q_seq)
        self.kv_end = grid.kv_seq if kv_length is None else jnp.minimum(kv_length, grid.kv_seq)
        self.mask_mod = opts.mask_mod()
        self.segment_ranges = None
        if q_ids is not None:
            self.segment_ranges = (
                _block_range(q_ids[: grid.q_seq], grid.q_seq, grid.block_q),
                _block_range(kv_ids[: grid.kv_seq], grid.kv_seq, grid.block_kv),
            )
        self.dense_summary = None if dense is None else _dense_summary(dense, grid)

    def row_interval(self, i):
        """Visible keys ``[lo, hi)`` of query row ``i`` from the interval masks."""
        lo, hi = 0, self.kv_end
        if self.causal:
            hi = jnp.minimum(hi, i + 1)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(i - left, 0)
            hi = jnp.minimum(hi, i + right + 1)
        return lo, hi

    def kv_block_range(self, qb):
        """Key blocks ``[lo, hi)`` that query block ``qb`` may see."""
        bq, bk = self.grid.block_q, self.grid.block_kv
        q0 = qb * bq
        q_last = jnp.minimum(q0 + bq, self.q_end) - 1
        lo, _ = self.row_interval(q0)
        _, hi = self.row_interval(q_last)
        empty = (q_last < q0) | (hi <= lo)
        return _int32(jnp.where(empty, 0, lo // bk)), _int32(jnp.where(empty, 0, _ceil_div(hi, bk)))

    def q_block_range(self, kb):
        """Query blocks ``[lo, hi)`` that may see key block ``kb``."""
        bq, bk = self.grid.block_q, self.grid.block_kv
        k0 = kb * bk
        k_end = jnp.minimum(k0 + bk, self.kv_end)
        lo, hi = 0, self.q_end
        if self.causal:
            lo = jnp.maximum(lo, k0)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, k0 - right)
            hi = jnp.minimum(hi, k_end + left)
        empty = (k_end <= k0) | (hi <= lo)
        return _int32(jnp.where(empty, 0, lo // bq)), _int32(jnp.where(empty, 0, _ceil_div(hi, bq)))

    def kind(self, qb, kb):
        """SKIP, FULL or PARTIAL for the block pair ``(qb, kb)``."""
        bq, bk = self.grid.block_q, self.grid.block_kv
        q0, k0 = qb * bq, kb * bk
        q_valid_end = jnp.minimum(q0 + bq, self.q_end)
        q_real_end = jnp.minimum(q0 + bq, self.grid.q_seq)
        first_lo, first_hi = self.row_interval(q0)
        last_lo, last_hi = self.row_interval(q_valid_end - 1)
        skip = (q_valid_end <= q0) | (k0 + bk <= first_lo) | (k0 >= last_hi)
        # Rows past q_seq are padding, sliced off later: they need not be visible.
        full = (q_valid_end >= q_real_end) & (k0 >= last_lo) & (k0 + bk <= first_hi)
        if self.segment_ranges is not None:
            (q_min, q_max), (k_min, k_max) = self.segment_ranges
            skip |= (q_max[qb] < k_min[kb]) | (k_max[kb] < q_min[qb])
            full &= (q_min[qb] == q_max[qb]) & (k_min[kb] == k_max[kb]) & (q_min[qb] == k_min[kb])
        if self.dense_summary is not None:
            any_visible, all_visible = self.dense_summary
            skip |= ~any_visible[qb, kb]
            full &= all_visible[qb, kb]
        return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)

    def block_mask(self, qb, kb, dense_blk: Array | None) -> Array:
        """Boolean ``(heads|1, block_q, block_kv)`` mask of a partial block.

        ``dense_blk`` is ``slice_block(dense, qb, kb, grid)`` (or None); callers
        slice it outside any ``lax.switch`` so the branches never take the
        whole dense mask as an operand.
        """
        bq, bk = self.grid.block_q, self.grid.block_kv
        q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
        kv_idx = kb * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
        visible = kv_idx < self.grid.kv_seq
        if self.mask_mod is not None:
            visible = visible & self.mask_mod(q_idx, kv_idx)
        visible = visible[None]
        if dense_blk is not None:
            visible = visible & dense_blk
        return visible


def slice_block(x: Array, qb, kb, grid: Grid) -> Array:
    """Block ``(qb, kb)`` of ``x`` with shape ``(lead, q_padded|1, kv_padded|1)``."""
    _, tq, tk = x.shape
    size = (x.shape[0], 1 if tq == 1 else grid.block_q, 1 if tk == 1 else grid.block_kv)
    return lax.dynamic_slice(x, block_start(x.shape, qb, kb, grid), size)


def block_start(shape, qb, kb, grid: Grid) -> tuple[Array, Array, Array]:
    """int32 start of block ``(qb, kb)`` in a ``(lead, q|1, kv|1)`` array (broadcast axes start at 0)."""
    zero = jnp.zeros((), jnp.int32)
    start_q = zero if shape[1] == 1 else _int32(qb * grid.block_q)
    start_k = zero if shape[2] == 1 else _int32(kb * grid.block_kv)
    return zero, start_q, start_k


def _block_range(ids: Array, seq: int, block: int) -> tuple[Array, Array]:
    """Per-block min and max of segment ids (the padded tail takes the last id)."""
    blocks = _ceil_div(seq, block)
    padded = jnp.pad(ids, (0, blocks * block - seq), mode="edge").reshape(blocks, block)
    return padded.min(axis=1), padded.max(axis=1)


def _dense_summary(dense: Array, grid: Grid) -> tuple[Array, Array]:
    """Per-block (any visible, all visible) of a padded dense mask, over all heads."""
    _, tq, tk = dense.shape
    nq = 1 if tq == 1 else grid.num_q_blocks
    nk = 1 if tk == 1 else grid.num_kv_blocks
    blocks = dense.reshape(dense.shape[0], nq, tq // nq, nk, tk // nk)
    any_visible = blocks.any(axis=(0, 2, 4))
    # Padding rows are False; only count real rows and columns toward "all visible".
    real = _real_positions(grid, tq, tk).reshape(1, nq, tq // nq, nk, tk // nk)
    all_visible = (blocks | ~real).all(axis=(0, 2, 4))
    shape = (grid.num_q_blocks, grid.num_kv_blocks)
    return jnp.broadcast_to(any_visible, shape), jnp.broadcast_to(all_visible, shape)


def _real_positions(grid: Grid, tq: int, tk: int) -> Array:
    rows = jnp.arange(tq, dtype=jnp.int32)[:, None] < (grid.q_seq if tq > 1 else 1)
    cols = jnp.arange(tk, dtype=jnp.int32)[None, :] < (grid.kv_seq if tk > 1 else 1)
    return rows & cols
