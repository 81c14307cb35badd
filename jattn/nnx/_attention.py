"""``MultiHeadAttention``: parameters and wiring around ``jattn.dot_product_attention``.

The attention itself is jattn's: the fast kernels through ``_api.attend``, and
when the weights are wanted (``return_weights=True``, or dropout on them while
training) the materialized reference path through ``_api.attend_with_weights``,
with dropout as its weights hook. Both are jit-compiled here, so an eager call
compiles once per shape instead of once per op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jattn import _api, _checks, _dispatch, masks
from jattn._prepare import CallOptions
from jattn.sharding import SequenceParallel

from ._cache import CacheMethods, decode_step
from ._keras import KerasMethods
from ._options import AttentionConfig
from ._projection import Projection, check_inputs, positive_int, promoted_dtype

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class MultiHeadAttention(CacheMethods, KerasMethods, nnx.Module):
    r"""Multi-head attention with Keras-layout kernels, computed by ``jattn.dot_product_attention``.

    ``out(attention(query(x_q), key(x_k), value(x_v)))`` with per-head
    projections. Axis legend::

        batch  examples       q_seq / kv_seq  query / key-value positions
        heads  query heads    kv_heads        key/value heads (divides heads; GQA/MQA)
        dim    head_dim       v_dim           value_head_dim

    Parameters (``nnx.Param``), in the layout of ``keras.layers.MultiHeadAttention``
    and ``flax.nnx.MultiHeadAttention`` (same names as the latter):
    ``query.kernel (in_features, heads, dim)``, ``key.kernel (in_kv_features,
    kv_heads, dim)``, ``value.kernel (in_kv_features, kv_heads, v_dim)``,
    ``out.kernel (heads, v_dim, out_features)``, and biases of the output shapes.

    **Attention weights and dropout.** Without them the module calls
    ``jattn.dot_product_attention(..., implementation=implementation)``, which
    never holds the ``(q_seq, kv_seq)`` weights. With ``return_weights=True``,
    or with ``dropout_rate > 0`` while not deterministic, it computes the
    weights with the public core (``jattn.scores``, ``jattn.softmax``,
    ``jattn.context``, vmapped; every mask option applied) whatever
    ``implementation`` says, drops weights out as ``nnx.Dropout`` does (each
    weight kept with probability ``1 - dropout_rate`` and scaled by its
    inverse) with a key from the module's dropout stream (reproducible from
    ``rngs``; the stream advances under ``nnx.jit`` too), and returns the
    weights before dropout. ``module.eval()`` (or ``deterministic=True``)
    turns dropout off.

    **KV cache.** After :meth:`init_cache` the module decodes: each call appends
    its keys/values to the cache at the filled position and attends causally
    over everything cached (see :meth:`init_cache`).

    Args:
        num_heads: query heads.
        in_features: features of ``inputs_q``.
        head_dim: query/key features per head (Keras's ``key_dim``); default
            ``in_features // num_heads``.
        value_head_dim: value features per head (Keras's ``value_dim``);
            default ``head_dim``.
        out_features: output features; default ``in_features``.
        num_kv_heads: key/value heads; default ``num_heads``; must divide it.
        in_kv_features: features of ``inputs_k``/``inputs_v``; default ``in_features``.
        use_bias: whether the four projections have biases.
        dropout_rate: dropout on the attention weights, in ``[0, 1)``.
        dtype: computation dtype; default: the promotion of the inputs' and
            parameters' dtypes.
        param_dtype: parameter dtype.
        kernel_init: kernel initializer (sees the flattened 2-D kernel).
        bias_init: bias initializer.
        implementation: passed to ``jattn.dot_product_attention`` (``None`` =
            fastest that honours the options).
        sequence_parallel: a ``jattn.sharding.SequenceParallel`` passed to
            ``jattn.dot_product_attention``. Not needed on ``Explicit`` mesh axes:
            activations sharded along the sequence keep that sharding through
            the (local) projections and the attention runs sequence-parallel by
            itself. The KV-cache decode step and the weights/dropout path run
            on gathered sequences.
        local_window_size: sliding window ``(left, right)`` or one int, as in
            ``jattn.dot_product_attention`` (Gemma's local layers).
        logits_soft_cap: tanh soft cap of the logits (Gemma 2).
        score_mod: ``score_mod(score, batch, head, q_idx, kv_idx)`` applied by
            every call (e.g. ``jattn.score_mods.alibi``); a call's own
            ``score_mod`` is applied after it.
        mask_mod: ``mask_mod(batch, head, q_idx, kv_idx) -> bool`` ANDed into
            every call (and with a call's own).
        use_sinks: learn attention sinks: ``sinks (heads,)``, an ``nnx.Param``
            initialized to zero, joins every row's softmax denominator (gpt-oss).
        deterministic: the initial mode: True turns dropout off (``module.eval()``
            and ``module.train()`` switch it).
        rngs: ``nnx.Rngs``: ``params`` for initialization, ``dropout`` (else
            ``default``) for dropout.

    Raises:
        ValueError: a non-positive size, ``in_features`` not divisible by
            ``num_heads`` without ``head_dim``, ``num_heads % num_kv_heads != 0``,
            or ``dropout_rate`` outside ``[0, 1)``.
        TypeError: a ``sequence_parallel`` that is not a ``SequenceParallel``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jattn import nnx as jnnx
        >>> mha = jnnx.MultiHeadAttention(4, 16, num_kv_heads=2, rngs=nnx.Rngs(0))
        >>> mha.query.kernel.shape, mha.out.kernel.shape
        ((16, 4, 4), (4, 4, 16))
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.float32)  # (batch, q_seq, in_features)
        >>> y, w = mha(x, is_causal=True, return_weights=True)
        >>> y.shape, w.shape  # w: (batch, heads, q_seq, kv_seq)
        ((2, 5, 16), (2, 4, 5, 5))
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        implementation: str | None = None,
        sequence_parallel: SequenceParallel | None = None,
        local_window_size: int | tuple[int, int] | None = None,
        logits_soft_cap: float | None = None,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        use_sinks: bool = False,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_heads = positive_int("num_heads", num_heads)
        self.in_features = positive_int("in_features", in_features)
        if head_dim is None and in_features % num_heads:
            raise ValueError(
                f"in_features must be divisible by num_heads when head_dim is not given; "
                f"got in_features={in_features}, num_heads={num_heads}"
            )
        self.head_dim = positive_int("head_dim", in_features // num_heads if head_dim is None else head_dim)
        self.value_head_dim = positive_int(
            "value_head_dim", self.head_dim if value_head_dim is None else value_head_dim
        )
        self.out_features = positive_int("out_features", in_features if out_features is None else out_features)
        self.num_kv_heads = positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads; got num_heads={num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )
        self.in_kv_features = positive_int("in_kv_features", in_features if in_kv_features is None else in_kv_features)
        if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be a float in [0, 1); got {dropout_rate!r}")
        self.dropout_rate = float(dropout_rate)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = _dispatch.check_implementation(implementation)
        if sequence_parallel is not None and not isinstance(sequence_parallel, SequenceParallel):
            raise TypeError(
                f"sequence_parallel must be a jattn.sharding.SequenceParallel or None; got {sequence_parallel!r}"
            )
        self.sequence_parallel = sequence_parallel
        self.attention_config = AttentionConfig(local_window_size, logits_soft_cap, score_mod, mask_mod)

        def projection(in_shape, out_shape):
            return Projection(
                in_shape,
                out_shape,
                use_bias=self.use_bias,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                rngs=rngs,
            )

        self.query = projection((self.in_features,), (self.num_heads, self.head_dim))
        self.key = projection((self.in_kv_features,), (self.num_kv_heads, self.head_dim))
        self.value = projection((self.in_kv_features,), (self.num_kv_heads, self.value_head_dim))
        self.out = projection((self.num_heads, self.value_head_dim), (self.out_features,))
        # As in nnx.Dropout: module.eval()/train() and nnx.view set `deterministic`;
        # only a module that can drop out holds a (forked) dropout RNG stream.
        self.deterministic = bool(deterministic)
        self.rngs = rngs["dropout"].fork() if self.dropout_rate > 0 else nnx.data(None)
        # Attention sinks (gpt-oss): a learned logit per head in every row's softmax denominator.
        _checks.check_static_bool("use_sinks", use_sinks)
        self.sinks = nnx.Param(jnp.zeros((self.num_heads,), param_dtype)) if use_sinks else nnx.data(None)
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        inputs_q: Float[ArrayLike, "batch q_seq in_features"],
        inputs_k: Float[ArrayLike, "batch kv_seq in_kv_features"] | None = None,
        inputs_v: Float[ArrayLike, "batch kv_seq in_kv_features"] | None = None,
        *,
        mask: Bool[ArrayLike, "#batch #heads #q_seq #kv_seq"] | None = None,
        is_causal: bool = False,
        query_seq_lengths: Int[ArrayLike, " batch"] | None = None,
        key_value_seq_lengths: Int[ArrayLike, " batch"] | None = None,
        query_segment_ids: Int[ArrayLike, "batch q_seq"] | None = None,
        key_value_segment_ids: Int[ArrayLike, "batch kv_seq"] | None = None,
        bias: Float[ArrayLike, "#batch #heads #q_seq #kv_seq"] | None = None,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        block_mask: masks.BlockMask | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        return_weights: bool = False,
    ) -> (
        Float[Array, "batch q_seq out_features"]
        | tuple[Float[Array, "batch q_seq out_features"], Float[Array, "batch heads q_seq kv_seq"]]
    ):
        """Projects, attends, projects back; self-attention when ``inputs_k`` is omitted.

        Args:
            inputs_q: ``(batch, q_seq, in_features)``.
            inputs_k: ``(batch, kv_seq, in_kv_features)``; default ``inputs_q``.
            inputs_v: ``(batch, kv_seq, in_kv_features)``; default ``inputs_k``.
            mask: boolean, True = attend, rank 4 and broadcastable to
                ``(batch, heads, q_seq, kv_seq)`` (a Keras ``attention_mask``
                ``(batch, q_seq, kv_seq)`` becomes ``mask[:, None]``). While
                decoding, ``kv_seq`` is the cache's ``max_length``.
            is_causal: query ``i`` sees keys ``j <= i``. Required (True) while
                decoding, where it means causal over the absolute positions.
            query_seq_lengths: int ``(batch,)``: queries at or past it return
                zeros before the output projection (padding). While decoding:
                how many of the new tokens are real; the cache of each example
                advances by it (right-padded prompts of different lengths).
            key_value_seq_lengths: int ``(batch,)``: keys at or past it are
                hidden. Not allowed while decoding (the cache knows its length).
            query_segment_ids: int ``(batch, q_seq)``, with
                ``key_value_segment_ids`` ``(batch, kv_seq)``: attend only within
                equal ids (packed sequences). Not allowed while decoding.
            key_value_segment_ids: see ``query_segment_ids``.
            bias: float added to the logits, broadcastable to ``(batch, heads,
                q_seq, kv_seq)`` (while decoding, ``kv_seq`` is ``max_length``).
            score_mod: a ``score_mod`` for this call, after the module's.
            mask_mod: a ``mask_mod`` for this call, ANDed with the module's
                (e.g. ``jattn.masks.document(ids)`` for this batch's documents).
            block_mask: ``jattn.masks.block_mask`` of the combined mask mods.
            deterministic: True turns dropout off; default: the module's mode
                (``module.eval()`` / ``module.train()``).
            rngs: overrides the dropout stream for this call.
            return_weights: also return the attention weights (before dropout).

        Returns:
            ``(batch, q_seq, out_features)`` in the computation dtype, and the
            weights ``(batch, heads, q_seq, kv_seq)`` if ``return_weights``.

        Raises:
            TypeError: non-floating inputs, a non-boolean mask, non-integer
                lengths or ids.
            ValueError: wrong input rank or feature size, mismatched batch or
                key/value lengths, a mask/lengths/ids of the wrong shape, options
                not allowed while decoding, decoding past ``max_length``.
        """
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_v was given without inputs_k; pass inputs_k too (or only inputs_k)")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        self_attention = inputs_k is inputs_q
        inputs_q, inputs_k, inputs_v = jnp.asarray(inputs_q), jnp.asarray(inputs_k), jnp.asarray(inputs_v)
        check_inputs("inputs_q", inputs_q, self.in_features, "q_seq", "in_features")
        check_inputs("inputs_k", inputs_k, self.in_kv_features, "kv_seq", "in_kv_features")
        check_inputs("inputs_v", inputs_v, self.in_kv_features, "kv_seq", "in_kv_features")
        batch = inputs_q.shape[0]
        if inputs_k.shape[0] != batch or inputs_v.shape[0] != batch:
            raise ValueError(
                f"inputs_k and inputs_v must have the batch size of inputs_q ({batch}); "
                f"got inputs_k {inputs_k.shape}, inputs_v {inputs_v.shape}"
            )
        if inputs_v.shape[1] != inputs_k.shape[1]:
            raise ValueError(
                f"inputs_v must have the kv_seq of inputs_k ({inputs_k.shape[1]}); got inputs_v {inputs_v.shape}"
            )
        _checks.check_static_bool("is_causal", is_causal)

        dtype = promoted_dtype(self.dtype, self.param_dtype, inputs_q, inputs_k, inputs_v)
        query = self.query(inputs_q, dtype)
        key = self.key(inputs_k, dtype)
        value = self.value(inputs_v, dtype)
        call = self.attention_config.call(
            mask=mask,
            bias=bias,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            query_segment_ids=query_segment_ids,
            key_value_segment_ids=key_value_segment_ids,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            sinks=None if self.sinks is None else self.sinks[...],
            is_causal=bool(is_causal),
        )

        past_end = None
        if (cache := self.kv_cache()) is not None:
            cache, call, past_end = decode_step(
                cache, key, value, call, heads=self.num_heads, self_attention=self_attention
            )
            self.store_cache(cache)
            key, value = cache.key, cache.value

        if deterministic is None:
            deterministic = self.deterministic
        dropping = self.dropout_rate > 0 and not deterministic
        weights = None
        if return_weights or dropping:
            dropout_key = self._dropout_key(rngs) if dropping else None
            context, weights = _weights_path(query, key, value, call, dropout_key, dropout_rate=self.dropout_rate)
        else:
            parallel = None if cache is not None else self.sequence_parallel  # decoding stays on one device
            context = _fast_path(
                query, key, value, call, implementation=self.implementation, sequence_parallel=parallel
            )
        out = self.out(context, dtype)
        if past_end is not None:
            out = jnp.where(past_end[:, :, None], jnp.asarray(jnp.nan, out.dtype), out)
        return (out, weights) if return_weights else out

    def _dropout_key(self, rngs) -> Array:
        """A fresh dropout key: from ``rngs`` if given (as ``nnx.Dropout`` takes it), else the module's stream."""
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs["dropout"]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        return rngs

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view(module, deterministic=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic


@functools.partial(jax.jit, static_argnames=("implementation", "sequence_parallel"))
def _fast_path(query, key, value, call: CallOptions, *, implementation, sequence_parallel):
    return _api.attend(query, key, value, call, implementation=implementation, sequence_parallel=sequence_parallel)


@functools.partial(jax.jit, static_argnames=("dropout_rate",))
def _weights_path(query, key, value, call: CallOptions, dropout_key, *, dropout_rate):
    """Context and weights through the materialized path, with dropout on the weights if ``dropout_key``."""
    hook = None if dropout_key is None else functools.partial(_dropout, key=dropout_key, rate=dropout_rate)
    return _api.attend_with_weights(query, key, value, call, weights_hook=hook)


def _dropout(weights: Array, *, key: Array, rate: float) -> Array:
    """As ``nnx.Dropout``: keep each weight with probability ``1 - rate`` and scale the kept ones up."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, weights.shape)
    return jax.lax.select(keep, weights / jnp.asarray(keep_prob, weights.dtype), jnp.zeros_like(weights))
