"""``MultiHeadAttention``: parameters and wiring around ``jattn.dot_product_attention``.

The attention step itself (jattn's paths, the KV-cache decode step, or a user
``attention_fn``) is ``_attend.AttendMethods._attention_step``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jattn import _checks, masks
from jattn.sharding import SequenceParallel

from ._attend import AttendMethods
from ._attention_fn import check_module_options
from ._cache import CacheMethods
from ._dropout import checked_rate
from ._keras import KerasMethods
from ._options import AttentionConfig, check_execution
from ._paged_step import PagedMethods
from ._projection import Projection, checked_inputs, head_sizes, promoted_dtype

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class MultiHeadAttention(AttendMethods, CacheMethods, KerasMethods, PagedMethods, nnx.Module):
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
    ``jattn.dot_product_attention``, which never holds the ``(q_seq, kv_seq)``
    weights. With ``return_weights=True``, or ``dropout_rate > 0`` while not
    deterministic, it computes them on jattn's materialized path (every mask
    option applied) whatever ``implementation`` says, keeps each weight with
    probability ``1 - dropout_rate`` scaled by its inverse (as ``nnx.Dropout``)
    with a key from the module's dropout stream (reproducible from ``rngs``; it
    advances under ``nnx.jit`` too), and returns the weights before dropout.
    ``module.eval()`` (or ``deterministic=True``) turns dropout off.

    **KV cache.** After :meth:`init_cache` the module decodes: each call appends
    its keys/values to the cache at the filled position and attends causally
    over everything cached (see :meth:`init_cache`).

    **attention_fn.** As in ``flax.nnx.MultiHeadAttention``: a function that
    replaces the attention step (after the projections, before ``out``), called
    as Flax calls it: ``attention_fn(query, key, value, mask=, dropout_rng=,
    dropout_rate=, broadcast_dropout=False, deterministic=, dtype=,
    precision=None, module=None, is_causal=)``, plus ``bias=`` when a call gives
    one; ``query (batch, q_seq, heads, dim)``, ``key``/``value`` with
    ``kv_heads``; it returns ``(batch, q_seq, heads, v_dim)``. E.g.
    ``flax.nnx.dot_product_attention`` or :func:`jattn.nnx.flax_attention_fn`
    (bind jattn's options into it with ``functools.partial``). It cannot serve,
    and refuses: jattn's module options (``implementation``, ``block_q``,
    ``block_kv``, ``sequence_parallel``, ``local_window_size``,
    ``logits_soft_cap``, ``score_mod``, ``mask_mod``, ``use_sinks``), call
    options other than ``mask``/``bias``/``is_causal``, ``return_weights``, and
    KV-cache decoding.

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
        block_q: query block of the blockwise kernel; ``None``: the backend's
            default (``jattn.DEFAULT_BLOCK_SIZES``).
        block_kv: key/value block of the blockwise kernel; ``None`` as for ``block_q``.
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
        attention_fn: ``None`` (jattn's attention) or a function with Flax's
            calling convention that replaces it (see above).
        rngs: ``nnx.Rngs``: ``params`` for initialization, ``dropout`` (else
            ``default``) for dropout.

    Raises:
        ValueError: a non-positive size, ``in_features`` not divisible by
            ``num_heads`` without ``head_dim``, ``num_heads % num_kv_heads != 0``,
            or ``dropout_rate`` outside ``[0, 1)``, a non-positive block size,
            and an option ``attention_fn`` cannot serve (see above).
        TypeError: a ``sequence_parallel`` that is not a ``SequenceParallel``,
            an ``attention_fn`` that is not callable.

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

        Flax's attention function in place of jattn's, with the same parameters:

        >>> flax_fn = jnnx.MultiHeadAttention(4, 16, num_kv_heads=2, attention_fn=nnx.dot_product_attention,
        ...                                   rngs=nnx.Rngs(0))
        >>> bool(jnp.allclose(flax_fn(x, is_causal=True), y, atol=1e-5))
        True
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
        block_q: int | None = None,
        block_kv: int | None = None,
        sequence_parallel: SequenceParallel | None = None,
        local_window_size: int | tuple[int, int] | None = None,
        logits_soft_cap: float | None = None,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        use_sinks: bool = False,
        deterministic: bool = False,
        attention_fn: Callable | None = None,
        rngs: nnx.Rngs,
    ):
        sizes = head_sizes(
            num_heads=num_heads,
            in_features=in_features,
            head_dim=head_dim,
            value_head_dim=value_head_dim,
            out_features=out_features,
            num_kv_heads=num_kv_heads,
            in_kv_features=in_kv_features,
        )
        for name, size in sizes._asdict().items():
            setattr(self, name, size)
        self.dropout_rate = checked_rate(dropout_rate)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = check_execution(implementation, block_q, block_kv, sequence_parallel)
        self.block_q, self.block_kv, self.sequence_parallel = block_q, block_kv, sequence_parallel
        self.attention_config = AttentionConfig(local_window_size, logits_soft_cap, score_mod, mask_mod)
        _checks.check_static_bool("use_sinks", use_sinks)
        jattn_only = dict(implementation=implementation, block_q=block_q, block_kv=block_kv, use_sinks=use_sinks)
        check_module_options(
            attention_fn, **jattn_only, sequence_parallel=sequence_parallel, **vars(self.attention_config)
        )
        self.attention_fn = attention_fn

        projection = functools.partial(
            Projection, use_bias=self.use_bias, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init
        )
        self.query = projection((self.in_features,), (self.num_heads, self.head_dim), rngs=rngs)
        self.key = projection((self.in_kv_features,), (self.num_kv_heads, self.head_dim), rngs=rngs)
        self.value = projection((self.in_kv_features,), (self.num_kv_heads, self.value_head_dim), rngs=rngs)
        self.out = projection((self.num_heads, self.value_head_dim), (self.out_features,), rngs=rngs)
        # As in nnx.Dropout: module.eval()/train() and nnx.view set `deterministic`;
        # only a module that can drop out holds a (forked) dropout RNG stream.
        self.deterministic = bool(deterministic)
        self.rngs = rngs["dropout"].fork() if self.dropout_rate > 0 else nnx.data(None)
        # Attention sinks (gpt-oss): a learned logit per head in every row's softmax denominator.
        self.sinks = nnx.Param(jnp.zeros((self.num_heads,), param_dtype)) if use_sinks else nnx.data(None)
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

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
        inputs_q, inputs_k, inputs_v, self_attention = checked_inputs(
            inputs_q, inputs_k, inputs_v, in_features=self.in_features, in_kv_features=self.in_kv_features
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
        step = self._attention_step
        context, weights = step(query, key, value, call, dtype=dtype, self_attention=self_attention,
                                deterministic=deterministic, rngs=rngs, return_weights=return_weights)  # fmt: skip
        out = self.out(context, dtype)
        return (out, cast(Array, weights)) if return_weights else out  # weights: given when asked for

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view(module, deterministic=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic
