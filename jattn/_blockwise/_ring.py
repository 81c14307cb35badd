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

from .. import _core
from ._backward import Grads, Wanted
from ._layout import Operands
from ._pairs import (
    Ring,
    kv_payload,
    kv_side,
    merge,
    merge_chunks,
    padded_logits,
    pair_at,
    pair_operands,
    query_side,
    rows_from_kernel,
    rows_to_kernel,
    source,
)
from ._tangent import Tangents


def _send(ring: Ring, tree):
    """Every device passes ``tree`` to the next one along the ring."""
    perm = [(i, (i + 1) % ring.shards) for i in range(ring.shards)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis, perm), tree)


# ---------------------------------------------------------------- the three passes
# Accumulators stay in the pair kernel's layout (one example per chunk pair) until the last step.


def ring_forward(spec, ops: Operands, pass_fn: Callable) -> tuple[Array, Array]:
    """``(out, lse)`` of the local queries over every K/V shard; ``pass_fn`` is ``forward`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    first = pair_at(ring, ops, 0)
    queries = query_side(first, pair_spec, ops)

    def visit(t, kv, acc):
        pair = pair_at(ring, ops, source(ring, t))

        def compute():
            return merge(acc, pass_fn(pair_spec, pair_operands(pair, pair_spec, ops, queries, kv)))

        return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

    def step(t, carry):
        kv, acc = carry
        return _send(ring, kv), visit(t, kv, acc)  # the next shard's transfer does not wait for this one

    rows = queries.q.shape[:4]
    # The output accumulates in the softmax dtype: each pair's output (in v's dtype) is merged once.
    empty = (jnp.zeros((*rows, ops.v.shape[-1]), _acc(ops)), jnp.full(rows, _core.masked_value(_acc(ops))))
    kv, acc = lax.fori_loop(0, ring.shards - 1, step, (kv_payload(ops), empty))
    out, lse = visit(ring.shards - 1, kv, acc)
    out, lse = merge_chunks(first, rows_from_kernel(out, pair_spec), rows_from_kernel(lse, pair_spec))
    return out.astype(ops.v.dtype), lse


def _acc(ops: Operands):
    return _core.compute_dtype(ops.q.dtype)


def ring_tangent(spec, ops: Operands, out, lse, tangents: Tangents, pass_fn: Callable) -> tuple[Array, Array]:
    """``(dout, dlse)``: the tangents of K/V travel with K/V; ``pass_fn`` is ``tangent`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads = ops.k.shape[2]
    first = pair_at(ring, ops, 0)
    queries = query_side(first, pair_spec, ops)
    out_k, lse_k = (rows_to_kernel(x, first, pair_spec, kv_heads) for x in (out, lse))
    dq = None if tangents.q is None else rows_to_kernel(tangents.q, first, pair_spec, kv_heads)

    def visit(t, payload, acc):
        kv, (dk, dv) = payload[:3], payload[3:]
        pair = pair_at(ring, ops, source(ring, t))

        def compute():
            pair_ops = pair_operands(pair, pair_spec, ops, queries, kv)
            pair_tangents = Tangents(
                q=dq,
                k=kv_side(pair, pair_spec, dk),
                v=kv_side(pair, pair_spec, dv),
                bias=None if tangents.bias is None else padded_logits(pair, pair_spec, tangents.bias),
            )
            d_out, d_lse = pass_fn(pair_spec, pair_ops, out_k, lse_k, pair_tangents)
            return acc[0] + d_out.astype(acc[0].dtype), acc[1] + d_lse

        return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

    def step(t, carry):
        payload, acc = carry
        return _send(ring, payload), visit(t, payload, acc)

    zeros = (jnp.zeros(out_k.shape, _acc(ops)), jnp.zeros(lse_k.shape, lse_k.dtype))
    payload = (*kv_payload(ops), tangents.k, tangents.v)
    payload, acc = lax.fori_loop(0, ring.shards - 1, step, (payload, zeros))
    d_out, d_lse = visit(ring.shards - 1, payload, acc)
    d_out = first.q_sum(rows_from_kernel(d_out, pair_spec))
    return d_out.astype(out.dtype), first.q_sum(rows_from_kernel(d_lse, pair_spec))


def ring_backward(spec, ops: Operands, out, lse, dout, dlse, *, want: Wanted, pass_fn: Callable) -> Grads:
    """Gradients: dQ (and dbias) stay home, dK/dV travel with their K/V shard.

    ``pass_fn`` is ``backward`` or its dense twin.
    """
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads, kv_local = ops.k.shape[2], ops.k.shape[1]
    acc_dtype = _acc(ops)
    first = pair_at(ring, ops, 0)
    queries = query_side(first, pair_spec, ops)
    rows = [rows_to_kernel(x, first, pair_spec, kv_heads) for x in (out, lse, dout, dlse)]

    def visit(t, kv, home):
        """Adds the pair with K/V shard ``me - t`` into ``home`` (dQ, dbias); returns it and that shard's dK/dV."""
        pair = pair_at(ring, ops, source(ring, t))
        dkv_zero = (jnp.zeros(ops.k.shape, acc_dtype), jnp.zeros(ops.v.shape, acc_dtype))

        def compute():
            grads = pass_fn(pair_spec, pair_operands(pair, pair_spec, ops, queries, kv), *rows, want=want)
            dk = pair.kv_sum(grads.k[:, : pair.kv_chunk].astype(acc_dtype))
            dv = pair.kv_sum(grads.v[:, : pair.kv_chunk].astype(acc_dtype))
            dq_home, dbias_home = home
            if dbias_home is not None:
                d = grads.bias
                d = d[:, :, : pair_spec.grid.q_seq if d.shape[2] > 1 else 1, : pair.kv_chunk if d.shape[3] > 1 else 1]
                d = pair.logits_sum(d, ops.bias)
                if dbias_home.shape[3] > 1:
                    start = pair.src * kv_local
                    current = lax.dynamic_slice_in_dim(dbias_home, start, kv_local, axis=3)
                    dbias_home = lax.dynamic_update_slice_in_dim(dbias_home, current + d, start, axis=3)
                else:
                    dbias_home = dbias_home + d
            return (dq_home + grads.q.astype(acc_dtype), dbias_home), (dk, dv)

        return lax.cond(pair.visible(ops.opts), compute, lambda: (home, dkv_zero))

    dbias0 = None if not want.bias else jnp.zeros((ops.q.shape[0], *ops.bias.shape[1:]), acc_dtype)
    home = (jnp.zeros(queries.q.shape, acc_dtype), dbias0)
    local = kv_payload(ops)
    dk = dv = 0
    if ring.shards > 1:

        def step(t, carry):
            kv, travelling, home = carry
            after = _send(ring, kv)  # the next shard's transfer does not wait for this pair
            home, dkv = visit(t, kv, home)
            return after, _send(ring, jax.tree.map(jnp.add, travelling, dkv)), home

        # Shard me - t is met at step t; its dK/dV accumulator starts on its first visit (t = 1, no
        # transfer) and reaches home with the last step's transfer: P - 1 K/V and P - 1 dK/dV transfers.
        # The local pair comes last, so its dK/dV are not held through the loop.
        travelling = (jnp.zeros(ops.k.shape, acc_dtype), jnp.zeros(ops.v.shape, acc_dtype))
        kv, travelling, home = lax.fori_loop(1, ring.shards - 1, step, (_send(ring, local), travelling, home))
        home, dkv = visit(ring.shards - 1, kv, home)
        dk, dv = _send(ring, jax.tree.map(jnp.add, travelling, dkv))
    home, (dk_local, dv_local) = visit(0, local, home)
    dq, dbias = home
    dq = first.q_sum(rows_from_kernel(dq, pair_spec))
    return Grads(
        dq.astype(ops.q.dtype),
        (dk + dk_local).astype(ops.k.dtype),
        (dv + dv_local).astype(ops.v.dtype),
        dbias,
        None,
        (),
    )
