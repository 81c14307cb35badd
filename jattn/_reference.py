"""The reference implementation: the per-example core, vmapped over batch and heads.

It materializes the ``(q_seq, kv_seq)`` weights of each head, so it is the
oracle the other kernels are tested against and the one path that can hand the
weights back or change them before they meet V (dropout), not the fast path.
Grouped-query heads are vmapped over ``(kv_heads, groups)`` so K/V are never
repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _core, _mods, _numerics
from ._options import AttentionInputs
from .masks import _combine

WeightsHook = Callable[[Float[Array, "batch heads q_seq kv_seq"]], Float[Array, "batch heads q_seq kv_seq"]]
"""Applied to the weights (in the value dtype) before the weighted sum, e.g. dropout."""


class ReferenceResult(NamedTuple):
    out: Float[Array, "batch q_seq heads v_dim"]
    lse: Float[Array, "batch q_seq heads"]
    weights: Float[Array, "batch heads q_seq kv_seq"]  # before the hook, in the value dtype


def _indices_along(x: Array, axis: int) -> Array:
    """``0 .. n-1`` for axis ``axis`` of ``x``, sharded as that axis is.

    The indices (what a score_mod or mask_mod receives as batch and head) are
    vmapped with ``x``, and on explicit mesh axes vmap wants every operand's
    mapped axis sharded alike: an unsharded ``arange`` beside a batch sharded
    over ``"data"`` is an error.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    out_sharding = None
    if sharding is not None and spec is not None and len(spec) > axis and spec[axis] is not None:
        out_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[axis]))
    return jax.lax.broadcasted_iota(jnp.int32, (x.shape[axis],), 0, out_sharding=out_sharding)


def _leading_axis(x: Array | None) -> tuple[Array | None, int | None]:
    """Peels the leading axis for vmap: mapped if it has extent > 1, else dropped."""
    if x is None:
        return None, None
    if x.shape[0] == 1:
        return x[0], None
    return x, 0


def _grouped(x: Array | None, kv_heads: int, groups: int) -> Array | None:
    """``(B|1, N|1, T|1, S|1)`` -> ``(B|1, K|1, G|1, T|1, S|1)``."""
    if x is None:
        return None
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])


def reference_attention(inputs: AttentionInputs, *, weights_hook: WeightsHook | None = None) -> ReferenceResult:
    """Materialized attention on normalized 4-D inputs.

    Args:
        inputs: query ``(batch, q_seq, heads, dim)``, key ``(batch, kv_seq,
            kv_heads, dim)``, value ``(batch, kv_seq, kv_heads, v_dim)``, bias and
            mask (None or rank 4, broadcastable to ``(batch, heads, q_seq,
            kv_seq)``) and the validated options.
        weights_hook: optional function of the ``(batch, heads, q_seq, kv_seq)``
            weights applied before the weighted sum (dropout).

    Returns:
        The ``(batch, q_seq, heads, v_dim)`` output, the ``(batch, q_seq, heads)``
        log-sum-exp in the softmax compute dtype, and the weights before the hook.
    """
    query, key, value, bias, mask, opts = inputs
    batch, q_seq, heads, _ = query.shape
    kv_seq, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(batch, q_seq, kv_heads, groups, query.shape[-1])

    static, shared = opts.static, jax.tree.map(lambda x: x[0], opts.shared)  # shared: drop the leading 1
    sinks = None if shared.sinks is None else shared.sinks.reshape(kv_heads, groups)
    layout = _mods.Layout("qs", groups)

    def one_example(example, q, k, logit_ops, arrays):
        bias, mask = logit_ops  # (kv_heads|1, groups|1, q_seq|1, kv_seq|1) each, or None
        opts_b = opts.with_arrays(arrays)  # this example's per-example arrays
        # The predicate is closed over, not passed through vmap: it is no JAX type.
        mask_mod = opts_b.mask_mod()
        structured = None if mask_mod is None else _combine.materialize(mask_mod, q_seq, kv_seq)
        q_start = 0 if arrays.q_offset is None else arrays.q_offset

        def at(kv_head, group, **kw):  # a user mod on this head's (q_seq, kv_seq) positions
            head = (kv_head, group)
            return dict(example=example, q_start=q_start, kv_start=0, head=head, **kw)

        def one_head(kv_head, group, q, k, logit_ops):
            bias, mask = logit_ops
            if structured is not None:
                mask = structured if mask is None else structured & mask
            if static.mask_mod is not None:
                user = _mods.evaluate(
                    static.mask_mod, shared.mask_consts, (q_seq, kv_seq), layout, **at(kv_head, group)
                )
                mask = user if mask is None else mask & user
            # Keys no query sees are selected out: padding may hold NaN or Inf, and 0 * NaN is NaN.
            seen = jnp.ones(k.shape[:1], bool) if mask is None else jnp.broadcast_to(mask, (q_seq, kv_seq)).any(0)
            k = jnp.where(seen[:, None], k, jnp.zeros((), k.dtype))

            def score_fn(x):
                return _mods.evaluate(
                    static.score_mod, shared.score_consts, x.shape, layout, **at(kv_head, group, score=x)
                )

            weights, lse = _core.attention_weights(
                q,
                k,
                mask,
                bias,
                scale=static.scale,
                logits_soft_cap=static.logits_soft_cap,
                score_fn=None if static.score_mod is None else score_fn,
                sink=None if sinks is None else sinks[kv_head, group],
            )
            return weights, lse, seen

        def one_kv_head(kv_head, q, k, bias, mask):
            bias, bias_axis = _leading_axis(bias)
            mask, mask_axis = _leading_axis(mask)
            return jax.vmap(one_head, in_axes=(None, 0, 1, None, (bias_axis, mask_axis)))(
                kv_head, _indices_along(q, 1), q, k, (bias, mask)
            )

        bias, bias_axis = _leading_axis(bias)
        mask, mask_axis = _leading_axis(mask)
        return jax.vmap(one_kv_head, in_axes=(0, 1, 1, bias_axis, mask_axis))(_indices_along(q, 1), q, k, bias, mask)

    bias, bias_axis = _leading_axis(_grouped(bias, kv_heads, groups))
    mask, mask_axis = _leading_axis(_grouped(mask, kv_heads, groups))
    f = jax.vmap(one_example, in_axes=(0, 0, 0, (bias_axis, mask_axis), 0))
    weights, lse, seen = f(_indices_along(q, 0), q, key, (bias, mask), opts.arrays)  # (batch, K, G, T, S), (.., T)
    weights = weights.astype(value.dtype).reshape(batch, heads, q_seq, kv_seq)

    def weighted_sum(w, v, seen):
        return _numerics.weighted_sum(w, jnp.where(seen[:, None], v, jnp.zeros((), v.dtype)))

    used = weights if weights_hook is None else weights_hook(weights)
    context = jax.vmap(weighted_sum, in_axes=(0, None, 0))  # groups share one value head
    context = jax.vmap(context, in_axes=(0, 1, 0))  # kv_heads: (K, G, T, S) x (S, K, Dv)
    context = jax.vmap(context)  # batch
    out = context(used.reshape(batch, kv_heads, groups, q_seq, kv_seq), value, seen)  # (batch, K, G, T, Dv)
    return ReferenceResult(
        out=out.transpose(0, 3, 1, 2, 4).reshape(batch, q_seq, heads, value.shape[-1]),
        lse=lse.transpose(0, 3, 1, 2).reshape(batch, q_seq, heads),
        weights=weights,
    )
