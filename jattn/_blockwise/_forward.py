"""The blockwise forward: online softmax over the key blocks each query block can see.

For each query block, loop over its visible key blocks carrying the float32
(float64) accumulator, running max and running sum; invisible blocks are
skipped, fully visible ones skip mask arithmetic. Returns the output and the
log-sum-exp of every row, which the backward uses to recompute probabilities.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _numerics
from .._tiling import PARTIAL
from . import _blockmath as bm
from ._geometry import ExampleBlocks, slice_block
from ._layout import Operands, over_batch, without_kv


class OnlineSoftmax(NamedTuple):
    """The carry of one query block, ``(kv_heads, groups, block_q, ...)``."""

    acc: Array  # unnormalized output (..., v_dim)
    max: Array  # running max of the logits
    sum: Array  # running sum of exp(logit - max)


class KeyBlock(NamedTuple):
    k: Array  # keys, head-major (kv_heads, bk, dim)
    v: Array  # values (kv_heads, bk, v_dim)
    bias: Array | None  # slice_block of the bias
    mask: Array | None  # slice_block of the dense mask


def online_softmax_step(spec, carry: OnlineSoftmax, q_blk, key: KeyBlock, visible, *, consts, place: bm.Placement,
                        hide: bool = True):  # fmt: skip
    """Folds one key block into the carry; ``visible`` masks a partial block (None: fully visible); ``hide``:
    select out the keys no row of the block sees (False only where every key is seen, :func:`keys_all_seen`)."""
    if visible is not None and hide:  # (kv_heads|1, groups|1, bq, bk)
        seen = bm.seen_keys(visible, 3)
        key = key._replace(k=bm.hide_unseen(key.k, seen, 1), v=bm.hide_unseen(key.v, seen, 1))
    s = bm.block_logits(spec, q_blk, key.k, key.bias, consts=consts, place=place).s
    return fold_logits(carry, s, key.v, visible)[0]


def fold_logits(carry: OnlineSoftmax, s: Array, v: Array, visible) -> tuple[OnlineSoftmax, Array, Array]:
    """Folds a block's logits ``s`` (and values ``v``) into the carry; also returns the block's weights
    ``exp(s - new max)`` (0 where hidden) and the factor ``alpha`` that rescaled the old carry."""
    if visible is not None:
        # -inf, not the finite masking sentinel: the running max starts at that sentinel (or a sink), so it
        # is finite and exp(-inf - max) is exactly 0 for every hidden logit; no second select after exp.
        s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(carry.max, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(carry.max - m_new)
    pv = bm.mm(bm.rows(p.astype(v.dtype)), v).reshape(carry.acc.shape)
    return OnlineSoftmax(carry.acc * alpha[..., None] + pv, m_new, carry.sum * alpha + p.sum(axis=-1)), p, alpha


def initial_carry(shape, v_dim: int, dtype, sinks: Array | None) -> OnlineSoftmax:
    """An empty accumulator; with attention sinks ``(kv_heads, groups)`` the row starts at ``exp(sink)``:
    the sink joins every row's denominator (as a key whose value is zero).

    The running max starts finite (the masking sentinel, or a sink above it), which
    :func:`fold_logits` relies on; a sink of -inf starts the row empty, as no sink does.
    """
    neg = _numerics.masked_value(dtype)
    if sinks is None:
        return OnlineSoftmax(jnp.zeros((*shape, v_dim), dtype), jnp.full(shape, neg), jnp.zeros(shape, dtype))
    sinks = jnp.broadcast_to(sinks.astype(dtype)[..., None], shape)
    start = jnp.maximum(sinks, neg)
    return OnlineSoftmax(jnp.zeros((*shape, v_dim), dtype), start, jnp.exp(sinks - start))


def finish(carry: OnlineSoftmax, dtype) -> tuple[Array, Array]:
    """Output (zeros for rows that saw no key) and log-sum-exp (the masking sentinel there)."""
    seen = carry.sum != 0  # NaN rows count as seen, so NaN inputs propagate
    safe_sum = jnp.where(seen, carry.sum, 1)
    out = jnp.where(seen[..., None], carry.acc / safe_sum[..., None], 0)
    lse = jnp.where(seen, carry.max + jnp.log(safe_sum), _numerics.masked_value(carry.max.dtype))
    return out.astype(dtype), lse


def splittable(grid, ops: Operands) -> bool:
    """Whether a call's partial blocks may be visited as quadrants (:func:`visit_split`): a causal or window
    mask (what makes a diagonal), blocks of at least 32 that halve, and no bias or dense mask block to halve."""
    static = ops.opts.static
    diagonal = static.is_causal or static.local_window_size is not None
    sizes = grid.block_q % 2 == 0 and grid.block_kv % 2 == 0 and min(grid.block_q, grid.block_kv) >= 32
    return diagonal and sizes and ops.bias is None and ops.mask is None


def keys_all_seen(grid, ops: Operands) -> bool:
    """Whether, in each piece :func:`visit_split` (and the backward's split) visits, some row sees every key, so
    hiding unseen keys is a no-op there and is skipped: a plain causal mask on a square grid of whole blocks.
    Its only partial blocks are then the diagonal ones, and no length, offset, segment, window or mask hides a
    key from every row of a piece (the diagonal's last row sees every key of its block)."""
    static, arrays = ops.opts.static, ops.opts.arrays
    plain = static.is_causal and static.local_window_size is None and static.mask_mod is None
    hidden = (ops.mask, ops.opts.block_mask, *arrays)  # every per-example array: lengths, segment ids, offsets
    square = grid.q_seq == grid.kv_seq and grid.block_q == grid.block_kv and grid.q_seq % grid.block_q == 0
    return plain and square and all(x is None for x in hidden)


def visit_split(spec, blocks: ExampleBlocks, q_blk, carry: OnlineSoftmax, key: KeyBlock, *, consts, at, hide=True):
    """A partial block whose top rows see none of its right half (the causal diagonal): the top half of the
    rows against the left half of the keys, the bottom half against all of them; a quarter of the block's
    products are skipped. Without a bias or dense mask block (the caller checks); ``hide`` as in
    :func:`online_softmax_step`."""
    qb, kb = at
    bq, bk = blocks.grid.block_q, blocks.grid.block_kv
    hq, hk = bq // 2, bk // 2

    def rows_of(x, half):  # (kv_heads, groups, bq, ...) -> one half of the rows
        return x[:, :, :hq] if half == 0 else x[:, :, hq:]

    def fold(half, keys: KeyBlock, width: int, kb_sub):
        visible = blocks.visible(2 * qb + half, kb_sub, None, hq, width)
        place = blocks.place(qb * bq + half * hq, kb * bk)
        part = OnlineSoftmax(*(rows_of(x, half) for x in carry))
        return online_softmax_step(spec, part, rows_of(q_blk, half), keys, visible, consts=consts, place=place,
                                   hide=hide)  # fmt: skip

    left = KeyBlock(k=key.k[:, :hk], v=key.v[:, :hk], bias=None, mask=None)
    top = fold(0, left, hk, 2 * kb)
    bottom = fold(1, key, bk, kb)
    return OnlineSoftmax(*(jnp.concatenate(pair, axis=2) for pair in zip(top, bottom, strict=True)))


def unit_groups_dropped(q: Array) -> Array:
    """One example's queries ``(kv_heads, groups, q_padded, dim)`` as ``(kv_heads, q_padded, dim)`` when
    ``groups`` is 1 (no grouped-query attention): XLA:CPU gives a whole-sequence array with a unit axis a
    layout that costs the caller-to-kernel transpose a second pass over it (an 8 MiB copy at N=4096)."""
    return q[:, 0] if q.shape[1] == 1 else q


def example_sinks(ops: Operands) -> Array | None:
    """One example's sinks as ``(kv_heads, groups)``, or None."""
    sinks = ops.opts.shared.sinks
    return None if sinks is None else sinks.reshape(ops.q.shape[:2])


def forward_example(spec, ops: Operands, k: Array, v: Array, example) -> tuple[Array, Array]:
    """One example's forward; ``k``/``v`` are the whole ``(batch, kv_padded, kv_heads, x)`` arrays."""
    grid = spec.grid
    kv_heads, groups, _, _ = ops.q.shape
    v_dim = v.shape[-1]
    acc_dtype = _numerics.compute_dtype(ops.q.dtype)
    blocks = ExampleBlocks(ops.opts, grid, ops.mask, example, heads=(kv_heads, groups))
    consts = ops.opts.shared.score_consts
    can_split = splittable(grid, ops)
    hide = not keys_all_seen(grid, ops)

    q = unit_groups_dropped(ops.q)

    def one_q_block(qb):
        q_blk = bm.dynamic_block(q, qb, grid.block_q, q.ndim - 2).reshape(kv_heads, groups, grid.block_q, -1)

        def visit(carry, key, kb, masked):
            visible = blocks.visible(qb, kb, key.mask, grid.block_q, grid.block_kv) if masked else None
            place = blocks.place(qb * grid.block_q, kb * grid.block_kv)
            return online_softmax_step(spec, carry, q_blk, key, visible, consts=consts, place=place, hide=hide)

        def step(kb, carry):  # branches in the order of _geometry.SKIP, FULL, PARTIAL
            # Blocks are sliced here, outside the switch: a branch that took the
            # whole K/V (or mask) as an operand could copy it on every step.
            key = KeyBlock(
                k=bm.kv_block(k, example, kb, grid.block_kv).transpose(1, 0, 2),
                v=bm.kv_block(v, example, kb, grid.block_kv).transpose(1, 0, 2),
                bias=None if ops.bias is None else slice_block(ops.bias, qb, kb, grid),
                mask=None if ops.mask is None else slice_block(ops.mask, qb, kb, grid),
            )
            branches = [
                lambda carry, key: carry,
                lambda carry, key: visit(carry, key, kb, masked=False),
                lambda carry, key: visit(carry, key, kb, masked=True),
            ]
            kind = blocks.kind(qb, kb)
            if can_split:  # a fourth branch: the causal diagonal's partial block, by quadrants
                split = functools.partial(visit_split, spec, blocks, q_blk, consts=consts, at=(qb, kb), hide=hide)
                branches.append(split)
                kind = jnp.where((kind == PARTIAL) & blocks.top_half_skips_right_half(qb, kb), len(branches) - 1, kind)
            return lax.switch(kind, branches, carry, key)

        init = initial_carry((kv_heads, groups, grid.block_q), v_dim, acc_dtype, example_sinks(ops))
        return finish(blocks.kv_loop(qb, step, init), v.dtype)

    if grid.num_q_blocks == 1:  # e.g. a decode step: no loop needed over one query block
        out, lse = jax.tree.map(lambda x: x[None], one_q_block(jnp.int32(0)))
    else:
        out, lse = lax.map(one_q_block, jnp.arange(grid.num_q_blocks, dtype=jnp.int32))
    # (num_q_blocks, kv_heads, groups, bq, ...) -> (kv_heads, groups, q_padded, ...)
    out = jnp.moveaxis(out, 0, 2).reshape(kv_heads, groups, grid.q_padded, v_dim)
    lse = jnp.moveaxis(lse, 0, 2).reshape(kv_heads, groups, grid.q_padded)
    return out, lse


def forward(spec, ops: Operands) -> tuple[Array, Array]:
    """Output ``(batch, kv_heads, groups, q_padded, v_dim)`` and log-sum-exp ``(batch, kv_heads, groups, q_padded)``."""

    def one_example(example, ops, kv):
        return forward_example(spec, ops, *kv, example)

    return over_batch(one_example, ops.q.shape[0], without_kv(ops), whole=(ops.k, ops.v))
