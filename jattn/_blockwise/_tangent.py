"""The blockwise tangent pass: forward-mode attention, linear in (dQ, dK, dV, dbias), with O(N) memory.

With the primal's log-sum-exp saved, the probabilities of a block are exact
(``p = exp(s - lse)``, no running max), and the tangent of every output row is
a sum over the key blocks it sees (the blockwise JVP of sCM, arXiv 2410.11081,
appendix F):

    ds   = d(logits) = scale * (dQ K^T + Q dK^T) [* (1 - tanh^2) with a soft cap] + dbias
    dout = sum_j p_ij (ds_ij v_j + dv_j) - (sum_j p_ij ds_ij) out_i
    dlse = sum_j p_ij ds_ij

The loop is the forward's: for each query block, the key blocks it can see,
skipping invisible blocks and masking only partial ones. Nothing of size
``(q_seq, kv_seq)`` is built. Tangents that are symbolically zero are not
passed, and their products are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _numerics
from . import _blockmath as bm
from ._forward import example_sinks
from ._geometry import ExampleBlocks, slice_block
from ._layout import Operands, over_batch, without_kv


class Tangents(NamedTuple):
    """Tangents of the differentiable operands in the kernel layout (None: zero)."""

    q: Array | None = None  # (batch, kv_heads, groups, q_padded, dim)
    k: Array | None = None  # (batch, kv_padded, kv_heads, dim)
    v: Array | None = None  # (batch, kv_padded, kv_heads, v_dim)
    bias: Array | None = None  # the bias's shape
    sinks: Array | None = None  # the sinks' shape, (1, heads)
    consts: tuple[Array | None, ...] = ()  # per score_mod const (None: zero), each with a leading axis of 1


class TangentCarry(NamedTuple):
    """Accumulators of one query block, ``(kv_heads, groups, block_q, ...)``."""

    acc: Array  # sum_j p_ij (ds_ij v_j + dv_j), (..., v_dim)
    rowsum: Array  # sum_j p_ij ds_ij


class TangentKeyBlock(NamedTuple):
    k: Array  # keys, head-major (kv_heads, bk, dim)
    v: Array  # (kv_heads, bk, v_dim)
    bias: Array | None  # slice_block of the bias
    mask: Array | None  # slice_block of the dense mask
    dk: Array | None  # key tangents (kv_heads, bk, dim)
    dv: Array | None  # (kv_heads, bk, v_dim)
    dbias: Array | None  # slice_block of the bias tangent


def probabilities(s: Array, lse: Array, visible: Array | None) -> Array:
    """``exp(s - lse)`` of a block ``(kv_heads, groups, bq, bk)``, 0 where hidden."""
    p = bm.exp_below_zero(s - lse[..., None])
    return p if visible is None else jnp.where(visible, p, 0)


def logits_tangent(spec, q_blk, dq_blk, key: TangentKeyBlock, logits: bm.Logits, *, consts, dconsts, place):
    """``d(logits)`` of a block ``(kv_heads, groups, bq, bk)``, zero terms skipped (None if all are zero).

    ``dconsts`` are the tangents of the score_mod's ``consts`` (None where zero).
    """
    options = spec.options
    kv_heads, groups, bq, _ = q_blk.shape
    ds = None
    if dq_blk is not None:
        ds = bm.mm_nt(bm.rows(bm.scaled_query(options, dq_blk)), key.k)
    if key.dk is not None:
        term = bm.mm_nt(bm.rows(bm.scaled_query(options, q_blk)), key.dk)
        ds = term if ds is None else ds + term
    if ds is not None:
        ds = ds.reshape(kv_heads, groups, bq, -1)
        if jnp.finfo(q_blk.dtype).bits < 32:
            ds = ds * options.scale
        if logits.tanh is not None:  # d(c tanh(x / c)) = (1 - tanh^2) dx
            ds = ds * (1 - logits.tanh * logits.tanh)
    if key.dbias is not None:
        dbias = bm.grouped(key.dbias, kv_heads, groups).astype(logits.s.dtype)
        ds = dbias if ds is None else ds + dbias
    have_dconsts = any(d is not None for d in dconsts)
    if options.score_mod is None or (ds is None and not have_dconsts):
        return ds
    want = tuple(d is not None for d in dconsts)

    def modded(pre, wanted_consts):
        return bm.score_mod(
            options, bm.with_wanted(consts, want, wanted_consts), pre, bm.FORWARD_LAYOUT, groups=groups, place=place
        )

    d_pre = jnp.zeros_like(logits.pre_mod) if ds is None else ds
    tangents = tuple(d for d in dconsts if d is not None)
    return jax.jvp(modded, (logits.pre_mod, bm.wanted(consts, want)), (d_pre, tangents))[1]


def hide_unseen_keys(key: TangentKeyBlock, visible) -> TangentKeyBlock:
    """The key block with the keys no row of a partial block sees selected out (padding may hold NaN)."""
    if visible is None:
        return key
    seen = bm.seen_keys(visible, 3)  # visible: (kv_heads|1, groups|1, bq, bk)
    return key._replace(
        k=bm.hide_unseen(key.k, seen, 1),
        v=bm.hide_unseen(key.v, seen, 1),
        dk=None if key.dk is None else bm.hide_unseen(key.dk, seen, 1),
        dv=None if key.dv is None else bm.hide_unseen(key.dv, seen, 1),
    )


def accumulate_tangent(spec, carry: TangentCarry, weights, q_blk, dq_blk, *, key, logits, visible, consts, dconsts,
                       place) -> TangentCarry:  # fmt: skip
    """Adds ``sum_j w_ij (ds_ij v_j + dv_j)`` and ``sum_j w_ij ds_ij`` of one key block to the carry, for the
    block's ``weights`` w (exact probabilities in the tangent pass, the online softmax's in the fused one)."""
    acc, rowsum = carry
    ds = logits_tangent(spec, q_blk, dq_blk, key, logits, consts=consts, dconsts=dconsts, place=place)
    if ds is not None:
        wds = weights * ds
        if visible is not None:  # hidden: 0, whatever ds holds
            wds = jnp.where(visible, wds, 0)
        if key.bias is not None or spec.options.score_mod is not None:  # a logit of -inf hides its key
            wds = jnp.where(logits.s == -jnp.inf, 0, wds)
        acc = acc + bm.mm(bm.rows(wds.astype(key.v.dtype)), key.v).reshape(acc.shape)
        rowsum = rowsum + wds.sum(axis=-1)
    if key.dv is not None:
        acc = acc + bm.mm(bm.rows(weights.astype(key.dv.dtype)), key.dv).reshape(acc.shape)
    return TangentCarry(acc, rowsum)


def tangent_step(spec, carry: TangentCarry, q_blk, dq_blk, lse_blk, *, key, visible, consts, dconsts, place):
    """Folds one key block into the tangent accumulators; ``visible`` masks a partial block."""
    key = hide_unseen_keys(key, visible)
    logits = bm.block_logits(spec, q_blk, key.k, key.bias, consts=consts, place=place)
    p = probabilities(logits.s, lse_blk, visible)
    at = dict(key=key, logits=logits, visible=visible, consts=consts, dconsts=dconsts, place=place)
    return accumulate_tangent(spec, carry, p, q_blk, dq_blk, **at)


def finish_tangent(carry: TangentCarry, out: Array, lse: Array, sinks, dsinks) -> tuple[Array, Array]:
    """``dout`` (in out's dtype) and ``dlse`` from the accumulators and the primal output.

    A sink's logit moves every row's denominator: ``p_sink * dsink`` joins the row's mean of d(logits).
    """
    rowsum = carry.rowsum
    if dsinks is not None:
        rowsum = rowsum + bm.exp_below_zero(sinks[..., None].astype(lse.dtype) - lse) * dsinks[..., None]
    dout = carry.acc - rowsum[..., None] * out.astype(carry.acc.dtype)
    return dout.astype(out.dtype), rowsum


class TangentSweep(NamedTuple):
    """One example's loop over query blocks and their visible key blocks, as the tangent and the fused pass
    (``_fused``) both run it: operands with their tangents, the block geometry, the sinks."""

    spec: Any  # the KernelSpec
    ops: Operands
    tangents: Tangents
    whole: tuple  # K, V, dK, dV with their batch axis
    example: Array
    blocks: ExampleBlocks
    sinks: Array | None  # (kv_heads, groups)
    dsinks: Array | None

    @classmethod
    def of(cls, spec, ops: Operands, tangents: Tangents, whole, example) -> TangentSweep:
        kv_heads, groups = ops.q.shape[:2]
        blocks = ExampleBlocks(ops.opts, spec.grid, ops.mask, example, heads=(kv_heads, groups))
        dsinks = None if tangents.sinks is None else tangents.sinks.reshape(kv_heads, groups)
        return cls(spec, ops, tangents, whole, example, blocks, example_sinks(ops), dsinks)

    def query_blocks(self, qb) -> tuple[Array, Array | None]:
        """Query block ``qb`` and its tangent (None: zero)."""
        bq, dq = self.spec.grid.block_q, self.tangents.q
        return bm.dynamic_block(self.ops.q, qb, bq, 2), None if dq is None else bm.dynamic_block(dq, qb, bq, 2)

    def zero_carry(self) -> TangentCarry:
        shape = (*self.ops.q.shape[:2], self.spec.grid.block_q)
        acc_dtype = _numerics.compute_dtype(self.ops.q.dtype)
        return TangentCarry(jnp.zeros((*shape, self.whole[1].shape[-1]), acc_dtype), jnp.zeros(shape, acc_dtype))

    def key_block(self, qb, kb) -> TangentKeyBlock:
        """Key block ``kb`` (beside query block ``qb``) with its tangents, head-major."""
        grid, (k, v, dk, dv) = self.spec.grid, self.whole

        def block_of(x, transpose):
            return None if x is None else bm.kv_block(x, self.example, kb, grid.block_kv).transpose(transpose)

        def logits_block(x):
            return None if x is None else slice_block(x, qb, kb, grid)

        return TangentKeyBlock(
            k=block_of(k, (1, 0, 2)),
            v=block_of(v, (1, 0, 2)),
            bias=logits_block(self.ops.bias),
            mask=logits_block(self.ops.mask),
            dk=block_of(dk, (1, 0, 2)),
            dv=block_of(dv, (1, 0, 2)),
            dbias=logits_block(self.tangents.bias),
        )

    def over_keys(self, qb, visit, init):
        """``visit(carry, key, visible=..., consts=..., dconsts=..., place=...)`` folded over the key blocks
        query block ``qb`` sees (``visible`` None for a fully visible block)."""
        grid, blocks = self.spec.grid, self.blocks
        at = dict(consts=self.ops.opts.shared.score_consts, dconsts=self.tangents.consts)

        def masked_visit(carry, key, kb, masked):
            visible = blocks.visible(qb, kb, key.mask, grid.block_q, grid.block_kv) if masked else None
            return visit(carry, key, visible=visible, place=blocks.place(qb * grid.block_q, kb * grid.block_kv), **at)

        def step(kb, carry):  # branches in the order of _geometry.SKIP, FULL, PARTIAL
            branches = [
                lambda carry, key: carry,
                lambda carry, key: masked_visit(carry, key, kb, masked=False),
                lambda carry, key: masked_visit(carry, key, kb, masked=True),
            ]
            return lax.switch(blocks.kind(qb, kb), branches, carry, self.key_block(qb, kb))

        return blocks.kv_loop(qb, step, init)

    def over_queries(self, one_q_block) -> tuple[Array, ...]:
        """``one_q_block(qb)`` of every query block, each result laid out ``(kv_heads, groups, q_padded, ...)``."""
        grid = self.spec.grid
        if grid.num_q_blocks == 1:  # no loop needed over one query block
            results = jax.tree.map(lambda x: x[None], one_q_block(jnp.int32(0)))
        else:
            results = lax.map(one_q_block, jnp.arange(grid.num_q_blocks, dtype=jnp.int32))
        # (num_q_blocks, kv_heads, groups, bq, ...) -> (kv_heads, groups, q_padded, ...)
        return tuple(jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], grid.q_padded, *x.shape[4:]) for x in results)


def tangent_example(spec, ops: Operands, out, lse, tangents: Tangents, *, whole, example):
    """One example's ``(dout, dlse)``; ``whole`` holds K, V, dK, dV with their batch axis."""
    sweep = TangentSweep.of(spec, ops, tangents, whole, example)

    def one_q_block(qb):
        q_blk, dq_blk = sweep.query_blocks(qb)
        lse_blk, out_blk = (bm.dynamic_block(x, qb, spec.grid.block_q, 2) for x in (lse, out))

        def visit(carry, key, **at):
            return tangent_step(spec, carry, q_blk, dq_blk, lse_blk, key=key, **at)

        carry = sweep.over_keys(qb, visit, sweep.zero_carry())
        return finish_tangent(carry, out_blk, lse_blk, sweep.sinks, sweep.dsinks)

    return sweep.over_queries(one_q_block)


def tangent(spec, ops: Operands, out: Array, lse: Array, tangents: Tangents) -> tuple[Array, Array]:
    """``(dout, dlse)`` in the kernel layout of ``(out, lse)``."""

    def one_example(example, mapped, whole):
        ops, out, lse, tangents = mapped
        return tangent_example(spec, ops, out, lse, tangents, whole=whole, example=example)

    mapped = (without_kv(ops), out, lse, tangents._replace(k=None, v=None))
    return over_batch(one_example, ops.q.shape[0], mapped, whole=(ops.k, ops.v, tangents.k, tangents.v))
