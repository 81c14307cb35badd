"""Dropout on the attention weights: the one implementation every path of ``jattn.nnx`` uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float


def checked_rate(rate) -> float:
    """``rate`` as a float after checking it is a real number in ``[0, 1)`` (bools refused).

    Raises:
        ValueError: otherwise, e.g. "dropout_rate must be a float in [0, 1); got 1.0".
    """
    real = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, (bool, np.bool_))
    if not real or not 0 <= rate < 1:
        raise ValueError(f"dropout_rate must be a float in [0, 1); got {rate!r}")
    return float(rate)


def keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Bool[Array, "*shape"]:
    """``jax.random.bernoulli(key, 1 - rate, shape)``: True = keep (the draw ``nnx.Dropout`` and Flax make)."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def dropout(
    weights: Float[Array, "batch heads q_seq kv_seq"], keep: Bool[Array, "#batch #heads #q_seq #kv_seq"], *, rate: float
) -> Float[Array, "batch heads q_seq kv_seq"]:
    """Kept weights scaled by ``1 / (1 - rate)``, dropped ones zero: ``where(keep, w / keep_prob, 0)``.

    A select rather than a multiply by ``keep / keep_prob``: a dropped weight is an exact zero even when
    the weight is not finite.

    Example:
        >>> import jax.numpy as jnp
        >>> dropout(jnp.full((1, 1, 1, 4), 0.25, jnp.float32), jnp.array([True, False, True, False]), rate=0.5)
        Array([[[[0.5, 0. , 0.5, 0. ]]]], dtype=float32)
    """
    keep_prob = jnp.asarray(1.0 - rate, weights.dtype)
    return jnp.where(keep, weights / keep_prob, jnp.zeros((), weights.dtype))
