"""Block summaries of a ``mask_mod``: which (query block, key block) pairs hold a visible position.

FlexAttention's block mask, for jattn's blockwise kernel: the predicate is
evaluated once per tile (``jit``-able, so it may depend on traced arrays such as
document ids that change per batch, without recompiling) and summarized per
block pair as SKIP (no visible position), FULL (every real position visible:
no mask arithmetic) or PARTIAL, over all heads. The kernel then loops over the
lists of visited blocks only. Build it once and pass it to every layer that
uses the same mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Int

from .. import _checks, _mods
from .._tiling import SKIP, Grid, default_block_size, fitted_block, kinds_of
from ._combine import MaskMod


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """A ``mask_mod`` summarized per block pair (a pytree: pass it through ``jit``, reuse it across layers).

    Attributes:
        kinds: ``(batch|1, num_q_blocks, num_kv_blocks)`` int32: SKIP (0), FULL (1)
            or PARTIAL (2), over all heads.
        kv_indices: ``(batch|1, num_q_blocks, num_kv_blocks)``: for every query
            block, the key blocks to visit first (ascending), then the others.
        kv_counts: ``(batch|1, num_q_blocks)``: how many key blocks each query block visits.
        q_indices: ``(batch|1, num_kv_blocks, num_q_blocks)``: the same per key block.
        q_counts: ``(batch|1, num_kv_blocks)``.
        q_seq, kv_seq, block_q, block_kv: the tiling it was built for (static).
    """

    kinds: Int[Array, "batch nq nk"]
    kv_indices: Int[Array, "batch nq nk"]
    kv_counts: Int[Array, "batch nq"]
    q_indices: Int[Array, "batch nk nq"]
    q_counts: Int[Array, "batch nk"]
    q_seq: int = dataclasses.field(metadata=dict(static=True))
    kv_seq: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))

    @property
    def grid(self) -> Grid:
        return Grid(self.q_seq, self.kv_seq, self.block_q, self.block_kv)

    @property
    def visited(self) -> Int[Array, " batch"]:
        """Block pairs the kernel visits per example (of ``num_q_blocks * num_kv_blocks``)."""
        return self.kv_counts.sum(axis=-1)


def block_mask(
    mask_mod: MaskMod,
    batch: int,
    heads: int,
    q_seq: int,
    kv_seq: int,
    *,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> BlockMask:
    """Summarizes ``mask_mod`` per (query block, key block) for the blockwise kernel.

    Pass the result with the same predicate to ``jattn.dot_product_attention(...,
    mask_mod=mask_mod, block_mask=mask)``; without one the kernel builds it on
    every call. The block sizes are fitted to the sequences as the kernel fits
    them (see ``dot_product_attention``'s ``block_q``), and the kernel uses these.

    Args:
        mask_mod: ``mask_mod(q_idx, kv_idx)`` or ``mask_mod(batch, head, q_idx, kv_idx)``.
        batch: examples it is evaluated for; 1 for a predicate that ignores the example.
        heads: heads it is evaluated for; 1 for a predicate that ignores the head.
        q_seq: query positions.
        kv_seq: key/value positions.
        block_q: query block size asked for; None: the kernel's default (``jattn.DEFAULT_BLOCK_SIZES``).
        block_kv: key/value block size asked for; None: likewise.

    Returns:
        A :class:`BlockMask`.

    Raises:
        ValueError: if a size is not a positive int.
        TypeError: if the predicate does not return booleans.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import masks
        >>> ids = jnp.repeat(jnp.arange(4), 64)[None]  # 4 packed documents of 64 tokens
        >>> summary = masks.block_mask(masks.document(ids), 1, 1, 256, 256, block_q=64, block_kv=64)
        >>> int(summary.visited[0]), summary.kinds.shape  # the 4 diagonal blocks of 16
        (4, (1, 4, 4))
    """
    for name, value in (("batch", batch), ("heads", heads), ("q_seq", q_seq), ("kv_seq", kv_seq)):
        _checks.check_positive_int(name, value)
    _checks.check_positive_int("block_q", block_q, allow_none=True)
    _checks.check_positive_int("block_kv", block_kv, allow_none=True)
    block_q, block_kv = block_q or default_block_size(), block_kv or default_block_size()
    grid = Grid(q_seq, kv_seq, fitted_block(q_seq, block_q), fitted_block(kv_seq, block_kv))
    mod, consts = _mods.convert(mask_mod, "mask")
    return block_mask_of(mod, consts, batch, heads, grid)


def block_mask_of(
    mod: _mods.ConvertedMod,
    consts,
    batch: int,
    heads: int,
    grid: Grid,
    *,
    q_offset: Array | None = None,
    kv_offset: Array | None = None,
) -> BlockMask:
    """:func:`block_mask` of a converted mask mod on a given grid (what the kernel builds when given none).

    ``q_offset`` / ``kv_offset`` ``(batch,)``, as in ``ExampleArrays``: the mod sees query ``q_offset +
    kv_offset + i`` and key ``kv_offset + j`` (a KV-cache decode step, a sequence shard, a ring pair's
    chunks); None: 0.
    """
    zeros = jnp.zeros((batch,), jnp.int32)
    q0 = zeros if q_offset is None else q_offset.astype(jnp.int32)
    k0 = zeros if kv_offset is None else kv_offset.astype(jnp.int32)
    examples = (jnp.arange(batch, dtype=jnp.int32), q0 + k0, k0)
    kinds = lax.map(lambda e: _example_kinds(mod, consts, e, heads, grid), examples)
    return summarize(kinds, grid)


def _example_kinds(mod, consts, example: tuple[Array, Array, Array], heads: int, grid: Grid) -> Array:
    """``(num_q_blocks, num_kv_blocks)`` kinds of one ``(example, first query, first key)``, one query block
    (all keys) at a time."""
    nk, bk = grid.num_kv_blocks, grid.block_kv
    cols = jnp.arange(grid.kv_padded, dtype=jnp.int32) < grid.kv_seq
    index, offset, kv_offset = example

    heads = heads if mod.uses("head") else 1  # one head stands for all when the mask ignores it

    def one_q_block(qb):
        q_start = qb * grid.block_q
        shape = (heads, grid.block_q, grid.kv_padded)
        visible = _mods.evaluate(
            mod, consts, shape, _mods.Layout("gqs", heads), example=index, q_start=offset + q_start, kv_start=kv_offset
        )
        rows = (q_start + jnp.arange(grid.block_q, dtype=jnp.int32)) < grid.q_seq
        real = (rows[:, None] & cols[None, :]).reshape(1, grid.block_q, nk, bk)
        tiles = visible.reshape(heads, grid.block_q, nk, bk)
        return kinds_of((tiles & real).any(axis=(0, 1, 3)), (tiles | ~real).all(axis=(0, 1, 3)))

    return lax.map(one_q_block, jnp.arange(grid.num_q_blocks, dtype=jnp.int32))


def summarize(kinds: Array, grid: Grid) -> BlockMask:
    """A :class:`BlockMask` from per-example kinds ``(batch, num_q_blocks, num_kv_blocks)``."""
    visit = kinds != SKIP
    by_q = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)  # visited first, ascending
    by_kv = jnp.argsort(~visit.swapaxes(1, 2), axis=-1, stable=True).astype(jnp.int32)
    return BlockMask(
        kinds=kinds.astype(jnp.int32),
        kv_indices=by_q,
        kv_counts=visit.sum(axis=2, dtype=jnp.int32),
        q_indices=by_kv,
        q_counts=visit.sum(axis=1, dtype=jnp.int32),
        q_seq=grid.q_seq,
        kv_seq=grid.kv_seq,
        block_q=grid.block_q,
        block_kv=grid.block_kv,
    )
