"""The functional core: attention for one example, in three pure steps.

``scores`` (query·key), ``softmax`` (weights) and ``context`` (weights·value)
work on a single example with no batch or head axes; batching comes from
``jax.vmap`` (see ``_reference.py``). Axis legend, used everywhere in jattn:

    q_seq   query positions          kv_seq  key/value positions
    dim     query/key feature size   v_dim   value feature size
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from . import _checks
from ._numerics import (
    check_scale,
    check_soft_cap,
    compute_dtype,
    default_scale,
    logits,
    softmax_with_lse,
    weighted_sum,
)


def _check_qk(q, k) -> None:
    _checks.check_floating("q", q)
    _checks.check_floating("k", k)
    _checks.check_same_dtype(q=q, k=k)
    _checks.check_rank("q", q, (1, 2), "(q_seq, dim) or (dim,)")
    _checks.check_rank("k", k, (2,), "(kv_seq, dim)")
    _checks.check_equal("k", k.shape[-1], q.shape[-1], "the last axis (dim) of k, as in q")


def scores(
    q: Float[ArrayLike, "q_seq dim"] | Float[ArrayLike, " dim"],
    k: Float[ArrayLike, "kv_seq dim"],
    *,
    scale: float | None = None,
) -> Float[Array, "q_seq kv_seq"] | Float[Array, " kv_seq"]:
    """Attention scores of one example: ``scale * q @ k.T``.

    Args:
        q: queries ``(q_seq, dim)``, or a single query vector ``(dim,)``.
        k: keys ``(kv_seq, dim)``.
        scale: multiplier of the dot products; ``None`` means ``1/sqrt(dim)``,
            ``1.0`` gives the plain (unscaled) dot product.

    Returns:
        ``(q_seq, kv_seq)`` scores, or ``(kv_seq,)`` for a single query, in the
        input dtype (accumulated in float32 for 16-bit inputs).

    Raises:
        TypeError: if q or k is not floating point, their dtypes differ, or
            ``scale`` is not a number.
        ValueError: if a rank is wrong or ``dim`` differs between q and k.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> q = jnp.array([1.0, 0.0])
        >>> k = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
        >>> print(jattn.scores(q, k, scale=1.0))
        [1. 0. 3.]
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    _check_qk(q, k)
    check_scale(scale)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return logits(q, k, scale=scale).astype(q.dtype)


def softmax(
    scores: Float[ArrayLike, "*rows n"],
    mask: Bool[ArrayLike, "*rows n"] | None = None,
    *,
    axis: int = -1,
) -> Float[Array, "*rows n"]:
    """Numerically stable masked softmax; a row with no visible entry gives zeros.

    ``softmax(x)_j = exp(x_j - max x) / sum_i exp(x_i - max x)`` over the
    visible entries of ``axis``. Arithmetic runs in float32 (float64 for
    float64 input) and the result is cast back to the input dtype. Masked
    logits are replaced by a finite large negative before any arithmetic, so
    values and gradients stay finite for fully masked rows and for logits of
    any finite size; NaN inputs still propagate.

    Args:
        scores: logits, any shape.
        mask: optional boolean, True = attend; same rank as ``scores`` and
            broadcastable to it.
        axis: the axis to normalize over.

    Returns:
        Weights with the shape and dtype of ``scores``.

    Raises:
        TypeError: if scores is not floating point or mask is not boolean.
        ValueError: if mask does not broadcast to scores, or axis is out of range.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> x = jnp.array([[0.0, jnp.log(3.0)], [5.0, 7.0]])
        >>> print(jattn.softmax(x, jnp.array([[True, True], [False, False]])))
        [[0.25 0.75]
         [0.   0.  ]]
    """
    x = jnp.asarray(scores)
    _checks.check_floating("scores", x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim}) for scores of shape {x.shape}; got {axis}")
    if mask is not None:
        mask = jnp.asarray(mask)
        _checks.check_bool("mask", mask)
        _checks.check_broadcastable("mask", mask, x.shape, "(same rank as scores)")
    weights, _ = softmax_with_lse(x.astype(compute_dtype(x.dtype)), mask, axis)
    return weights.astype(x.dtype)


def context(
    weights: Float[ArrayLike, "q_seq kv_seq"] | Float[ArrayLike, " kv_seq"],
    v: Float[ArrayLike, "kv_seq v_dim"],
) -> Float[Array, "q_seq v_dim"] | Float[Array, " v_dim"]:
    """Context vectors of one example: ``weights @ v``.

    Args:
        weights: attention weights ``(q_seq, kv_seq)`` or ``(kv_seq,)``.
        v: values ``(kv_seq, v_dim)``.

    Returns:
        ``(q_seq, v_dim)`` (or ``(v_dim,)``) in v's dtype, accumulated in float32
        for 16-bit inputs.

    Raises:
        TypeError: if an input is not floating point or the dtypes differ.
        ValueError: if a rank is wrong or ``kv_seq`` differs.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> w = jnp.array([0.25, 0.75])
        >>> v = jnp.array([[0.0, 4.0], [8.0, 0.0]])
        >>> print(jattn.context(w, v))
        [6. 1.]
    """
    weights, v = jnp.asarray(weights), jnp.asarray(v)
    _checks.check_floating("weights", weights)
    _checks.check_floating("v", v)
    _checks.check_same_dtype(weights=weights, v=v)
    _checks.check_rank("weights", weights, (1, 2), "(q_seq, kv_seq) or (kv_seq,)")
    _checks.check_rank("v", v, (2,), "(kv_seq, v_dim)")
    _checks.check_equal("v", v.shape[0], weights.shape[-1], "the first axis (kv_seq) of v, as in weights")
    return weighted_sum(weights, v)


