"""``AttentionBlock``: the tutorial's multi-head self-attention + residual + LayerNorm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from jattn import _checks
from jattn.sharding import SequenceParallel

from . import _keras
from ._attention import MultiHeadAttention
from ._paged_step import BlockPagedMethods

KERAS_LAYER_NORM_EPSILON = 1e-3


class AttentionBlock(BlockPagedMethods, nnx.Module):
    r"""Self-attention, residual add and LayerNorm: ``norm(x + mha(x))``, or ``x + mha(norm(x))``.

    The default (post-norm) is the tutorial's Keras block
    ``LayerNormalization()(Add()([x, MultiHeadAttention(...)(x, x)]))``, with
    Keras's LayerNorm epsilon ``1e-3`` so that loaded Keras weights give the
    same outputs; ``pre_norm=True`` gives the pre-norm block of most current
    transformers. The attention is a :class:`MultiHeadAttention` (``attention``)
    whose output has ``in_features`` features; the norm is an ``nnx.LayerNorm``
    (``norm``, parameters ``scale`` and ``bias``).

    Inputs are float ``(batch, seq, in_features)``: token ids go through an
    embedding first (``nnx.Embed``), and a wrongly ranked input is an error
    rather than a silently broadcast result.

    The block's own arguments are the sizes, the norm's and the dtypes; every
    other keyword builds the attention: it is passed to
    :class:`MultiHeadAttention` as is, with ``out_features=in_features``.

    Args:
        num_heads: attention heads.
        in_features: features in and out.
        pre_norm: normalize the attention input instead of the sum.
        epsilon: LayerNorm epsilon (Keras's default ``1e-3``; Flax uses ``1e-6``).
        dtype: computation dtype of the attention and the norm (default:
            promotion of inputs and params).
        param_dtype: parameter dtype of both.
        rngs: ``nnx.Rngs``.
        **attention_options: keyword arguments of :class:`MultiHeadAttention`:
            ``head_dim``, ``value_head_dim``, ``num_kv_heads`` (GQA), ``use_bias``,
            ``dropout_rate``, ``kernel_init``, ``bias_init``, ``implementation``,
            ``block_q``, ``block_kv``, ``sequence_parallel``,
            ``local_window_size``, ``logits_soft_cap``, ``score_mod``,
            ``mask_mod``, ``use_sinks``, ``deterministic``, ``attention_fn``.

    Raises:
        TypeError: ``out_features`` or ``in_kv_features`` in
            ``attention_options`` (a block maps ``in_features`` to itself), and
            the errors of :class:`MultiHeadAttention`.

    Example:
        The tutorial's example done right: token ids, an embedding, the block.

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jattn import nnx as jnnx
        >>> rngs = nnx.Rngs(0)
        >>> embed = nnx.Embed(100, 16, rngs=rngs)
        >>> block = jnnx.AttentionBlock(2, 16, head_dim=8, rngs=rngs)
        >>> tokens = jax.random.randint(jax.random.key(0), (3, 10), 0, 100)  # (batch, seq) ids
        >>> block(embed(tokens)).shape
        (3, 10, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        pre_norm: bool = False,
        epsilon: float = KERAS_LAYER_NORM_EPSILON,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **attention_options: Any,
    ):
        for name in ("out_features", "in_kv_features"):
            if name in attention_options:
                raise TypeError(
                    f"AttentionBlock maps in_features to in_features: {name} cannot be given; "
                    f"got {name}={attention_options[name]!r}"
                )
        self.attention = MultiHeadAttention(
            num_heads, in_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **attention_options
        )
        self.norm = nnx.LayerNorm(
            in_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, rngs=rngs
        )
        self.pre_norm = bool(pre_norm)
        self.in_features = in_features

    def __call__(
        self,
        inputs: Float[ArrayLike, "batch seq in_features"],
        *,
        return_weights: bool = False,
        **options: Any,
    ) -> (
        Float[Array, "batch seq in_features"]
        | tuple[Float[Array, "batch seq in_features"], Float[Array, "batch heads seq kv_seq"]]
    ):
        """Applies the block; the keyword options are those of :meth:`MultiHeadAttention.__call__`.

        Args:
            inputs: float ``(batch, seq, in_features)``.
            return_weights: also return the attention weights ``(batch, heads, seq, kv_seq)``.
            **options: passed to the attention: ``mask``, ``is_causal`` (required
                while decoding), ``query_seq_lengths`` / ``key_value_seq_lengths``
                (padding), ``query_segment_ids`` / ``key_value_segment_ids``
                (packed sequences), ``bias``, ``score_mod``, ``mask_mod``,
                ``block_mask``, ``deterministic``, ``rngs``.

        Returns:
            ``(batch, seq, in_features)``, and the weights if ``return_weights``.

        Raises:
            TypeError: integer inputs (token ids: embed them first).
            ValueError: inputs not of shape ``(batch, seq, in_features)``, and
                the errors of :class:`MultiHeadAttention`.
        """
        x = jnp.asarray(inputs)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"inputs must be float (batch, seq, in_features); got dtype {x.dtype} with shape {x.shape} "
                "(token ids? embed them first, e.g. with nnx.Embed)"
            )
        _checks.check_rank("inputs", x, (3,), f"(batch, seq, in_features={self.in_features})")
        result = self.attention(self._norm(x) if self.pre_norm else x, return_weights=return_weights, **options)
        attended, weights = result if isinstance(result, tuple) else (result, None)
        y = x.astype(attended.dtype) + attended
        if not self.pre_norm:
            y = self._norm(y)
        return y if weights is None or not return_weights else (y, weights)

    def _norm(self, x: Array) -> Array:
        # nnx.LayerNorm promotes inputs and parameters implicitly (float64 inputs, float32 params).
        with jax.numpy_dtype_promotion("standard"):
            return self.norm(x)

    def init_cache(
        self, batch: int, max_length: int, *, dtype: Any = None, runtime_overflow_error: bool = False
    ) -> None:
        """Allocates the attention's KV cache; see :meth:`MultiHeadAttention.init_cache`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> block = jnnx.AttentionBlock(2, 8, rngs=nnx.Rngs(0))
            >>> block.init_cache(batch=1, max_length=8)
            >>> block(jnp.ones((1, 3, 8), jnp.float32), is_causal=True).shape
            (1, 3, 8)
            >>> block.attention.cache_index[...]
            Array([3], dtype=int32)
        """
        self.attention.init_cache(batch, max_length, dtype=dtype, runtime_overflow_error=runtime_overflow_error)

    def clear_cache(self) -> None:
        """Drops the attention's KV cache."""
        self.attention.clear_cache()

    @classmethod
    def from_keras(
        cls,
        attention: Any,
        layer_norm: Any,
        *,
        pre_norm: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        sequence_parallel: SequenceParallel | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> AttentionBlock:
        """A block with the weights of a Keras ``MultiHeadAttention`` and ``LayerNormalization``.

        Each source is a built layer or its ``get_weights()`` list; the LayerNorm
        epsilon is taken from the layer (Keras's default ``1e-3`` for a list).
        ``implementation`` and ``sequence_parallel`` are passed to the block.

        Raises:
            ValueError: see :meth:`MultiHeadAttention.from_keras`, and a
                LayerNorm whose size differs from the attention's features.

        Example:
            >>> import numpy as np
            >>> from jattn import nnx as jnnx
            >>> mha = [np.ones(s, np.float32) for s in [(8, 2, 4), (8, 2, 4), (8, 2, 4), (2, 4, 8)]]
            >>> norm = [np.ones(8, np.float32), np.zeros(8, np.float32)]  # gamma, beta
            >>> block = jnnx.AttentionBlock.from_keras(mha, norm)
            >>> block.attention.num_heads, block.norm.epsilon
            (2, 0.001)
        """
        configuration = _keras.mha_configuration(attention)
        _, norm_config = _keras.layer_norm_arrays(layer_norm)
        for name in ("out_features", "in_kv_features"):  # a block maps in_features to in_features
            if (size := configuration.pop(name)) != configuration["in_features"]:
                raise ValueError(
                    f"an AttentionBlock needs a Keras MultiHeadAttention with {name} equal to its in_features "
                    f"({configuration['in_features']}); got {name}={size}"
                )
        block = cls(
            **configuration,
            pre_norm=pre_norm,
            epsilon=norm_config.get("epsilon", KERAS_LAYER_NORM_EPSILON),
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=implementation,
            sequence_parallel=sequence_parallel,
            rngs=nnx.Rngs(0) if rngs is None else rngs,
        )
        block.load_keras_weights(attention, layer_norm)
        return block

    def load_keras_weights(self, attention: Any, layer_norm: Any) -> None:
        """Copies Keras ``MultiHeadAttention`` and ``LayerNormalization`` weights (layers or lists) into the block.

        Raises:
            ValueError: on any shape mismatch, or a LayerNorm layer whose epsilon
                differs from the block's.

        Example:
            >>> import numpy as np
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> block = jnnx.AttentionBlock(2, 8, use_bias=False, rngs=nnx.Rngs(0))
            >>> mha = [np.ones(s, np.float32) for s in [(8, 2, 4), (8, 2, 4), (8, 2, 4), (2, 4, 8)]]
            >>> block.load_keras_weights(mha, [np.full(8, 2.0, np.float32), np.zeros(8, np.float32)])
            >>> float(block.norm.scale[...].sum())
            16.0
        """
        arrays, norm_config = _keras.layer_norm_arrays(layer_norm)
        epsilon = norm_config.get("epsilon", self.norm.epsilon)
        if epsilon != self.norm.epsilon:
            raise ValueError(f"the Keras LayerNormalization has epsilon={epsilon} but this block {self.norm.epsilon}")
        for name, array in arrays.items():
            param = getattr(self.norm, name)
            if array.shape != param.shape:
                raise ValueError(f"Keras LayerNormalization {name} must have shape {param.shape}; got {array.shape}")
        self.attention.load_keras_weights(attention)
        for name, array in arrays.items():
            getattr(self.norm, name).set_value(jnp.asarray(array, self.norm.param_dtype))
