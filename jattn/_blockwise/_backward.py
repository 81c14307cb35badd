"""The blockwise backward: one pass over key blocks, dQ accumulated in place.

For each key block, loop over the query blocks that see it, recompute the
probabilities from the saved log-sum-exp, accumulate dK/dV for the key block
and add into a full-size dQ carry. Five block matmuls per visited pair (QK^T,
dV, dP, dK, dQ) and no second pass for dQ. The backward works on transposed
logits ``(kv_heads, bk, groups * bq)``: the logits and dP read the query and dO
blocks as they are (``_blockmath.mm_nt``), and dQ is built transposed, so
every product is one XLA:CPU runs at full speed.
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
from ._forward import example_sinks, keys_all_seen, splittable, unit_groups_dropped
from ._geometry import ExampleBlocks, Grid, block_start, slice_block
from ._layout import Operands, over_batch


class KeyBlock(NamedTuple):
    """One key block, head-major: ``(kv_heads, bk, x)``, and the keys transposed ``(kv_heads, dim, bk)``."""

    k: Array
    v: Array
    kt: Array


class QueryBlock(NamedTuple):
    """What the backward reads of one query block; ``rows = groups * block_q``."""

    q: Array  # (kv_heads, rows, dim)
    dout: Array  # (kv_heads, rows, v_dim)
    lse: Array  # (kv_heads, 1, rows)
    delta: Array  # (kv_heads, 1, rows): sum_d dO O - dlse, the softmax-Jacobian term of every row
    bias: Array | None  # slice_block of the bias
    mask: Array | None  # slice_block of the dense mask


class PairGrads(NamedTuple):
    """What the visited (query block, key block) pairs contribute; ``dk``, ``dv`` and ``dconsts`` accumulate."""

    dk: Array  # (kv_heads, bk, dim), accumulated over the query blocks
    dv: Array  # (kv_heads, bk, v_dim), likewise
    dqt: Array  # transposed dQ block (kv_heads, dim, rows)
    dlogits: Array | None  # (kv_heads, bk, groups, bq) before the score_mod: dbias, when wanted
    dconsts: tuple[Array, ...]  # the score_mod's captured arrays, accumulated over every pair


class Wanted(NamedTuple):
    """Which gradients besides dQ, dK, dV a backward computes (the linear arguments of the tangent)."""

    bias: bool = False
    sinks: bool = False
    consts: tuple[bool, ...] = ()  # per score_mod const


def pair_grads(
    spec, key: KeyBlock, query: QueryBlock, visible, acc: PairGrads, *, consts, want, place, block_q=None, hide=True
) -> PairGrads:
    """Adds one block pair's dK/dV (and score_mod const gradients) to ``acc``; also its dQ block and dlogits.

    ``visible`` ``(kv_heads|1, bk, groups|1, bq)`` masks a partial block (None: fully visible);
    ``want`` says which of the score_mod's ``consts`` get gradients (``acc.dconsts`` holds those);
    ``place`` locates the block for the score_mod (transposed layout); ``block_q``: the query block's
    rows per group when not the grid's (half a block, :func:`split_pair_grads`); ``hide``: as in the forward.
    """
    options = spec.options
    bq = spec.grid.block_q if block_q is None else block_q
    if visible is not None and hide:  # (kv_heads|1, bk, groups|1, bq): keys no row sees are selected out
        seen = bm.seen_keys(visible, 1)
        key = KeyBlock(bm.hide_unseen(key.k, seen, 1), bm.hide_unseen(key.v, seen, 1), bm.hide_unseen(key.kt, seen, 2))
    kv_heads, bk = key.k.shape[:2]
    groups = query.q.shape[1] // bq

    def as_4d(x):  # (kv_heads, bk|1, rows) -> (kv_heads, bk|1, groups, bq)
        return x.reshape(kv_heads, x.shape[1], groups, bq)

    raw = as_4d(bm.mm_nt(key.k, bm.scaled_query(options, query.q)))  # (kv_heads, bk, groups, bq)
    bias = None if query.bias is None else bm.transposed_block(bm.grouped(query.bias, kv_heads, groups))
    pre, t = bm.finish_logits(options, raw, query.q.dtype, bias)

    def modded(pre, wanted_consts):
        return bm.score_mod(
            options, bm.with_wanted(consts, want, wanted_consts), pre, bm.BACKWARD_LAYOUT, groups=groups, place=place
        )

    s = modded(pre, bm.wanted(consts, want))
    pt = bm.exp_below_zero(s - as_4d(query.lse))  # lse (kv_heads, 1, rows) -> (kv_heads, 1, groups, bq)
    if visible is not None:
        pt = jnp.where(visible, pt, 0)
    dv = acc.dv + bm.mm(pt.reshape(raw.shape[0], bk, -1).astype(query.dout.dtype), query.dout)
    dpt = as_4d(bm.mm_nt(key.v, query.dout))
    dlogits = pt * (dpt - as_4d(query.delta))  # with respect to the logits softmax saw
    dconsts = acc.dconsts
    if options.score_mod is not None:
        _, vjp = jax.vjp(modded, pre, bm.wanted(consts, want))
        dlogits, dmod_consts = vjp(dlogits)
        dconsts = tuple(a + d for a, d in zip(acc.dconsts, dmod_consts, strict=True))
    draw = dlogits if t is None else dlogits * (1 - t * t)
    dst = draw.reshape(kv_heads, bk, -1).astype(query.q.dtype)
    # d(logits)/dq = scale * k and d(logits)/dk = scale * q: scale the small products.
    dk = acc.dk + bm.mm(dst, query.q) * options.scale
    dqt = bm.mm(key.kt, dst) * options.scale  # (kv_heads, dim, rows)
    return PairGrads(dk, dv, dqt, dlogits, dconsts)


def split_pair_grads(spec, blocks: ExampleBlocks, key: KeyBlock, query: QueryBlock, acc: PairGrads, *, consts,
                     want, at, hide=True) -> PairGrads:  # fmt: skip
    """:func:`pair_grads` of a partial pair whose top rows see none of the right half of the keys (the causal
    diagonal): the left half of the keys against every row, the right half against the bottom rows only, a
    quarter of the products skipped. Without a bias or dense mask (the caller checks)."""
    qb, kb = at
    bq, bk = spec.grid.block_q, spec.grid.block_kv
    hq, hk = bq // 2, bk // 2
    kv_heads = key.k.shape[0]
    groups = query.q.shape[1] // bq

    def bottom(x, axis):  # the bottom half of each group's rows along ``axis`` (rows = groups * bq)
        x = x.reshape(*x.shape[:axis], groups, bq, *x.shape[axis + 1 :])
        x = lax.slice_in_dim(x, hq, bq, axis=axis + 1)
        return x.reshape(*x.shape[:axis], groups * hq, *x.shape[axis + 2 :])

    def half(x, axis, right):
        return lax.slice_in_dim(x, hk if right else 0, bk if right else hk, axis=axis)

    def keys(right):
        return KeyBlock(half(key.k, 1, right), half(key.v, 1, right), half(key.kt, 2, right))

    def visible(q_block, k_block, rows):
        return bm.transposed_block(blocks.visible(q_block, k_block, None, rows, hk))

    def acc_half(acc, right):
        return acc._replace(dk=half(acc.dk, 1, right), dv=half(acc.dv, 1, right))

    left = pair_grads(spec, keys(False), query, visible(qb, 2 * kb, bq), acc_half(acc, False), consts=consts,
                      want=want, place=blocks.place(qb * bq, kb * bk), hide=hide)  # fmt: skip
    lower = QueryBlock(bottom(query.q, 1), bottom(query.dout, 1), bottom(query.lse, 2), bottom(query.delta, 2), None,
                       None)  # fmt: skip
    right = pair_grads(spec, keys(True), lower, visible(2 * qb + 1, 2 * kb + 1, hq),
                       acc_half(acc, True)._replace(dconsts=left.dconsts), consts=consts, want=want,
                       place=blocks.place(qb * bq + hq, kb * bk + hk), block_q=hq, hide=hide)  # fmt: skip
    dqt = left.dqt.reshape(kv_heads, -1, groups, bq).at[..., hq:].add(right.dqt.reshape(kv_heads, -1, groups, hq))
    dqt = dqt.reshape(left.dqt.shape)
    dk, dv = (jnp.concatenate([a, b], axis=1) for a, b in ((left.dk, right.dk), (left.dv, right.dv)))
    return PairGrads(dk, dv, dqt, None, right.dconsts)


class BackwardArrays(NamedTuple):
    """One example's backward operands.

    K and V keep the caller's layout: each key block is made head-major when its loop starts
    (:func:`key_block`), into a small buffer, not as whole-sequence copies. Q and dO are read in the
    kernel layout, without a unit groups axis (``_forward.unit_groups_dropped``): no transposed copy of
    either is made.
    """

    k: Array  # keys in the caller's layout (kv_padded, kv_heads, dim)
    v: Array  # (kv_padded, kv_heads, v_dim)
    q: Array  # (kv_heads, groups, q_padded, dim), or (kv_heads, q_padded, dim) when groups is 1
    dout: Array  # likewise, (..., v_dim)
    delta: Array  # (kv_heads, groups, q_padded)


def backward_arrays(ops: Operands, out: Array, dout: Array, dlse: Array) -> BackwardArrays:
    acc_dtype = _numerics.compute_dtype(ops.q.dtype)
    # The log-sum-exp's cotangent adds dlse * p to dlogits: it enters as -dlse in the row term.
    delta = jnp.einsum("kgqd,kgqd->kgq", dout, out, preferred_element_type=acc_dtype) - dlse.astype(acc_dtype)
    return BackwardArrays(ops.k, ops.v, unit_groups_dropped(ops.q), unit_groups_dropped(dout), delta)


def key_block(grid, arrays: BackwardArrays, kb) -> KeyBlock:
    """Key block ``kb``, head-major, and its keys transposed."""
    k, v = (bm.dynamic_block(x, kb, grid.block_kv, 0) for x in (arrays.k, arrays.v))  # (bk, kv_heads, x)
    return KeyBlock(k.transpose(1, 0, 2), v.transpose(1, 0, 2), k.transpose(1, 2, 0))


def query_block(grid, ops: Operands, arrays: BackwardArrays, lse: Array, *, at) -> QueryBlock:
    """The query-side blocks of block pair ``at = (qb, kb)``."""
    qb, kb = at
    kv_heads, groups = ops.q.shape[:2]
    rows = groups * grid.block_q

    def query_rows(x):  # (kv_heads, [groups,] q_padded, x) -> (kv_heads, rows, x)
        return bm.dynamic_block(x, qb, grid.block_q, x.ndim - 2).reshape(kv_heads, rows, x.shape[-1])

    def row_block(x):  # (kv_heads, groups, q_padded) -> (kv_heads, 1, rows)
        return bm.dynamic_block(x, qb, grid.block_q, 2).reshape(kv_heads, 1, rows)

    return QueryBlock(
        q=query_rows(arrays.q),
        dout=query_rows(arrays.dout),
        lse=row_block(lse),
        delta=row_block(arrays.delta),
        bias=None if ops.bias is None else slice_block(ops.bias, qb, kb, grid),
        mask=None if ops.mask is None else slice_block(ops.mask, qb, kb, grid),
    )


class Grads(NamedTuple):
    """One example's gradients (None where not wanted); dbias and dsinks per example, in the softmax dtype."""

    q: Array  # kernel layout (kv_heads, groups, q_padded, dim)
    k: Array  # (kv_padded, kv_heads, dim)
    v: Array  # (kv_padded, kv_heads, v_dim)
    bias: Array | None  # (heads|1, q|1, kv|1): the bias's shape without its batch axis
    sinks: Array | None  # (kv_heads, groups)
    consts: tuple[Array, ...]  # the wanted score_mod consts, each its const's shape


def sinks_grad(sinks: Array, lse: Array, delta: Array) -> Array:
    """d(sinks) ``(kv_heads, groups)``: a sink is a key whose value is zero, so its logit's gradient is
    ``p_sink * (0 - delta)`` summed over the rows, with ``p_sink = exp(sink - lse)``."""
    p_sink = bm.exp_below_zero(sinks[..., None].astype(lse.dtype) - lse)
    return -(p_sink * delta).sum(axis=-1)


def backward_example(spec, ops: Operands, out, lse, dout, *, dlse, example, want: Wanted) -> Grads:
    """One example's gradients; ``ops`` holds that example's arrays."""
    grid = spec.grid
    kv_heads, groups, _, dim = ops.q.shape
    v_dim = ops.v.shape[-1]
    rows = groups * grid.block_q
    acc_dtype = _numerics.compute_dtype(ops.q.dtype)
    blocks = ExampleBlocks(ops.opts, grid, ops.mask, example, heads=(kv_heads, groups))
    arrays = backward_arrays(ops, out, dout, dlse)
    consts = ops.opts.shared.score_consts

    can_split = splittable(grid, ops) and not want.bias
    hide = not keys_all_seen(grid, ops)

    def pair(acc, query, qb, kb, key, *, masked):
        visible = None
        if masked:
            visible = bm.transposed_block(blocks.visible(qb, kb, query.mask, grid.block_q, grid.block_kv))
        place = blocks.place(qb * grid.block_q, kb * grid.block_kv)
        grads = pair_grads(spec, key, query, visible, acc, consts=consts, want=want.consts, place=place, hide=hide)
        return grads if want.bias else grads._replace(dlogits=None)

    def one_kv_block(carry, kb):
        key = key_block(grid, arrays, kb)

        def skip(acc):
            dlogits = jnp.zeros((kv_heads, grid.block_kv, groups, grid.block_q), acc_dtype) if want.bias else None
            return acc._replace(dqt=jnp.zeros((kv_heads, dim, rows), acc_dtype), dlogits=dlogits)

        def step(qb, carry):  # branches in the order of _geometry.SKIP, FULL, PARTIAL
            # The switch only carries block-sized values: the full-size dQ (and dbias) are updated in place
            # outside it, and blocks are sliced before it, so no branch takes or copies a full-size array.
            acc, dqt, dbias = carry
            branches = [
                lambda acc, query: skip(acc),
                lambda acc, query: pair(acc, query, qb, kb, key, masked=False),
                lambda acc, query: pair(acc, query, qb, kb, key, masked=True),
            ]
            kind = blocks.kind(qb, kb)
            if can_split:  # a fourth branch: the causal diagonal's partial pair, by quadrants
                split = functools.partial(split_pair_grads, spec, blocks, key, consts=consts, want=want.consts,
                                          at=(qb, kb), hide=hide)  # fmt: skip
                branches.append(lambda acc, query: split(query, acc))
                kind = jnp.where((kind == PARTIAL) & blocks.top_half_skips_right_half(qb, kb), len(branches) - 1, kind)
            query = query_block(grid, ops, arrays, lse, at=(qb, kb))
            # The barrier keeps XLA from hoisting the split's row halves as a second slice of each query array.
            query = lax.optimization_barrier(query) if can_split else query
            grads = lax.switch(kind, branches, acc, query)
            dqt_blk = bm.dynamic_block(dqt, qb, grid.block_q, 3) + grads.dqt.reshape(
                kv_heads, dim, groups, grid.block_q
            )
            dqt = lax.dynamic_update_slice_in_dim(dqt, dqt_blk, qb * grid.block_q, 3)
            if dbias is not None:
                dbias = add_bias_block(dbias, grads.dlogits.transpose(0, 2, 3, 1), qb, kb, grid)
            return grads._replace(dqt=None, dlogits=None), dqt, dbias

        dqt, dbias, dconsts = carry
        zeros = (
            jnp.zeros((kv_heads, grid.block_kv, dim), acc_dtype),
            jnp.zeros((kv_heads, grid.block_kv, v_dim), acc_dtype),
        )
        acc = PairGrads(*zeros, None, None, dconsts)
        acc, dqt, dbias = blocks.q_loop(kb, step, (acc, dqt, dbias))
        return (dqt, dbias, acc.dconsts), (acc.dk, acc.dv)

    dconsts0 = tuple(jnp.zeros(c.shape, acc_dtype) for c in bm.wanted(consts, want.consts))
    dbias0 = jnp.zeros(ops.bias.shape, acc_dtype) if want.bias and ops.bias is not None else None
    init = (jnp.zeros((kv_heads, dim, groups, grid.q_padded), acc_dtype), dbias0, dconsts0)
    (dqt, dbias, dconsts), (dk, dv) = lax.scan(one_kv_block, init, jnp.arange(grid.num_kv_blocks, dtype=jnp.int32))
    # (num_kv_blocks, kv_heads, bk, x) -> the primal layout (kv_padded, kv_heads, x)
    dk = jnp.moveaxis(dk, 1, 2).reshape(grid.kv_padded, kv_heads, dim)
    dv = jnp.moveaxis(dv, 1, 2).reshape(grid.kv_padded, kv_heads, v_dim)
    dq = dqt.transpose(0, 2, 3, 1)  # (kv_heads, groups, q_padded, dim)
    sinks = example_sinks(ops)
    dsinks = sinks_grad(sinks, lse, arrays.delta) if want.sinks and sinks is not None else None
    return Grads(dq.astype(ops.q.dtype), dk.astype(ops.k.dtype), dv.astype(ops.v.dtype), dbias, dsinks, dconsts)


