"""The ``"xla"`` and ``"cudnn"`` implementations: delegating to ``jax.nn.dot_product_attention``.

What jax.nn lacks is in the capability table (``_capabilities``); calls reach here already checked.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from . import _numerics
from ._options import AttentionInputs
from .masks import _combine, _positions
from .masks._positions import key_interval

# jax.nn's overloads key the result type on a literal return_residual; this module passes a bool.
_jax_nn_dpa: Any = jax.nn.dot_product_attention


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
        result = _jax_nn_dpa(
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


def rows_with_a_key(inputs: AttentionInputs) -> Array:
    """``(batch, q_seq, heads|1)`` bool: the query rows that see at least one key under every mask option
    jax.nn has (lengths, causal, window, the query offset of a decode step, a dense mask).

    Closed form for the position masks (each row sees a contiguous key range ``[lo, hi]``), so it costs
    ``O(batch * q_seq)``; a dense mask adds one ``any`` over it (jax.nn reads it whole anyway), over the
    mask's own shape where no causal or window mask makes the key range differ between rows.
    """
    query, key, _, _, mask, opts = inputs
    static, arrays = opts.static, opts.arrays
    batch, q_seq, kv_seq = query.shape[0], query.shape[1], key.shape[1]
    i = jnp.arange(q_seq, dtype=jnp.int32)[None, :]  # (1, q_seq)
    position = i if arrays.q_offset is None else i + arrays.q_offset[:, None]
    end = jnp.full((batch, 1), kv_seq, jnp.int32) if arrays.kv_length is None else arrays.kv_length[:, None]
    end = jnp.clip(end, 0, kv_seq)
    interval = key_interval(position, end, causal=static.is_causal, window=static.local_window_size)
    lo, hi = (jnp.broadcast_to(x, (batch, q_seq)) for x in interval)  # keys [lo, hi) of each row
    rows = (lo < hi) if arrays.q_length is None else (lo < hi) & (i < arrays.q_length[:, None])
    rows = rows[:, :, None]  # (batch, q_seq, 1)
    if mask is None:
        return rows
    j = jnp.arange(kv_seq, dtype=jnp.int32)[None, None, None, :]
    if static.is_causal or static.local_window_size is not None:  # each row its own key range
        in_range = (j >= lo[:, None, :, None]) & (j < hi[:, None, :, None])  # (batch, 1, q_seq, kv_seq)
    else:  # every row the keys below its example's length: the any stays the mask's size (a padding mask's: tiny)
        in_range = j < end[:, :, None, None]  # (batch, 1, 1, kv_seq)
    visible = (in_range & mask).any(-1)  # (batch, heads|1, q_seq|1)
    return rows & visible.transpose(0, 2, 1)


def with_segment_mask(inputs: AttentionInputs) -> AttentionInputs:
    """Segment ids (which jax.nn lacks) as the dense ``(batch, 1, q_seq, kv_seq)`` mask they define, ANDed
    into the mask: how auto runs packed sequences through jax.nn (it then repairs the rows that see no key)."""
    arrays = inputs.opts.arrays
    if arrays.q_segment_ids is None or arrays.kv_segment_ids is None:  # given together (checked in _prepare)
        return inputs
    same = arrays.q_segment_ids[:, None, :, None] == arrays.kv_segment_ids[:, None, None, :]
    mask = same if inputs.mask is None else inputs.mask & same
    opts = inputs.opts.with_arrays(arrays._replace(q_segment_ids=None, kv_segment_ids=None))
    return inputs._replace(mask=mask, opts=opts)


def repair_rows(inputs: AttentionInputs, out: Array, lse: Array) -> tuple[Array, Array]:
    """jax.nn's ``(out, lse)`` with jattn's answer for rows that see no key: zeros (and zero gradients: the
    select passes none to jax.nn's mean-of-V there) and the masking sentinel as log-sum-exp.

    On CPU the select runs only when some row sees no key (a ``lax.cond``): XLA:CPU fuses it into the
    transpose that ends jax.nn's program, which then loses its fast transpose path and took about 3x as
    long (0.2 ms of a 3 ms call, batch 4, T=128); every row seeing a key is the common case. Elsewhere
    the select is fused at no cost, and a branch would cost a device-to-host wait. The tangent (and so the
    cotangent) is the plain select on every backend: the branch's own derivative cost fwd+bwd 2-5% there.
    """
    return _repaired(rows_with_a_key(inputs), out, lse)


def _select_rows(rows: Array, out: Array, lse: Array, lse_fill) -> tuple[Array, Array]:
    out = jnp.where(rows[..., None], out, jnp.zeros((), out.dtype))
    return out, jnp.where(rows, lse, jnp.asarray(lse_fill, lse.dtype))


@jax.custom_jvp
def _repaired(rows: Array, out: Array, lse: Array) -> tuple[Array, Array]:
    """:func:`repair_rows` given the rows that see a key, ``(batch, q_seq, heads|1)``."""
    fill = _numerics.masked_value(lse.dtype)

    def when_needed(out, lse):
        # The untouched branch selects with all-true rows (XLA drops that select) so that both branches give
        # the same types, shardings included.
        untouched = functools.partial(_select_rows, jnp.ones_like(rows), lse_fill=fill)
        repaired = functools.partial(_select_rows, rows, lse_fill=fill)
        return jax.lax.cond(rows.all(), untouched, repaired, out, lse)

    everywhere = functools.partial(_select_rows, rows, lse_fill=fill)
    return jax.lax.platform_dependent(out, lse, cpu=when_needed, default=everywhere)


@_repaired.defjvp
def _repaired_jvp(primals, tangents):
    rows, out, lse = primals
    _, out_dot, lse_dot = tangents
    return _repaired(rows, out, lse), _select_rows(rows, out_dot, lse_dot, lse_fill=0)
