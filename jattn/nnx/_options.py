"""The attention options of a module: those fixed at construction, composed with those of one call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jattn import masks
from jattn._prepare import CallOptions


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
