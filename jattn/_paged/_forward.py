"""The forward: an online softmax in the compute dtype over the page chunks each query block sees.

Per query block the carry is the blockwise kernel's (:class:`OnlineSoftmax`, ``(kv_heads, groups,
block_q)``); sinks start the running sum as there. Only the chunk's pages are gathered from the pool.
Rows are written back with a select, so a block's slice never disturbs the rows of other sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _mods, _numerics
from .._blockwise._forward import OnlineSoftmax, finish, initial_carry
from . import _geometry as geo
from . import _products as prod
from ._spec import Dims, Metadata, Operands, PagedSpec, Tiling, dims


class Block(NamedTuple):
    """A query block with its rows read: what every chunk step of that block needs."""

    seq: geo.Sequence
    qb: geo.QueryBlock
    d: Dims
    tiling: Tiling
    q: Array  # (kv_heads, groups, block_q, dim): scaled rows in the compute dtype
    q_op: Array  # q in the product form of ``tiling``


def rows_of(x: Array, start: Array, d: Dims, block_q: int) -> Array:
    """Rows ``[start, start + block_q)`` of a ``(tokens, heads, x)`` array as ``(kv_heads, groups, block_q, x)``."""
    blk = lax.dynamic_slice_in_dim(x, start, block_q)
    return blk.reshape(block_q, d.kv_heads, d.groups, -1).transpose(1, 2, 0, 3)


def make_block(spec: PagedSpec, ops: Operands, d: Dims, where: tuple[geo.Sequence, geo.QueryBlock, Tiling]) -> Block:
    seq, qb, tiling = where
    acc = _numerics.compute_dtype(ops.queries.dtype)
    q = rows_of(ops.queries, qb.start, d, tiling.block_q).astype(acc) * jnp.asarray(spec.scale, acc)
    return Block(seq, qb, d, tiling, q, prod.query_operand(q, tiling.block_diagonal))


def write_rows(x: Array, qb: geo.QueryBlock, blk: Array) -> Array:
    """``x (tokens, heads, ...)`` with the block's valid rows replaced by ``blk (kv_heads, groups, block_q, ...)``."""
    block_q = qb.valid.shape[0]
    blk = jnp.moveaxis(blk, 2, 0).reshape(block_q, *x.shape[1:]).astype(x.dtype)
    old = lax.dynamic_slice_in_dim(x, qb.start, block_q)
    valid = qb.valid.reshape(block_q, *(1,) * (x.ndim - 1))
    return lax.dynamic_update_slice_in_dim(x, jnp.where(valid, blk, old), qb.start, 0)


class ChunkLogits(NamedTuple):
    s: Array  # (kv_heads, groups, block_q, tokens) after soft cap and score_mod; hidden entries not replaced
    tanh: Array | None  # tanh(raw / cap), for the soft cap's derivative
    pre_mod: Array  # the logits the score_mod got
    visible: Array  # (1|kv_heads, 1|groups, block_q, tokens)
    keys: Array  # (tokens, kv_heads, dim), unseen tokens zeroed
    values: Array  # (tokens, kv_heads, v_dim)
    ids: Array  # (n,) the physical pages read
    kv_start: Array  # absolute position of the chunk's first token


def score_mod(spec: PagedSpec, consts, s: Array, blk: Block, kv_start: Array) -> Array:
    """The user's score_mod on a chunk's logits: batch = sequence index, absolute positions."""
    if spec.score_mod is None:
        return s
    layout = _mods.Layout(geo.LAYOUT, blk.d.groups)
    where = dict(example=blk.seq.number, q_start=blk.qb.first_pos, kv_start=kv_start)
    return _mods.evaluate(spec.score_mod, consts, s.shape, layout, score=s, **where)


def chunk_logits(spec: PagedSpec, ops: Operands, blk: Block, first_page: Array, n: int) -> ChunkLogits:
    """Reads ``n`` pages from logical page ``first_page`` and computes the block's logits against them."""
    ch = geo.chunk(blk.seq, first_page, n, blk.d)
    visible = geo.visibility(spec, (blk.seq, blk.qb, ch), ops.mask_consts, blk.d)
    acc = blk.q.dtype
    keys = geo.hide_unseen(prod.read_pages(ops.key_pages, ch.ids, spec.k_scale, acc), visible)
    values = geo.hide_unseen(prod.read_pages(ops.value_pages, ch.ids, spec.v_scale, acc), visible)
    pre = prod.logits(blk.q_op, keys, blk.q.shape[:3])
    t = None
    if spec.logits_soft_cap is not None:
        # Gemma 2 style capping, before the score_mod and masks as in dot_product_attention.
        t = jnp.tanh(pre / spec.logits_soft_cap)
        pre = spec.logits_soft_cap * t
    s = score_mod(spec, ops.score_consts, pre, blk, ch.first_pos)
    return ChunkLogits(s, t, pre, visible, keys, values, ch.ids, ch.first_pos)


def fold(carry: OnlineSoftmax, c: ChunkLogits, block_diagonal: bool) -> OnlineSoftmax:
    """Folds one chunk into the online softmax; hidden logits are selected out before any arithmetic."""
    s = jnp.where(c.visible, c.s, _numerics.masked_value(c.s.dtype))
    m_new = jnp.maximum(carry.max, s.max(axis=-1))
    p = jnp.where(c.visible, jnp.exp(s - m_new[..., None]), 0)
    alpha = jnp.exp(carry.max - m_new)
    pv = prod.weighted(p, c.values, block_diagonal)
    return OnlineSoftmax(carry.acc * alpha[..., None] + pv, m_new, carry.sum * alpha + p.sum(axis=-1))


def grouped_sinks(ops: Operands, d: Dims) -> Array | None:
    acc = _numerics.compute_dtype(ops.queries.dtype)
    return None if ops.sinks is None else ops.sinks.astype(acc).reshape(d.kv_heads, d.groups)


def forward(spec: PagedSpec, meta: Metadata, ops: Operands) -> tuple[Array, Array]:
    """Output ``(tokens, heads, v_dim)`` in the query dtype (zeros on padding rows) and the log-sum-exp
    ``(tokens, heads)`` in the compute dtype (the masking sentinel on rows no sequence owns)."""
    d = dims(ops, meta)
    acc = _numerics.compute_dtype(ops.queries.dtype)
    v_dim = ops.value_pages.shape[-1]
    heads = d.kv_heads * d.groups
    sinks = grouped_sinks(ops, d)
    out = jnp.zeros((d.tokens, heads, v_dim), ops.queries.dtype)
    lse = jnp.full((d.tokens, heads), _numerics.masked_value(acc))

    def body(seq, qb, tiling, carry):
        blk = make_block(spec, ops, d, (seq, qb, tiling))

        def step(first_page, n, state):
            return fold(state, chunk_logits(spec, ops, blk, first_page, n), tiling.block_diagonal)

        state = initial_carry((d.kv_heads, d.groups, tiling.block_q), v_dim, acc, sinks)
        o, lse_blk = finish(geo.over_chunks(spec, qb, d, step, state), ops.queries.dtype)
        out, lse = carry
        return write_rows(out, qb, o), write_rows(lse, qb, lse_blk)

    return geo.over_query_blocks(spec, meta, d, body, (out, lse))