def add_bias_block(dbias, ds, qb, kb, grid: Grid):
    """Adds a block's dlogits into dbias ``(heads|1, q|1, kv|1)``, summing broadcast axes."""
    heads_b, tq, tk = dbias.shape
    ds = ds.reshape(-1, *ds.shape[2:])  # (heads, bq, bk)
    ds = ds.sum(axis=0, keepdims=True) if heads_b == 1 else ds
    ds = ds.sum(axis=1, keepdims=True) if tq == 1 else ds
    ds = ds.sum(axis=2, keepdims=True) if tk == 1 else ds
    start = block_start(dbias.shape, qb, kb, grid)
    current = lax.dynamic_slice(dbias, start, ds.shape)
    return lax.dynamic_update_slice(dbias, current + ds, start)


def backward(spec, ops: Operands, out: Array, lse: Array, dout: Array, *, dlse: Array, want: Wanted) -> Grads:
    """dQ (kernel layout), dK, dV (caller's layout), and the wanted others, per example (a leading batch axis)."""

    def one_example(example, args, _):
        ops, out, lse, dout, dlse = args
        return backward_example(spec, ops, out, lse, dout, dlse=dlse, example=example, want=want)

    return over_batch(one_example, ops.q.shape[0], (ops, out, lse, dout, dlse))
