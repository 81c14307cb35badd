"""Checks of a ragged paged attention call: shapes and dtypes always, metadata values when they are concrete.

Shape and dtype checks are static (trace time). Metadata values are checked only when every metadata
array is concrete (an eager call, or arrays closed over by a ``jit``); under ``jit`` they are data and
the kernel makes wrong values harmless instead (see ``_geometry``). Every message names the argument,
the expected and the actual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .. import _checks, _jax_compat, _mods, _numerics
from ._spec import DEFAULT_BLOCK_Q, DEFAULT_PAGES_PER_CHUNK, Metadata, Operands, PagedSpec
from ._values import check_metadata_values


class PagedArrays(NamedTuple):
    """The positional arguments of ``ragged_paged_attention``, as the caller gave them."""

    queries: Any
    key_pages: Any
    value_pages: Any
    kv_lens: Any
    page_indices: Any
    cu_q_lens: Any
    num_seqs: Any


class PagedOptions(NamedTuple):
    """Its keyword arguments."""

    scale: float | None = None
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: Any = None
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    k_scale: float | None = None
    v_scale: float | None = None
    pages_per_chunk: int = DEFAULT_PAGES_PER_CHUNK
    block_q: int = DEFAULT_BLOCK_Q


POOL_AXES = {
    "key_pages": "(num_pages, page_size, kv_heads, dim)",
    "value_pages": "(num_pages, page_size, kv_heads, v_dim)",
}


def check_pool_dtype(name: str, pool, other: tuple[str, Any], scale) -> None:
    """Unscaled pages share the dtype of ``other`` (``(name, dtype)``: the queries, or the keys written);
    scaled (quantized) ones may hold any integer or float dtype."""
    if scale is None:
        _checks.check_same_dtype(**{other[0]: jnp.zeros((), other[1]), name: pool})
    elif not jnp.issubdtype(pool.dtype, jnp.integer) and not jnp.issubdtype(pool.dtype, jnp.floating):
        raise TypeError(f"{name} must hold integers or floats (quantized with a scale); got {pool.dtype}")


def check_quant_scale(name: str, scale) -> None:
    if scale is None:
        return
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python float or None (one scale for the whole pool); got {scale!r}")
    if not 0 < scale < math.inf:
        raise ValueError(f"{name} must be a positive finite float or None; got {scale!r}")


def check_arrays(a: PagedArrays, opts: PagedOptions) -> None:
    """Static checks of the array arguments (shapes, dtypes); raises ValueError / TypeError."""
    _checks.check_rank("queries", a.queries, (3,), "(tokens, heads, dim)")
    _checks.check_floating("queries", a.queries)
    for name, pool, scale in (("key_pages", a.key_pages, opts.k_scale), ("value_pages", a.value_pages, opts.v_scale)):
        _checks.check_rank(name, pool, (4,), POOL_AXES[name])
        check_quant_scale(f"{name[0]}_scale", scale)
        check_pool_dtype(name, pool, ("queries", jnp.result_type(a.queries)), scale)
    _, heads, dim = a.queries.shape
    num_pages, page_size, kv_heads, _ = a.key_pages.shape
    _checks.check_shape("key_pages", a.key_pages, (num_pages, page_size, kv_heads, dim), POOL_AXES["key_pages"])
    v_dim = a.value_pages.shape[-1]
    expected = (num_pages, page_size, kv_heads, v_dim)
    _checks.check_shape("value_pages", a.value_pages, expected, POOL_AXES["value_pages"])
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"queries' heads must be a multiple of the pages' kv_heads (grouped-query attention); "
            f"got heads={heads}, kv_heads={kv_heads}"
        )
    for name in ("kv_lens", "page_indices", "cu_q_lens", "num_seqs"):
        _checks.check_integer(name, getattr(a, name))
    _checks.check_rank("kv_lens", a.kv_lens, (1,), "(max_seqs,)")
    max_seqs = a.kv_lens.shape[0]
    _checks.check_rank("page_indices", a.page_indices, (2,), "(max_seqs, pages_per_seq)")
    _checks.check_shape(
        "page_indices", a.page_indices, (max_seqs, a.page_indices.shape[1]), "(max_seqs, pages_per_seq)"
    )
    _checks.check_shape("cu_q_lens", a.cu_q_lens, (max_seqs + 1,), "(max_seqs + 1,)")
    if np.shape(a.num_seqs) not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar or have shape (1,); got shape {np.shape(a.num_seqs)}")


def check_options(opts: PagedOptions, heads: int) -> None:
    _numerics.check_scale(opts.scale)
    _numerics.check_soft_cap(opts.logits_soft_cap)
    _checks.check_positive_int("sliding_window", opts.sliding_window, allow_none=True)
    _checks.check_positive_int("pages_per_chunk", opts.pages_per_chunk)
    _checks.check_positive_int("block_q", opts.block_q)
    if opts.sinks is not None:
        _checks.check_floating("sinks", opts.sinks)
        _checks.check_shape("sinks", opts.sinks, (heads,), "(heads,)")
    for name in ("score_mod", "mask_mod"):
        fn = getattr(opts, name)
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None; got {type(fn).__name__}")


def is_concrete(*xs) -> bool:
    """True unless some ``x`` is traced (its values are data of a compiled function)."""
    return not any(isinstance(x, _jax_compat.Tracer) for x in xs)


def prepare(a: PagedArrays, opts: PagedOptions) -> tuple[PagedSpec, Metadata, Operands]:
    """Checks the call and splits it into the static spec, the int32 metadata and the operands."""
    a = PagedArrays(*(jnp.asarray(x) for x in a))
    check_arrays(a, opts)
    queries = a.queries
    check_options(opts, queries.shape[1])
    metadata = (a.kv_lens, a.page_indices, a.cu_q_lens, a.num_seqs)
    if is_concrete(*metadata):
        host = Metadata._make(np.asarray(x) for x in metadata)  # checked on the host
        check_metadata_values(host, queries.shape[0], a.key_pages.shape[:2])
    acc = _numerics.compute_dtype(queries.dtype)
    score_mod, score_consts = (None, ()) if opts.score_mod is None else _mods.convert(opts.score_mod, "score", acc)
    mask_mod, mask_consts = (None, ()) if opts.mask_mod is None else _mods.convert(opts.mask_mod, "mask")
    spec = PagedSpec(
        scale=_numerics.default_scale(queries.shape[-1]) if opts.scale is None else float(opts.scale),
        sliding_window=None if opts.sliding_window is None else int(opts.sliding_window),
        logits_soft_cap=None if opts.logits_soft_cap is None else float(opts.logits_soft_cap),
        score_mod=score_mod,
        mask_mod=mask_mod,
        k_scale=None if opts.k_scale is None else float(opts.k_scale),
        v_scale=None if opts.v_scale is None else float(opts.v_scale),
        pages_per_chunk=int(opts.pages_per_chunk),
        block_q=int(opts.block_q),
    )
    ints = [x.astype(jnp.int32) for x in metadata]  # any integer dtype in; int32 in the kernel
    meta = Metadata(ints[0], ints[1], ints[2], ints[3].reshape(()))
    sinks = None if opts.sinks is None else jnp.asarray(opts.sinks)
    ops = Operands(queries, a.key_pages, a.value_pages, sinks, score_consts, mask_consts)
    return spec, meta, ops
