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

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _mods
from .._options import AttentionOptions
from .._tiling import FULL, PARTIAL, SKIP, Grid
from .._tiling import fitted_block as fitted_block
from ..masks._positions import key_interval


def _ceil_div(a, b):
    return -(-a // b)


def _int32(x):
    """Block indices are int32 whatever jax_enable_x64 says (dynamic_slice wants one type)."""
    return jnp.asarray(x).astype(jnp.int32)


class Placement(NamedTuple):
    """Where a block of logits sits, for a ``score_mod``: the example and the first query and key positions."""

    example: Array
    q_start: Array | int  # absolute (a decode step's offset included)
    kv_start: Array | int


class ExampleBlocks:
    """Block classification for one example (built inside the traced kernel).

    Args:
        opts: one example's options (causal, window, and its slice of the
            per-example arrays, segment ids already padded to the grid, the
            user's mask_mod, its block mask).
        grid: the static tiling.
        dense: this example's dense mask ``(heads|1, q_padded|1, kv_padded|1)``
            padded with False, or None.
        example: the example's index (what a ``mask_mod`` receives as ``batch``).
        kv_heads, groups: the head layout (a ``mask_mod`` receives
            ``head = kv_head * groups + group``).
    """

    def __init__(self, opts: AttentionOptions, grid: Grid, dense: Array | None, example, *, heads: tuple[int, int]):
        self.grid = grid
        self.causal = opts.static.is_causal
        self.window = opts.static.local_window_size
        arrays = opts.arrays
        self.offset = 0 if arrays.q_offset is None else arrays.q_offset
        self.kv_offset = 0 if arrays.kv_offset is None else arrays.kv_offset  # mods only (see ExampleArrays)
        self.q_end = grid.q_seq if arrays.q_length is None else jnp.minimum(arrays.q_length, grid.q_seq)
        self.kv_end = grid.kv_seq if arrays.kv_length is None else jnp.minimum(arrays.kv_length, grid.kv_seq)
        self.predicate = opts.mask_mod()
        self.user_mask = opts.static.mask_mod
        self.user_consts = opts.shared.mask_consts
        self.example, (self.kv_heads, self.groups) = example, heads
        self.block_mask = opts.block_mask
        self.segment_ranges = None
        if arrays.q_segment_ids is not None and arrays.kv_segment_ids is not None:
            self.segment_ranges = (
                _block_range(arrays.q_segment_ids[: grid.q_seq], grid.q_seq, grid.block_q),
                _block_range(arrays.kv_segment_ids[: grid.kv_seq], grid.kv_seq, grid.block_kv),
            )
        self.dense_summary = None if dense is None else _dense_summary(dense, grid)

    def row_interval(self, i):
        """Visible keys ``[lo, hi)`` of query row ``i`` (at position ``i + offset``) from the interval masks."""
        return key_interval(i + self.offset, self.kv_end, causal=self.causal, window=self.window)

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
        if self.causal:  # key j is seen from query position j on, i.e. row j - offset
            lo = jnp.maximum(lo, k0 - self.offset)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, k0 - right - self.offset)
            hi = jnp.minimum(hi, k_end + left - self.offset)
        empty = (k_end <= k0) | (hi <= lo)
        lo = jnp.maximum(lo, 0)
        return _int32(jnp.where(empty, 0, lo // bq)), _int32(jnp.where(empty, 0, _ceil_div(hi, bq)))

    def kv_loop(self, qb, step, init):
        """``step(kb, carry)`` over the key blocks query block ``qb`` may see (the block mask's list, if any)."""
        bm = self.block_mask
        listed = None if bm is None else (bm.kv_indices[qb], bm.kv_counts[qb])
        return _visit(listed, lambda: self.kv_block_range(qb), step, init)

    def q_loop(self, kb, step, init):
        """``step(qb, carry)`` over the query blocks that may see key block ``kb``."""
        bm = self.block_mask
        listed = None if bm is None else (bm.q_indices[kb], bm.q_counts[kb])
        return _visit(listed, lambda: self.q_block_range(kb), step, init)

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
        if self.block_mask is not None:
            skip |= self.block_mask.kinds[qb, kb] == SKIP
            full &= self.block_mask.kinds[qb, kb] == FULL
        elif self.user_mask is not None:  # no summary: every visited block is masked in-kernel
            full = jnp.zeros_like(full)
        return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)

    def top_half_skips_right_half(self, qb, kb):
        """Whether no query in the top half of block ``qb`` sees a key in the right half of block ``kb`` (by
        the interval masks; the others only hide more): the causal diagonal's empty quadrant."""
        bq, bk = self.grid.block_q, self.grid.block_kv
        _, hi = self.row_interval(qb * bq + bq // 2 - 1)
        return hi <= kb * bk + bk // 2

    def place(self, q_start, kv_start) -> Placement:
        """Where a block whose first query and key are ``q_start`` / ``kv_start`` of this call sits, as a
        ``score_mod`` sees it (absolute positions)."""
        return Placement(self.example, q_start + self.offset + self.kv_offset, kv_start + self.kv_offset)

    def visible(self, qb, kb, dense_blk: Array | None, block_q: int, block_kv: int) -> Array:
        """Boolean ``(kv_heads|1, groups|1, block_q, block_kv)`` visibility of a partial block.

        ``dense_blk`` is ``slice_block(dense, qb, kb, grid)`` (or None); callers
        slice it outside any ``lax.switch`` so the branches never take the
        whole dense mask as an operand. ``block_q``/``block_kv`` are the grid's
        (or the whole padded sequences, for the dense twins).
        """
        q_idx = qb * block_q + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        kv_idx = kb * block_kv + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        visible = kv_idx < self.grid.kv_seq
        if self.predicate is not None:
            visible = visible & self.predicate(q_idx, kv_idx)
        visible = visible[None, None]
        if dense_blk is not None:
            visible = visible & grouped(dense_blk, self.kv_heads, self.groups)
        if self.user_mask is not None:
            heads = (self.kv_heads, self.groups) if self.user_mask.uses("head") else (1, 1)  # broadcast over heads
            shape = (*heads, block_q, block_kv)
            user = _mods.evaluate(
                self.user_mask,
                self.user_consts,
                shape,
                _mods.Layout("kgqs", self.groups),
                example=self.example,
                q_start=qb * block_q + self.offset + self.kv_offset,
                kv_start=kb * block_kv + self.kv_offset,
            )
            visible = visible & user
        return visible


def _visit(listed, block_range, step, init):
    """``step(block, carry)`` over ``listed`` = (indices, count) from a block mask, else ``range(*block_range())``."""
    if listed is not None:
        indices, count = listed
        return lax.fori_loop(0, count, lambda i, carry: step(indices[i], carry), init)
    lo, hi = block_range()
    return lax.fori_loop(lo, hi, step, init)


def grouped(x: Array, kv_heads: int, groups: int) -> Array:
    """``(heads|1, ...)`` -> ``(kv_heads|1, groups|1, ...)`` to broadcast against logits."""
    if x.shape[0] == 1:
        return x[:, None]
    return x.reshape(kv_heads, groups, *x.shape[1:])


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