def attention(
    q: Float[ArrayLike, "q_seq dim"] | Float[ArrayLike, " dim"],
    k: Float[ArrayLike, "kv_seq dim"],
    v: Float[ArrayLike, "kv_seq v_dim"],
    mask: Bool[ArrayLike, "q_seq kv_seq"] | None = None,
    bias: Float[ArrayLike, "q_seq kv_seq"] | None = None,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_weights: bool = False,
) -> Float[Array, "q_seq v_dim"] | tuple[Float[Array, "q_seq v_dim"], Float[Array, "q_seq kv_seq"]]:
    """Attention of one example: ``context(softmax(scores(q, k) + bias, mask), v)``.

    With ``logits_soft_cap=c`` the scaled scores become ``c * tanh(s / c)``
    before the bias is added (Gemma 2). The logits and softmax stay in float32
    (float64 for float64 inputs); the weights are cast to v's dtype for the
    weighted sum.

    Args:
        q: queries ``(q_seq, dim)``, or one query ``(dim,)``.
        k: keys ``(kv_seq, dim)``.
        v: values ``(kv_seq, v_dim)``.
        mask: optional boolean, True = attend, broadcastable to
            ``(q_seq, kv_seq)`` (``(kv_seq,)`` for one query).
        bias: optional float added to the logits, same broadcasting as mask.
        scale: score multiplier, ``None`` = ``1/sqrt(dim)``.
        logits_soft_cap: optional positive cap for tanh soft-capping.
        return_weights: also return the weights ``(q_seq, kv_seq)``.

    Returns:
        ``(q_seq, v_dim)`` context in the input dtype (``(v_dim,)`` for one
        query), and the weights when ``return_weights`` is True. A query that
        sees no key gets zeros.

    Raises:
        TypeError: on non-floating or mismatched dtypes, a non-boolean mask, a
            non-floating bias.
        ValueError: on wrong ranks, mismatched ``dim``/``kv_seq``, or a mask or
            bias that does not broadcast to the scores.

    Example:
        The tutorial's first example: one query, unscaled, keys used as values.

        >>> import jax.numpy as jnp, jattn
        >>> q = jnp.array([0.41, 0.42, 0.43])
        >>> k = jnp.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23]])
        >>> out, w = jattn.attention(q, k, k, scale=1.0, return_weights=True)
        >>> print(jnp.round(w, 4), jnp.round(out, 4))
        [0.4685 0.5315] [0.1631 0.1731 0.1831]
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_qk(q, k)
    _checks.check_floating("v", v)
    _checks.check_same_dtype(q=q, k=k, v=v)
    _checks.check_rank("v", v, (2,), "(kv_seq, v_dim)")
    _checks.check_equal("v", v.shape[0], k.shape[0], "the first axis (kv_seq) of v, as in k")
    check_scale(scale)
    check_soft_cap(logits_soft_cap)
    logits_shape = (*q.shape[:-1], k.shape[0])
    axes = "(q_seq, kv_seq)" if q.ndim == 2 else "(kv_seq,)"
    if mask is not None:
        mask = jnp.asarray(mask)
        _checks.check_bool("mask", mask)
        _checks.check_broadcastable("mask", mask, logits_shape, axes)
    if bias is not None:
        bias = jnp.asarray(bias)
        _checks.check_floating("bias", bias)
        _checks.check_broadcastable("bias", bias, logits_shape, axes)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, weights, _ = attention_core(q, k, v, mask, bias, scale=scale, logits_soft_cap=logits_soft_cap)
    return (out, weights) if return_weights else out


def attention_weights(
    q: Array,
    k: Array,
    mask: Array | None,
    bias: Array | None,
    *,
    scale: float,
    logits_soft_cap: float | None,
    score_fn: Callable[[Array], Array] | None = None,
    sink: Array | None = None,
) -> tuple[Array, Array]:
    """Unchecked single-example weights and log-sum-exp, both in the softmax compute dtype.

    The logit pipeline: ``scale * q.k`` -> soft cap -> ``+ bias`` -> ``score_fn`` -> mask -> softmax
    (with ``sink`` in the denominator).
    """
    x = logits(q, k, scale=scale, logits_soft_cap=logits_soft_cap)
    if bias is not None:
        x = x + bias.astype(x.dtype)
    if score_fn is not None:
        x = score_fn(x)
    return softmax_with_lse(x, mask, sink=sink)


def attention_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    bias: Array | None,
    *,
    scale: float,
    logits_soft_cap: float | None,
) -> tuple[Array, Array, Array]:
    """Unchecked single-example attention: ``(context, weights, log-sum-exp)``."""
    weights, lse = attention_weights(q, k, mask, bias, scale=scale, logits_soft_cap=logits_soft_cap)
    weights = weights.astype(v.dtype)
    return weighted_sum(weights, v), weights, lse
