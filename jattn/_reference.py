"""The reference implementation: the per-example core, vmapped over batch and heads.

It materializes the ``(q_seq, kv_seq)`` logits of each head, so it is the
oracle the other kernels are tested against, not the fast path. Grouped-query
heads are vmapped over ``(kv_heads, groups)`` so K/V are never repeated.
"""

from __future__ import annotations

import jax
from jaxtyping import Array

from . import _core, masks
from ._options import AttentionOptions


def _leading_axis(x: Array | None) -> tuple[Array | None, int | None]:
    """Peels the leading axis for vmap: mapped if it has extent > 1, else dropped."""
    if x is None:
        return None, None
    if x.shape[0] == 1:
        return x[0], None
    return x, 0


def reference_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    opts: AttentionOptions,
) -> tuple[Array, Array]:
    """Materialized attention on normalized 4-D inputs.

    Args:
        query: ``(batch, q_seq, heads, dim)``.
        key: ``(batch, kv_seq, kv_heads, dim)``.
        value: ``(batch, kv_seq, kv_heads, v_dim)``.
        bias: ``None`` or broadcastable to ``(batch, heads, q_seq, kv_seq)``, rank 4.
        mask: likewise, boolean.
        opts: validated options (scale, structured masks, soft cap).

    Returns:
        ``(batch, q_seq, heads, v_dim)`` output and ``(batch, q_seq, heads)``
        log-sum-exp in the softmax compute dtype.
    """
    batch, q_seq, heads, dim = query.shape
    kv_seq, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    query = query.reshape(batch, q_seq, kv_heads, groups, dim)

    def grouped(x):  # (B|1, N|1, T|1, S|1) -> (B|1, K|1, G|1, T|1, S|1)
        if x is None:
            return None
        if x.shape[1] == 1:
            return x[:, :, None]
        return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])

    def one_example(q, k, v, bias, mask, per_example):
        # The predicate is closed over, not passed through vmap: it is no JAX type.
        mask_mod = opts.mask_mod(*per_example)
        structured = None if mask_mod is None else masks.materialize(mask_mod, q_seq, kv_seq)

        def one_head(q, k, v, bias, mask):
            if structured is not None:
                mask = structured if mask is None else structured & mask
            out, _, lse = _core.attention_core(
                q, k, v, mask, bias, scale=opts.scale, logits_soft_cap=opts.logits_soft_cap
            )
            return out, lse

        def one_kv_head(q, k, v, bias, mask):
            bias, bias_axis = _leading_axis(bias)
            mask, mask_axis = _leading_axis(mask)
            return jax.vmap(one_head, in_axes=(1, None, None, bias_axis, mask_axis), out_axes=1)(q, k, v, bias, mask)

        bias, bias_axis = _leading_axis(bias)
        mask, mask_axis = _leading_axis(mask)
        return jax.vmap(one_kv_head, in_axes=(1, 1, 1, bias_axis, mask_axis), out_axes=1)(q, k, v, bias, mask)

    bias, bias_axis = _leading_axis(grouped(bias))
    mask, mask_axis = _leading_axis(grouped(mask))
    per_example = opts.per_example_arrays()
    per_example_axes = tuple(None if a is None else 0 for a in per_example)
    f = jax.vmap(one_example, in_axes=(0, 0, 0, bias_axis, mask_axis, per_example_axes))
    out, lse = f(query, key, value, bias, mask, per_example)
    return (
        out.reshape(batch, q_seq, heads, value.shape[-1]),
        lse.reshape(batch, q_seq, heads),
    )
