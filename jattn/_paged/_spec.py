"""What one ragged paged attention call is made of: its static spec, its metadata and its operands.

The spec is hashable (a ``jax.jit`` static and ``custom_vjp`` non-differentiable argument); the
metadata and operands are pytrees of arrays, so new metadata values never recompile.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxtyping import Array, Float, Int

from .._mods import ConvertedMod

DEFAULT_PAGES_PER_CHUNK = 8
"""Pages folded into the online softmax per loop step. ``python -m bench --suite serve`` on a 2-core CPU
(page_size 64, heads 8, dim 64): 4, 8 and 16 pages (256-1024 keys) were within noise of each other and 2
pages ~25% slower (loop overhead); a longer chunk also lengthens the page-by-page tail of each sequence."""

DEFAULT_BLOCK_Q = 64
"""Query rows per block of a sequence with more than one new token (a prefill chunk). The serve suite's
mixed batch (2 prefill chunks of 64 tokens at 8192 and 128 cached, 2-core CPU): 64 rows took 0.75x the
time of 32 (8/8 heads) and 0.6x (8/2); 128 rows was slower again (half a block of padding rows)."""

BLOCK_DIAGONAL_MAX_ROWS = 32
"""Up to this many query rows in all (``kv_heads x groups x block_q``) a block uses the block-diagonal
products (see ``_products``): one plain matmul per chunk instead of a batched one over transposed keys.
Measured on a 2-core CPU with the serve suite's decode batch (1 x 8192 + 15 x 128 cached, heads 64-dim):
the block-diagonal form was 2.5x (heads 8/8, 8 rows) and 1.2x (8/2, 8 rows) faster than the batched one
for decode rows; with 16 rows per kv head (8 x 16 = 128 rows) it was 2x slower.
"""


@dataclasses.dataclass(frozen=True)
class PagedSpec:
    """Everything static about a call: the options and the tiling (hashable; mods hashed by identity)."""

    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    score_mod: ConvertedMod | None = None
    mask_mod: ConvertedMod | None = None
    k_scale: float | None = None  # quantized key pages are read as page.astype(float32) * k_scale
    v_scale: float | None = None
    pages_per_chunk: int = DEFAULT_PAGES_PER_CHUNK
    block_q: int = DEFAULT_BLOCK_Q


class Metadata(NamedTuple):
    """The batch's page table and lengths, all int32 (values are data: they never recompile)."""

    kv_lens: Int[Array, " max_seqs"]
    page_indices: Int[Array, "max_seqs pages_per_seq"]
    cu_q_lens: Int[Array, " max_seqs_plus_1"]
    num_seqs: Int[Array, ""]


class Operands(NamedTuple):
    """The differentiable inputs (sinks and captured mod arrays may be None / empty)."""

    queries: Float[Array, "tokens heads dim"]
    key_pages: Array  # (num_pages, page_size, kv_heads, dim), float or quantized
    value_pages: Array  # (num_pages, page_size, kv_heads, v_dim)
    sinks: Float[Array, " heads"] | None
    score_consts: tuple[Array, ...]
    mask_consts: tuple[Array, ...]


class Dims(NamedTuple):
    """The static sizes of a call, read from the operands' shapes."""

    tokens: int
    kv_heads: int
    groups: int  # query heads per kv head
    num_pages: int
    page_size: int
    pages_per_seq: int


def dims(ops: Operands, meta: Metadata) -> Dims:
    tokens, heads, _ = ops.queries.shape
    num_pages, page_size, kv_heads, _ = ops.key_pages.shape
    return Dims(tokens, kv_heads, heads // kv_heads, num_pages, page_size, meta.page_indices.shape[1])


class Tiling(NamedTuple):
    """How one class of query blocks is computed (static): rows per block and the product form."""

    block_q: int
    block_diagonal: bool


def tiling(block_q: int, kv_heads: int, groups: int) -> Tiling:
    """The product form for blocks of ``block_q`` rows: block-diagonal while the rows are few."""
    return Tiling(block_q, kv_heads * groups * block_q <= BLOCK_DIAGONAL_MAX_ROWS)
