"""The pairs of a ring pass: one device's query shard against one K/V shard, as single-device kernel calls.

A pair is one call of a single-device pass on the two shards, with positions
made global: causal and window masks see the query at ``q_start - kv_start``
(the kernel's query offset), lengths are clipped to each shard, and a dense
mask or bias (rows of the local queries, columns of the whole sequence) is
sliced to the K/V shard's columns. With the zigzag layout (``chunks=2``) a
shard holds two chunks of the sequence far apart, each contiguous: a pair is
then a loop over four chunk pairs, each one kernel call on slices (nothing is
copied per chunk pair but the slices). :func:`visited_blocks` counts the block
pairs each device visits (the load balance of a layout).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from .. import _numerics
from .._options import AttentionOptions, StaticOptions
from .._tiling import SKIP, Grid, fitted_block
from ..masks._block_mask import block_mask_of
from ._geometry import ExampleBlocks
from ._layout import Operands, pad_logits_operand
from ._ring_layout import Ring, chunk_start, splits_for

# ---------------------------------------------------------------- one chunk pair


@dataclasses.dataclass(frozen=True)
class Pair:
    """Query chunk ``a`` of this device's shard against K/V chunk ``c`` of shard ``src`` (one kernel call)."""

    ring: Ring
    batch: int
    q_chunk: int  # chunk lengths (the pair kernel's sequences)
    kv_chunk: int
    me: Array  # this device's shard index
    src: Array  # the K/V shard's index
    a: Array | int = 0
    c: Array | int = 0

    @property
    def q0(self):
        return jnp.asarray(chunk_start(self.ring, self.me, self.a, self.q_chunk), jnp.int32)

    @property
    def k0(self):
        return jnp.asarray(chunk_start(self.ring, self.src, self.c, self.kv_chunk), jnp.int32)

    def kv_rows(self, x: Array) -> Array:
        """K/V chunk ``c`` of a ``(batch, kv_local, ...)`` array."""
        if self.ring.parts == 1:
            return x
        return lax.dynamic_slice_in_dim(x, self.c * self.kv_chunk, self.kv_chunk, axis=1)

    def logits_operand(self, x: Array | None) -> Array | None:
        """The pair's block of a ``(batch|1, heads|1, q_local|1, kv_seq|1)`` bias or mask (columns: the whole
        sequence's, in storage order)."""
        if x is None:
            return None
        if x.shape[3] > 1:
            start = self.src * self.kv_chunk * self.ring.parts + self.c * self.kv_chunk
            x = lax.dynamic_slice_in_dim(x, start, self.kv_chunk, axis=3)
        if x.shape[2] > 1 and self.ring.parts > 1:
            x = lax.dynamic_slice_in_dim(x, self.a * self.q_chunk, self.q_chunk, axis=2)
        return x

    def options(self, opts: AttentionOptions) -> AttentionOptions:
        """The pair's per-example query offsets and lengths clipped to its chunks (segment ids: the caller's)."""
        static, arrays = opts.static, opts.arrays
        q0, k0 = self.q0, self.k0
        offset = kv_offset = None
        mods = static.score_mod is not None or static.mask_mod is not None
        if static.is_causal or static.local_window_size is not None or mods:
            base = jnp.zeros((self.batch,), jnp.int32) if arrays.q_offset is None else arrays.q_offset
            offset = (base + q0 - k0).astype(jnp.int32)
        if mods:  # the mods see absolute positions: the chunk's queries at q0 (+ base), its keys at k0
            kv_offset = jnp.broadcast_to(k0, (self.batch,)).astype(jnp.int32)
        q_length = None if arrays.q_length is None else jnp.clip(arrays.q_length - q0, 0, self.q_chunk)
        kv_length = None if arrays.kv_length is None else jnp.clip(arrays.kv_length - k0, 0, self.kv_chunk)
        return opts.with_arrays(
            arrays._replace(q_length=q_length, kv_length=kv_length, q_offset=offset, kv_offset=kv_offset)
        )

    def visible(self, opts: AttentionOptions) -> Array:
        """Whether any query of the pair may see any key, from causal, window and lengths (a bool scalar).

        Conservative: a pair it calls visible may still see nothing (the kernel then skips its blocks).
        """
        static, arrays = opts.static, opts.arrays
        first = self.q0 if arrays.q_offset is None else self.q0 + arrays.q_offset
        last = first + self.q_chunk - 1  # query positions [first, last], keys [k0, k_last]
        k_last = self.k0 + self.kv_chunk - 1
        seen = jnp.ones((self.batch,), bool)
        if static.is_causal:
            seen &= self.k0 <= last
        if static.local_window_size is not None:
            left, right = static.local_window_size
            seen &= (self.k0 <= last + right) & (k_last >= first - left)
        if arrays.q_length is not None:
            seen &= arrays.q_length > self.q0
        if arrays.kv_length is not None:
            seen &= arrays.kv_length > self.k0
        return seen.any()


