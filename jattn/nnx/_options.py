"""The attention options of a module: those fixed at construction (checked here), composed with those of one call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jattn import _checks, _dispatch, masks
from jattn._dispatch import Implementation
from jattn._options import CallOptions
from jattn.sharding import SequenceParallel


def check_execution(implementation: Any, block_q: Any, block_kv: Any, sequence_parallel: Any) -> Implementation | None:
    """Checks how a module runs jattn's attention, at construction; returns the checked ``implementation``.

    Raises:
        ValueError: an unknown ``implementation``, a block size that is not a positive int or None.
        TypeError: a ``sequence_parallel`` that is not a ``jattn.sharding.SequenceParallel`` or None.
    """
    implementation = _dispatch.check_implementation(implementation)
    _checks.check_positive_int("block_q", block_q, allow_none=True)
    _checks.check_positive_int("block_kv", block_kv, allow_none=True)
    if sequence_parallel is not None and not isinstance(sequence_parallel, SequenceParallel):
        raise TypeError(
            f"sequence_parallel must be a jattn.sharding.SequenceParallel or None; got {sequence_parallel!r}"
        )
    return implementation


def compose_score_mods(first: Callable | None, second: Callable | None) -> Callable | None:
    """``second(first(score, ...), ...)``: a module's score_mod, then a call's."""
    if first is None or second is None:
        return first or second

    def composed(score, batch, head, q_idx, kv_idx):
        return second(first(score, batch, head, q_idx, kv_idx), batch, head, q_idx, kv_idx)

    return composed


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """What a module fixes about its attention (static): window, soft cap, score and mask mods."""

    local_window_size: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    score_mod: Callable | None = None
    mask_mod: Callable | None = None

    def call(self, *, score_mod=None, mask_mod=None, sinks=None, **options: Any) -> CallOptions:
        """The options of one call: this config's, the call's ``options``, both mods applied (module's first)."""
        mods = [m for m in (self.mask_mod, mask_mod) if m is not None]
        return CallOptions(
            local_window_size=self.local_window_size,
            logits_soft_cap=self.logits_soft_cap,
            score_mod=compose_score_mods(self.score_mod, score_mod),
            mask_mod=masks.and_masks(*mods) if mods else None,
            sinks=sinks,
            **options,
        )
