"""Where the work is: the loops over sequences, query blocks and page chunks, and what a chunk may see.

The forward and the backward share these loops, so both visit exactly the same (query block, chunk)
pairs. Every trip count is a value (``lax.fori_loop`` with traced bounds is a ``while_loop``): a
sequence costs what it caches, never ``pages_per_seq``. Metadata that is wrong under ``jit`` is made
harmless here: lengths and offsets are clipped, a decreasing ``cu_q_lens`` gives an empty sequence, and
a page index outside the pool hides that page's tokens (it is clamped for the read, then selected out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _mods
from ._spec import Dims, Metadata, PagedSpec, Tiling, tiling

LAYOUT = "kgqs"  # a block of logits: (kv_heads, groups, block_q, tokens)


class Sequence(NamedTuple):
    """One sequence's scalars (int32) and its row of the page table."""

    number: Array  # its row of the page table (``index`` would shadow tuple.index)
    q_start: Array  # its first row in queries
    q_end: Array
    kv_len: Array  # cached tokens, this call's included
    pages: Array  # (pages_per_seq,) physical page of each logical page


class QueryBlock(NamedTuple):
    start: Array  # first row of the block's static-size slice of queries
    first_pos: Array  # absolute position of row ``start`` (bottom-right causal)
    valid: Array  # (block_q,) rows that belong to the sequence and to no earlier block
    kv_lo: Array  # the keys some valid row may see: [kv_lo, kv_hi)
    kv_hi: Array


class Chunk(NamedTuple):
    ids: Array  # (n,) physical pages, clamped into the pool
    first_pos: Array  # absolute position of its first token
    present: Array  # (n * page_size,) a cached token of the sequence whose page lies in the pool


def sequence(meta: Metadata, s: Array, tokens: int, page_size: int) -> Sequence:
    q_start = jnp.clip(meta.cu_q_lens[s], 0, tokens)
    q_end = jnp.clip(meta.cu_q_lens[s + 1], q_start, tokens)
    kv_len = jnp.clip(meta.kv_lens[s], 0, meta.page_indices.shape[1] * page_size)
    return Sequence(s, q_start, q_end, kv_len, meta.page_indices[s])


def query_block(spec: PagedSpec, seq: Sequence, b: Array, block_q: int, tokens: int) -> QueryBlock:
    """Block ``b`` of ``block_q`` rows; the last block's slice is moved back to stay inside ``queries``."""
    q_len = seq.q_end - seq.q_start
    first = seq.q_start + b * block_q
    start = jnp.minimum(first, tokens - block_q)
    rows = start + jnp.arange(block_q, dtype=jnp.int32)
    offset = seq.kv_len - q_len - seq.q_start  # position = row + offset
    last = jnp.minimum(first + block_q, seq.q_end) - 1
    kv_hi = jnp.clip(last + offset + 1, 0, seq.kv_len)
    kv_lo = jnp.zeros_like(kv_hi)
    if spec.sliding_window is not None:
        kv_lo = jnp.clip(first + offset - spec.sliding_window + 1, 0, kv_hi)
    return QueryBlock(start, start + offset, (rows >= first) & (rows < seq.q_end), kv_lo, kv_hi)


def chunk(seq: Sequence, first_page: Array, n: int, d: Dims) -> Chunk:
    """``n`` pages of ``seq`` from logical page ``first_page`` (the page table is read, the pool not yet)."""
    ids = lax.dynamic_slice_in_dim(seq.pages, first_page, n)
    tokens = n * d.page_size
    in_pool = jnp.repeat((ids >= 0) & (ids < d.num_pages), d.page_size, total_repeat_length=tokens)
    first_pos = first_page * d.page_size
    present = in_pool & (first_pos + jnp.arange(tokens, dtype=jnp.int32) < seq.kv_len)
    return Chunk(jnp.clip(ids, 0, d.num_pages - 1), first_pos, present)


