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

A pair is one call of the single-device pass on the two shards, with positions
made global: causal and window masks see the query at ``q_start - kv_start``
(the kernel's query offset), lengths are clipped to each shard, and a dense
mask or bias (rows of the local queries, columns of the whole sequence) is
sliced to the K/V shard's columns. A pair no query of which sees a key does
no work. With the zigzag layout (``chunks=2``) a shard holds two chunks of the
sequence far apart; a pair is then four chunk pairs, run as four examples.

Operands here are the caller's 4-D layout, per device: q ``(batch, q_local,
heads, dim)``, k/v ``(batch, kv_local, kv_heads, x)``, bias/mask ``(batch|1,
heads|1, q_local|1, kv_seq|1)``, per-example lengths (global) and segment ids
(local). Results: ``(batch, q_local, heads, v_dim)`` and ``(batch, q_local,
heads)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _core
from .._options import AttentionOptions
from ._backward import Grads, Wanted
from ._layout import Operands, pad_logits_operand
from ._tangent import Tangents


@dataclasses.dataclass(frozen=True)
class Ring:
    """A sequence-parallel call (static): the mesh axis the sequence is split over and how.

    ``chunks`` is 1 for the contiguous layout (device ``i`` holds positions
    ``[i L, (i + 1) L)``) and 2 for zigzag (chunks ``i`` and ``2P - 1 - i`` of
    ``2P``, see ``jattn.sharding.zigzag``).
    """

    axis: str
    shards: int
    chunks: int = 1


# ---------------------------------------------------------------- positions


def chunk_starts(ring: Ring, shard, chunk_len: int) -> list:
    """Global position of the first element of each local chunk of ``shard``."""
    if ring.chunks == 1:
        return [shard * chunk_len]
    return [shard * chunk_len, (2 * ring.shards - 1 - shard) * chunk_len]


def _send(ring: Ring, tree):
    """Every device passes ``tree`` to the next one along the ring."""
    perm = [(i, (i + 1) % ring.shards) for i in range(ring.shards)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis, perm), tree)


# ---------------------------------------------------------------- one pair


