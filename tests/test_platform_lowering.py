"""Platform-dependent code is chosen when a program is lowered for its platform, not by the default backend
while tracing: a program exported on this CPU for another platform takes that platform's branch."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import jattn

Q = jax.ShapeDtypeStruct((1, 7, 2, 8), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((1, 11, 2, 8), jnp.bfloat16)


def _dot_operand_types(platform: str) -> set[str]:
    """The operand element types of every dot in the blockwise kernel exported for ``platform``."""
    f = jax.jit(lambda q, k: jattn.dot_product_attention(q, k, k, implementation="blockwise"))
    text = export.export(f, platforms=[platform])(Q, KV).mlir_module()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)
    assert dots, "no dot in the exported program"
    return {t for pair in dots for t in pair}


def test_cpu_widens_16_bit_operands_before_the_dot():
    assert _dot_operand_types("cpu") == {"f32"}  # XLA:CPU lacks some bf16 x bf16 -> f32 dots


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_platforms_keep_16_bit_operands(platform):
    assert _dot_operand_types(platform) == {"bf16"}
