"""Score mods (implementation of the public ``jattn.score_mods``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from . import _checks

ScoreMod = Callable[[Array, Array, Array, Array, Array], Array]
"""``score_mod(score, batch, head, q_idx, kv_idx) -> score``."""

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "relative_position_bias", "soft_cap", "temperature"]


def alibi_slopes(heads: int) -> Float[Array, " heads"]:
    """ALiBi's head slopes: the geometric sequence ``2**(-8 (h + 1) / heads)`` (Press et al., 2022).

    For a number of heads that is not a power of two, the slopes of the next
    lower power of two are followed by every other slope of the next higher one,
    as in the paper's code.

    Raises:
        ValueError: if ``heads`` is not a positive int.

    Example:
        >>> from jattn import score_mods
        >>> print(score_mods.alibi_slopes(4))
        [0.25     0.0625   0.015625 0.00390625]
    """
    _checks.check_positive_int("heads", heads)

    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(heads))
    slopes = powers(lower) + powers(2 * lower)[0::2][: heads - lower]
    return jnp.asarray(slopes, jnp.float32)


def alibi(slopes: Float[ArrayLike, " heads"]) -> ScoreMod:
    """ALiBi: ``score + slopes[head] * (kv_idx - q_idx)``, a linear penalty on distance.

    Args:
        slopes: float ``(heads,)`` (e.g. :func:`alibi_slopes`); may be learned.

    Raises:
        TypeError: if ``slopes`` is not floating point.
        ValueError: if ``slopes`` is not a vector.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import score_mods
        >>> mod = score_mods.alibi(jnp.array([0.5]))
        >>> float(mod(jnp.float32(1.0), 0, 0, 4, 1))  # 1 + 0.5 * (1 - 4)
        -0.5
    """
    slopes = _vector("slopes", slopes)

    def alibi_mod(score, batch, head, q_idx, kv_idx):
        return score + slopes[head].astype(score.dtype) * jnp.asarray(kv_idx - q_idx).astype(score.dtype)

    return alibi_mod


def relative_position_bias(
    table: Float[ArrayLike, "num_buckets heads"], num_buckets: int, max_distance: int, bidirectional: bool = True
) -> ScoreMod:
    """T5's relative position bias: ``score + table[bucket(kv_idx - q_idx), head]``.

    Distances below ``num_buckets / 2`` (half of that per direction when
    ``bidirectional``) get a bucket each; longer ones share logarithmically
    wider buckets up to ``max_distance``, beyond which all share the last.

    Args:
        table: float ``(num_buckets, heads)``, usually learned.
        num_buckets: buckets in ``table``.
        max_distance: the distance the logarithmic buckets end at.
        bidirectional: separate buckets for keys before and after the query
            (encoders); False for decoders (later keys share bucket 0).

    Raises:
        TypeError: if ``table`` is not floating point.
        ValueError: if ``table`` is not ``(num_buckets, heads)`` or a size is not positive.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import score_mods
        >>> table = jnp.arange(8.0)[:, None]  # 8 buckets, 1 head: bias = bucket
        >>> mod = score_mods.relative_position_bias(table, 8, 16)
        >>> [float(mod(jnp.float32(0.0), 0, 0, 5, k)) for k in (5, 4, 6, 0)]  # same, 1 before, 1 after, 5 before
        [0.0, 1.0, 5.0, 2.0]
    """
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        _checks.check_positive_int(name, value)
    table = jnp.asarray(table)
    _checks.check_floating("table", table)
    _checks.check_rank("table", table, (2,), "(num_buckets, heads)")
    _checks.check_equal("table", table.shape[0], num_buckets, "the first axis (num_buckets)")

    def relative_position_mod(score, batch, head, q_idx, kv_idx):
        bucket = _bucket(jnp.asarray(kv_idx - q_idx), num_buckets, max_distance, bidirectional)
        return score + table[bucket, head].astype(score.dtype)

    return relative_position_mod


def _bucket(relative, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's bucketing of ``kv_idx - q_idx``: exact near the query, logarithmic further away."""
    distance = -relative  # > 0: the key lies before the query
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(distance < 0, num_buckets, 0)
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    exact = num_buckets // 2
    far = distance.astype(jnp.float32) / max(exact, 1)
    log_ratio = jnp.log(jnp.maximum(far, 1e-6)) / math.log(max(max_distance / max(exact, 1), 1 + 1e-6))
    large = exact + (log_ratio * (num_buckets - exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < exact, distance, large)


def soft_cap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` as a score mod (after the bias; ``logits_soft_cap=`` caps before it).

    Raises:
        ValueError: if ``cap`` is not a positive finite number.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import score_mods
        >>> round(float(score_mods.soft_cap(2.0)(jnp.float32(100.0), 0, 0, 0, 0)), 4)
        2.0
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
        raise ValueError(f"cap must be a positive finite float; got {cap!r}")

    def soft_cap_mod(score, batch, head, q_idx, kv_idx):
        return cap * jnp.tanh(score / cap)

    return soft_cap_mod


def temperature(per_head: Float[ArrayLike, " heads"]) -> ScoreMod:
    """``score / per_head[head]``: a (learnable) softmax temperature per head.

    Raises:
        TypeError: if ``per_head`` is not floating point.
        ValueError: if ``per_head`` is not a vector.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import score_mods
        >>> float(score_mods.temperature(jnp.array([2.0, 4.0]))(jnp.float32(8.0), 0, 1, 0, 0))
        2.0
    """
    per_head = _vector("per_head", per_head)

    def temperature_mod(score, batch, head, q_idx, kv_idx):
        return score / per_head[head].astype(score.dtype)

    return temperature_mod


def _vector(name: str, x) -> Array:
    x = jnp.asarray(x)
    _checks.check_floating(name, x)
    _checks.check_rank(name, x, (1,), "(heads,)")
    return x