@dataclasses.dataclass(frozen=True)
class Pair:
    """The (query shard, K/V shard) pair a device works on at one ring step, as kernel examples.

    Example ``(b, a, c)`` (flattened in that order) is query chunk ``a``
    against K/V chunk ``c`` of example ``b``.
    """

    ring: Ring
    batch: int
    q_chunk: int  # chunk lengths (the pair kernel's sequences)
    kv_chunk: int
    me: Array  # this device's shard index
    src: Array  # the K/V shard's index

    @property
    def n(self) -> int:
        return self.ring.chunks

    def q_rows(self, x: Array) -> Array:
        """``(batch, q_local, ...)`` -> ``(batch * n * n, q_chunk, ...)``: each example's query chunk."""
        if self.n == 1:
            return x
        x = x.reshape(self.batch, self.n, 1, self.q_chunk, *x.shape[2:])
        x = jnp.broadcast_to(x, (self.batch, self.n, self.n, *x.shape[3:]))
        return x.reshape(-1, *x.shape[3:])

    def kv_rows(self, x: Array) -> Array:
        """``(batch, kv_local, ...)`` -> ``(batch * n * n, kv_chunk, ...)``: each example's K/V chunk."""
        if self.n == 1:
            return x
        x = x.reshape(self.batch, 1, self.n, self.kv_chunk, *x.shape[2:])
        x = jnp.broadcast_to(x, (self.batch, self.n, self.n, *x.shape[3:]))
        return x.reshape(-1, *x.shape[3:])

    def q_sum(self, x: Array) -> Array:
        """Per-example query-side results back to ``(batch, q_local, ...)``, summed over K/V chunks."""
        if self.n == 1:
            return x
        x = x.reshape(self.batch, self.n, self.n, *x.shape[1:]).sum(axis=2)
        return x.reshape(self.batch, self.n * self.q_chunk, *x.shape[3:])

    def kv_sum(self, x: Array) -> Array:
        """Per-example K/V-side results back to ``(batch, kv_local, ...)``, summed over query chunks."""
        if self.n == 1:
            return x
        x = x.reshape(self.batch, self.n, self.n, *x.shape[1:]).sum(axis=1)
        return x.reshape(self.batch, self.n * self.kv_chunk, *x.shape[3:])

    def starts(self) -> tuple[Array, Array]:
        """Global first positions of each example's query and K/V chunks, ``(batch * n * n,)`` each."""
        q0 = jnp.stack(chunk_starts(self.ring, self.me, self.q_chunk)).astype(jnp.int32)
        k0 = jnp.stack(chunk_starts(self.ring, self.src, self.kv_chunk)).astype(jnp.int32)
        shape = (self.batch, self.n, self.n)
        q0 = jnp.broadcast_to(q0[None, :, None], shape).reshape(-1)
        k0 = jnp.broadcast_to(k0[None, None, :], shape).reshape(-1)
        return q0, k0

    def logits_operand(self, x: Array | None) -> Array | None:
        """The pair's block of a ``(batch|1, heads|1, q_local|1, kv_seq|1)`` bias or mask."""
        if x is None:
            return None
        kv_local = self.n * self.kv_chunk
        if x.shape[3] > 1:  # columns are the whole sequence's, in storage order
            x = lax.dynamic_slice_in_dim(x, self.src * kv_local, kv_local, axis=3)
        if self.n == 1:
            return x
        b, h, tq, tk = x.shape
        nq, nk = (self.n if tq > 1 else 1), (self.n if tk > 1 else 1)
        x = x.reshape(b, h, nq, tq // nq, nk, tk // nk).transpose(0, 2, 4, 1, 3, 5)
        x = jnp.broadcast_to(x, (self.batch if b > 1 or self.n > 1 else 1, self.n, self.n, *x.shape[3:]))
        return x.reshape(-1, *x.shape[3:])

    def logits_sum(self, d: Array, like: Array) -> Array:
        """A per-example dbias of the pair back to ``(batch, heads|1, q_local|1, kv_local|1)`` (``like``'s)."""
        if self.n == 1:
            return d
        _, h, tq, tk = like.shape
        nq, nk = (self.n if tq > 1 else 1), (self.n if tk > 1 else 1)
        d = d.reshape(self.batch, self.n, self.n, *d.shape[1:])
        d = d if nq > 1 else d.sum(axis=1, keepdims=True)
        d = d if nk > 1 else d.sum(axis=2, keepdims=True)
        return d.transpose(0, 3, 1, 4, 2, 5).reshape(self.batch, h, tq, nk * d.shape[-1] if nk > 1 else 1)

    def options(self, opts: AttentionOptions) -> AttentionOptions:
        """The pair's per-example query offsets and lengths clipped to its chunks (segment ids: the caller's)."""
        static, arrays = opts.static, opts.arrays
        q0, k0 = self.starts()
        per_example = self.n * self.n

        def expand(x):  # (batch,) -> (batch * n * n,)
            return x if per_example == 1 else jnp.repeat(x, per_example)

        offset = None
        if static.is_causal or static.local_window_size is not None:
            base = 0 if arrays.q_offset is None else expand(arrays.q_offset)
            offset = (base + q0 - k0).astype(jnp.int32)
        q_length = None if arrays.q_length is None else jnp.clip(expand(arrays.q_length) - q0, 0, self.q_chunk)
        kv_length = None if arrays.kv_length is None else jnp.clip(expand(arrays.kv_length) - k0, 0, self.kv_chunk)
        return opts.with_arrays(arrays._replace(q_length=q_length, kv_length=kv_length, q_offset=offset))

    def visible(self, opts: AttentionOptions) -> Array:
        """Whether any query of the pair may see any key, from causal, window and lengths (a bool scalar).

        Conservative: a pair it calls visible may still see nothing (the kernel then skips its blocks).
        """
        static, arrays = opts.static, opts.arrays
        q0, k0 = self.starts()
        per_example = self.n * self.n
        first = q0 if arrays.q_offset is None else q0 + jnp.repeat(arrays.q_offset, per_example)
        last = first + self.q_chunk - 1  # query positions [first, last], keys [k0, k_last]
        k_last = k0 + self.kv_chunk - 1
        seen = jnp.ones(q0.shape, bool)
        if static.is_causal:
            seen &= k0 <= last
        if static.local_window_size is not None:
            left, right = static.local_window_size
            seen &= (k0 <= last + right) & (k_last >= first - left)
        if arrays.q_length is not None:
            seen &= jnp.repeat(arrays.q_length, per_example) > q0
        if arrays.kv_length is not None:
            seen &= jnp.repeat(arrays.kv_length, per_example) > k0
        return seen.any()


def _pair(ring: Ring, ops: Operands, src) -> Pair:
    batch, q_local = ops.q.shape[:2]
    kv_local = ops.k.shape[1]
    return Pair(ring, batch, q_local // ring.chunks, kv_local // ring.chunks, lax.axis_index(ring.axis), src)


def _source(ring: Ring, t):
    """The K/V shard a device holds at ring step ``t``."""
    return (lax.axis_index(ring.axis) - t) % ring.shards


class QuerySide(NamedTuple):
    """What every pair of a device shares (computed once per pass): its queries in the kernel layout."""

    q: Array  # (examples, kv_heads, groups, q_padded, dim)
    q_segment_ids: Array | None  # (examples, q_padded), padded with the edge id


def _query_side(pair: Pair, spec, ops: Operands) -> QuerySide:
    ids = ops.opts.arrays.q_segment_ids
    if ids is not None:
        ids = jnp.pad(pair.q_rows(ids), ((0, 0), (0, spec.grid.q_padded - spec.grid.q_seq)), mode="edge")
    return QuerySide(_rows_to_kernel(ops.q, pair, spec, ops.k.shape[2]), ids)


def _pair_operands(pair: Pair, spec, ops: Operands, queries: QuerySide, kv: tuple) -> Operands:
    """The pair as kernel :class:`Operands` for the single-device passes (K/V padded to the grid if needed)."""
    k, v, kv_ids = kv
    grid = spec.grid
    opts = pair.options(ops.opts)
    arrays = opts.arrays._replace(
        q_segment_ids=queries.q_segment_ids,
        kv_segment_ids=None if kv_ids is None else _kv_side(pair, spec, kv_ids, "edge"),
    )
    return Operands(
        queries.q,
        _kv_side(pair, spec, k),
        _kv_side(pair, spec, v),
        pad_logits_operand(pair.logits_operand(ops.bias), grid, 0),
        pad_logits_operand(pair.logits_operand(ops.mask), grid, False),
        opts.with_arrays(arrays),
    )


def _kv_side(pair: Pair, spec, x: Array | None, mode: str = "constant") -> Array | None:
    """A ``(batch, kv_local, ...)`` K/V-side array as the pair's examples, padded to the grid."""
    if x is None:
        return None
    x = pair.kv_rows(x)
    pad_kv = spec.grid.kv_padded - spec.grid.kv_seq
    return x if pad_kv == 0 else jnp.pad(x, ((0, 0), (0, pad_kv)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def _rows_to_kernel(x: Array, pair: Pair, spec, kv_heads: int) -> Array:
    """A ``(batch, q_local, heads[, x])`` query-side array in the pair kernel's layout,
    ``(examples, kv_heads, groups, q_padded[, x])``."""
    x = pair.q_rows(x)
    b, q, heads = x.shape[:3]
    x = x.reshape(b, q, kv_heads, heads // kv_heads, *x.shape[3:])
    x = jnp.moveaxis(x, 1, 3)
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, spec.grid.q_padded - q)
    return jnp.pad(x, pad)


def _rows_from_kernel(x: Array, spec) -> Array:
    """Inverse of :func:`_rows_to_kernel` (before the chunk sum): ``(examples, kv_heads, groups, q_padded[, x])``
    -> ``(examples, q_chunk, heads[, x])``."""
    b, kv_heads, groups = x.shape[:3]
    x = jnp.moveaxis(x[:, :, :, : spec.grid.q_seq], 3, 1)
    return x.reshape(b, spec.grid.q_seq, kv_heads * groups, *x.shape[4:])


def _kv_payload(ops: Operands) -> tuple:
    return ops.k, ops.v, ops.opts.arrays.kv_segment_ids


def _padded_logits(pair: Pair, pair_spec, x: Array) -> Array:
    return pad_logits_operand(pair.logits_operand(x), pair_spec.grid, 0)


# ---------------------------------------------------------------- merging


def merge(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    """Two partial ``(out, lse)`` over disjoint keys as one; rows no key of either saw keep zeros and the sentinel."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    neg = _core.masked_value(lse_a.dtype)
    seen_a, seen_b = lse_a != neg, lse_b != neg
    top = jnp.maximum(lse_a, lse_b)
    w_a = jnp.where(seen_a, jnp.exp(lse_a - top), 0)
    w_b = jnp.where(seen_b, jnp.exp(lse_b - top), 0)
    total = w_a + w_b
    seen = seen_a | seen_b
    safe = jnp.where(seen, total, 1)
    lse = jnp.where(seen, top + jnp.log(safe), neg)
    out = (w_a / safe)[..., None] * out_a.astype(lse.dtype) + (w_b / safe)[..., None] * out_b.astype(lse.dtype)
    return out.astype(out_a.dtype), lse


def _merge_chunks(pair: Pair, out: Array, lse: Array) -> tuple[Array, Array]:
    """Per-example ``(out, lse)`` merged over each query chunk's K/V chunks into ``(batch, q_local, ...)``."""
    if pair.n == 1:
        return out, lse
    out = out.reshape(pair.batch, pair.n, pair.n, *out.shape[1:])
    lse = lse.reshape(pair.batch, pair.n, pair.n, *lse.shape[1:])
    out, lse = merge((out[:, :, 0], lse[:, :, 0]), (out[:, :, 1], lse[:, :, 1]))
    return out.reshape(pair.batch, -1, *out.shape[3:]), lse.reshape(pair.batch, -1, lse.shape[-1])


# ---------------------------------------------------------------- the three passes
# Accumulators stay in the pair kernel's layout (one example per chunk pair) until the last step.


def ring_forward(spec, ops: Operands, pass_fn: Callable) -> tuple[Array, Array]:
    """``(out, lse)`` of the local queries over every K/V shard; ``pass_fn`` is ``forward`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    first = _pair(ring, ops, 0)
    queries = _query_side(first, pair_spec, ops)

    def visit(t, kv, acc):
        pair = _pair(ring, ops, _source(ring, t))

        def compute():
            return merge(acc, pass_fn(pair_spec, _pair_operands(pair, pair_spec, ops, queries, kv)))

        return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

    def step(t, carry):
        kv, acc = carry
        return _send(ring, kv), visit(t, kv, acc)  # the next shard's transfer does not wait for this one

    rows = queries.q.shape[:4]
    empty = (jnp.zeros((*rows, ops.v.shape[-1]), ops.v.dtype), jnp.full(rows, _core.masked_value(_acc(ops))))
    kv, acc = lax.fori_loop(0, ring.shards - 1, step, (_kv_payload(ops), empty))
    out, lse = visit(ring.shards - 1, kv, acc)
    return _merge_chunks(first, _rows_from_kernel(out, pair_spec), _rows_from_kernel(lse, pair_spec))


def _acc(ops: Operands):
    return _core.compute_dtype(ops.q.dtype)


def ring_tangent(spec, ops: Operands, out, lse, tangents: Tangents, pass_fn: Callable) -> tuple[Array, Array]:
    """``(dout, dlse)``: the tangents of K/V travel with K/V; ``pass_fn`` is ``tangent`` or its dense twin."""
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads = ops.k.shape[2]
    first = _pair(ring, ops, 0)
    queries = _query_side(first, pair_spec, ops)
    out_k, lse_k = (_rows_to_kernel(x, first, pair_spec, kv_heads) for x in (out, lse))
    dq = None if tangents.q is None else _rows_to_kernel(tangents.q, first, pair_spec, kv_heads)

    def visit(t, payload, acc):
        kv, (dk, dv) = payload[:3], payload[3:]
        pair = _pair(ring, ops, _source(ring, t))

        def compute():
            pair_ops = _pair_operands(pair, pair_spec, ops, queries, kv)
            pair_tangents = Tangents(
                q=dq,
                k=_kv_side(pair, pair_spec, dk),
                v=_kv_side(pair, pair_spec, dv),
                bias=None if tangents.bias is None else _padded_logits(pair, pair_spec, tangents.bias),
            )
            d_out, d_lse = pass_fn(pair_spec, pair_ops, out_k, lse_k, pair_tangents)
            return acc[0] + d_out.astype(acc[0].dtype), acc[1] + d_lse

        return lax.cond(pair.visible(ops.opts), compute, lambda: acc)

    def step(t, carry):
        payload, acc = carry
        return _send(ring, payload), visit(t, payload, acc)

    zeros = (jnp.zeros(out_k.shape, _acc(ops)), jnp.zeros(lse_k.shape, lse_k.dtype))
    payload = (*_kv_payload(ops), tangents.k, tangents.v)
    payload, acc = lax.fori_loop(0, ring.shards - 1, step, (payload, zeros))
    d_out, d_lse = visit(ring.shards - 1, payload, acc)
    d_out = first.q_sum(_rows_from_kernel(d_out, pair_spec))
    return d_out.astype(out.dtype), first.q_sum(_rows_from_kernel(d_lse, pair_spec))


def ring_backward(spec, ops: Operands, out, lse, dout, dlse, *, want: Wanted, pass_fn: Callable) -> Grads:
    """Gradients: dQ (and dbias) stay home, dK/dV travel with their K/V shard.

    ``pass_fn`` is ``backward`` or its dense twin.
    """
    ring, pair_spec = spec.ring, dataclasses.replace(spec, ring=None)
    kv_heads, kv_local = ops.k.shape[2], ops.k.shape[1]
    acc_dtype = _acc(ops)
    first = _pair(ring, ops, 0)
    queries = _query_side(first, pair_spec, ops)
    rows = [_rows_to_kernel(x, first, pair_spec, kv_heads) for x in (out, lse, dout, dlse)]

    def visit(t, kv, home):
        """Adds the pair with K/V shard ``me - t`` into ``home`` (dQ, dbias); returns it and that shard's dK/dV."""
        pair = _pair(ring, ops, _source(ring, t))
        dkv_zero = (jnp.zeros(ops.k.shape, acc_dtype), jnp.zeros(ops.v.shape, acc_dtype))

        def compute():
            grads = pass_fn(pair_spec, _pair_operands(pair, pair_spec, ops, queries, kv), *rows, want=want)
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
    local = _kv_payload(ops)
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
    dq = first.q_sum(_rows_from_kernel(dq, pair_spec))
    return Grads(
        dq.astype(ops.q.dtype),
        (dk + dk_local).astype(ops.k.dtype),
        (dv + dv_local).astype(ops.v.dtype),
        dbias,
        None,
        (),
    )
