"""Input checks, the computation dtype and the dense head projections of the modules."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from jattn import _checks


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


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
