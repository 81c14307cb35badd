"""Position predicates ``mask_mod(q_idx, kv_idx) -> bool``: the masks that depend on positions only."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int

from .. import _checks


def _as_index(x: ArrayLike, like: ArrayLike) -> Array:
    """``x`` in the integer dtype of the positions ``like`` (no silent promotion)."""
    return jnp.asarray(x).astype(jnp.result_type(like))


def key_interval(position, end, *, causal: bool, window: tuple[int, int] | None):
    """The keys ``[lo, hi)`` a query at ``position`` sees among keys ``[0, end)`` under the interval masks:
    ``causal`` and a ``(left, right)`` window (broadcast over ``position`` and ``end``; ``lo`` may be 0).

    Example:
        >>> lo, hi = key_interval(jnp.array([0, 5, 9]), 8, causal=True, window=(2, 0))
        >>> lo.tolist(), hi.tolist()
        ([0, 3, 7], [1, 6, 8])
    """
    lo: Array | int = 0
    hi = end
    if causal:
        hi = jnp.minimum(hi, position + 1)
    if window is not None:
        left, right = window
        lo = jnp.maximum(position - left, 0)
        hi = jnp.minimum(hi, position + right + 1)
    return lo, hi


@dataclasses.dataclass(frozen=True, eq=False)
class Causal:
    """Query ``i`` (at absolute position ``i + offset``) sees keys ``j <= i + offset``."""

    offset: ArrayLike = 0

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return kv_idx <= q_idx + _as_index(self.offset, q_idx)


@dataclasses.dataclass(frozen=True, eq=False)
class SlidingWindow:
    """Query at position ``p = i + offset`` sees keys ``p - left <= j <= p + right``."""

    left: int
    right: int
    offset: ArrayLike = 0

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        pos = q_idx + _as_index(self.offset, q_idx)
        return (kv_idx >= pos - self.left) & (kv_idx <= pos + self.right)


@dataclasses.dataclass(frozen=True, eq=False)
class Lengths:
    """Only the first ``q_length`` queries and ``kv_length`` keys take part."""

    q_length: ArrayLike | None = None
    kv_length: ArrayLike | None = None

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        visible = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)
        if self.q_length is not None:
            visible = visible & (q_idx < _as_index(self.q_length, q_idx))
        if self.kv_length is not None:
            visible = visible & (kv_idx < _as_index(self.kv_length, kv_idx))
        return visible


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """Query ``i`` sees key ``j`` only where ``q_ids[i] == kv_ids[j]`` (packed sequences)."""

    q_ids: Array
    kv_ids: Array

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return self.q_ids[q_idx] == self.kv_ids[kv_idx]


@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """An explicit boolean ``(q_seq, kv_seq)`` mask, looked up by position."""

    mask: Array

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return self.mask[q_idx, kv_idx]


@dataclasses.dataclass(frozen=True, eq=False)
class Chunked:
    """Query ``i`` sees key ``j`` only within the same chunk: ``i // size == j // size`` (Llama 4's local chunks)."""

    size: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return q_idx // self.size == kv_idx // self.size


@dataclasses.dataclass(frozen=True, eq=False)
class Dilated:
    """Query ``i`` sees key ``j`` where ``i - j`` is a multiple of ``stride`` (dilated / strided attention)."""

    stride: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return (q_idx - kv_idx) % self.stride == 0


def causal(*, offset: ArrayLike = 0) -> Causal:
    """Causal predicate: query ``i`` sees keys ``j <= i + offset``.

    ``offset`` is the absolute position of query 0 (e.g. the number of tokens
    already in a KV cache); it may be a traced integer.

    Raises:
        TypeError: if ``offset`` is not an integer.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.causal(), 3, 3).astype(int))
        [[1 0 0]
         [1 1 0]
         [1 1 1]]
    """
    _checks.check_integer("offset", offset)
    return Causal(offset)


