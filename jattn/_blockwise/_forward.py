"""The blockwise forward: online softmax over the key blocks each query block can see.

For each query block, loop over its visible key blocks carrying the float32
(float64) accumulator, running max and running sum; invisible blocks are
skipped, fully visible ones skip mask arithmetic. Returns the output and the
log-sum-exp of every row, which the backward uses to recompute probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _core
from . import _blockmath as bm
from ._geometry import ExampleBlocks, slice_block
from ._layout import Operands, over_batch


class OnlineSoftmax(NamedTuple):
    """The carry of one query block, ``(kv_heads, groups, block_q, ...)``."""

    acc: Array  # unnormalized output (..., v_dim)
    max: Array  # running max of the logits
    sum: Array  # running sum of exp(logit - max)


class KeyBlock(NamedTuple):
    kt: Array  # transposed keys (kv_heads, dim, bk)
    v: Array  # values (kv_heads, bk, v_dim)
    bias: Array | None  # slice_block of the bias
    mask: Array | None  # slice_block of the dense mask


def online_softmax_step(spec, carry: OnlineSoftmax, q_blk: Array, key: KeyBlock, visible: Array | None):
    """Folds one key block into the carry; ``visible`` masks a partial block (None: fully visible)."""
    if visible is not None:  # (kv_heads|1, groups|1, bq, bk)
        seen = bm.seen_keys(visible, 3)
        key = key._replace(kt=bm.hide_unseen(key.kt, seen, 2), v=bm.hide_unseen(key.v, seen, 1))
    s, _ = bm.block_logits(spec.options, q_blk, key.kt, key.bias)
    neg = _core.masked_value(s.dtype)
    if visible is not None:
        s = jnp.where(visible, s, neg)
    m_new = jnp.maximum(carry.max, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if visible is not None:
        p = jnp.where(visible, p, 0)
    alpha = jnp.exp(carry.max - m_new)
    pv = bm.mm(bm.rows(p.astype(key.v.dtype)), key.v).reshape(carry.acc.shape)
    return OnlineSoftmax(carry.acc * alpha[..., None] + pv, m_new, carry.sum * alpha + p.sum(axis=-1))


def finish(carry: OnlineSoftmax, dtype) -> tuple[Array, Array]:
    """Output (zeros for rows that saw no key) and log-sum-exp (the masking sentinel there)."""
    seen = carry.sum != 0  # NaN rows count as seen, so NaN inputs propagate
    safe_sum = jnp.where(seen, carry.sum, 1)
    out = jnp.where(seen[..., None], carry.acc / safe_sum[..., None], 0)
    lse = jnp.where(seen, carry.max + jnp.log(safe_sum), _core.masked_value(carry.max.dtype))
    return out.astype(dtype), lse


def forward_example(spec, ops: Operands, k: Array, v: Array, example) -> tuple[Array, Array]:
    """One example's forward; ``k``/``v`` are the whole ``(batch, kv_padded, kv_heads, x)`` arrays."""
    grid = spec.grid
    kv_heads, groups, _, _ = ops.q.shape
    v_dim = v.shape[-1]
    acc_dtype = _core.compute_dtype(ops.q.dtype)
    blocks = ExampleBlocks(ops.opts, grid, ops.mask)

    def one_q_block(qb):
        q_blk = bm.dynamic_block(ops.q, qb, grid.block_q, 2)

        def visit(carry, key, kb, masked):
            visible = None
            if masked:
                visible = bm.grouped(blocks.block_mask(qb, kb, key.mask), kv_heads, groups)
            return online_softmax_step(spec, carry, q_blk, key, visible)

        def step(kb, carry):  # branches in the order of _geometry.SKIP, FULL, PARTIAL
            # Blocks are sliced here, outside the switch: a branch that took the
            # whole K/V (or mask) as an operand could copy it on every step.
            key = KeyBlock(
                kt=bm.kv_block(k, example, kb, grid.block_kv).transpose(1, 2, 0),
                v=bm.kv_block(v, example, kb, grid.block_kv).transpose(1, 0, 2),
                bias=None if ops.bias is None else slice_block(ops.bias, qb, kb, grid),
                mask=None if ops.mask is None else slice_block(ops.mask, qb, kb, grid),
            )
            branches = [
                lambda carry, key: carry,
                lambda carry, key: visit(carry, key, kb, masked=False),
                lambda carry, key: visit(carry, key, kb, masked=True),
            ]
            return lax.switch(blocks.kind(qb, kb), branches, carry, key)

        shape = (kv_heads, groups, grid.block_q)
        init = OnlineSoftmax(
            jnp.zeros((*shape, v_dim), acc_dtype),
            jnp.full(shape, _core.masked_value(acc_dtype)),
            jnp.zeros(shape, acc_dtype),
        )
        lo, hi = blocks.kv_block_range(qb)
        return finish(lax.fori_loop(lo, hi, step, init), v.dtype)

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

    return over_batch(one_example, ops.q.shape[0], ops._replace(k=None, v=None), whole=(ops.k, ops.v))
