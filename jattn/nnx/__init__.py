"""Flax NNX modules on top of ``jattn.dot_product_attention``.

``MultiHeadAttention`` (Keras-layout projections, grouped-query heads, dropout
on the attention weights, weights for inspection, a KV cache for jit-compiled
decoding, a serving step over a paged KV cache (``paged_step``, pools in a
``PagedKV``), Keras weight import, Flax's ``attention_fn=`` hook) and
``AttentionBlock`` (a ``MultiHeadAttention`` + residual + LayerNorm), and
``flax_attention_fn``, which puts jattn behind Flax's own
modules (``attention_fn=`` of ``flax.nnx.MultiHeadAttention`` and
``flax.linen.MultiHeadDotProductAttention``). This subpackage is the only part
of jattn that imports flax; use it as ``from jattn import nnx as jnnx`` (next
to ``from flax import nnx``). From Flax Linen, wrap a module with
``flax.nnx.bridge.ToLinen``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jattn import nnx as jnnx
    >>> mha = jnnx.MultiHeadAttention(num_heads=2, in_features=8, rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((1, 3, 8), jnp.float32), is_causal=True).shape
    (1, 3, 8)
"""

from ._attention import MultiHeadAttention as MultiHeadAttention
from ._block import AttentionBlock as AttentionBlock
from ._flax import flax_attention_fn as flax_attention_fn
from ._paged_step import PagedKV as PagedKV

__all__ = ["AttentionBlock", "MultiHeadAttention", "PagedKV", "flax_attention_fn"]
