"""Score mods: ``score_mod(score, batch, head, q_idx, kv_idx) -> score`` for ``dot_product_attention``.

Each function here returns a plain closure over its arrays, applied elementwise
to the logits after scale, soft cap and bias (FlexAttention's ``score_mod``).
Gradients and tangents reach the captured arrays through every implementation
jattn computes: make the closure inside the function you differentiate (or
``jit``), from the arrays you differentiate with respect to.

Example:
    >>> import jax, jax.numpy as jnp, jattn
    >>> from jattn import score_mods
    >>> x = jax.random.normal(jax.random.key(0), (1, 6, 4, 8))  # (batch, seq, heads, dim)
    >>> mod = score_mods.alibi(score_mods.alibi_slopes(4))
    >>> jattn.dot_product_attention(x, x, x, is_causal=True, score_mod=mod).shape
    (1, 6, 4, 8)
"""

from __future__ import annotations

from ._score_mods import ScoreMod as ScoreMod
from ._score_mods import alibi as alibi
from ._score_mods import alibi_slopes as alibi_slopes
from ._score_mods import relative_position_bias as relative_position_bias
from ._score_mods import soft_cap as soft_cap
from ._score_mods import temperature as temperature

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "relative_position_bias", "soft_cap", "temperature"]