def visibility(spec: PagedSpec, where: tuple[Sequence, QueryBlock, Chunk], mask_consts, d: Dims) -> Array:
    """Which row of the block sees which token of the chunk: ``(1|kv_heads, 1|groups, block_q, tokens)``."""
    seq, qb, ch = where
    block_q, tokens = qb.valid.shape[0], ch.present.shape[0]
    pos = qb.first_pos + jnp.arange(block_q, dtype=jnp.int32)[:, None]
    j = ch.first_pos + jnp.arange(tokens, dtype=jnp.int32)[None, :]
    visible = ch.present[None, :] & qb.valid[:, None] & (j <= pos)
    if spec.sliding_window is not None:
        visible = visible & (j > pos - spec.sliding_window)
    visible = visible[None, None]
    if spec.mask_mod is not None:
        shape = (d.kv_heads, d.groups, block_q, tokens)
        layout = _mods.Layout(LAYOUT, d.groups)
        place = dict(example=seq.number, q_start=qb.first_pos, kv_start=ch.first_pos)
        visible = visible & _mods.evaluate(spec.mask_mod, mask_consts, shape, layout, **place)
    return visible


def hide_unseen(x: Array, visible: Array) -> Array:
    """``x (tokens, kv_heads, x)`` with the tokens no row sees set to 0 by a select: a hidden page may hold
    NaN or Inf, and a weight of 0 times NaN is NaN."""
    seen = visible.any(axis=(0, 1, 2))
    return jnp.where(seen[:, None, None], x, jnp.zeros((), x.dtype))


StepFn = Callable[[Array, int, Any], Any]  # (first logical page, static page count, carry) -> carry
BlockFn = Callable[[Sequence, QueryBlock, Tiling, Any], Any]


def over_chunks(spec: PagedSpec, qb: QueryBlock, d: Dims, step: StepFn, carry):
    """Folds ``step`` over the pages holding ``[kv_lo, kv_hi)``: whole chunks, then the rest page by page.

    The single-page tail keeps short sequences from paying for a whole chunk of pages they do not have.
    """
    per_chunk = min(spec.pages_per_chunk, d.pages_per_seq)
    first = qb.kv_lo // d.page_size
    n = jnp.maximum(-(-qb.kv_hi // d.page_size) - first, 0)
    full = n // per_chunk

    def whole(c, carry):
        return step(first + c * per_chunk, per_chunk, carry)

    def single(p, carry):
        return step(p, 1, carry)

    carry = lax.fori_loop(0, full, whole, carry)
    return lax.fori_loop(first + full * per_chunk, first + n, single, carry)


def over_query_blocks(spec: PagedSpec, meta: Metadata, d: Dims, body: BlockFn, carry):
    """Folds ``body`` over every query block of every sequence.

    A sequence with one new token (decode) is one block of one row; longer ones (prefill chunks) are
    blocks of ``spec.block_q`` rows. Both loops run in every sequence, one of them zero times.
    """
    tokens = d.tokens
    block_q = min(spec.block_q, tokens)
    decode, prefill = tiling(1, d.kv_heads, d.groups), tiling(block_q, d.kv_heads, d.groups)

    def one_sequence(s, carry):
        seq = sequence(meta, s, tokens, d.page_size)
        q_len = seq.q_end - seq.q_start

        def decode_block(b, carry):
            return body(seq, query_block(spec, seq, b, 1, tokens), decode, carry)

        def prefill_block(b, carry):
            return body(seq, query_block(spec, seq, b, block_q, tokens), prefill, carry)

        carry = lax.fori_loop(0, (q_len == 1).astype(jnp.int32), decode_block, carry)
        n_prefill = jnp.where(q_len > 1, -(-q_len // block_q), 0)
        return lax.fori_loop(0, n_prefill, prefill_block, carry)

    num_seqs = jnp.clip(meta.num_seqs, 0, meta.kv_lens.shape[0])
    return lax.fori_loop(0, num_seqs, one_sequence, carry)
