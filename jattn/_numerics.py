"""Numerics every path shares: the softmax dtype, the masking sentinel, the logits and the stable softmax.

The one owner of these rules: the per-example core (``_core``), the reference,
the blockwise kernel and the jax.nn delegate all call them, so a masked logit,
a row that sees no key or a 16-bit input is treated the same way everywhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype softmax runs in: float64 stays, everything else uses float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def masked_value(dtype) -> Array:
    """A finite stand-in for -inf: masked logits never turn into NaN or Inf."""
    return jnp.asarray(jnp.finfo(dtype).min, dtype)


def residual(lse: Array, dtype) -> Array:
    """The log-sum-exp handed back by ``return_residual``: in the input dtype, as ``jax.nn`` does.

    It is computed in the softmax dtype; a row that sees no key holds the
    masking sentinel there, which is clipped to ``dtype``'s lowest finite value
    so that the cast cannot overflow to -inf.
    """
    return jnp.maximum(lse, jnp.asarray(jnp.finfo(dtype).min, lse.dtype)).astype(dtype)


def default_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


def _is_real_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_scale(scale: float | None) -> None:
    if scale is not None and not _is_real_number(scale):
        raise TypeError(f"scale must be a Python float or None; got {type(scale).__name__}")


def check_soft_cap(logits_soft_cap: float | None) -> None:
    if logits_soft_cap is None:
        return
    if not _is_real_number(logits_soft_cap):
        raise TypeError(f"logits_soft_cap must be a positive float or None; got {logits_soft_cap!r}")
    if not 0 < logits_soft_cap < math.inf:
        raise ValueError(f"logits_soft_cap must be a positive finite float or None; got {logits_soft_cap!r}")


def logits(q: Array, k: Array, *, scale: float, logits_soft_cap: float | None = None) -> Array:
    """Scaled (and optionally tanh-capped) q·k in the softmax compute dtype; no checks."""
    acc = compute_dtype(q.dtype)
    x = jnp.einsum("...d,kd->...k", q, k, preferred_element_type=acc)
    x = x * jnp.asarray(scale, acc)
    if logits_soft_cap is not None:
        # Gemma 2 style capping keeps |logit| < cap; applied before bias and masks.
        cap = jnp.asarray(logits_soft_cap, acc)
        x = cap * jnp.tanh(x / cap)
    return x


def softmax_with_lse(x: Array, mask: Array | None, axis: int = -1, sink: Array | None = None) -> tuple[Array, Array]:
    """Masked softmax of ``x`` and its log-sum-exp, in ``x``'s dtype; no checks.

    Masked entries become a finite large negative *before* any arithmetic, so
    no ``inf - inf`` or ``0 * inf`` ever appears, in values or in gradients. A
    logit of ``-inf`` (e.g. from a bias) hides its entry like the mask does. A
    row with no visible entry has weights 0 and log-sum-exp equal to the
    dtype's lowest finite value. NaN logits stay visible, so NaN propagates.
    A ``sink`` (a scalar logit, an attention sink) joins the denominator only:
    the weights then sum to less than one, and a row with no visible entry has
    log-sum-exp ``sink``.
    """
    finite = x != -jnp.inf
    visible = finite if mask is None else mask & finite
    x = jnp.where(visible, x, masked_value(x.dtype))
    # Softmax is invariant to the shift, so its gradient can be stopped.
    shift = jnp.max(x, axis=axis, keepdims=True)
    if sink is not None:
        shift = jnp.maximum(shift, sink.astype(x.dtype))
    shift = jax.lax.stop_gradient(shift)
    e = jnp.where(visible, jnp.exp(x - shift), 0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    if sink is not None:
        total = total + jnp.exp(sink.astype(x.dtype) - shift)
    visible = total > 0
    weights = e / jnp.where(visible, total, 1)
    lse = jnp.where(visible, shift + jnp.log(jnp.where(visible, total, 1)), masked_value(x.dtype))
    return weights, jnp.squeeze(lse, axis)


def weighted_sum(weights: Array, v: Array) -> Array:
    out = jnp.einsum("...k,kd->...d", weights, v, preferred_element_type=compute_dtype(v.dtype))
    return out.astype(v.dtype)
