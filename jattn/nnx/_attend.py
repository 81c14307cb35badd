"""The attention step of a ``MultiHeadAttention`` call, between the projections and the output projection.

One of: the user's ``attention_fn``; jattn's fast kernels (``_api.attend``); or, when the weights are
wanted (``return_weights=True``, or dropout on them while training), the materialized path
(``_api.attend_with_weights``) with dropout as its weights hook; a KV-cache decode step first writes the
cache and attends over it. The jattn paths are jit-compiled here, so an eager call compiles once per shape
instead of once per op.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jattn import _api
from jattn._options import CallOptions

from ._attention_fn import call_attention_fn, check_call_options
from ._cache import CacheMethods, decode_step
from ._dropout import dropout, keep_mask


class AttendMethods(CacheMethods):
    """The attention step of a module with the attributes ``MultiHeadAttention`` sets (options, dropout
    stream, KV cache through ``CacheMethods``)."""

    def _attention_step(
        self,
        query: Float[Array, "batch q_seq heads dim"],
        key: Float[Array, "batch kv_seq kv_heads dim"],
        value: Float[Array, "batch kv_seq kv_heads v_dim"],
        call: CallOptions,
        *,
        self_attention: bool,
        deterministic: bool | None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None,
        return_weights: bool,
        dtype: Any,
    ) -> tuple[Float[Array, "batch q_seq heads v_dim"], Float[Array, "batch heads q_seq kv_seq"] | None]:
        """The context, and the weights before dropout if ``return_weights`` (else None).

        While decoding, the context rows of queries past the cache's end are NaN.

        Raises:
            ValueError: ``return_weights`` with an ``attention_fn``, and the errors of the step taken.
        """
        if deterministic is None:
            deterministic = self.deterministic
        dropping = self.dropout_rate > 0 and not deterministic
        if self.attention_fn is not None:
            check_call_options(call, return_weights=return_weights)
            dropout_key = self._dropout_key(rngs) if dropping else None  # drawn once the call is accepted
            fn_options = dict(dropout_key=dropout_key, dropout_rate=self.dropout_rate, dtype=dtype)
            return call_attention_fn(self.attention_fn, query, key, value, call, **fn_options), None
        past_end = None
        if (cache := self.kv_cache()) is not None:
            cache, call, past_end = decode_step(
                cache, key, value, call, heads=self.num_heads, self_attention=self_attention,
                checked=self.runtime_overflow_error,
            )  # fmt: skip
            self.store_cache(cache)
            key, value = cache.key, cache.value
        dropout_key = self._dropout_key(rngs) if dropping else None
        weights = None
        if return_weights or dropping:
            context, weights = _weights_path(query, key, value, call, dropout_key, dropout_rate=self.dropout_rate)
        else:
            execution = dict(implementation=self.implementation, block_q=self.block_q, block_kv=self.block_kv)
            # A decode step stays on one device.
            parallel = None if cache is not None else self.sequence_parallel
            context = _fast_path(
                query, key, value, call, **execution, sequence_parallel=parallel, kv_cache=cache is not None
            )
        if past_end is not None:  # NaN context rows give NaN output rows through any projection
            context = jnp.where(past_end[:, :, None, None], jnp.asarray(jnp.nan, context.dtype), context)
        return context, weights

    def _dropout_key(self, rngs) -> Array:
        """A fresh dropout key: from ``rngs`` if given (as ``nnx.Dropout`` takes it), else the module's stream."""
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs["dropout"]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        return rngs


@functools.partial(jax.jit, static_argnames=("implementation", "block_q", "block_kv", "sequence_parallel", "kv_cache"))
def _fast_path(query, key, value, call: CallOptions, **execution):
    """jattn's kernels (``execution``: ``implementation``, ``block_q``, ``block_kv``, ``sequence_parallel``,
    ``kv_cache``)."""
    return _api.attend(query, key, value, call, **execution)


@functools.partial(jax.jit, static_argnames=("dropout_rate",))
def _weights_path(query, key, value, call: CallOptions, dropout_key, *, dropout_rate):
    """Context and weights through the materialized path, with dropout on the weights if ``dropout_key``."""
    hook = None
    if dropout_key is not None:

        def hook(weights):
            return dropout(weights, keep_mask(dropout_key, dropout_rate, weights.shape), rate=dropout_rate)

    return _api.attend_with_weights(query, key, value, call, weights_hook=hook)
