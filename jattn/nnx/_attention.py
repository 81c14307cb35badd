"""``MultiHeadAttention``: parameters and wiring around ``jattn.dot_product_attention``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from . import _cache, _keras, _weights
from ._projection import Projection, check_inputs, compute_dtype, positive_int

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class MultiHeadAttention(nnx.Module):
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
        deterministic: the initial mode: True turns dropout off (``module.eval()``
            and ``module.train()`` switch it).
        rngs: ``nnx.Rngs``: ``params`` for initialization, ``dropout`` (else
            ``default``) for dropout.

    Raises:
        ValueError: a non-positive size, ``in_features`` not divisible by
            ``num_heads`` without ``head_dim``, ``num_heads % num_kv_heads != 0``,
            or ``dropout_rate`` outside ``[0, 1)``.

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
        self.implementation = implementation

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
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a Python bool; got {type(is_causal).__name__}")

        dtype = compute_dtype(self.dtype, self.param_dtype, inputs_q, inputs_k, inputs_v)
        query = self.query(inputs_q, dtype)
        key = self.key(inputs_k, dtype)
        value = self.value(inputs_v, dtype)
        options = dict(
            mask=None if mask is None else jnp.asarray(mask),
            query_seq_lengths=None if query_seq_lengths is None else jnp.asarray(query_seq_lengths),
            key_value_seq_lengths=None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths),
            query_segment_ids=None if query_segment_ids is None else jnp.asarray(query_segment_ids),
            key_value_segment_ids=None if key_value_segment_ids is None else jnp.asarray(key_value_segment_ids),
        )

        past_end = None
        if self.cache_index is not None:
            key, value, options, past_end = _cache.append(
                self, query, key, value, options, is_causal=is_causal, self_attention=self_attention
            )
            is_causal = False  # now expressed by the cache's lengths and mask

        if deterministic is None:
            deterministic = self.deterministic
        dropping = self.dropout_rate > 0 and not deterministic
        weights = None
        if return_weights or dropping:
            context, weights = _weights.weights_attention(
                query,
                key,
                value,
                options,
                self._dropout_key(rngs) if dropping else None,
                is_causal=is_causal,
                implementation=self.implementation,
                dropout_rate=self.dropout_rate,
            )
        else:
            context = _weights.fast_attention(
                query, key, value, options, is_causal=is_causal, implementation=self.implementation
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

    # ------------------------------------------------------------- KV cache

    def init_cache(self, batch: int, max_length: int, *, dtype: Any = None) -> None:
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
        past ``max_length`` raises ValueError eagerly; under jit the write is
        dropped (never wrapped around), the rows past the end are NaN and a
        ``jax.debug.callback`` raises at run time (a ``JaxRuntimeError`` with the
        same message).

        Args:
            batch: examples decoded together.
            max_length: positions the cache holds (prompt plus generated tokens).
            dtype: cache dtype; default ``dtype`` of the module, else
                ``param_dtype``. It must equal the computation dtype of the calls.

        Raises:
            ValueError: if ``batch`` or ``max_length`` is not a positive int.

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
        positive_int("batch", batch)
        positive_int("max_length", max_length)
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        self.cached_key = nnx.Cache(jnp.zeros((batch, max_length, self.num_kv_heads, self.head_dim), dtype))
        self.cached_value = nnx.Cache(jnp.zeros((batch, max_length, self.num_kv_heads, self.value_head_dim), dtype))
        self.cache_index = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    def clear_cache(self) -> None:
        """Drops the KV cache: calls attend over their own inputs again."""
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    @classmethod
    def from_keras(
        cls,
        source: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> MultiHeadAttention:
        """A module with the configuration and weights of a Keras 3 ``keras.layers.MultiHeadAttention``.

        The sizes come from the weight shapes, so ``source`` may be the built
        layer or its ``get_weights()`` list (8 arrays, or 4 without biases);
        from a layer the dropout rate is copied too. The Keras call
        ``layer(q, v, k, attention_mask=m, use_causal_mask=c)`` corresponds to
        ``module(q, k, v, mask=m[:, None], is_causal=c)`` (a mask row that hides
        every key gives zeros here, Keras's softmax gives uniform weights).

        Args:
            source: a built Keras ``MultiHeadAttention`` layer or its weights list.
            dtype: computation dtype (see the class).
            param_dtype: parameter dtype; the Keras arrays are cast to it.
            implementation: passed to ``jattn.dot_product_attention``.
            rngs: for the dropout stream; default ``nnx.Rngs(0)``.

        Raises:
            ValueError: an unbuilt layer, Keras features jattn lacks (gating,
                sliding window, custom attention axes), a weights list of the
                wrong length or shapes.

        Example:
            >>> import numpy as np
            >>> from jattn import nnx as jnnx
            >>> rng = np.random.default_rng(0)
            >>> shapes = [(16, 2, 8), (2, 8), (16, 2, 8), (2, 8), (16, 2, 8), (2, 8), (2, 8, 16), (16,)]
            >>> weights = [rng.normal(size=s).astype(np.float32) for s in shapes]  # layer.get_weights()
            >>> mha = jnnx.MultiHeadAttention.from_keras(weights)
            >>> mha.num_heads, mha.head_dim, mha.out_features
            (2, 8, 16)
        """
        arrays, config = _keras.mha_arrays(source)
        in_features, num_heads, head_dim = arrays["query/kernel"].shape
        module = cls(
            num_heads,
            in_features,
            head_dim=head_dim,
            value_head_dim=arrays["value/kernel"].shape[2],
            out_features=arrays["out/kernel"].shape[2],
            in_kv_features=arrays["key/kernel"].shape[0],
            use_bias="query/bias" in arrays,
            dropout_rate=config.get("dropout_rate", 0.0),
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=implementation,
            rngs=nnx.Rngs(0) if rngs is None else rngs,
        )
        module.load_keras_weights(source)
        return module

    def load_keras_weights(self, source: Any) -> None:
        """Copies the weights of a Keras 3 ``MultiHeadAttention`` (layer or ``get_weights()`` list) into this module.

        Raises:
            ValueError: if a weight's shape differs from this module's parameter,
                or biases are present on one side only.

        Example:
            >>> import numpy as np
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> mha = jnnx.MultiHeadAttention(2, 16, head_dim=8, use_bias=False, rngs=nnx.Rngs(0))
            >>> shapes = [(16, 2, 8), (16, 2, 8), (16, 2, 8), (2, 8, 16)]  # use_bias=False: kernels only
            >>> mha.load_keras_weights([np.ones(s, np.float32) for s in shapes])
            >>> float(mha.out.kernel[...].sum())
            256.0
        """
        arrays, _ = _keras.mha_arrays(source)
        params = {
            f"{name}/{kind}": getattr(getattr(self, name), kind)
            for name in ("query", "key", "value", "out")
            for kind in ("kernel", "bias")
        }
        has_bias = "query/bias" in arrays
        if has_bias != self.use_bias:
            raise ValueError(
                f"the Keras weights {'have' if has_bias else 'lack'} biases "
                f"but this module has use_bias={self.use_bias}"
            )
        for name, array in arrays.items():
            expected = params[name].shape
            if array.shape != expected:
                raise ValueError(f"Keras weight {name} must have shape {expected} for this module; got {array.shape}")
        for name, array in arrays.items():
            params[name].set_value(jnp.asarray(array, self.param_dtype))
