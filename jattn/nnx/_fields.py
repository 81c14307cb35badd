"""The attributes ``MultiHeadAttention.__init__`` sets, declared once for the mixins that read them.

``AttendMethods``, ``CacheMethods`` and ``KerasMethods`` are parts of ``MultiHeadAttention`` kept in
their own files; they read the module's sizes, options and cache variables. Declaring those here (as
annotations only: nothing is assigned at class level) lets a type checker see what each part relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from jattn.sharding import SequenceParallel

from ._options import AttentionConfig


class ModuleFields:
    """Annotations of ``MultiHeadAttention``'s attributes (see its ``__init__``)."""

    num_heads: int
    in_features: int
    head_dim: int
    value_head_dim: int
    out_features: int
    num_kv_heads: int
    in_kv_features: int
    dropout_rate: float
    use_bias: bool
    dtype: Any
    param_dtype: Any
    implementation: str | None
    block_q: int | None
    block_kv: int | None
    sequence_parallel: SequenceParallel | None
    attention_config: AttentionConfig
    attention_fn: Callable | None
    deterministic: bool
    rngs: nnx.RngStream | None
    sinks: nnx.Param | None
    cached_key: nnx.Cache | None
    cached_value: nnx.Cache | None
    cache_index: nnx.Cache | None
