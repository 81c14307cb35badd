"""The pairs of a ring pass: one device's query shard against one K/V shard, as single-device kernel calls.

A pair is one call of a single-device pass on the two shards, with positions
made global: causal and window masks see the query at ``q_start - kv_start``
(the kernel's query offset), lengths are clipped to each shard, and a dense
mask or bias (rows of the local queries, columns of the whole sequence) is
sliced to the K/V shard's columns. With the zigzag layout (``chunks=2``) a
shard holds two chunks of the sequence far apart; a pair is then four chunk
pairs, run as four examples. :func:`visited_blocks` counts the block pairs
each device visits (the load balance of a layout).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from .. import _core
from .._options import AttentionOptions, ExampleArrays, StaticOptions
from .._tiling import SKIP, Grid, fitted_block
from ._geometry import ExampleBlocks
from ._layout import Operands, pad_logits_operand


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


def pair_at(ring: Ring, ops: Operands, src) -> Pair:
    batch, q_local = ops.q.shape[:2]
    kv_local = ops.k.shape[1]
    return Pair(ring, batch, q_local // ring.chunks, kv_local // ring.chunks, lax.axis_index(ring.axis), src)


def source(ring: Ring, t):
    """The K/V shard a device holds at ring step ``t``."""
    return (lax.axis_index(ring.axis) - t) % ring.shards


class QuerySide(NamedTuple):
    """What every pair of a device shares (computed once per pass): its queries in the kernel layout."""

    q: Array  # (examples, kv_heads, groups, q_padded, dim)
    q_segment_ids: Array | None  # (examples, q_padded), padded with the edge id


def query_side(pair: Pair, spec, ops: Operands) -> QuerySide:
    ids = ops.opts.arrays.q_segment_ids
    if ids is not None:
        ids = jnp.pad(pair.q_rows(ids), ((0, 0), (0, spec.grid.q_padded - spec.grid.q_seq)), mode="edge")
    return QuerySide(rows_to_kernel(ops.q, pair, spec, ops.k.shape[2]), ids)


def pair_operands(pair: Pair, spec, ops: Operands, queries: QuerySide, kv: tuple) -> Operands:
    """The pair as kernel :class:`Operands` for the single-device passes (K/V padded to the grid if needed)."""
    k, v, kv_ids = kv
    grid = spec.grid
    opts = pair.options(ops.opts)
    arrays = opts.arrays._replace(
        q_segment_ids=queries.q_segment_ids,
        kv_segment_ids=None if kv_ids is None else kv_side(pair, spec, kv_ids, "edge"),
    )
    return Operands(
        queries.q,
        kv_side(pair, spec, k),
        kv_side(pair, spec, v),
        pad_logits_operand(pair.logits_operand(ops.bias), grid, 0),
        pad_logits_operand(pair.logits_operand(ops.mask), grid, False),
        opts.with_arrays(arrays),
    )


def kv_side(pair: Pair, spec, x: Array | None, mode: str = "constant") -> Array | None:
    """A ``(batch, kv_local, ...)`` K/V-side array as the pair's examples, padded to the grid."""
    if x is None:
        return None
    x = pair.kv_rows(x)
    pad_kv = spec.grid.kv_padded - spec.grid.kv_seq
    return x if pad_kv == 0 else jnp.pad(x, ((0, 0), (0, pad_kv)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def rows_to_kernel(x: Array, pair: Pair, spec, kv_heads: int) -> Array:
    """A ``(batch, q_local, heads[, x])`` query-side array in the pair kernel's layout,
    ``(examples, kv_heads, groups, q_padded[, x])``."""
    x = pair.q_rows(x)
    b, q, heads = x.shape[:3]
    x = x.reshape(b, q, kv_heads, heads // kv_heads, *x.shape[3:])
    x = jnp.moveaxis(x, 1, 3)
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, spec.grid.q_padded - q)
    return jnp.pad(x, pad)


def rows_from_kernel(x: Array, spec) -> Array:
    """Inverse of :func:`_rows_to_kernel` (before the chunk sum): ``(examples, kv_heads, groups, q_padded[, x])``
    -> ``(examples, q_chunk, heads[, x])``."""
    b, kv_heads, groups = x.shape[:3]
    x = jnp.moveaxis(x[:, :, :, : spec.grid.q_seq], 3, 1)
    return x.reshape(b, spec.grid.q_seq, kv_heads * groups, *x.shape[4:])


def kv_payload(ops: Operands) -> tuple:
    return ops.k, ops.v, ops.opts.arrays.kv_segment_ids


def padded_logits(pair: Pair, pair_spec, x: Array) -> Array:
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


def merge_chunks(pair: Pair, out: Array, lse: Array) -> tuple[Array, Array]:
    """Per-example ``(out, lse)`` merged over each query chunk's K/V chunks into ``(batch, q_local, ...)``."""
    if pair.n == 1:
        return out, lse
    out = out.reshape(pair.batch, pair.n, pair.n, *out.shape[1:])
    lse = lse.reshape(pair.batch, pair.n, pair.n, *lse.shape[1:])
    out, lse = merge((out[:, :, 0], lse[:, :, 0]), (out[:, :, 1], lse[:, :, 1]))
    return out.reshape(pair.batch, -1, *out.shape[3:]), lse.reshape(pair.batch, -1, lse.shape[-1])


def visited_blocks(
    static: StaticOptions, ring: Ring, q_seq: int, kv_seq: int, block_q: int, block_kv: int
) -> np.ndarray:
    """Block pairs each device's kernel visits over a ring pass ``(shards,)``, from the causal and window
    masks (what the pair kernels' geometry visits, skipped pairs included as zero)."""
    n = ring.chunks
    q_chunk, kv_chunk = q_seq // (ring.shards * n), kv_seq // (ring.shards * n)
    grid = Grid(q_chunk, kv_chunk, fitted_block(q_chunk, block_q), fitted_block(kv_chunk, block_kv))
    blocks = jnp.stack(
        jnp.meshgrid(*(jnp.arange(n, dtype=jnp.int32) for n in (grid.num_q_blocks, grid.num_kv_blocks)), indexing="ij"),
        -1,
    ).reshape(-1, 2)
    opts = AttentionOptions(static, ExampleArrays(q_offset=jnp.zeros((1,), jnp.int32)))

    @jax.jit
    def count(me, src):
        pair = Pair(ring, 1, q_chunk, kv_chunk, me, src)
        pair_opts = pair.options(opts)

        def example(arrays):
            geometry = ExampleBlocks(pair_opts.with_arrays(arrays), grid, None, 0, 1, 1)
            kinds = jax.vmap(lambda b: geometry.kind(b[0], b[1]))(blocks)
            return (kinds != SKIP).sum()

        visited = jax.vmap(example, axis_size=n * n)(pair_opts.arrays).sum()
        return jnp.where(pair.visible(opts), visited, 0)

    me, t = np.meshgrid(np.arange(ring.shards), np.arange(ring.shards), indexing="ij")
    per_step = jax.vmap(count)(*(jnp.asarray(x.ravel(), jnp.int32) for x in (me, (me - t) % ring.shards)))
    return np.asarray(per_step).reshape(ring.shards, ring.shards).sum(axis=1)
