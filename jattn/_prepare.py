"""Checking and normalizing the arguments of one attention call (no maths here).

:class:`CallOptions` is the typed record of ``dot_product_attention``'s
options as the caller gave them; :func:`prepare` checks them against the
query, key and value and returns :class:`Prepared`: 4-D inputs (a batch axis
added if there was none) and the validated :class:`AttentionOptions`. Both the
public function and ``jattn.nnx`` go through it, so every path raises the same
errors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from . import _checks, _mods, _numerics
from ._mesh import align_batch
from ._options import (
    AttentionInputs,
    AttentionOptions,
    CallOptions,
    ExampleArrays,
    SharedArrays,
    StaticOptions,
    window_pair,
)
from .masks._block_mask import BlockMask


class Prepared(NamedTuple):
    """A checked call: 4-D inputs (one flat batch axis) and validated options, and the caller's batch shape."""

    inputs: AttentionInputs
    batch_shape: tuple[int, ...]  # () for unbatched inputs; restored on the outputs

    def restore(self, x: Array) -> Array:
        """``(batch, ...)`` -> ``(*batch_shape, ...)``."""
        return x.reshape(*self.batch_shape, *x.shape[1:])


def prepare(query, key, value, call: CallOptions) -> Prepared:
    """Checks q/k/v and the options; flattens any number of leading batch axes into one."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.check_floating(name, x)
    _checks.check_same_dtype(query=query, key=key, value=value)
    if query.ndim < 3:
        raise ValueError(
            "query must have rank 3 or more (*batch, q_seq, heads, dim); "
            f"got rank {query.ndim} with shape {query.shape}"
        )
    batch_shape = query.shape[:-3]
    lead = _batch_legend(len(batch_shape))
    kv_axes, v_axes = f"({lead}kv_seq, kv_heads, dim)", f"({lead}kv_seq, kv_heads, v_dim)"
    _checks.check_rank("key", key, (query.ndim,), kv_axes + " like query")
    _checks.check_rank("value", value, (query.ndim,), v_axes + " like query")
    q_seq, heads, dim = query.shape[-3:]
    kv_seq, kv_heads, v_dim = key.shape[-3], key.shape[-2], value.shape[-1]
    _checks.check_shape("key", key, (*batch_shape, kv_seq, kv_heads, dim), kv_axes)
    _checks.check_shape("value", value, (*batch_shape, kv_seq, kv_heads, v_dim), v_axes)
    if heads % kv_heads if kv_heads else heads:  # no kv heads: only zero query heads can share them
        raise ValueError(
            f"query heads must be a multiple of key/value heads (kv_heads); got heads={heads}, kv_heads={kv_heads}"
        )
    batch = math.prod(batch_shape)
    query, key, value = (x.reshape(batch, *x.shape[-3:]) for x in (query, key, value))

    logits_shape = (*batch_shape, heads, q_seq, kv_seq)
    bias = _logits_operand("bias", call.bias, logits_shape, _checks.check_floating)
    mask = _logits_operand("mask", call.mask, logits_shape, _checks.check_bool)
    _numerics.check_scale(call.scale)
    _numerics.check_soft_cap(call.logits_soft_cap)
    _checks.check_static_bool("is_causal", call.is_causal)
    score_mod, score_consts = _mod("score_mod", call.score_mod, _numerics.compute_dtype(query.dtype))
    mask_mod, mask_consts = _mod("mask_mod", call.mask_mod)
    static = StaticOptions(
        scale=_numerics.default_scale(dim) if call.scale is None else float(call.scale),
        is_causal=bool(call.is_causal),
        local_window_size=window_pair(call.local_window_size),
        logits_soft_cap=None if call.logits_soft_cap is None else float(call.logits_soft_cap),
        score_mod=score_mod,
        mask_mod=mask_mod,
    )
    shared = SharedArrays(
        sinks=_sinks(call.sinks, heads),
        score_consts=tuple(c[None] for c in score_consts),
        mask_consts=tuple(c[None] for c in mask_consts),
    )
    block_mask = _checked_block_mask(call.block_mask, call.mask_mod, batch_shape, q_seq, kv_seq)
    q_ids = _segment_ids("query_segment_ids", call.query_segment_ids, batch_shape, q_seq)
    kv_ids = _segment_ids("key_value_segment_ids", call.key_value_segment_ids, batch_shape, kv_seq)
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together; got only one")
    if q_ids is not None and kv_ids is not None and q_ids.dtype != kv_ids.dtype:
        # compare in one integer dtype that holds both
        common = _common_integer_dtype(q_ids, kv_ids)
        q_ids, kv_ids = q_ids.astype(common), kv_ids.astype(common)
    arrays = ExampleArrays(
        q_length=_lengths("query_seq_lengths", call.query_seq_lengths, batch_shape, q_seq),
        kv_length=_lengths("key_value_seq_lengths", call.key_value_seq_lengths, batch_shape, kv_seq),
        q_segment_ids=q_ids,
        kv_segment_ids=kv_ids,
        q_offset=_query_offset(call.query_offset, batch_shape),
    )
    # Per-example arrays split over the batch like the query (explicit meshes), so vmaps map them together.
    arrays = jax.tree.map(lambda x: align_batch(x, query, batch), arrays)
    bias, mask = align_batch(bias, query, batch), align_batch(mask, query, batch)
    opts = AttentionOptions(static, arrays, shared, block_mask)
    return Prepared(AttentionInputs(query, key, value, bias, mask, opts), batch_shape)


def _mod(name, fn, score_dtype=None):
    """A user ``score_mod`` / ``mask_mod`` closure-converted (see ``_mods``), or ``(None, ())``."""
    if fn is None:
        return None, ()
    if not callable(fn):
        raise TypeError(f"{name} must be callable or None; got {type(fn).__name__}")
    if score_dtype is None:
        return _mods.convert(fn, "mask")
    return _mods.convert(fn, "score", score_dtype)


def _sinks(sinks, heads: int) -> Array | None:
    """Attention sinks ``(heads,)`` -> ``(1, heads)`` (shared by every example)."""
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    _checks.check_floating("sinks", sinks)
    _checks.check_shape("sinks", sinks, (heads,), "(heads,)")
    return sinks[None]


def _checked_block_mask(mask, mask_mod, batch_shape, q_seq, kv_seq):
    """A ``masks.BlockMask`` checked against the call: built for these lengths and for 1 or every example."""
    if mask is None:
        return None
    if not isinstance(mask, BlockMask):
        raise TypeError(
            f"block_mask must be a jattn.masks.BlockMask (masks.block_mask(...)); got {type(mask).__name__}"
        )
    if mask_mod is None:
        raise ValueError("block_mask summarizes a mask_mod: pass that mask_mod too (mask_mod=...)")
    if (mask.q_seq, mask.kv_seq) != (q_seq, kv_seq):
        raise ValueError(
            f"block_mask was built for q_seq, kv_seq = {(mask.q_seq, mask.kv_seq)}; this call has {(q_seq, kv_seq)}"
        )
    batch = math.prod(batch_shape)
    if mask.kinds.shape[0] not in (1, batch):
        raise ValueError(f"block_mask must have a batch of 1 or {batch} (the call's); got {mask.kinds.shape[0]}")
    return mask


def _query_offset(offset, batch_shape) -> Array | None:
    if offset is None:
        return None
    offset = jnp.asarray(offset)
    _checks.check_integer("query_offset", offset)
    _checks.check_shape("query_offset", offset, batch_shape, "(batch,)")
    return offset.reshape(-1).astype(jnp.int32)


def _batch_legend(batch_rank: int) -> str:
    """The leading part of an axis legend: ``""``, ``"batch, "`` or ``"*batch, "``."""
    return ("", "batch, ")[batch_rank] if batch_rank < 2 else "*batch, "


def _logits_operand(name, x, logits_shape, check_dtype):
    """A bias or mask as ``(batch|1, heads|1, q_seq|1, kv_seq|1)``.

    As in ``jax.nn``, missing leading axes count as 1: ``(kv_seq,)``, ``(q_seq,
    kv_seq)`` and ``(heads, q_seq, kv_seq)`` all broadcast. Leading batch axes
    are flattened like the query's (broadcast first where only some are 1).
    """
    if x is None:
        return None
    x = jnp.asarray(x)
    check_dtype(name, x)
    legend = f"({_batch_legend(len(logits_shape) - 3)}heads, q_seq, kv_seq)"
    extra = x.ndim - len(logits_shape)
    if extra > 0 and any(n != 1 for n in x.shape[:extra]):
        raise ValueError(f"{name} must have shape {legend} broadcastable to {logits_shape}; got {x.shape}")
    # Extra leading axes of size 1 are dropped (jax.nn takes (1, heads, q_seq, kv_seq) with an unbatched query).
    full = x.reshape((1,) * max(-extra, 0) + x.shape[max(extra, 0) :])
    if extra < 0:
        legend += " (missing leading axes count as 1)"
    _checks.check_broadcastable(name, full, logits_shape, legend, shown=x.shape)
    batch_shape, lead = logits_shape[:-3], full.shape[:-3]
    if all(n == 1 for n in lead):
        return full.reshape(1, *full.shape[-3:])
    if lead != batch_shape:
        full = jnp.broadcast_to(full, (*batch_shape, *full.shape[-3:]))
    return full.reshape(math.prod(batch_shape), *full.shape[-3:])


def _lengths(name, lengths, batch_shape, seq) -> Array | None:
    """Per-example lengths ``batch_shape`` (a scalar for unbatched inputs) as int32 ``(batch,)``.

    int32 lengths are kept as given, so the jax.nn delegate passes on exactly the
    caller's array (its program is then jax.nn's own); jattn's kernels read them
    through :func:`clipped_lengths`. Wider lengths are clipped to ``[0, seq]`` in
    their own dtype first, so a 64-bit length past the sequence never wraps
    around in the int32 cast.
    """
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    _checks.check_integer(name, lengths)
    if not batch_shape and lengths.shape == (1,):  # jax.nn's form of an unbatched length
        lengths = lengths[0]
    legend = {0: "()", 1: "(batch,)"}.get(len(batch_shape), "(*batch,)")
    _checks.check_shape(name, lengths, batch_shape, legend)
    if lengths.dtype == jnp.int32:
        return lengths.reshape(-1)
    zero = jnp.zeros((), lengths.dtype)
    end = jnp.asarray(seq).astype(lengths.dtype) if _fits(seq, lengths.dtype) else jnp.iinfo(lengths.dtype).max
    return jnp.clip(lengths, zero, end).reshape(-1).astype(jnp.int32)


def _fits(seq, dtype) -> bool:
    """Whether a sequence length is representable in an integer dtype (symbolic lengths are assumed to)."""
    return not _checks.is_concrete(seq) or seq <= jnp.iinfo(dtype).max


def _segment_ids(name, ids, batch_shape, seq: int) -> Array | None:
    if ids is None:
        return None
    ids = jnp.asarray(ids)
    _checks.check_integer(name, ids)
    axis = "q_seq" if name.startswith("query") else "kv_seq"
    legend = f"({_batch_legend(len(batch_shape))}{axis})" if batch_shape else f"({axis},)"
    _checks.check_shape(name, ids, (*batch_shape, seq), legend)
    return ids.reshape(-1, seq)  # ids compare in their own dtype: 0 and 2**32 stay different segments


def _common_integer_dtype(q_ids, kv_ids):
    with jax.numpy_dtype_promotion("standard"):
        common = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
    if not jnp.issubdtype(common, jnp.integer):
        raise TypeError(
            "query_segment_ids and key_value_segment_ids must have integer dtypes with a common integer type; "
            f"got {q_ids.dtype} and {kv_ids.dtype} (promoted to {common})"
        )
    return common


def clipped_lengths(inputs: AttentionInputs) -> AttentionInputs:
    """``inputs`` with the lengths clipped to ``[0, q_seq]`` / ``[0, kv_seq]``: what jattn's own kernels read
    (a block count from a length past the sequence, or a negative one, would index blocks that do not exist)."""
    arrays = inputs.opts.arrays
    q_seq, kv_seq = inputs.query.shape[1], inputs.key.shape[1]

    def clip(x, seq):
        return None if x is None else jnp.clip(x, 0, seq)

    arrays = arrays._replace(q_length=clip(arrays.q_length, q_seq), kv_length=clip(arrays.kv_length, kv_seq))
    return inputs._replace(opts=inputs.opts.with_arrays(arrays))
