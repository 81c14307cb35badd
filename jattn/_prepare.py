"""Checking and normalizing the arguments of one attention call (no maths here).

:class:`CallOptions` is the typed record of ``dot_product_attention``'s
options as the caller gave them; :func:`prepare` checks them against the
query, key and value and returns :class:`Prepared`: 4-D inputs (a batch axis
added if there was none) and the validated :class:`AttentionOptions`. Both the
public function and ``jattn.nnx`` go through it, so every path raises the same
errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from . import _checks, _core
from ._options import AttentionInputs, AttentionOptions, ExampleArrays, StaticOptions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CallOptions:
    """The options of one call as given (arrays unchecked); see ``dot_product_attention`` for each."""

    bias: Any = None
    mask: Any = None
    query_seq_lengths: Any = None
    key_value_seq_lengths: Any = None
    query_segment_ids: Any = None
    key_value_segment_ids: Any = None
    scale: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    local_window_size: Any = dataclasses.field(default=None, metadata=dict(static=True))
    logits_soft_cap: float | None = dataclasses.field(default=None, metadata=dict(static=True))

    def replace(self, **changes) -> CallOptions:
        return dataclasses.replace(self, **changes)


class Prepared(NamedTuple):
    """A checked call: 4-D inputs with validated options, and whether the caller's had a batch axis."""

    inputs: AttentionInputs
    batched: bool


def prepare(query, key, value, call: CallOptions) -> Prepared:
    """Checks q/k/v and the options, adds a batch axis where there was none."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.check_floating(name, x)
    _checks.check_same_dtype(query=query, key=key, value=value)
    _checks.check_rank("query", query, (3, 4), "(batch, q_seq, heads, dim) or (q_seq, heads, dim)")
    batched = query.ndim == 4
    lead, lead_axes = (query.shape[:1], "(batch, ") if batched else ((), "(")
    kv_axes, v_axes = lead_axes + "kv_seq, kv_heads, dim)", lead_axes + "kv_seq, kv_heads, v_dim)"
    _checks.check_rank("key", key, (query.ndim,), kv_axes + " like query")
    _checks.check_rank("value", value, (query.ndim,), v_axes + " like query")
    *_, q_seq, heads, dim = query.shape
    kv_seq, kv_heads, v_dim = key.shape[-3], key.shape[-2], value.shape[-1]
    _checks.check_shape("key", key, (*lead, kv_seq, kv_heads, dim), kv_axes)
    _checks.check_shape("value", value, (*lead, kv_seq, kv_heads, v_dim), v_axes)
    if heads % kv_heads:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (kv_heads); got heads={heads}, kv_heads={kv_heads}"
        )
    if not batched:
        query, key, value = query[None], key[None], value[None]
    batch = query.shape[0]

    logits_shape = (batch, heads, q_seq, kv_seq)
    bias = _batched_logits_operand("bias", call.bias, logits_shape, batched, _checks.check_floating)
    mask = _batched_logits_operand("mask", call.mask, logits_shape, batched, _checks.check_bool)
    _core.check_scale(call.scale)
    _core.check_soft_cap(call.logits_soft_cap)
    _checks.check_static_bool("is_causal", call.is_causal)
    static = StaticOptions(
        scale=_core.default_scale(dim) if call.scale is None else float(call.scale),
        is_causal=bool(call.is_causal),
        local_window_size=_window(call.local_window_size),
        logits_soft_cap=None if call.logits_soft_cap is None else float(call.logits_soft_cap),
    )
    arrays = ExampleArrays(
        q_length=_lengths("query_seq_lengths", call.query_seq_lengths, batch, batched),
        kv_length=_lengths("key_value_seq_lengths", call.key_value_seq_lengths, batch, batched),
        q_segment_ids=_segment_ids("query_segment_ids", call.query_segment_ids, (batch, q_seq), batched),
        kv_segment_ids=_segment_ids("key_value_segment_ids", call.key_value_segment_ids, (batch, kv_seq), batched),
    )
    if (arrays.q_segment_ids is None) != (arrays.kv_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together; got only one")
    return Prepared(AttentionInputs(query, key, value, bias, mask, AttentionOptions(static, arrays)), batched)


def _batched_logits_operand(name, x, logits_shape, batched, check_dtype):
    """Checks a bias or mask and gives it a leading batch axis."""
    if x is None:
        return None
    x = jnp.asarray(x)
    check_dtype(name, x)
    if batched:
        _checks.check_broadcastable(name, x, logits_shape, "(batch, heads, q_seq, kv_seq)")
        return x
    if x.ndim == 4:  # jax.nn accepts a leading batch axis of 1 on unbatched calls
        _checks.check_broadcastable(name, x, logits_shape, "(1, heads, q_seq, kv_seq)")
        return x
    _checks.check_broadcastable(name, x, logits_shape[1:], "(heads, q_seq, kv_seq)")
    return x[None]


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None

    def is_size(w):
        return isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)) and w >= 0

    window = (local_window_size,) * 2 if is_size(local_window_size) else local_window_size
    ok = isinstance(window, tuple) and len(window) == 2 and all(is_size(w) for w in window)
    if not ok:
        raise ValueError(
            f"local_window_size must be a non-negative int or a (left, right) tuple of them; got {local_window_size!r}"
        )
    return int(window[0]), int(window[1])


def _lengths(name, lengths, batch, batched) -> Array | None:
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    _checks.check_integer(name, lengths)
    if not batched and lengths.ndim == 0:
        lengths = lengths[None]
    _checks.check_shape(name, lengths, (batch,), "(batch,)")
    return lengths.astype(jnp.int32)


def _segment_ids(name, ids, shape, batched) -> Array | None:
    if ids is None:
        return None
    ids = jnp.asarray(ids)
    _checks.check_integer(name, ids)
    seq = "q_seq" if name.startswith("query") else "kv_seq"
    if batched:
        _checks.check_shape(name, ids, shape, f"(batch, {seq})")
    else:
        _checks.check_shape(name, ids, shape[1:], f"({seq},)")
        ids = ids[None]
    return ids.astype(jnp.int32)
