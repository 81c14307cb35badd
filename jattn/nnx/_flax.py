"""``flax_attention_fn``: jattn behind Flax's ``attention_fn=`` hook (NNX and Linen).

Flax's attention modules call ``attention_fn(query, key, value, bias=..., mask=...,
broadcast_dropout=..., dropout_rng=..., dropout_rate=..., deterministic=...,
dtype=..., precision=..., module=..., is_causal=...)``. This adapter takes that
call: without dropout or weights to sow it runs jattn's fast kernels
(``_api.attend``); otherwise jattn's materialized path
(``_api.attend_with_weights``), with Flax's dropout as the weights hook and
the weights before dropout sown into ``module``, as Flax does.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from flax.nnx.nn import dtypes
from jaxtyping import Array, ArrayLike, Float, Shaped

from jattn import _api, _checks, _dispatch
from jattn._dispatch import Implementation
from jattn._options import CallOptions

from ._dropout import checked_rate, dropout, keep_mask


def flax_attention_fn(
    query: Float[ArrayLike, "*batch q_seq heads dim"],
    key: Float[ArrayLike, "*batch kv_seq kv_heads dim"],
    value: Float[ArrayLike, "*batch kv_seq kv_heads v_dim"],
    bias: Float[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | None = None,
    mask: Shaped[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | None = None,  # bool or float, nonzero = attend
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: nnx.Module | linen.Module | None = None,
    promote_dtype: Any = dtypes.promote_dtype,
    is_causal: bool = False,
    *,
    implementation: Implementation | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Float[Array, "*batch q_seq heads v_dim"]:
    r"""Flax's ``dot_product_attention`` signature, computed by jattn: pass it as ``attention_fn=``.

    ``softmax(Q K^T / sqrt(dim) + bias, masked)``, dropped out, times ``V``, for
    ``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention``
    (bind jattn's options with ``functools.partial``). Axis legend::

        batch   any number of leading axes (none, one, several), the same on q, k, v
        q_seq   query positions         kv_seq    key/value positions
        heads   query heads             kv_heads  key/value heads (divides heads; GQA)
        dim     query/key features      v_dim     value features

    As in Flax: ``query``, ``key`` and ``value`` go through ``promote_dtype``
    with ``dtype`` first; ``bias`` is added to the logits before masking; a
    float mask counts as True where nonzero; dropout keeps each weight with
    probability ``1 - dropout_rate`` and scales it by the inverse, drawing
    ``jax.random.bernoulli(dropout_rng, 1 - dropout_rate, shape)`` with Flax's
    shape, ``(1, ..., 1, q_seq, kv_seq)`` (one keep mask shared by every
    example and head) if ``broadcast_dropout`` else ``(*batch, heads, q_seq,
    kv_seq)``, so the same ``dropout_rng`` drops the same weights as Flax;
    ``module`` gets the weights *before* dropout, as Flax sows them
    (``nnx.Intermediate`` / Linen's ``"intermediates"``, name
    ``"attention_weights"``).

    Differences from Flax: a query row that sees no key (every key masked)
    returns zeros and zero weights; Flax returns the mean of V (uniform
    weights). Logits and softmax run in float32 (float64 for float64 inputs)
    whatever the input dtype. ``precision`` is accepted and not used: jattn's
    matmuls run at JAX's default precision (``jax.default_matmul_precision``).

    Args:
        query: ``(*batch, q_seq, heads, dim)``.
        key: ``(*batch, kv_seq, kv_heads, dim)``.
        value: ``(*batch, kv_seq, kv_heads, v_dim)``.
        bias: optional float, broadcastable to ``(*batch, heads, q_seq, kv_seq)``
            (missing leading axes count as 1).
        mask: optional bool or float (nonzero = attend), same shape rule.
        broadcast_dropout: share one dropout mask across batch and heads.
        dropout_rng: PRNG key, required when dropout is on.
        dropout_rate: in ``[0, 1)``; dropout is on when it is positive and
            ``deterministic`` is False.
        deterministic: True turns dropout off.
        dtype: computation dtype for ``promote_dtype``; default: inferred.
        precision: accepted for Flax compatibility; not used (see above).
        module: an ``nnx.Module`` or ``linen.Module`` to sow the weights
            ``(*batch, heads, q_seq, kv_seq)`` into, or None.
        promote_dtype: Flax's promotion function, called as
            ``promote_dtype((query, key, value), dtype=dtype)``.
        is_causal: query ``i`` sees keys ``j <= i``.
        implementation: jattn's kernel when nothing needs the weights (``None``:
            see :func:`jattn.auto_implementation`); the weights path is
            always ``"reference"``.
        block_q: query block of the blockwise kernel; ``None``: the backend's
            default (``jattn.DEFAULT_BLOCK_SIZES``).
        block_kv: key/value block of the blockwise kernel; ``None`` as for ``block_q``.

    Returns:
        ``(*batch, q_seq, heads, v_dim)`` in the promoted dtype.

    Raises:
        TypeError: a non-bool ``broadcast_dropout``, ``deterministic`` or
            ``is_causal``, a ``module`` that is no Flax module, and jattn's
            errors (dtypes of q/k/v or bias).
        ValueError: ``dropout_rate`` outside ``[0, 1)``, dropout on without
            ``dropout_rng``, an unknown ``implementation``, a non-positive
            block size, and jattn's shape errors.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn, nnx
        >>> from jattn import nnx as jnnx
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 6), jnp.float32)  # (batch, seq, features)
        >>> mha = nnx.MultiHeadAttention(num_heads=2, in_features=6, decode=False, rngs=nnx.Rngs(0),
        ...                              attention_fn=jnnx.flax_attention_fn)
        >>> flax_mha = nnx.MultiHeadAttention(num_heads=2, in_features=6, decode=False, rngs=nnx.Rngs(0))
        >>> y = mha(x, is_causal=True)
        >>> y.shape, bool(jnp.allclose(y, flax_mha(x, is_causal=True), atol=1e-6))
        ((2, 5, 6), True)
        >>> layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=jnnx.flax_attention_fn)
        >>> variables = layer.init(jax.random.key(1), x)
        >>> layer.apply(variables, x).shape
        (2, 5, 6)
    """
    # Python bools: they pick the code path, and is_causal is a static (hashed) field of CallOptions.
    for name, flag in (
        ("broadcast_dropout", broadcast_dropout),
        ("deterministic", deterministic),
        ("is_causal", is_causal),
    ):
        _checks.check_static_bool(name, flag)
    rate = checked_rate(dropout_rate)
    implementation = _dispatch.check_implementation(implementation)
    _checks.check_positive_int("block_q", block_q, allow_none=True)
    _checks.check_positive_int("block_kv", block_kv, allow_none=True)
    sow = _sower(module)
    dropping = rate > 0 and not deterministic
    if dropping and dropout_rng is None:
        raise ValueError(
            f"dropout_rng must be a PRNG key when dropout is on (dropout_rate={rate}, deterministic=False); got None"
        )

    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    # Flax's rule: a mask is truthy where attended, whatever its dtype; jattn's masks are boolean.
    mask = None if mask is None else jnp.asarray(mask).astype(jnp.bool_)
    call = CallOptions(bias=bias, mask=mask, is_causal=bool(is_causal))
    if sow is None and not dropping:
        return _fast_path(query, key, value, call, implementation=implementation, block_q=block_q, block_kv=block_kv)
    rng = dropout_rng if dropping else None
    out, weights = _weights_path(query, key, value, call, rng, rate=rate, broadcast=bool(broadcast_dropout))
    if sow is not None:
        sow(weights)
    return out


def _sower(module):
    """What sows the weights into ``module`` (None for no module), in the collection Flax uses."""
    if module is None:
        return None
    if isinstance(module, nnx.Module):
        return functools.partial(module.sow, nnx.Intermediate, "attention_weights")
    if isinstance(module, linen.Module):
        return functools.partial(module.sow, "intermediates", "attention_weights")
    raise TypeError(f"module must be a flax.nnx.Module, a flax.linen.Module or None; got {type(module).__name__}")


# Jit-compiled so that an eager call (Flax's tests, notebooks) compiles once per shape, not once per op.


@functools.partial(jax.jit, static_argnames=("implementation", "block_q", "block_kv"))
def _fast_path(query, key, value, call: CallOptions, *, implementation, block_q, block_kv):
    return _api.attend(query, key, value, call, implementation=implementation, block_q=block_q, block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("rate", "broadcast"))
def _weights_path(query, key, value, call: CallOptions, rng, *, rate: float, broadcast: bool):
    """Output and weights before dropout ``(*batch, heads, q_seq, kv_seq)``; dropout on the weights if ``rng``."""
    hook = None
    if rng is not None:
        hook = functools.partial(_flax_dropout, rng=rng, rate=rate, broadcast=broadcast, batch_shape=query.shape[:-3])
    return _api.attend_with_weights(query, key, value, call, weights_hook=hook)


def _flax_dropout(
    weights: Float[Array, "batch heads q_seq kv_seq"],
    *,
    rng: Array,
    rate: float,
    broadcast: bool,
    batch_shape: tuple[int, ...],
) -> Float[Array, "batch heads q_seq kv_seq"]:
    """Flax's attention dropout on jattn's weights (their batch axes flattened into one).

    The keep mask is drawn with the shape Flax draws it with, ``(1, ..., 1,
    q_seq, kv_seq)`` (rank ``len(batch_shape) + 3``) or ``(*batch_shape, heads,
    q_seq, kv_seq)``, then reshaped to jattn's layout: the same key drops the
    same weights. The kept ones are scaled by jattn's one dropout (a select;
    Flax multiplies by ``keep / keep_prob``, which may round the last bit differently).
    """
    heads, q_seq, kv_seq = weights.shape[1:]
    if broadcast:
        draw_shape, layout = (1,) * (len(batch_shape) + 1) + (q_seq, kv_seq), (1, 1, q_seq, kv_seq)
    else:
        draw_shape, layout = (*batch_shape, heads, q_seq, kv_seq), (math.prod(batch_shape), heads, q_seq, kv_seq)
    return dropout(weights, keep_mask(rng, rate, draw_shape).reshape(layout), rate=rate)
