"""Sizes and input checks, the computation dtype and the dense head projections of the modules."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from jattn import _checks


class HeadSizes(NamedTuple):
    """The checked sizes of a ``MultiHeadAttention``, defaults filled in."""

    num_heads: int
    in_features: int
    head_dim: int
    value_head_dim: int
    out_features: int
    num_kv_heads: int
    in_kv_features: int


def head_sizes(
    *,
    num_heads: int,
    in_features: int,
    head_dim: int | None,
    value_head_dim: int | None,
    out_features: int | None,
    num_kv_heads: int | None,
    in_kv_features: int | None,
) -> HeadSizes:
    """Fills in the defaults (see ``MultiHeadAttention``) and checks every size is a positive int.

    Raises:
        ValueError: a size that is not a positive int, ``in_features % num_heads`` without
            ``head_dim``, or ``num_heads % num_kv_heads``.
    """
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_positive_int("in_features", in_features)
    if head_dim is None and in_features % num_heads:
        raise ValueError(
            f"in_features must be divisible by num_heads when head_dim is not given; "
            f"got in_features={in_features}, num_heads={num_heads}"
        )
    head_dim = in_features // num_heads if head_dim is None else head_dim
    sizes = HeadSizes(
        num_heads=num_heads,
        in_features=in_features,
        head_dim=head_dim,
        value_head_dim=head_dim if value_head_dim is None else value_head_dim,
        out_features=in_features if out_features is None else out_features,
        num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
        in_kv_features=in_features if in_kv_features is None else in_kv_features,
    )
    for name, size in sizes._asdict().items():
        _checks.check_positive_int(name, size)
    if num_heads % sizes.num_kv_heads:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads; got num_heads={num_heads}, "
            f"num_kv_heads={sizes.num_kv_heads}"
        )
    return sizes


def promoted_dtype(dtype, param_dtype, *arrays: Array) -> jnp.dtype:
    """``dtype`` if given, else the JAX promotion of the inputs' and the parameters' dtypes (as in Flax)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    with jax.numpy_dtype_promotion("standard"):  # the explicit lattice, also under strict promotion
        return jnp.dtype(jnp.result_type(param_dtype, *(a.dtype for a in arrays)))


def check_inputs(name: str, x: Array, features: int, seq: str, features_name: str) -> None:
    """Floating dtype and shape ``(batch, seq, features)``, with expected-vs-actual messages."""
    _checks.check_floating(name, x)
    _checks.check_rank(name, x, (3,), f"(batch, {seq}, {features_name})")
    if x.shape[-1] != features:
        raise ValueError(f"{name} must have shape (batch, {seq}, {features_name}={features}); got {x.shape}")


def checked_inputs(
    inputs_q: Any, inputs_k: Any, inputs_v: Any, *, in_features: int, in_kv_features: int
) -> tuple[Array, Array, Array, bool]:
    """``(query, key, value, self_attention)`` inputs as arrays: ``inputs_k`` defaults to ``inputs_q``,
    ``inputs_v`` to ``inputs_k``; dtypes, ranks, features, batch sizes and key/value lengths checked."""
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_v was given without inputs_k; pass inputs_k too (or only inputs_k)")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    self_attention = inputs_k is inputs_q
    inputs_q, inputs_k, inputs_v = jnp.asarray(inputs_q), jnp.asarray(inputs_k), jnp.asarray(inputs_v)
    check_inputs("inputs_q", inputs_q, in_features, "q_seq", "in_features")
    check_inputs("inputs_k", inputs_k, in_kv_features, "kv_seq", "in_kv_features")
    check_inputs("inputs_v", inputs_v, in_kv_features, "kv_seq", "in_kv_features")
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
    return inputs_q, inputs_k, inputs_v, self_attention


# The pure parts of a call (here and in _attention.py) are jit-compiled functions: an eager call then costs
# one compilation per shape instead of one per primitive, and under an outer
# jit they are inlined.


@functools.partial(jax.jit, static_argnames=("axes", "dtype"))
def _project(x: Array, kernel: Array, bias: Array | None, *, axes: int, dtype: Any) -> Array:
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=axes)
    if bias is not None:
        bias = bias.astype(dtype)
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


class Projection(nnx.Module):
    """A dense map from the trailing ``in_shape`` axes to ``out_shape`` (the Keras/Flax kernel layout).

    ``kernel`` has shape ``in_shape + out_shape`` and ``bias`` ``out_shape``;
    the initializers see the flattened ``(prod(in_shape), prod(out_shape))``
    matrix, so fan-in and fan-out are those of the equivalent dense layer.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        use_bias: bool,
        param_dtype: Any,
        kernel_init: nnx.Initializer,
        bias_init: nnx.Initializer,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.bias: nnx.Param | None
        flat = (math.prod(self.in_shape), math.prod(self.out_shape))
        kernel = kernel_init(rngs.params(), flat, param_dtype)
        self.kernel = nnx.Param(jnp.reshape(kernel, self.in_shape + self.out_shape))
        if use_bias:
            bias = bias_init(rngs.params(), (flat[1],), param_dtype)
            self.bias = nnx.Param(jnp.reshape(bias, self.out_shape))
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: Array, dtype: Any) -> Array:
        bias = None if self.bias is None else self.bias[...]
        return _project(x, self.kernel[...], bias, axes=len(self.in_shape), dtype=jnp.dtype(dtype))
