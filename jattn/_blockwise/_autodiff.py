"""Autodiff wiring of the blockwise kernel.

First order: the blockwise backward (``_backward.py``) as the VJP of the
blockwise forward. Second order (grad of grad) goes through the backward's own
custom VJP, which differentiates a dense version of the same maths (one block
spanning everything): O(q_seq * kv_seq) memory, but only for higher
derivatives. Each rule calls its own function again for its primal value, so
that value stays differentiable when an outer transformation traces the rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _core
from . import _blockmath as bm
from ._backward import backward
from ._forward import forward
from ._geometry import ExampleBlocks, Grid
from ._layout import Operands, over_batch


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(spec: bm.KernelSpec, ops: Operands):
    """``(out, lse)`` in the kernel layout (see ``forward``), differentiable in q, k, v and bias."""
    return forward(spec, ops)


def _attention_fwd(spec, ops):
    out, lse = attention(spec, ops)
    return (out, lse), (ops, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    ops, out, lse = residuals
    dout, _ = cotangents  # the log-sum-exp output carries no gradient (stopped by the caller)
    dq, dk, dv, dbias = _attention_grads(spec, ops, out, lse, dout)
    return (_cotangent(ops, dq, dk, dv, dbias),)


def _cotangent(ops: Operands, dq, dk, dv, dbias) -> Operands:
    """Cotangents in the shape of ``ops``: none for the mask and the integer per-example arrays."""
    return Operands(dq, dk, dv, dbias, None, None)


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_grads(spec, ops, out, lse, dout):
    return backward(spec, ops, out, lse, dout)


def _attention_grads_fwd(spec, ops, out, lse, dout):
    grads = _attention_grads(spec, ops, out, lse, dout)
    return grads, (ops, out, lse, dout)


def _attention_grads_bwd(spec, residuals, cotangents):
    ops, out, lse, dout = residuals

    def first_order(q, k, v, bias, dout):
        _, vjp = jax.vjp(lambda q, k, v, bias: dense(spec, ops._replace(q=q, k=k, v=v, bias=bias)), q, k, v, bias)
        return vjp(dout)

    _, vjp = jax.vjp(first_order, ops.q, ops.k, ops.v, ops.bias, dout)
    dq, dk, dv, dbias, ddout = vjp(tuple(cotangents))
    # out and lse are functions of q, k, v, bias; the dense maths already
    # accounts for that path, so they get zero cotangents.
    return _cotangent(ops, dq, dk, dv, dbias), jnp.zeros_like(out), jnp.zeros_like(lse), ddout


_attention_grads.defvjp(_attention_grads_fwd, _attention_grads_bwd)


def dense(spec: bm.KernelSpec, ops: Operands):
    """The kernel's maths with one block spanning everything (for second derivatives): the output only."""
    grid = spec.grid
    whole = Grid(grid.q_seq, grid.kv_seq, grid.q_padded, grid.kv_padded)

    def one_example(_, ops, __):
        blocks = ExampleBlocks(ops.opts, whole, ops.mask)
        s, _ = bm.block_logits(spec.options, ops.q, ops.k.transpose(1, 2, 0), ops.bias)
        visible = bm.grouped(blocks.block_mask(0, 0, ops.mask), *ops.q.shape[:2])
        weights, _ = _core.softmax_with_lse(s, visible)
        out = jnp.einsum("kgqc,ckd->kgqd", weights.astype(ops.v.dtype), ops.v, preferred_element_type=s.dtype)
        return out.astype(ops.v.dtype)

    return over_batch(one_example, ops.q.shape[0], ops)
