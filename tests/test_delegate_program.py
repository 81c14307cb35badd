"""``implementation="xla"`` costs nothing: it compiles to the program ``jax.nn.dot_product_attention`` compiles to."""

import jax
import jax.numpy as jnp
import pytest

import jattn
from bench.hlo import instructions

Q = jax.ShapeDtypeStruct((2, 11, 4, 8), jnp.float32)
KV = jax.ShapeDtypeStruct((2, 13, 2, 8), jnp.float32)  # grouped-query: 2 kv heads
OPTIONS = {
    "plain": ({}, ()),
    "causal": ({"is_causal": True}, ()),
    "window": ({"local_window_size": (3, 1)}, ()),
    "lengths": ({}, (("query_seq_lengths", (2,), jnp.int32), ("key_value_seq_lengths", (2,), jnp.int32))),
    "mask": ({}, (("mask", (2, 1, 11, 13), jnp.bool_),)),
    "bias": ({}, (("bias", (1, 4, 11, 13), jnp.float32),)),
    "scale": ({"scale": 0.3}, ()),
}


def _program(fn, *args) -> str:
    """Optimized HLO without names, source locations or stack frames: the instructions only."""
    return instructions(jax.jit(fn).lower(*args).compile().as_text())


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_xla_delegate_compiles_to_jax_nns_program(name, grad):
    static, arrays = OPTIONS[name]
    specs = [jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in arrays]

    def call(attention, **extra):
        def f(q, k, v, *values):
            kwargs = {key: value for (key, _, _), value in zip(arrays, values, strict=True)}
            out = attention(q, k, v, **static, **kwargs, **extra)
            return jnp.sum(out) if grad else out

        return jax.grad(f, argnums=(0, 1, 2)) if grad else f

    ours = _program(call(jattn.dot_product_attention, implementation="xla"), Q, KV, KV, *specs)
    with jax.numpy_dtype_promotion("standard"):  # jax.nn mixes int32 lengths with default-int positions
        theirs = _program(call(jax.nn.dot_product_attention, implementation="xla"), Q, KV, KV, *specs)
    assert ours == theirs
