"""Dense twins of the kernel's passes: the same block maths with one block spanning everything.

No loop with a dynamic trip count, so JAX can differentiate them in every mode;
they cost O(q_seq * kv_seq) memory and serve only where the blockwise passes
cannot: transposing a second derivative (reverse over reverse). Each twin
calls the very step function its blockwise pass calls, on the whole grid, so
the two compute the same function of the same arguments.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array

from .. import _numerics
from . import _blockmath as bm
from ._backward import (
    Grads,
    PairGrads,
    Wanted,
    add_bias_block,
    backward_arrays,
    key_block,
    pair_grads,
    query_block,
    sinks_grad,
)
from ._forward import KeyBlock, example_sinks, finish, initial_carry, online_softmax_step
from ._geometry import ExampleBlocks, Grid
from ._layout import Operands, over_batch, without_kv
from ._tangent import TangentCarry, TangentKeyBlock, Tangents, finish_tangent, tangent_step


def whole(spec: bm.KernelSpec) -> bm.KernelSpec:
    """The spec with one block spanning each padded sequence."""
    grid = spec.grid
    return dataclasses.replace(spec, grid=Grid(grid.q_seq, grid.kv_seq, grid.q_padded, grid.kv_padded))


def _example(spec: bm.KernelSpec, ops: Operands, example) -> tuple[ExampleBlocks, Array, bm.Placement]:
    """The one block's classification, its ``(kv_heads|1, groups|1, q_padded, kv_padded)`` visibility, its place."""
    kv_heads, groups = ops.q.shape[:2]
    grid = spec.grid
    blocks = ExampleBlocks(ops.opts, grid, ops.mask, example, heads=(kv_heads, groups))
    visible = blocks.visible(0, 0, ops.mask, grid.q_padded, grid.kv_padded)
    return blocks, visible, blocks.place(0, 0)


def dense_forward(spec: bm.KernelSpec, ops: Operands) -> tuple[Array, Array]:
    """Twin of ``_forward.forward``."""
    spec = whole(spec)

    def one_example(example, ops, kv):
        k, v = (x[example] for x in kv)  # (kv_padded, kv_heads, x)
        _, visible, place = _example(spec, ops, example)
        acc_dtype = _numerics.compute_dtype(ops.q.dtype)
        init = initial_carry(ops.q.shape[:3], v.shape[-1], acc_dtype, example_sinks(ops))
        key = KeyBlock(k=k.transpose(1, 0, 2), v=v.transpose(1, 0, 2), bias=ops.bias, mask=ops.mask)
        carry = online_softmax_step(spec, init, ops.q, key, visible, consts=ops.opts.shared.score_consts, place=place)
        return finish(carry, v.dtype)

    return over_batch(one_example, ops.q.shape[0], without_kv(ops), whole=(ops.k, ops.v))


def dense_tangent(spec: bm.KernelSpec, ops: Operands, out, lse, tangents: Tangents) -> tuple[Array, Array]:
    """Twin of ``_tangent.tangent``."""
    spec = whole(spec)

    def one_example(example, mapped, whole_kv):
        ops, out, lse, tangents = mapped
        k, v, dk, dv = (None if x is None else x[example] for x in whole_kv)  # (kv_padded, kv_heads, x)
        _, visible, place = _example(spec, ops, example)
        key = TangentKeyBlock(
            k=k.transpose(1, 0, 2),
            v=v.transpose(1, 0, 2),
            bias=ops.bias,
            mask=ops.mask,
            dk=None if dk is None else dk.transpose(1, 0, 2),
            dv=None if dv is None else dv.transpose(1, 0, 2),
            dbias=tangents.bias,
        )
        acc_dtype = _numerics.compute_dtype(ops.q.dtype)
        init = TangentCarry(jnp.zeros(out.shape, acc_dtype), jnp.zeros(lse.shape, acc_dtype))
        consts = ops.opts.shared.score_consts
        blocks_at = dict(key=key, visible=visible, consts=consts, dconsts=tangents.consts, place=place)
        carry = tangent_step(spec, init, ops.q, tangents.q, lse, **blocks_at)
        dsinks = None if tangents.sinks is None else tangents.sinks.reshape(ops.q.shape[:2])
        return finish_tangent(carry, out, lse, example_sinks(ops), dsinks)

    mapped = (without_kv(ops), out, lse, tangents._replace(k=None, v=None))
    return over_batch(one_example, ops.q.shape[0], mapped, whole=(ops.k, ops.v, tangents.k, tangents.v))


def dense_cotangent(spec: bm.KernelSpec, ops: Operands, out, lse, dout, *, dlse, want: Wanted) -> Grads:
    """Twin of ``_backward.backward``."""
    spec = whole(spec)
    grid = spec.grid

    def one_example(example, args, _):
        ops, out, lse, dout, dlse = args
        kv_heads, groups, _, dim = ops.q.shape
        acc_dtype = _numerics.compute_dtype(ops.q.dtype)
        arrays = backward_arrays(ops, out, dout, dlse)
        blocks, visible, _ = _example(spec, ops, example)
        consts = ops.opts.shared.score_consts
        zeros = tuple(jnp.zeros((x.shape[1], x.shape[0], x.shape[2]), acc_dtype) for x in (arrays.k, arrays.v))
        dconsts = tuple(jnp.zeros(c.shape, acc_dtype) for c in bm.wanted(consts, want.consts))
        query = query_block(grid, ops, arrays, lse, at=(0, 0))
        place = blocks.place(0, 0)
        acc = PairGrads(*zeros, None, None, dconsts)
        grads = pair_grads(
            spec,
            key_block(grid, arrays, 0),
            query,
            bm.transposed_block(visible),
            acc,
            consts=consts,
            want=want.consts,
            place=place,
        )
        dq = grads.dqt.reshape(kv_heads, dim, groups, grid.q_padded).transpose(0, 2, 3, 1)
        dbias = None
        if want.bias:
            dbias = add_bias_block(
                jnp.zeros(ops.bias.shape, acc_dtype), grads.dlogits.transpose(0, 2, 3, 1), 0, 0, grid
            )
        dsinks = sinks_grad(example_sinks(ops), lse, arrays.delta) if want.sinks else None
        return Grads(
            dq.astype(ops.q.dtype),
            grads.dk.transpose(1, 0, 2).astype(ops.k.dtype),
            grads.dv.transpose(1, 0, 2).astype(ops.v.dtype),
            dbias,
            dsinks,
            grads.dconsts,
        )

    return over_batch(one_example, ops.q.shape[0], (ops, out, lse, dout, dlse))
