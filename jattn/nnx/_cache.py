"""The KV cache of autoregressive decoding: a small pytree with write, decode-mask and overflow logic.

The cache holds ``max_length`` key/value positions per example and a filled
count ``index`` of shape ``(batch,)``. A call with ``n_new`` tokens writes them
at absolute positions ``index + i`` and lets query ``i`` see key ``j`` iff
``j <= index + i`` (causal, offset by what is already cached). That is told to
the attention as a query offset ``index`` (causal and window masks, score and
mask mods all see absolute positions) and ``key_value_seq_lengths = index +
n_valid``, which lets a blockwise kernel skip every key block past the filled
length: no dense mask is built.

Writing past ``max_length`` never wraps around or clamps: the write is dropped,
the output rows of those queries are NaN and the filled count ends past
``max_length``. An error is raised eagerly when the filled count is concrete (so
the next eager call after an overflowing jitted step raises too); under ``jit``
only when asked (``init_cache(..., runtime_overflow_error=True)``), from a
``jax.debug.callback``: a program with a host callback costs about 0.1 ms more
per step on CPU, more than the rest of a small decode step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jattn import _checks
from jattn._jax_compat import Tracer
from jattn._mesh import align_batch, explicit_mesh
from jattn._options import CallOptions

from ._fields import ModuleFields


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Cached keys and values ``(batch, max_length, kv_heads, x)`` and the filled length ``(batch,)``."""

    key: Float[Array, "batch max_length kv_heads dim"]
    value: Float[Array, "batch max_length kv_heads v_dim"]
    index: Int[Array, " batch"]

    @property
    def max_length(self) -> int:
        return self.key.shape[1]

    def positions(self, n_new: int) -> Int[Array, "batch n_new"]:
        """Absolute positions ``index + i`` of ``n_new`` new tokens."""
        return self.index[:, None] + jnp.arange(n_new, dtype=self.index.dtype)[None, :]

    def write(self, key: Array, value: Array, n_valid: Int[Array, " batch"]) -> KVCache:
        """Writes the new keys/values at ``index + i`` (past the end: dropped, never wrapped).

        Returns the cache with ``index`` advanced by ``n_valid``.
        """
        batch, n_new = key.shape[:2]
        # On an explicit mesh the cache follows the new keys' batch split (init_cache made it whole): the
        # first step moves it once, later steps find it split already.
        cache = KVCache(*(align_batch(x, key, batch) for x in (self.key, self.value, self.index)))
        rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
        positions = cache.positions(n_new)

        def put(old, new):
            split = {} if explicit_mesh(old) is None else {"out_sharding": jax.typeof(old).sharding}
            at, new = positions, new.astype(old.dtype)
            if batch * n_new == 1 and _pad_single_updates():
                at = jnp.concatenate([at, jnp.full_like(at, old.shape[1])], axis=1)
                new = jnp.concatenate([new, jnp.zeros_like(new)], axis=1)
            return old.at[rows, at].set(new, mode="drop", **split)

        return KVCache(put(cache.key, key), put(cache.value, value), cache.index + align_batch(n_valid, key, batch))

    def past_end(self, n_new: int) -> Bool[Array, "batch n_new"]:
        """True for the new queries whose absolute position is at or past ``max_length``."""
        return self.positions(n_new) >= self.max_length

    def check_overflow(self, n_valid: Int[Array, " batch"], *, at_run_time: bool = False) -> None:
        """Raises if ``index + n_valid > max_length``: now when concrete; when traced, at run time if
        ``at_run_time`` (else the caller's NaN rows, see :meth:`past_end`, and the index past
        ``max_length`` are the signal).

        Under ``jax.jit`` the error comes from a ``jax.debug.callback`` and reaches
        the caller as a ``JaxRuntimeError`` carrying this message when the result is
        used; the rows past the end are NaN either way, in case a backend drops callbacks.
        """
        end = self.index + n_valid
        if not isinstance(end, Tracer):
            if bool(jnp.any(end > self.max_length)):
                _raise_overflow(end, self.max_length)
            return
        if not at_run_time:
            return
        over = jnp.any(end > self.max_length)
        furthest = jnp.max(end)  # one scalar to the host (a batch split over devices would be gathered there)
        jax.lax.cond(over, lambda: jax.debug.callback(_raise_overflow, furthest, self.max_length), lambda: None)