def over_pairs(ring: Ring, ops: Operands, src, body: Callable, carry):
    """``body(pair, carry)`` over the chunk pairs of this device's queries and K/V shard ``src``."""
    batch, q_local = ops.q.shape[:2]
    n = ring.parts
    me = lax.axis_index(ring.axis)

    def pair(a, c):
        return Pair(ring, batch, q_local // n, ops.k.shape[1] // n, me, src, a, c)

    if n == 1:
        return body(pair(0, 0), carry)
    return lax.fori_loop(0, n * n, lambda i, carry: body(pair(i // n, i % n), carry), carry)


# ---------------------------------------------------------------- kernel operands


class QuerySide(NamedTuple):
    """What every pair of a device shares (computed once per pass): its queries in the kernel layout."""

    q: Array  # (chunks, batch, kv_heads, groups, q_padded, dim)
    q_segment_ids: Array | None  # (chunks, batch, q_padded), padded with the edge id


def query_side(ring: Ring, spec, ops: Operands) -> QuerySide:
    ids = ops.opts.arrays.q_segment_ids
    if ids is not None:
        ids = ids.reshape(ids.shape[0], ring.parts, -1).swapaxes(0, 1)
        ids = jnp.pad(ids, ((0, 0), (0, 0), (0, spec.grid.q_padded - spec.grid.q_seq)), mode="edge")
    return QuerySide(rows_to_kernel(ops.q, ring, spec, ops.k.shape[2]), ids)


def rows_to_kernel(x: Array, ring: Ring, spec, kv_heads: int) -> Array:
    """A ``(batch, q_local, heads[, x])`` query-side array per chunk in the kernel's layout,
    ``(chunks, batch, kv_heads, groups, q_padded[, x])``."""
    b, q_local, heads = x.shape[:3]
    x = x.reshape(b, ring.parts, q_local // ring.parts, kv_heads, heads // kv_heads, *x.shape[3:])
    x = jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 4)
    pad = [(0, 0)] * x.ndim
    pad[4] = (0, spec.grid.q_padded - spec.grid.q_seq)
    return jnp.pad(x, pad)


def rows_from_kernel(x: Array, spec) -> Array:
    """Inverse of :func:`rows_to_kernel`: ``(chunks, batch, kv_heads, groups, q_padded[, x])`` ->
    ``(batch, q_local, heads[, x])``."""
    n, b, kv_heads, groups = x.shape[:4]
    x = jnp.moveaxis(jnp.moveaxis(x[:, :, :, :, : spec.grid.q_seq], 4, 2), 0, 1)
    return x.reshape(b, n * spec.grid.q_seq, kv_heads * groups, *x.shape[5:])


def at_chunk(x: Array, a) -> Array:
    """Chunk ``a`` of a per-chunk ``(chunks, ...)`` array."""
    return x[0] if x.shape[0] == 1 else lax.dynamic_index_in_dim(x, a, 0, keepdims=False)


def add_at_chunk(x: Array, a, value: Array) -> Array:
    """``x`` with ``value`` added to its chunk ``a``."""
    if x.shape[0] == 1:
        return x + value[None].astype(x.dtype)
    return lax.dynamic_update_index_in_dim(x, at_chunk(x, a) + value.astype(x.dtype), a, 0)


def set_at_chunk(x: Array, a, value: Array) -> Array:
    return value[None] if x.shape[0] == 1 else lax.dynamic_update_index_in_dim(x, value, a, 0)


def pair_operands(pair: Pair, spec, ops: Operands, queries: QuerySide, kv: tuple) -> Operands:
    """The pair as kernel :class:`Operands` for the single-device passes (K/V padded to the grid if needed)."""
    k, v, kv_ids = kv
    grid = spec.grid
    opts = pair.options(ops.opts)
    arrays = opts.arrays._replace(
        q_segment_ids=None if queries.q_segment_ids is None else at_chunk(queries.q_segment_ids, pair.a),
        kv_segment_ids=None if kv_ids is None else kv_side(pair, spec, kv_ids, "edge"),
    )
    opts = opts.with_arrays(arrays)
    if opts.static.mask_mod is not None and opts.block_mask is None:  # the pair's own summary: it skips blocks
        _, batch, kv_heads, groups = queries.q.shape[:4]
        consts = tuple(c[0] for c in opts.shared.mask_consts)
        offsets = dict(q_offset=arrays.q_offset, kv_offset=arrays.kv_offset)
        summary = block_mask_of(opts.static.mask_mod, consts, batch, kv_heads * groups, grid, **offsets)
        opts = dataclasses.replace(opts, block_mask=summary)
    return Operands(
        at_chunk(queries.q, pair.a),
        kv_side(pair, spec, k),
        kv_side(pair, spec, v),
        padded_logits(pair, spec, ops.bias),
        pad_logits_operand(pair.logits_operand(ops.mask), grid, False),
        opts,
    )


@typing.overload
def kv_side(pair: Pair, spec, x: Array, mode: str = ...) -> Array: ...
@typing.overload
def kv_side(pair: Pair, spec, x: None, mode: str = ...) -> None: ...
def kv_side(pair: Pair, spec, x: Array | None, mode: str = "constant") -> Array | None:
    """K/V chunk ``c`` of a ``(batch, kv_local, ...)`` array, padded to the grid."""
    if x is None:
        return None
    x = pair.kv_rows(x)
    pad_kv = spec.grid.kv_padded - spec.grid.kv_seq
    return x if pad_kv == 0 else jnp.pad(x, ((0, 0), (0, pad_kv)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def add_kv_side(acc: Array, pair: Pair, d: Array) -> Array:
    """``acc`` ``(batch, kv_local, ...)`` with a pair's padded K/V-side gradient added to chunk ``c``."""
    d = d[:, : pair.kv_chunk].astype(acc.dtype)
    if pair.ring.parts == 1:
        return acc + d
    start = pair.c * pair.kv_chunk
    return lax.dynamic_update_slice_in_dim(acc, lax.dynamic_slice_in_dim(acc, start, pair.kv_chunk, 1) + d, start, 1)


def add_logits(acc: Array, pair: Pair, d: Array) -> Array:
    """``acc`` (a dbias ``(batch, heads|1, q_local|1, kv_seq|1)``) with a pair's padded dbias added in place."""
    d = d[:, :, : pair.q_chunk if d.shape[2] > 1 else 1, : pair.kv_chunk if d.shape[3] > 1 else 1].astype(acc.dtype)
    zero = jnp.zeros((), jnp.int32)
    row = pair.a * pair.q_chunk if acc.shape[2] > 1 and pair.ring.parts > 1 else zero
    col = pair.src * pair.kv_chunk * pair.ring.parts + pair.c * pair.kv_chunk if acc.shape[3] > 1 else zero
    start = (zero, zero, jnp.asarray(row, jnp.int32), jnp.asarray(col, jnp.int32))
    return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, start, d.shape) + d, start)


def kv_payload(ops: Operands) -> tuple:
    return ops.k, ops.v, ops.opts.arrays.kv_segment_ids


def padded_logits(pair: Pair, pair_spec, x: Array | None) -> Array | None:
    return None if x is None else pad_logits_operand(pair.logits_operand(x), pair_spec.grid, 0)


# ---------------------------------------------------------------- merging


def merge(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    """Two partial ``(out, lse)`` over disjoint keys as one; rows no key of either saw keep zeros and the sentinel."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    neg = _numerics.masked_value(lse_a.dtype)
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


def visited_blocks(
    static: StaticOptions, ring: Ring, q_seq: int, kv_seq: int, *, block_q: int, block_kv: int
) -> np.ndarray:
    """Block pairs each device's kernel visits over a ring pass ``(shards,)``, from the causal and window
    masks (what the pair kernels' geometry visits, skipped pairs included as zero)."""
    local_q, local_kv = q_seq // ring.shards, kv_seq // ring.shards
    ring = dataclasses.replace(ring, splits=splits_for(local_q, local_kv, ring.chunks, block_q))
    n = ring.parts
    q_chunk, kv_chunk = local_q // n, local_kv // n
    grid = Grid(q_chunk, kv_chunk, fitted_block(q_chunk, block_q), fitted_block(kv_chunk, block_kv))
    blocks = jnp.stack(
        jnp.meshgrid(*(jnp.arange(m, dtype=jnp.int32) for m in (grid.num_q_blocks, grid.num_kv_blocks)), indexing="ij"),
        -1,
    ).reshape(-1, 2)
    opts = AttentionOptions(static)

    @jax.jit
    def count(me, src, a, c):
        pair = Pair(ring, 1, q_chunk, kv_chunk, me, src, a, c)
        arrays = jax.tree.map(lambda x: x[0], pair.options(opts).arrays)
        geometry = ExampleBlocks(opts.with_arrays(arrays), grid, None, 0, heads=(1, 1))
        visited = (jax.vmap(lambda b: geometry.kind(b[0], b[1]))(blocks) != SKIP).sum()
        return jnp.where(pair.visible(opts), visited, 0)

    me, t, a, c = (
        x.ravel() for x in np.meshgrid(*(np.arange(m) for m in (ring.shards, ring.shards, n, n)), indexing="ij")
    )
    per_pair = jax.vmap(count)(*(jnp.asarray(x, jnp.int32) for x in (me, (me - t) % ring.shards, a, c)))
    return np.asarray(per_pair).reshape(ring.shards, -1).sum(axis=1)