def sliding_window(left: int, right: int | None = None, *, offset: ArrayLike = 0) -> SlidingWindow:
    """Local attention: query at ``p`` sees keys in ``[p - left, p + right]``.

    Matches ``local_window_size=(left, right)`` of ``jax.nn.dot_product_attention``;
    ``right=None`` (the default) means the same as ``left``. Pass
    ``sliding_window(left, 0)`` for a causal window.

    Raises:
        ValueError: if a window side is negative.
        TypeError: if ``offset`` is not an integer.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.sliding_window(1), 4, 4).astype(int))
        [[1 1 0 0]
         [1 1 1 0]
         [0 1 1 1]
         [0 0 1 1]]
    """
    if right is None:
        right = left
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sliding_window {side} must be a non-negative int; got {value!r}")
    _checks.check_integer("offset", offset)
    return SlidingWindow(left, right, offset)


def lengths(q_length: ArrayLike | None = None, kv_length: ArrayLike | None = None) -> Lengths:
    """Padding predicate: positions at or past a length take no part.

    Lengths are scalars here (one example); batched callers ``jax.vmap`` over them.

    Raises:
        TypeError: if a length is not an integer.
        ValueError: if a length is not a scalar.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.lengths(2, 3), 3, 4).astype(int))
        [[1 1 1 0]
         [1 1 1 0]
         [0 0 0 0]]
    """
    for name, value in (("q_length", q_length), ("kv_length", kv_length)):
        if value is not None:
            _checks.check_integer(name, value)
            _checks.check_rank(name, value, (0,), "()")
    return Lengths(q_length, kv_length)


def segments(q_ids: Int[ArrayLike, " q_seq"], kv_ids: Int[ArrayLike, " kv_seq"]) -> Segments:
    """Segment predicate for packed sequences: attend only within the same segment id.

    Raises:
        TypeError: if the ids are not integers.
        ValueError: if the ids are not vectors.

    Example:
        >>> from jattn import masks
        >>> ids = jnp.array([0, 0, 1])
        >>> print(masks.materialize(masks.segments(ids, ids), 3, 3).astype(int))
        [[1 1 0]
         [1 1 0]
         [0 0 1]]
    """
    for name, value in (("q_ids", q_ids), ("kv_ids", kv_ids)):
        _checks.check_integer(name, value)
        _checks.check_rank(name, value, (1,), f"({name[:-4]}_seq,)")
    return Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))


def dense(mask: Bool[ArrayLike, "q_seq kv_seq"]) -> Dense:
    """Wraps an explicit boolean ``(q_seq, kv_seq)`` mask as a predicate.

    Raises:
        TypeError: if ``mask`` is not boolean.
        ValueError: if ``mask`` is not rank 2.

    Example:
        >>> from jattn import masks
        >>> mod = masks.dense(jnp.array([[True, False], [False, True]]))
        >>> print(mod(jnp.array(0), jnp.array(1)))
        False
    """
    _checks.check_bool("mask", mask)
    _checks.check_rank("mask", mask, (2,), "(q_seq, kv_seq)")
    return Dense(jnp.asarray(mask))


def chunked(size: int) -> Chunked:
    """Local chunks (Llama 4): query ``i`` sees key ``j`` only where ``i // size == j // size``.

    Combine with :func:`causal` for causal chunked attention.

    Raises:
        ValueError: if ``size`` is not a positive int.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.and_masks(masks.causal(), masks.chunked(2)), 4, 4).astype(int))
        [[1 0 0 0]
         [1 1 0 0]
         [0 0 1 0]
         [0 0 1 1]]
    """
    _checks.check_positive_int("size", size)
    return Chunked(size)


def dilated(stride: int) -> Dilated:
    """Dilated (strided) attention: query ``i`` sees key ``j`` where ``i - j`` is a multiple of ``stride``.

    Raises:
        ValueError: if ``stride`` is not a positive int.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.and_masks(masks.causal(), masks.dilated(2)), 4, 4).astype(int))
        [[1 0 0 0]
         [0 1 0 0]
         [1 0 1 0]
         [0 1 0 1]]
    """
    _checks.check_positive_int("stride", stride)
    return Dilated(stride)
