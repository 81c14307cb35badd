"""Ragged paged attention, paged KV-cache writes and a page allocator (``jattn.paged`` is the public face).

Modules: ``_spec`` (the static spec, metadata, operands, tuned defaults), ``_validate`` / ``_values``
(checks), ``_geometry`` (the loops and what a chunk sees), ``_products`` (page reads and block
products), ``_forward`` / ``_backward`` / ``_autodiff`` (the kernel and its reverse mode), ``_write``
(scattering new tokens into the pools) and ``_allocator`` (host-side pages for continuous batching).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

from ._allocator import BatchMetadata as BatchMetadata
from ._allocator import OutOfPagesError as OutOfPagesError
from ._allocator import PageAllocator as PageAllocator
from ._autodiff import attend
from ._placement import run_sharded
from ._spec import DEFAULT_BLOCK_Q as DEFAULT_BLOCK_Q
from ._spec import DEFAULT_PAGES_PER_CHUNK as DEFAULT_PAGES_PER_CHUNK
from ._validate import PagedArrays as PagedArrays
from ._validate import PagedOptions as PagedOptions
from ._validate import prepare
from ._write import write as write


def ragged_paged_attention(arrays: PagedArrays, options: PagedOptions) -> Array:
    """Checks the call and runs the kernel (per head shard on an explicit mesh: ``_placement``)."""
    return run_sharded(_unsharded, arrays, options)


def _unsharded(arrays: PagedArrays, options: PagedOptions) -> Array:
    """Checks the call and runs the kernel; an empty batch or pool gives zeros without running it."""
    spec, meta, ops = prepare(arrays, options)
    tokens, heads, _ = ops.queries.shape
    num_pages, _, _, v_dim = ops.value_pages.shape
    if 0 in (tokens, num_pages, meta.kv_lens.shape[0], meta.page_indices.shape[1]):
        return jnp.zeros((tokens, heads, v_dim), ops.queries.dtype)  # no key can be visible
    return attend(spec, meta, ops)
