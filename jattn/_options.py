"""Validated options of one attention call: a hashable static part and a pytree of per-example arrays.

Every implementation reads the same :class:`AttentionOptions`. Its ``static``
part (:class:`StaticOptions`) is hashable, so it can be a ``jax.jit`` static
argument or a ``custom_vjp`` non-differentiable argument; its ``arrays`` part
(:class:`ExampleArrays`) is a pytree whose leaves carry a leading ``batch``
axis, so ``jax.vmap`` or ``lax.map`` over the options gives one example's
options, whose :meth:`AttentionOptions.mask_mod` is that example's position
predicate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import Array

from ._mods import ConvertedMod
from .masks import _block_mask, _combine, _positions


@dataclasses.dataclass(frozen=True)
class StaticOptions:
    """The array-free options of a call (hashable; user mods are hashed by identity)."""

    scale: float
    is_causal: bool = False
    local_window_size: tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    score_mod: ConvertedMod | None = None  # its captured arrays are SharedArrays.score_consts
    mask_mod: ConvertedMod | None = None  # likewise mask_consts


class ExampleArrays(NamedTuple):
    """Per-example arrays: int32 lengths ``(batch,)`` clipped to the sequence, segment ids ``(batch, q_seq)`` /
    ``(batch, kv_seq)`` in the caller's integer dtype (one dtype for both).

    After mapping over the batch axis, one example's: scalar lengths and ``(q_seq,)`` / ``(kv_seq,)`` ids.
    """

    q_length: Array | None = None
    kv_length: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    q_offset: Array | None = None  # absolute position of query 0 (a KV-cache decode step), int32
    # Where key 0 sits for the mods alone (a ring pair's K/V chunk), int32: the mods see query
    # ``q_offset + kv_offset + i`` and key ``kv_offset + j``; the causal and window masks (relative) do not.
    kv_offset: Array | None = None


class SharedArrays(NamedTuple):
    """Arrays every example shares, each with a leading axis of 1 (so the loop over examples passes them
    whole, and a ``vmap`` of the call may give one per example)."""

    sinks: Array | None = None  # (1, heads): a logit per head that joins every row's softmax denominator
    score_consts: tuple[Array, ...] = ()  # what score_mod captured, each (1, ...)
    mask_consts: tuple[Array, ...] = ()  # what mask_mod captured, each (1, ...)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Everything besides q/k/v/bias/mask, already checked and normalized (a pytree)."""

    static: StaticOptions = dataclasses.field(metadata=dict(static=True))
    arrays: ExampleArrays = dataclasses.field(default_factory=ExampleArrays)
    shared: SharedArrays = dataclasses.field(default_factory=SharedArrays)
    block_mask: _block_mask.BlockMask | None = None  # the mask_mod's block summary (blockwise kernel only)

    def with_arrays(self, arrays: ExampleArrays) -> AttentionOptions:
        """The same static options over other per-example arrays (e.g. one shard's)."""
        return dataclasses.replace(self, arrays=arrays)

    def mask_mod(self) -> _combine.MaskMod | None:
        """The position predicate of one example (``arrays`` already sliced to it), or None.

        Causal and window masks see the query at its absolute position ``q_idx + q_offset``;
        the user's ``mask_mod`` (it depends on batch and head) is evaluated apart, see ``_mods``.
        """
        static, arrays = self.static, self.arrays
        offset = 0 if arrays.q_offset is None else arrays.q_offset
        mods: list[_combine.MaskMod] = []
        if static.is_causal:
            mods.append(_positions.Causal(offset))
        if static.local_window_size is not None:
            mods.append(_positions.SlidingWindow(*static.local_window_size, offset))
        if arrays.q_length is not None or arrays.kv_length is not None:
            mods.append(_positions.Lengths(arrays.q_length, arrays.kv_length))
        if arrays.q_segment_ids is not None and arrays.kv_segment_ids is not None:
            mods.append(_positions.Segments(arrays.q_segment_ids, arrays.kv_segment_ids))
        return _combine.and_masks(*mods) if mods else None


_SEGMENT_IDS = "query_segment_ids/key_value_segment_ids"  # given together: one capability column


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CallOptions:
    """The options of one call as given (arrays unchecked); see ``dot_product_attention`` for each.

    The one list of a call's options: the names ``dot_product_attention`` and ``auto_implementation``
    take, the capability table's columns (``_capabilities``) and the static/array split all derive from
    these fields (:func:`option_names`). ``metadata["internal"]`` marks a field no public signature has.
    """

    bias: Any = None
    mask: Any = None
    query_seq_lengths: Any = None
    key_value_seq_lengths: Any = None
    query_segment_ids: Any = dataclasses.field(default=None, metadata=dict(group=_SEGMENT_IDS))
    key_value_segment_ids: Any = dataclasses.field(default=None, metadata=dict(group=_SEGMENT_IDS))
    sinks: Any = None
    block_mask: Any = None
    query_offset: Any = dataclasses.field(default=None, metadata=dict(internal=True))  # (batch,) position of query 0:
    # a KV-cache decode step (jattn.nnx)
    scale: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    local_window_size: Any = dataclasses.field(default=None, metadata=dict(static=True))
    logits_soft_cap: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    score_mod: Any = dataclasses.field(default=None, metadata=dict(static=True))
    mask_mod: Any = dataclasses.field(default=None, metadata=dict(static=True))

    def replace(self, **changes) -> CallOptions:
        return dataclasses.replace(self, **changes)


def option_names(*, static: bool | None = None, internal: bool = False) -> tuple[str, ...]:
    """The fields of :class:`CallOptions`: all, only the static (hashable) ones or only the array ones.

    >>> option_names(static=True)
    ('scale', 'is_causal', 'local_window_size', 'logits_soft_cap', 'score_mod', 'mask_mod')
    """
    return tuple(
        f.name
        for f in dataclasses.fields(CallOptions)
        if (static is None or f.metadata.get("static", False) == static)
        and (internal or not f.metadata.get("internal", False))
    )


def window_pair(local_window_size) -> tuple[int, int] | None:
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


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a call runs, as opposed to what it computes (:class:`CallOptions`): one value through dispatch."""

    implementation: str | None = None  # None: the auto rule
    block_q: int | None = None  # None: the backend's default (``_tiling.DEFAULT_BLOCK_SIZES``)
    block_kv: int | None = None
    sequence_parallel: Any = None  # a jattn.sharding.SequenceParallel, or None
    return_residual: bool = False
    kv_cache: bool = False  # key/value are a KV cache jattn.nnx wrote by a scatter in this step (see _one_query)


class AttentionInputs(NamedTuple):
    """A checked call's arrays, normalized to 4-D, and its options: what every implementation takes."""

    query: Array  # (batch, q_seq, heads, dim)
    key: Array  # (batch, kv_seq, kv_heads, dim)
    value: Array  # (batch, kv_seq, kv_heads, v_dim)
    bias: Array | None  # rank 4, broadcastable to (batch, heads, q_seq, kv_seq)
    mask: Array | None  # likewise, boolean
    opts: AttentionOptions
