"""KV-cache bookkeeping for autoregressive decoding: writes, decode masks, overflow.

The cache holds ``max_length`` key/value positions per example and a filled
count ``index`` of shape ``(batch,)``. A call with ``n_new`` tokens writes them
at absolute positions ``index + i`` and lets query ``i`` see key ``j`` iff
``j <= index + i`` (causal, offset by what is already cached). That is told to
``jattn.dot_product_attention`` as ``key_value_seq_lengths = index + n_valid``,
which lets a blockwise kernel skip every key block past the filled length, plus,
for ``n_new > 1`` only, a small dense ``(batch, 1, n_new, max_length)`` mask for
causality inside the new chunk (with one new token the length says it all).

Writing past ``max_length`` never wraps around or clamps: the write is dropped,
the output rows of those queries are NaN, and an error is raised (eagerly when
the filled count is concrete, from a ``jax.debug.callback`` when it is traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn import _checks


def write(
    cache: Float[Array, "batch max_length kv_heads dim"],
    new: Float[Array, "batch n_new kv_heads dim"],
    index: Int[Array, " batch"],
) -> Float[Array, "batch max_length kv_heads dim"]:
    """Writes ``new[b, i]`` at position ``index[b] + i``; positions past the end are dropped, never wrapped."""
    batch, n_new = new.shape[:2]
    positions = index[:, None] + jnp.arange(n_new, dtype=index.dtype)[None, :]
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def decode_mask(
    index: Int[Array, " batch"], n_new: int, max_length: int
) -> Bool[Array, "batch 1 n_new max_length"] | None:
    """Causality inside a chunk of ``n_new`` queries at positions ``index + i``; None when ``n_new == 1``."""
    if n_new == 1:
        return None
    positions = index[:, None] + jnp.arange(n_new, dtype=index.dtype)[None, :]  # (batch, n_new)
    keys = jnp.arange(max_length, dtype=index.dtype)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def _raise_overflow(end, max_length) -> None:
    raise ValueError(
        "KV cache overflow: decoding would write positions up to "
        f"{int(np.max(end))} (exclusive) but init_cache(max_length={int(max_length)}); "
        "nothing was wrapped around — re-initialize the cache with a larger max_length"
    )


def check_overflow(index: Int[Array, " batch"], n_valid: Int[Array, " batch"], max_length: int) -> None:
    """Raises if ``index + n_valid > max_length``: now when concrete, at run time when traced.

    Under ``jax.jit`` the error comes from a ``jax.debug.callback`` and reaches
    the caller as a ``JaxRuntimeError`` carrying this message when the result is
    used; the caller also poisons the rows past the end with NaN (see
    :func:`past_end`) in case a backend drops callbacks.
    """
    end = index + n_valid
    if not isinstance(end, jax.core.Tracer):
        if bool(jnp.any(end > max_length)):
            _raise_overflow(end, max_length)
        return
    over = jnp.any(end > max_length)
    jax.lax.cond(over, lambda: jax.debug.callback(_raise_overflow, end, max_length), lambda: None)


def past_end(index: Int[Array, " batch"], n_new: int, max_length: int) -> Bool[Array, "batch n_new"]:
    """True for the new queries whose absolute position is at or past ``max_length``."""
    return index[:, None] + jnp.arange(n_new, dtype=index.dtype)[None, :] >= max_length


def append(module, query, key, value, options, *, is_causal, self_attention):
    """Appends the new keys/values to ``module``'s cache; returns what to attend over and the rows past the end.

    Returns ``(key, value, options, past_end)``: the whole updated cache,
    the ``dot_product_attention`` options with the decode lengths and mask,
    and ``(batch, n_new)`` flags of queries at or past ``max_length``.
    """
    if not self_attention:
        raise ValueError(
            "decoding with a KV cache is self-attention only; got inputs_k/inputs_v (call clear_cache() first)"
        )
    if not is_causal:
        raise ValueError("decoding with a KV cache is causal; pass is_causal=True (or call clear_cache() first)")
    for name in ("key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids"):
        if options[name] is not None:
            raise ValueError(f"{name} cannot be given while decoding with a KV cache (call clear_cache() first)")
    cached_key, cached_value = module.cached_key[...], module.cached_value[...]
    batch, max_length = cached_key.shape[:2]
    n_new = query.shape[1]
    if query.shape[0] != batch:
        raise ValueError(f"inputs_q must have the cache's batch size {batch} (init_cache); got {query.shape[0]}")
    if key.dtype != cached_key.dtype:
        raise ValueError(
            f"the KV cache has dtype {cached_key.dtype} but this call computes in {key.dtype}; "
            "pass dtype= to init_cache or cast the inputs"
        )
    if n_new > max_length:
        raise ValueError(f"inputs_q has {n_new} tokens but the KV cache holds max_length={max_length}")
    index = module.cache_index[...]
    n_valid = options["query_seq_lengths"]
    if n_valid is None:
        n_valid = jnp.full((batch,), n_new, jnp.int32)
    else:
        _checks.check_integer("query_seq_lengths", n_valid)
        _checks.check_shape("query_seq_lengths", n_valid, (batch,), "(batch,)")
        n_valid = n_valid.astype(jnp.int32)
        if not isinstance(n_valid, jax.core.Tracer) and not bool(jnp.all((n_valid >= 0) & (n_valid <= n_new))):
            raise ValueError(f"query_seq_lengths must lie in [0, {n_new}] (the new tokens); got {n_valid}")
    check_overflow(index, n_valid, max_length)
    mask = options["mask"]
    if mask is not None:
        _checks.check_bool("mask", mask)
        logits_shape = (batch, module.num_heads, n_new, max_length)
        _checks.check_broadcastable("mask", mask, logits_shape, "(batch, heads, q_seq, max_length)")
    causal = decode_mask(index, n_new, max_length)
    if causal is not None:
        mask = causal if mask is None else mask & causal
    key = write(cached_key, key, index)
    value = write(cached_value, value, index)
    module.cached_key[...] = key
    module.cached_value[...] = value
    module.cache_index[...] = index + n_valid
    options = dict(options, mask=mask, key_value_seq_lengths=index + n_valid)
    return key, value, options, past_end(index, n_new, max_length)
