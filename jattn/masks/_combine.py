"""Combining predicates, FlexAttention-style predicates of ``(batch, head, q_idx, kv_idx)``, and materializing."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool

from .. import _checks, _mods
from ._positions import _as_index

MaskMod = Callable[..., Array]
"""``mask_mod(q_idx, kv_idx) -> bool`` (a position predicate) or ``mask_mod(batch, head, q_idx, kv_idx) -> bool``
(FlexAttention's signature); True = attend. Every position predicate works in both places."""


def _call(mod: MaskMod, idx: tuple) -> Array:
    """``mod`` on ``(q_idx, kv_idx)`` or ``(batch, head, q_idx, kv_idx)``, whichever signature it has."""
    if len(idx) == 2:
        return mod(*idx)
    return _mods.as_mask_mod(mod)(*idx)


@dataclasses.dataclass(frozen=True, eq=False)
class _Combined:
    """Predicates folded with ``combine`` (called with 2 or 4 indices, like its predicates)."""

    mods: tuple[MaskMod, ...]
    combine = staticmethod(operator.and_)

    def __call__(self, *idx: Array) -> Array:
        return functools.reduce(self.combine, (_call(mod, idx) for mod in self.mods))


class And(_Combined):
    """Visible where every predicate is."""


class Or(_Combined):
    """Visible where any predicate is."""

    combine = staticmethod(operator.or_)


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixLM:
    """Keys before ``prefix_length`` are seen by every query (bidirectional prefix); after it, causal."""

    prefix_length: ArrayLike  # a scalar, or (batch,) per example

    def __call__(self, batch: Array, head: Array, q_idx: Array, kv_idx: Array) -> Array:
        length = jnp.asarray(self.prefix_length)
        length = length[batch] if length.ndim else length
        return (kv_idx < _as_index(length, kv_idx)) | (kv_idx <= q_idx)


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """Query ``i`` of example ``b`` sees key ``j`` where ``q_ids[b, i] == kv_ids[b, j]`` (packed documents)."""

    q_ids: Array  # (batch, q_seq)
    kv_ids: Array  # (batch, kv_seq)

    def __call__(self, batch: Array, head: Array, q_idx: Array, kv_idx: Array) -> Array:
        return self.q_ids[batch, q_idx] == self.kv_ids[batch, kv_idx]


def and_masks(*mods: MaskMod) -> MaskMod:
    """Combines predicates: visible only where all of them are.

    Raises:
        ValueError: if no predicate is given.

    Example:
        >>> from jattn import masks
        >>> mod = masks.and_masks(masks.causal(), masks.lengths(kv_length=2))
        >>> print(masks.materialize(mod, 3, 3).astype(int))
        [[1 0 0]
         [1 1 0]
         [1 1 0]]
    """
    return _combined(And, "and_masks", mods)


def or_masks(*mods: MaskMod) -> MaskMod:
    """Combines predicates: visible where any of them is.

    Raises:
        ValueError: if no predicate is given.

    Example:
        >>> from jattn import masks
        >>> mod = masks.or_masks(masks.causal(), masks.sliding_window(0, 1))
        >>> print(masks.materialize(mod, 3, 3).astype(int))
        [[1 1 0]
         [1 1 1]
         [1 1 1]]
    """
    return _combined(Or, "or_masks", mods)


def _combined(kind: type[_Combined], name: str, mods: tuple[MaskMod, ...]) -> MaskMod:
    """One predicate stays itself; several become ``kind(mods)``."""
    if not mods:
        raise ValueError(f"{name} needs at least one mask_mod; got none")
    return mods[0] if len(mods) == 1 else kind(tuple(mods))


def prefix_lm(prefix_length: ArrayLike) -> PrefixLM:
    """Prefix-LM: every query sees the first ``prefix_length`` keys (a bidirectional prefix), then causal.

    Args:
        prefix_length: integer scalar, or ``(batch,)`` for one prefix per example
            (a ``mask_mod(batch, head, q_idx, kv_idx)``); may be traced.

    Raises:
        TypeError: if ``prefix_length`` is not an integer.
        ValueError: if it has more than one axis.

    Example:
        >>> from jattn import masks
        >>> print(masks.materialize(masks.prefix_lm(2), 4, 4).astype(int))
        [[1 1 0 0]
         [1 1 0 0]
         [1 1 1 0]
         [1 1 1 1]]
    """
    _checks.check_integer("prefix_length", prefix_length)
    _checks.check_rank("prefix_length", prefix_length, (0, 1), "() or (batch,)")
    return PrefixLM(jnp.asarray(prefix_length))


def document(q_ids: ArrayLike, kv_ids: ArrayLike | None = None) -> Document:
    """Document masking for packed sequences: attend only within the same document id.

    Args:
        q_ids: integer ``(batch, q_seq)`` document id of every query position; may
            be traced (ids that change per batch do not recompile).
        kv_ids: ``(batch, kv_seq)`` ids of the keys; default ``q_ids`` (self-attention).

    Raises:
        TypeError: if the ids are not integers.
        ValueError: if the ids are not rank 2 or their batch sizes differ.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import masks
        >>> ids = jnp.array([[0, 0, 1, 1, 1]])
        >>> print(masks.materialize(masks.document(ids), 5, 5).astype(int))
        [[1 1 0 0 0]
         [1 1 0 0 0]
         [0 0 1 1 1]
         [0 0 1 1 1]
         [0 0 1 1 1]]
    """
    kv_ids = q_ids if kv_ids is None else kv_ids
    for name, ids, axis in (("q_ids", q_ids, "q_seq"), ("kv_ids", kv_ids, "kv_seq")):
        _checks.check_integer(name, ids)
        _checks.check_rank(name, ids, (2,), f"(batch, {axis})")
    if jnp.shape(q_ids)[0] != jnp.shape(kv_ids)[0]:
        raise ValueError(f"q_ids and kv_ids must have one batch size; got {jnp.shape(q_ids)} and {jnp.shape(kv_ids)}")
    return Document(jnp.asarray(q_ids), jnp.asarray(kv_ids))


def materialize(
    mask_mod: MaskMod, q_seq: int, kv_seq: int, *, batch: int = 0, head: int = 0
) -> Bool[Array, "q_seq kv_seq"]:
    """Evaluates a predicate on every position pair: a dense boolean mask.

    Args:
        mask_mod: ``mask_mod(q_idx, kv_idx) -> bool``, or
            ``mask_mod(batch, head, q_idx, kv_idx) -> bool``.
        q_seq: number of query positions.
        kv_seq: number of key/value positions.
        batch: the example a four-argument ``mask_mod`` is evaluated for.
        head: the head a four-argument ``mask_mod`` is evaluated for.

    Returns:
        Boolean array of shape ``(q_seq, kv_seq)``, True = attend.

    Raises:
        ValueError: if a size is negative.
        TypeError: if the predicate does not return booleans.

    Example:
        >>> from jattn import masks
        >>> masks.materialize(masks.causal(), 2, 3).shape
        (2, 3)
    """
    for name, value in (("q_seq", q_seq), ("kv_seq", kv_seq)):
        symbolic = jax.export.is_symbolic_dim(value)  # jax.export with a symbolic sequence length
        if not symbolic and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    q_idx = jnp.arange(q_seq, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(kv_seq, dtype=jnp.int32)[None, :]
    visible = _mods.as_mask_mod(mask_mod)(jnp.int32(batch), jnp.int32(head), q_idx, kv_idx)
    _checks.check_bool("mask_mod result", visible)
    return jnp.broadcast_to(visible, (q_seq, kv_seq))
