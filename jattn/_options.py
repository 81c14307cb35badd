"""Validated options of one ``dot_product_attention`` call, shared by every kernel."""

from __future__ import annotations

import dataclasses

from jaxtyping import Array

from . import masks


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionOptions:
    """Everything besides q/k/v/bias/mask, already checked and normalized.

    Per-example arrays carry a leading ``batch`` axis: lengths ``(batch,)`` and
    segment ids ``(batch, q_seq)`` / ``(batch, kv_seq)``, all int32.
    """

    scale: float
    is_causal: bool = False
    local_window_size: tuple[int, int] | None = None
    query_seq_lengths: Array | None = None
    key_value_seq_lengths: Array | None = None
    query_segment_ids: Array | None = None
    key_value_segment_ids: Array | None = None
    logits_soft_cap: float | None = None

    @property
    def has_mask_mod(self) -> bool:
        return (
            self.is_causal
            or self.local_window_size is not None
            or any(a is not None for a in self.per_example_arrays())
        )

    def per_example_arrays(self) -> tuple[Array | None, Array | None, Array | None, Array | None]:
        """The batched arrays the per-example predicate is built from (for vmap)."""
        return (
            self.query_seq_lengths,
            self.key_value_seq_lengths,
            self.query_segment_ids,
            self.key_value_segment_ids,
        )

    def with_per_example_arrays(self, *arrays: Array | None) -> AttentionOptions:
        """The same options over other per-example arrays (e.g. one shard's), in ``per_example_arrays`` order."""
        names = ("query_seq_lengths", "key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids")
        return dataclasses.replace(self, **dict(zip(names, arrays, strict=True)))

    def mask_mod(self, q_length, kv_length, q_segment_ids, kv_segment_ids) -> masks.MaskMod | None:
        """The position predicate of one example, from its slice of ``per_example_arrays``."""
        mods = []
        if self.is_causal:
            mods.append(masks.Causal())
        if self.local_window_size is not None:
            mods.append(masks.SlidingWindow(*self.local_window_size))
        if q_length is not None or kv_length is not None:
            mods.append(masks.Lengths(q_length, kv_length))
        if q_segment_ids is not None:
            mods.append(masks.Segments(q_segment_ids, kv_segment_ids))
        return masks.and_masks(*mods) if mods else None
