"""The ``"xla"`` and ``"cudnn"`` implementations: delegating to ``jax.nn.dot_product_attention``.

What jax.nn lacks is in the capability table (``_capabilities``); calls reach here already checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from . import _numerics
from ._options import AttentionInputs
from .masks import _combine, _positions


def _shifted_mask(is_causal, window, offsets, q_seq: int, kv_seq: int) -> Array:
    """Causal and window masks at each example's query offset, dense ``(batch, 1, q_seq, kv_seq)``."""

    def one(offset):
        mods = [_positions.Causal(offset)] if is_causal else []
        if window is not None:
            mods.append(_positions.SlidingWindow(*window, offset))
        return _combine.materialize(_combine.and_masks(*mods), q_seq, kv_seq)

    return jax.vmap(one)(offsets)[:, None]


def jax_nn_attention(inputs: AttentionInputs, implementation: str, *, return_residual: bool) -> tuple[Array, Array]:
    """``(out, lse)`` from ``jax.nn.dot_product_attention`` (the call already checked against the capability
    table: it has no option jax.nn lacks)."""
    query, key, value, bias, mask, opts = inputs
    is_causal, window = opts.static.is_causal, opts.static.local_window_size
    if opts.arrays.q_offset is not None and (is_causal or window is not None):
        # jax.nn has no query offset (a decode step): the shifted causal/window mask goes in as a dense one.
        dense = _shifted_mask(is_causal, window, opts.arrays.q_offset, query.shape[1], key.shape[1])
        mask = dense if mask is None else mask & dense
        is_causal, window = False, None
    # jax.nn mixes int32 lengths with default-int positions; keep that working under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        result = jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=opts.static.scale,
            is_causal=is_causal,
            query_seq_lengths=opts.arrays.q_length,
            key_value_seq_lengths=opts.arrays.kv_length,
            local_window_size=window,
            implementation=implementation,
            return_residual=return_residual,
        )
    if not return_residual:  # the log-sum-exp costs an extra pass: ask only when wanted
        return result, jnp.zeros(result.shape[:-1], _numerics.compute_dtype(query.dtype))
    out, lse = result
    # jax.nn gives the log-sum-exp in the input dtype; jattn's is in the softmax dtype.
    return out, lse.astype(_numerics.compute_dtype(query.dtype))
