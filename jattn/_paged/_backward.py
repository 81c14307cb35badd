"""The backward: the forward's loops again, recomputing each chunk's probabilities from the saved log-sum-exp.

Per (query block, chunk): ``p = exp(s - lse)``, ``dV += p^T dO``, ``ds = p (dO V^T - delta)``, through the
score_mod (a ``jax.vjp`` of the user's function, which also gives its captured arrays' gradients) and the
soft cap, then ``dQ += ds K`` and ``dK += ds^T Q``. The chunk's d(keys) and d(values) are scatter-added
into pool-sized gradients at the pages it read, so pages shared by several sequences sum their
contributions. Each query row belongs to one block, so its dQ is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .. import _numerics
from .._blockwise import _blockmath as bm
from . import _forward as fwd
from . import _geometry as geo
from . import _products as prod
from ._spec import Dims, Metadata, Operands, PagedSpec, dims


class RowGrads(NamedTuple):
    """A block's rows of what the backward reads, ``(kv_heads, groups, block_q, ...)`` in the compute dtype."""

    dout: Array  # (..., v_dim)
    dout_op: Array  # dout in the product form of the block
    lse: Array  # (...,)
    delta: Array  # rowsum(dout * out)


class Cotangents(NamedTuple):
    dq: Array  # (tokens, heads, dim); per block: (kv_heads, groups, block_q, dim)
    dk: Array  # the key pool's shape, in the compute dtype
    dv: Array
    dconsts: tuple[Array, ...]  # the floating score_mod consts' gradients


def wanted_consts(ops: Operands) -> tuple[bool, ...]:
    """Which captured score_mod arrays get gradients: the floating ones (ids and tables of ints do not)."""
    return tuple(jnp.issubdtype(c.dtype, jnp.floating) for c in ops.score_consts)


def row_grads(blk: fwd.Block, dout: Array, lse: Array, delta: Array) -> RowGrads:
    start, block_q, d = blk.qb.start, blk.tiling.block_q, blk.d
    do = fwd.rows_of(dout, start, d, block_q).astype(blk.q.dtype)
    lse_rows = fwd.rows_of(lse[..., None], start, d, block_q)[..., 0]
    delta_rows = fwd.rows_of(delta[..., None], start, d, block_q)[..., 0]
    return RowGrads(do, prod.query_operand(do, blk.tiling.block_diagonal), lse_rows, delta_rows)


def chunk_grads(spec: PagedSpec, ops: Operands, blk: fwd.Block, c: fwd.ChunkLogits, rows: RowGrads) -> Cotangents:
    """One chunk's gradients: dQ of the block ``(kv_heads, groups, block_q, dim)`` (unscaled), d(keys)
    ``(tokens, kv_heads, dim)``, d(values) and the wanted score_mod consts' gradients."""
    p = jnp.where(c.visible, bm.exp_below_zero(c.s - rows.lse[..., None]), 0)
    dv = prod.keys_grad(p, rows.dout)
    dp = prod.logits(rows.dout_op, c.values, p.shape[:3])
    ds = p * (dp - rows.delta[..., None])
    dconsts: tuple[Array, ...] = ()
    if spec.score_mod is not None:
        want = wanted_consts(ops)

        def modded(pre, wanted):
            consts = bm.with_wanted(ops.score_consts, want, wanted)
            return fwd.score_mod(spec, consts, pre, blk, c.kv_start)

        _, vjp = jax.vjp(modded, c.pre_mod, bm.wanted(ops.score_consts, want))
        ds, dconsts = vjp(ds)
    if c.tanh is not None:
        ds = ds * (1 - c.tanh * c.tanh)
    dq = prod.weighted(ds, c.keys, blk.tiling.block_diagonal)
    return Cotangents(dq, prod.keys_grad(ds, blk.q), dv, tuple(dconsts))


def pool_grad(grad: Array, pool: Array, scale: float | None) -> Array | None:
    """The pool's cotangent in its dtype (a quantized page was read as ``page * scale``); None for integers."""
    if not jnp.issubdtype(pool.dtype, jnp.floating):
        return None
    return (grad if scale is None else grad * scale).astype(pool.dtype)


def sinks_grad(ops: Operands, lse: Array, delta: Array) -> Array | None:
    """A sink is a key whose value is zero: ``d(sink) = -sum_rows p_sink * delta`` over the rows a sequence
    owns (the others hold the masking sentinel as log-sum-exp)."""
    if ops.sinks is None:
        return None
    owned = lse != _numerics.masked_value(lse.dtype)
    p_sink = jnp.where(owned, bm.exp_below_zero(ops.sinks.astype(lse.dtype)[None] - lse), 0)
    return (-(p_sink * delta).sum(axis=0)).astype(ops.sinks.dtype)


def block_grads(spec: PagedSpec, ops: Operands, blk: fwd.Block, rows: RowGrads, carry: Cotangents) -> Cotangents:
    """Folds every chunk of one query block into the pool gradients and writes the block's dQ rows."""
    d: Dims = blk.d

    def step(first_page, n, state):
        c = fwd.chunk_logits(spec, ops, blk, first_page, n)
        g = chunk_grads(spec, ops, blk, c, rows)
        dk = state.dk.at[c.ids].add(g.dk.reshape(n, d.page_size, *g.dk.shape[1:]))
        dv = state.dv.at[c.ids].add(g.dv.reshape(n, d.page_size, *g.dv.shape[1:]))
        dconsts = tuple(a + b for a, b in zip(state.dconsts, g.dconsts, strict=True))
        return Cotangents(state.dq + g.dq, dk, dv, dconsts)

    state = carry._replace(dq=jnp.zeros_like(blk.q))
    state = geo.over_chunks(spec, blk.qb, d, step, state)
    dq = state.dq * jnp.asarray(spec.scale, state.dq.dtype)  # s = (scale q) . k
    return state._replace(dq=fwd.write_rows(carry.dq, blk.qb, dq))


def backward(spec: PagedSpec, meta: Metadata, ops: Operands, res: tuple[Array, Array], dout: Array) -> Operands:
    """Cotangents of the operands (None where there is none) from the forward's output and log-sum-exp."""
    d = dims(ops, meta)
    out, lse = res
    acc = lse.dtype
    delta = (dout.astype(acc) * out.astype(acc)).sum(axis=-1)
    want = wanted_consts(ops)
    carry = Cotangents(
        jnp.zeros(ops.queries.shape, acc),
        jnp.zeros(ops.key_pages.shape, acc),
        jnp.zeros(ops.value_pages.shape, acc),
        tuple(jnp.zeros(c.shape, c.dtype) for c in bm.wanted(ops.score_consts, want)),
    )

    def body(seq, qb, tiling, carry):
        blk = fwd.make_block(spec, ops, d, (seq, qb, tiling))
        return block_grads(spec, ops, blk, row_grads(blk, dout, lse, delta), carry)

    g = geo.over_query_blocks(spec, meta, d, body, carry)
    it = iter(g.dconsts)
    return Operands._make(  # the cotangent tree: None where there is no gradient
        [
            g.dq.astype(ops.queries.dtype),
            pool_grad(g.dk, ops.key_pages, spec.k_scale),
            pool_grad(g.dv, ops.value_pages, spec.v_scale),
            sinks_grad(ops, lse, delta),
            tuple(next(it).astype(c.dtype) if w else None for c, w in zip(ops.score_consts, want, strict=True)),
            tuple(None for _ in ops.mask_consts),
        ]
    )
