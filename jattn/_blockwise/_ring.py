"""Ring attention: the kernel's passes over a sequence split across the devices of a mesh axis.

Runs inside a ``shard_map``: each device holds its query shard and passes its
K/V shard to the next device ``P - 1`` times, so every query shard meets every
K/V shard once and no device ever holds more than one K/V shard.

* forward: partial ``(out, lse)`` of each (query shard, K/V shard) pair merged
  by log-sum-exp;
* tangent (forward mode): the K/V tangents travel with K/V; given the final
  ``out`` and ``lse`` each pair's tangent is a sum term (see ``_tangent``);
* backward: given the final ``out`` and ``lse`` each pair's gradients are sum
  terms too; dQ stays home, dK/dV accumulators travel with their K/V shard and
  arrive home after one lap: ``P - 1`` K/V and ``P - 1`` dK/dV transfers.

Each (query shard, K/V shard) pair is one call of the single-device pass
(``_pairs``); a pair no query of which sees a key does no work.

Operands here are the caller's 4-D layout, per device: q ``(batch, q_local,
heads, dim)``, k/v ``(batch, kv_local, kv_heads, x)``, bias/mask ``(batch|1,
heads|1, q_local|1, kv_seq|1)``, per-example lengths (global) and segment ids
(local). Results: ``(batch, q_local, heads, v_dim)`` and ``(batch, q_local,
heads)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _numerics
from ._backward import Grads, Wanted
from ._layout import Operands
from ._pairs import (
    add_at_chunk,
    add_kv_side,
    add_logits,
    at_chunk,
    kv_payload,
    kv_side,
    merge,
    over_pairs,
    padded_logits,
    pair_operands,
    query_side,
    rows_from_kernel,
    rows_to_kernel,
    set_at_chunk,
)
from ._ring_layout import Ring, source
from ._tangent import Tangents


def _send(ring: Ring, tree):
    """Every device passes ``tree`` to the next one along the ring."""
    perm = [(i, (i + 1) % ring.shards) for i in range(ring.shards)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis, perm), tree)


# ---------------------------------------------------------------- the three passes
# Accumulators stay in the kernel's layout, per query chunk, until the last step.


def ring_forward(spec, ops: Operands, pass_fn: Callable) -> tuple[Array, Array]:
    """``(out, lse)`` of the local queries over every K/V shard; ``pass_fn`` is ``forward`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    queries = query_side(ring, pair_spec, ops)

    def visit(t, kv, acc):
        def chunk_pair(pair, acc):
            def compute():
                partial = pass_fn(pair_spec, pair_operands(pair, pair_spec, ops, queries, kv))
                out, lse = merge((at_chunk(acc[0], pair.a), at_chunk(acc[1], pair.a)), partial)
                return set_at_chunk(acc[0], pair.a, out), set_at_chunk(acc[1], pair.a, lse)

            return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

        return over_pairs(ring, ops, source(ring, t), chunk_pair, acc)

    def step(t, carry):
        kv, acc = carry
        return _send(ring, kv), visit(t, kv, acc)  # the next shard's transfer does not wait for this one

    rows = queries.q.shape[:5]
    # The output accumulates in the softmax dtype: each pair's output (in v's dtype) is merged once.
    empty = (jnp.zeros((*rows, ops.v.shape[-1]), _acc(ops)), jnp.full(rows, _numerics.masked_value(_acc(ops))))
    kv, acc = lax.fori_loop(0, ring.shards - 1, step, (kv_payload(ops), empty))
    out, lse = visit(ring.shards - 1, kv, acc)
    return rows_from_kernel(out, pair_spec).astype(ops.v.dtype), rows_from_kernel(lse, pair_spec)


def _acc(ops: Operands):
    return _numerics.compute_dtype(ops.q.dtype)


def ring_tangent(spec, ops: Operands, out, lse, tangents: Tangents, *, pass_fn: Callable) -> tuple[Array, Array]:
    """``(dout, dlse)``: the tangents of K/V travel with K/V; ``pass_fn`` is ``tangent`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads = ops.k.shape[2]
    queries = query_side(ring, pair_spec, ops)
    out_k, lse_k = (rows_to_kernel(x, ring, pair_spec, kv_heads) for x in (out, lse))
    dq = None if tangents.q is None else rows_to_kernel(tangents.q, ring, pair_spec, kv_heads)

    def visit(t, payload, acc):
        kv, (dk, dv) = payload[:3], payload[3:]

        def chunk_pair(pair, acc):
            def compute():
                pair_tangents = Tangents(
                    q=None if dq is None else at_chunk(dq, pair.a),
                    k=kv_side(pair, pair_spec, dk),
                    v=kv_side(pair, pair_spec, dv),
                    bias=padded_logits(pair, pair_spec, tangents.bias),
                    consts=tangents.consts,  # what a score_mod captured: the same on every pair
                )
                rows = (at_chunk(out_k, pair.a), at_chunk(lse_k, pair.a))
                d_out, d_lse = pass_fn(
                    pair_spec, pair_operands(pair, pair_spec, ops, queries, kv), *rows, pair_tangents
                )
                return add_at_chunk(acc[0], pair.a, d_out), add_at_chunk(acc[1], pair.a, d_lse)

            return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

        return over_pairs(ring, ops, source(ring, t), chunk_pair, acc)

    def step(t, carry):
        payload, acc = carry
        return _send(ring, payload), visit(t, payload, acc)

    zeros = (jnp.zeros(out_k.shape, _acc(ops)), jnp.zeros(lse_k.shape, lse_k.dtype))
    payload = (*kv_payload(ops), tangents.k, tangents.v)
    payload, acc = lax.fori_loop(0, ring.shards - 1, step, (payload, zeros))
    d_out, d_lse = visit(ring.shards - 1, payload, acc)
    return rows_from_kernel(d_out, pair_spec).astype(out.dtype), rows_from_kernel(d_lse, pair_spec)