def _pad_single_updates() -> bool:
    """Whether a one-token write of batch 1 adds a second update at ``max_length`` (which ``mode="drop"``
    discards): XLA:CPU rewrites a scatter of a single update as a dynamic-update-slice, fuses that into each
    reader of the cache and copies the whole cache for every one (4 copies per cache and step). On an H200
    the two-update scatter cost 7-15% of a batch-1 decode step and the copies nothing measurable (a probe of
    ``bench.suites.decode``'s step, issue 22's closing note), so other backends write the one update."""
    return jax.default_backend() == "cpu"


def _raise_overflow(end, max_length) -> None:
    raise ValueError(
        "KV cache overflow: decoding would write positions up to "
        f"{int(np.max(end))} (exclusive) but init_cache(max_length={int(max_length)}); "
        "nothing was wrapped around — re-initialize the cache with a larger max_length"
    )


def decode_step(
    cache: KVCache, key: Array, value: Array, call: CallOptions, *, heads: int, self_attention: bool, checked: bool
):
    """Checks a decode call, writes the new keys/values and says what to attend over (``checked``: raise on
    overflow at run time too, see :meth:`KVCache.check_overflow`).

    Returns ``(cache, call, past_end)``: the updated cache (attend over its
    whole ``key``/``value``), the call's options with the decode lengths and
    query offset, and ``(batch, n_new)`` flags of queries at or past ``max_length``.
    """
    if not self_attention:
        raise ValueError(
            "decoding with a KV cache is self-attention only; got inputs_k/inputs_v (call clear_cache() first)"
        )
    if not call.is_causal:
        raise ValueError("decoding with a KV cache is causal; pass is_causal=True (or call clear_cache() first)")
    for name in ("key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids"):
        if getattr(call, name) is not None:
            raise ValueError(f"{name} cannot be given while decoding with a KV cache (call clear_cache() first)")
    batch, n_new = key.shape[:2]
    if batch != cache.key.shape[0]:
        raise ValueError(f"inputs_q must have the cache's batch size {cache.key.shape[0]} (init_cache); got {batch}")
    if key.dtype != cache.key.dtype:
        raise ValueError(
            f"the KV cache has dtype {cache.key.dtype} but this call computes in {key.dtype}; "
            "pass dtype= to init_cache or cast the inputs"
        )
    if n_new > cache.max_length:
        raise ValueError(f"inputs_q has {n_new} tokens but the KV cache holds max_length={cache.max_length}")
    n_valid = _new_token_counts(call.query_seq_lengths, batch, n_new)
    cache.check_overflow(n_valid, at_run_time=checked)
    mask = call.mask
    if mask is not None:
        mask = jnp.asarray(mask)
        _checks.check_bool("mask", mask)
        logits_shape = (batch, heads, n_new, cache.max_length)
        _checks.check_broadcastable("mask", mask, logits_shape, "(batch, heads, q_seq, max_length)")
    past_end = cache.past_end(n_new)
    offset = cache.index
    cache = cache.write(key, value, n_valid)
    call = call.replace(mask=mask, key_value_seq_lengths=cache.index, query_offset=offset)
    return cache, call, past_end


def _new_token_counts(query_seq_lengths, batch: int, n_new: int) -> Int[Array, " batch"]:
    """How many of the new tokens of each example are real (``query_seq_lengths``, default all)."""
    if query_seq_lengths is None:
        return jnp.full((batch,), n_new, jnp.int32)
    n_valid = jnp.asarray(query_seq_lengths)
    _checks.check_integer("query_seq_lengths", n_valid)
    _checks.check_shape("query_seq_lengths", n_valid, (batch,), "(batch,)")
    n_valid = n_valid.astype(jnp.int32)
    if not isinstance(n_valid, Tracer) and not bool(jnp.all((n_valid >= 0) & (n_valid <= n_new))):
        raise ValueError(f"query_seq_lengths must lie in [0, {n_new}] (the new tokens); got {n_valid}")
    return n_valid


