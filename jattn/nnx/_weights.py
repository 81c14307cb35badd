"""The materialized path: attention weights for inspection and for dropout.

``jattn.dot_product_attention`` returns the context only (its fast kernels
never hold the ``(q_seq, kv_seq)`` weights). When the weights are wanted —
``return_weights=True`` or dropout on the weights during training — the module
composes the public per-example core instead: ``jattn.scores`` and
``jattn.softmax`` give the weights, dropout (if any) is applied to them, and
``jattn.context`` gives the output. Batch and heads come from ``jax.vmap``;
grouped-query heads are mapped over ``(kv_heads, groups)`` so K/V are never
repeated. Every mask option is turned into one dense boolean mask with the
``jattn.masks`` predicates, exactly the options ``dot_product_attention`` takes.

``fast_attention`` and ``weights_attention`` are the two jit-compiled entry
points of a module call: an eager call compiles once per shape, not once per op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import jattn
from jattn import masks


def visible_mask(
    batch: int,
    heads: int,
    q_seq: int,
    kv_seq: int,
    *,
    mask: Bool[Array, "#batch #heads q_seq kv_seq"] | None,
    is_causal: bool,
    query_seq_lengths: Int[Array, " batch"] | None,
    key_value_seq_lengths: Int[Array, " batch"] | None,
    query_segment_ids: Int[Array, "batch q_seq"] | None,
    key_value_segment_ids: Int[Array, "batch kv_seq"] | None,
) -> Bool[Array, "batch heads q_seq kv_seq"] | None:
    """Every mask option ANDed into one dense ``(batch, heads, q_seq, kv_seq)`` mask (None: all visible)."""
    per_example = (query_seq_lengths, key_value_seq_lengths, query_segment_ids, key_value_segment_ids)
    structured = None
    if is_causal or any(a is not None for a in per_example):

        def one_example(q_length, kv_length, q_ids, kv_ids):
            mods = [masks.causal()] if is_causal else []
            if q_length is not None or kv_length is not None:
                mods.append(masks.lengths(q_length, kv_length))
            if q_ids is not None:
                mods.append(masks.segments(q_ids, kv_ids))
            return masks.materialize(masks.and_masks(*mods), q_seq, kv_seq)

        axes = tuple(None if a is None else 0 for a in per_example)
        if all(a is None for a in per_example):  # causal only: the same for every example
            structured = one_example(None, None, None, None)[None, None]
        else:
            structured = jax.vmap(one_example, in_axes=axes)(*per_example)[:, None]
    if mask is None and structured is None:
        return None
    if mask is None:
        combined = structured
    elif structured is None:
        combined = mask
    else:
        combined = mask & structured
    return jnp.broadcast_to(combined, (batch, heads, q_seq, kv_seq))


def materialized_attention(
    query: Float[Array, "batch q_seq heads dim"],
    key: Float[Array, "batch kv_seq kv_heads dim"],
    value: Float[Array, "batch kv_seq kv_heads v_dim"],
    visible: Bool[Array, "batch heads q_seq kv_seq"] | None,
    dropout: Callable[[Array], Array] | None = None,
) -> tuple[Float[Array, "batch q_seq heads v_dim"], Float[Array, "batch heads q_seq kv_seq"]]:
    """``context(dropout(softmax(scores(q, k), visible)), v)`` and the weights before dropout.

    Logits and softmax run in float32 (float64 for float64 inputs), as in every
    jattn kernel; the weights are cast to the value dtype for the weighted sum.
    A query that sees no key gets zero weights and a zero output.
    """
    batch, q_seq, heads, dim = query.shape
    kv_seq, kv_heads, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    groups = heads // kv_heads
    acc = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    q = query.astype(acc).reshape(batch, q_seq, kv_heads, groups, dim)
    k = key.astype(acc)
    m = None if visible is None else visible.reshape(batch, kv_heads, groups, q_seq, kv_seq)
    m_axis = None if m is None else 0

    def head_weights(q, k, m):  # (q_seq, dim), (kv_seq, dim), (q_seq, kv_seq) -> (q_seq, kv_seq)
        return jattn.softmax(jattn.scores(q, k), m)

    f = jax.vmap(head_weights, in_axes=(1, None, m_axis))  # groups share one K head
    f = jax.vmap(f, in_axes=(1, 1, m_axis))  # kv_heads
    f = jax.vmap(f, in_axes=(0, 0, m_axis))  # batch
    weights = f(q, k, m).reshape(batch, heads, q_seq, kv_seq).astype(value.dtype)

    used = weights if dropout is None else dropout(weights)
    g = jax.vmap(jattn.context, in_axes=(0, None))  # groups: (G, T, S) x (S, Dv) -> (G, T, Dv)
    g = jax.vmap(g, in_axes=(0, 1))  # kv_heads: (K, G, T, S) x (S, K, Dv) -> (K, G, T, Dv)
    g = jax.vmap(g, in_axes=(0, 0))  # batch
    out = g(used.reshape(batch, kv_heads, groups, q_seq, kv_seq), value)  # (B, K, G, T, Dv)
    out = out.reshape(batch, heads, q_seq, v_dim).transpose(0, 2, 1, 3)
    return out, weights


@functools.partial(jax.jit, static_argnames=("is_causal", "implementation"))
def fast_attention(query, key, value, options, *, is_causal, implementation):
    return jattn.dot_product_attention(query, key, value, is_causal=is_causal, implementation=implementation, **options)


@functools.partial(jax.jit, static_argnames=("is_causal", "implementation", "dropout_rate"))
def weights_attention(query, key, value, options, dropout_key, *, is_causal, implementation, dropout_rate):
    """Context and weights through the materialized core, with dropout on the weights if ``dropout_key``."""
    # The fast path's argument checks (and error messages), at trace time only.
    jax.eval_shape(
        functools.partial(fast_attention, is_causal=is_causal, implementation=implementation),
        query,
        key,
        value,
        options,
    )
    batch, q_seq, heads, _ = query.shape
    visible = visible_mask(batch, heads, q_seq, key.shape[1], is_causal=is_causal, **options)
    dropout = None
    if dropout_key is not None:
        keep_prob = 1.0 - dropout_rate

        def dropout(w):  # as nnx.Dropout: keep with probability 1 - rate, scale the kept weights up
            keep = jax.random.bernoulli(dropout_key, keep_prob, w.shape)
            return jax.lax.select(keep, w / jnp.asarray(keep_prob, w.dtype), jnp.zeros_like(w))

    return materialized_attention(query, key, value, visible, dropout)
