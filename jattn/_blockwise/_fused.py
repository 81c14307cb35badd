"""The fused forward-mode pass: the output, its log-sum-exp and their tangents in one online sweep.

``jax.jvp`` needs the primal and the tangent together. Run apart, the forward
(2 block products) and the tangent pass (``_tangent``: 5, the logits
recomputed from the saved log-sum-exp) cost 7 products per block; fused, the
logits and their weights are computed once and both accumulate from them, 6
products per block (``Q K^T``, ``dQ K^T``, ``Q dK^T``, ``e V``, ``(e ds) V``,
``e dV``).

The tangent accumulators follow the forward's running max: with
``e = exp(s - m)`` the weights of the forward's online softmax, they hold
``sum_j e_ij (ds_ij v_j + dv_j)`` and ``sum_j e_ij ds_ij``, rescaled by the
same ``alpha`` whenever the max moves, and are divided by the row's sum at the
end, which gives what the tangent pass sums with exact probabilities (see
``_tangent``'s formulas).

Only forward mode runs it: reverse mode linearizes into the forward and the
tangent pass apart (``_partial_eval``), so the tangent pass stays the one that
transposes into the backward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from .. import _numerics
from . import _blockmath as bm
from ._forward import OnlineSoftmax, finish, fold_logits, initial_carry
from ._layout import Operands, over_batch, without_kv
from ._tangent import (
    TangentCarry,
    TangentKeyBlock,
    Tangents,
    TangentSweep,
    accumulate_tangent,
    finish_tangent,
    hide_unseen_keys,
)


class FusedCarry(NamedTuple):
    """The forward's online softmax and the unnormalized tangent accumulators of one query block."""

    primal: OnlineSoftmax
    tangent: TangentCarry  # sum_j e_ij (ds_ij v_j + dv_j), sum_j e_ij ds_ij; e = exp(s - running max)


def fused_step(spec, carry: FusedCarry, q_blk, dq_blk, *, key: TangentKeyBlock, visible, consts, dconsts, place):
    """Folds one key block into both accumulators; ``visible`` masks a partial block."""
    key = hide_unseen_keys(key, visible)
    logits = bm.block_logits(spec, q_blk, key.k, key.bias, consts=consts, place=place)
    primal, e, alpha = fold_logits(carry.primal, logits.s, key.v, visible)
    rescaled = TangentCarry(carry.tangent.acc * alpha[..., None], carry.tangent.rowsum * alpha)
    at = dict(key=key, logits=logits, visible=visible, consts=consts, dconsts=dconsts, place=place)
    return FusedCarry(primal, accumulate_tangent(spec, rescaled, e, q_blk, dq_blk, **at))


def finish_fused(carry: FusedCarry, dtype, sinks, dsinks) -> tuple[Array, Array, Array, Array]:
    """``(out, lse, dout, dlse)`` of one query block; rows that saw no key get zero tangents."""
    out, lse = finish(carry.primal, dtype)
    total = carry.primal.sum
    seen = total != 0
    safe = jnp.where(seen, total, 1)
    exact_out = jnp.where(seen[..., None], carry.primal.acc / safe[..., None], 0)  # unrounded, for dout
    normalized = TangentCarry(carry.tangent.acc / safe[..., None], carry.tangent.rowsum / safe)
    dout, dlse = finish_tangent(normalized, exact_out, lse, sinks, dsinks)
    return out, lse, dout.astype(dtype), dlse


def fused_example(spec, ops: Operands, tangents: Tangents, *, whole, example):
    """One example's ``(out, lse, dout, dlse)``; ``whole`` holds K, V, dK, dV with their batch axis."""
    sweep = TangentSweep.of(spec, ops, tangents, whole, example)
    v_dim = whole[1].shape[-1]
    acc_dtype = _numerics.compute_dtype(ops.q.dtype)

    def one_q_block(qb):
        q_blk, dq_blk = sweep.query_blocks(qb)

        def visit(carry, key, **at):
            return fused_step(spec, carry, q_blk, dq_blk, key=key, **at)

        primal = initial_carry((*ops.q.shape[:2], spec.grid.block_q), v_dim, acc_dtype, sweep.sinks)
        carry = sweep.over_keys(qb, visit, FusedCarry(primal, sweep.zero_carry()))
        return finish_fused(carry, whole[1].dtype, sweep.sinks, sweep.dsinks)

    return sweep.over_queries(one_q_block)


def fused(spec, ops: Operands, tangents: Tangents) -> tuple[Array, Array, Array, Array]:
    """``(out, lse, dout, dlse)`` in the kernel layout (see ``_forward.forward``)."""

    def one_example(example, mapped, whole):
        ops, tangents = mapped
        return fused_example(spec, ops, tangents, whole=whole, example=example)

    mapped = (without_kv(ops), tangents._replace(k=None, v=None))
    return over_batch(one_example, ops.q.shape[0], mapped, whole=(ops.k, ops.v, tangents.k, tangents.v))