class CacheMethods(ModuleFields):
    """``init_cache`` / ``clear_cache`` of a module with ``num_kv_heads``, ``head_dim``, ``value_head_dim``,
    ``dtype``, ``param_dtype``, ``attention_fn`` and the ``nnx.Cache`` attributes ``cached_key``,
    ``cached_value``, ``cache_index``."""

    runtime_overflow_error: bool = False  # until init_cache says otherwise

    def init_cache(
        self, batch: int, max_length: int, *, dtype: Any = None, runtime_overflow_error: bool = False
    ) -> None:
        """Allocates an empty KV cache; from now on calls decode (append and attend causally).

        The cache holds ``cached_key (batch, max_length, kv_heads, dim)``,
        ``cached_value (batch, max_length, kv_heads, v_dim)`` and
        ``cache_index (batch,)``, the filled length of each example, as
        ``nnx.Cache`` variables. Each call with ``n_new`` tokens (a prompt of
        any length, then one or a few tokens) writes them at positions
        ``cache_index + i``, attends with query ``i`` seeing cached keys
        ``j <= cache_index + i`` and advances ``cache_index`` by ``n_new`` (or
        by ``query_seq_lengths`` for right-padded prompts). Only the filled
        length is attended: it is passed as ``key_value_seq_lengths``, so a
        blockwise kernel skips the key blocks past it.

        Under ``jax.jit`` (or ``nnx.jit``) each step compiles once per
        ``n_new``; a loop in ``jax.lax.scan`` updates the cache in place. Decoding
        past ``max_length`` raises ValueError eagerly. Under jit the write is
        dropped (never wrapped around), the output rows past the end are NaN and
        ``cache_index`` ends past ``max_length`` (the next eager call raises);
        with ``runtime_overflow_error=True`` the step also raises at run time (a
        ``JaxRuntimeError`` with the same message, from a ``jax.debug.callback``,
        which costs about 0.1 ms per step on CPU).

        Args:
            batch: examples decoded together.
            max_length: positions the cache holds (prompt plus generated tokens).
            dtype: cache dtype; default ``dtype`` of the module, else
                ``param_dtype``. It must equal the computation dtype of the calls.
            runtime_overflow_error: also raise on overflow inside jitted steps.

        Raises:
            ValueError: if ``batch`` or ``max_length`` is not a positive int, or
                the module has an ``attention_fn`` (a Flax-convention function
                cannot take the cache's lengths and query offset).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> mha = jnnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
            >>> x = jax.random.normal(jax.random.key(1), (1, 6, 8), jnp.float32)
            >>> full = mha(x, is_causal=True)
            >>> mha.init_cache(1, max_length=16)
            >>> prompt = mha(x[:, :4], is_causal=True)  # prefill 4 tokens
            >>> steps = [mha(x[:, i : i + 1], is_causal=True) for i in (4, 5)]  # then 1 per call
            >>> bool(jnp.allclose(jnp.concatenate([prompt, *steps], axis=1), full, atol=1e-5))
            True
            >>> mha.cache_index[...]
            Array([6], dtype=int32)
        """
        _checks.check_positive_int("batch", batch)
        _checks.check_positive_int("max_length", max_length)
        if self.attention_fn is not None:
            raise ValueError(
                "init_cache: KV-cache decoding runs jattn's own attention, not attention_fn; "
                f"got a module with attention_fn={self.attention_fn!r} (build it with attention_fn=None to decode)"
            )
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        self.runtime_overflow_error = bool(runtime_overflow_error)  # static: part of the graph definition
        self.cached_key = nnx.Cache(jnp.zeros((batch, max_length, self.num_kv_heads, self.head_dim), dtype))
        self.cached_value = nnx.Cache(jnp.zeros((batch, max_length, self.num_kv_heads, self.value_head_dim), dtype))
        self.cache_index = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    def clear_cache(self) -> None:
        """Drops the KV cache: calls attend over their own inputs again."""
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def kv_cache(self) -> KVCache | None:
        """The cache as a :class:`KVCache` value (None when not decoding)."""
        key, value, index = self.cached_key, self.cached_value, self.cache_index
        if key is None or value is None or index is None:
            return None
        return KVCache(key[...], value[...], index[...])

    def store_cache(self, cache: KVCache) -> None:
        """Writes a :class:`KVCache` value back into the module's cache variables (made by ``init_cache``)."""
        key, value, index = self.cached_key, self.cached_value, self.cache_index
        if key is None or value is None or index is None:
            raise ValueError("store_cache: the module has no KV cache; call init_cache first")
        key[...], value[...], index[...] = cache.key, cache.value, cache.index
