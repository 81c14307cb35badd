"""One query per head over a KV cache (a ``jattn.nnx`` decode step), reading the cache as it lies.

``jax.nn``'s program (and the reference's) contracts the query with keys laid out
``(batch, kv_seq, kv_heads, dim)`` over the batch and head axes, and XLA:CPU first
copies the whole cache to ``(batch, kv_heads, kv_seq, dim)`` so that those axes
lead, every step. A decode step reads the cache once and does little arithmetic,
so that copy was most of its attention time (about half of a whole batch-8 step
over a 256-token cache, ``bench.common_case``'s decode rows).

Here the query is laid out block-diagonally, ``(batch, kv_heads * dim, heads)``
with head ``h``'s query in rows ``kv_head(h) * dim ...`` and zeros elsewhere, so
the logits are one plain product with the cache as it lies, ``(kv_seq, kv_heads *
dim) @ (kv_heads * dim, heads)`` per example, and the weighted sum is ``(heads,
kv_seq) @ (kv_seq, kv_heads * v_dim)``, of which each head keeps its own kv head's
slice. Both products do ``kv_heads`` times the arithmetic a head needs, so the
form is used for a few kv heads only (:data:`MAX_KV_HEADS`), where reading the
cache dominates.

Only for ``jattn.nnx``'s own cache (``Execution.kv_cache``): the reshape of the
cache to ``(kv_seq, kv_heads * dim)`` is free, but when the cache was written in
the same program by a dynamic-update-slice (as Flax and most hand-written decode
loops do) XLA fuses that write into the reshape and copies the cache for each
reader, which is slower than jax.nn's one transposed copy. ``jattn.nnx`` writes
its cache by a scatter that XLA does not fuse (``_cache.KVCache.write``).

Semantics are jattn's: a row that sees no key gives zeros and the masking
sentinel as its log-sum-exp. As with the jax.nn delegate it replaces, hidden
keys and values are masked out of the softmax, not selected out of the products,
so NaN or Inf stored past the visible keys would reach the output (a cache from
``init_cache`` holds zeros there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _capabilities, _numerics
from ._options import AttentionInputs
from .masks._positions import key_interval

FEATURES = frozenset(
    {"scale", "is_causal", "key_value_seq_lengths", "query_offset", "local_window_size"}
    | {_capabilities.EMPTY_ROWS, _capabilities.V_DIM, _capabilities.FLOAT64, _capabilities.ONE_SIDED_WINDOW_ONLY}
    | {_capabilities.WIDE_FLOATS}
)
"""The capability-table features the one-query form computes (a call using any other goes elsewhere)."""

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
"""Inputs already in the softmax's dtype: XLA:CPU has no 16-bit x 16-bit -> float32 product for every
shape, and widening the cache would be the copy this form avoids."""

MAX_KV_HEADS = 8
"""Up to this many kv heads (the products do ``kv_heads`` times the needed arithmetic): 8, the head count
``bench.common_case``'s decode rows measure."""


def applies(q_seq: int | None, kv_heads: int | None, dtype, features) -> bool:
    """Whether a call of ``q_seq`` queries over ``kv_heads`` kv heads in ``dtype`` using ``features`` (names
    of the capability table) is one the one-query form computes."""
    return (
        q_seq == 1
        and kv_heads is not None
        and kv_heads <= MAX_KV_HEADS
        and jnp.dtype(dtype) in DTYPES
        and set(features) <= FEATURES
    )


def visible_keys(inputs: AttentionInputs) -> Array:
    """``(batch, kv_seq)``: the keys each example's one query sees (lengths, causal, window; lengths already
    clipped to ``[0, kv_seq]``), with the query at position ``query_offset`` (default 0)."""
    arrays, static = inputs.opts.arrays, inputs.opts.static
    batch, kv_seq = inputs.key.shape[:2]
    pos = jnp.zeros((batch,), jnp.int32) if arrays.q_offset is None else arrays.q_offset.astype(jnp.int32)
    end = jnp.full((batch,), kv_seq, jnp.int32) if arrays.kv_length is None else arrays.kv_length.astype(jnp.int32)
    lo, hi = key_interval(pos, end, causal=static.is_causal, window=static.local_window_size)
    keys = jnp.arange(kv_seq, dtype=jnp.int32)[None, :]
    return (keys >= jnp.broadcast_to(lo, (batch,))[:, None]) & (keys < hi[:, None])


def one_query_attention(
    inputs: AttentionInputs,
) -> tuple[Float[Array, "batch 1 heads v_dim"], Float[Array, "batch 1 heads"]]:
    """``(out, lse)`` of a call :func:`applies` accepts.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn._options import CallOptions
        >>> from jattn._prepare import prepare
        >>> q, kv = jnp.ones((2, 1, 4, 8)), jnp.ones((2, 16, 2, 8))
        >>> lengths = jnp.array([0, 5])
        >>> out, lse = one_query_attention(prepare(q, kv, kv, CallOptions(key_value_seq_lengths=lengths)).inputs)
        >>> out.shape, out[0].max().item(), out[1].min().item()
        ((2, 1, 4, 8), 0.0, 1.0)
    """
    query, key, value = inputs.query, inputs.key, inputs.value
    batch, _, heads, dim = query.shape
    kv_seq, kv_heads, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    groups = heads // kv_heads
    acc = _numerics.compute_dtype(query.dtype)
    seen = visible_keys(inputs)[:, :, None]  # (batch, kv_seq, 1)

    eye = jnp.eye(kv_heads, dtype=query.dtype)
    q = query[:, 0].reshape(batch, kv_heads, groups, dim).transpose(0, 1, 3, 2)  # (batch, kv_heads, dim, groups)
    diagonal = (q[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(batch, kv_heads * dim, heads)
    k = key.reshape(batch, kv_seq, kv_heads * dim)
    logits = jnp.einsum("btc,bch->bth", k, diagonal, preferred_element_type=acc) * inputs.opts.static.scale
    logits = jnp.where(seen, logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.maximum(logits.max(axis=1), _numerics.masked_value(acc)))  # (batch, heads)
    p = jnp.exp(logits - top[:, None])  # a hidden key: exp(-inf) = 0
    total = p.sum(axis=1)  # (batch, heads)
    v = value.reshape(batch, kv_seq, kv_heads * v_dim)
    every = jnp.einsum("bth,btc->bhc", p.astype(value.dtype), v, preferred_element_type=acc)
    every = every.reshape(batch, kv_heads, groups, kv_heads, v_dim)  # each head against every kv head's values
    own = (every * eye.astype(acc)[None, :, None, :, None]).sum(axis=3).reshape(batch, heads, v_dim)
    some = total > 0
    safe = jnp.where(some, total, 1)  # no 0/0, in the value or its derivatives
    out = own / safe[..., None]
    lse = jnp.where(some, top + jnp.log(safe), _numerics.masked_value(acc))
    return out[:, None].astype(value.dtype), lse[:, None]