def ring_backward(spec, ops: Operands, out, lse, dout, *, dlse, want: Wanted, pass_fn: Callable) -> Grads:
    """Gradients: dQ (and dbias) stay home, dK/dV travel with their K/V shard.

    ``pass_fn`` is ``backward`` or its dense twin.
    """
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads = ops.k.shape[2]
    acc_dtype = _acc(ops)
    queries = query_side(ring, pair_spec, ops)
    rows = [rows_to_kernel(x, ring, pair_spec, kv_heads) for x in (out, lse, dout, dlse)]

    def visit(t, kv, home, dkv):
        """Adds this device's pairs with K/V shard ``me - t``: dQ (and dbias, and the gradients of what a
        score_mod captured) into ``home``, dK/dV into ``dkv``."""

        def chunk_pair(pair, carry):
            def compute():
                (dq, dbias, dconsts), (dk, dv) = carry
                pair_rows = [at_chunk(x, pair.a) for x in rows]
                operands = pair_operands(pair, pair_spec, ops, queries, kv)
                out_p, lse_p, dout_p, dlse_p = pair_rows
                grads = pass_fn(pair_spec, operands, out_p, lse_p, dout_p, dlse=dlse_p, want=want)
                dq = add_at_chunk(dq, pair.a, grads.q)
                dbias = None if dbias is None else add_logits(dbias, pair, grads.bias)
                dconsts = tuple(a + g.astype(a.dtype) for a, g in zip(dconsts, grads.consts, strict=True))
                return (dq, dbias, dconsts), (add_kv_side(dk, pair, grads.k), add_kv_side(dv, pair, grads.v))

            return lax.cond(pair.visible(ops.opts), compute, lambda: carry)

        return over_pairs(ring, ops, source(ring, t), chunk_pair, (home, dkv))

    dbias0 = None if not want.bias or ops.bias is None else jnp.zeros((ops.q.shape[0], *ops.bias.shape[1:]), acc_dtype)
    wanted = (c for c, w in zip(ops.opts.shared.score_consts, want.consts, strict=True) if w)
    dconsts0 = tuple(jnp.zeros((ops.q.shape[0], *c.shape[1:]), acc_dtype) for c in wanted)  # per example
    home = (jnp.zeros(queries.q.shape, acc_dtype), dbias0, dconsts0)
    local = kv_payload(ops)
    dkv = (jnp.zeros(ops.k.shape, acc_dtype), jnp.zeros(ops.v.shape, acc_dtype))
    if ring.shards > 1:

        def step(t, carry):
            kv, travelling, home = carry
            after = _send(ring, kv)  # the next shard's transfer does not wait for this pair
            home, travelling = visit(t, kv, home, travelling)
            return after, _send(ring, travelling), home

        # Shard me - t is met at step t; its dK/dV accumulator starts on its first visit (t = 1, no
        # transfer) and reaches home with the last step's transfer: P - 1 K/V and P - 1 dK/dV transfers.
        # The local pair comes last and adds into what arrived.
        kv, travelling, home = lax.fori_loop(1, ring.shards - 1, step, (_send(ring, local), dkv, home))
        home, travelling = visit(ring.shards - 1, kv, home, travelling)
        dkv = _send(ring, travelling)
    (dq, dbias, dconsts), (dk, dv) = visit(0, local, home, dkv)
    dq = rows_from_kernel(dq, pair_spec)
    return Grads(dq.astype(ops.q.dtype), dk.astype(ops.k.dtype), dv.astype(ops.v.dtype), dbias, None, dconsts)
