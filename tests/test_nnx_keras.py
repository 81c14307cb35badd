"""Keras 3 interop: weights of keras.layers.MultiHeadAttention (+ LayerNormalization) give the same outputs.

Keras runs on its JAX backend, imported lazily by a fixture. Keras's own ops
rely on NumPy-style implicit rank and dtype promotion, so its calls run under
standard promotion; ours run under the suite's strict settings.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import nnx as jnnx

F32 = jnp.float32
# Keras 3.15's Variable.__array__ predates NumPy 2's copy keyword (get_weights, set_weights).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "jax"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras was already imported with the {keras.backend.backend()} backend")
    keras.utils.set_random_seed(0)
    return keras


def keras_call(fn, *args, **kwargs):
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return np.asarray(fn(*args, **kwargs))


def ours(module, x, **kwargs):
    from flax import nnx

    return np.asarray(nnx.jit(lambda m, x: m(x, **kwargs))(module, x))


def close(actual, desired, tol=1e-5):
    np.testing.assert_allclose(actual, desired, atol=tol, rtol=tol)


def padding_mask(batch, seq):
    """Keras attention_mask (batch, q_seq, kv_seq): the last keys of example 1 are padding."""
    mask = np.ones((batch, seq, seq), bool)
    mask[1, :, seq - 3 :] = False
    return mask


MASKS = ["none", "causal", "padding", "causal+padding"]


def keras_and_jattn_masks(kind, batch, seq):
    mask = padding_mask(batch, seq) if "padding" in kind else None
    causal = "causal" in kind
    return dict(attention_mask=mask, use_causal_mask=causal), dict(
        mask=None if mask is None else jnp.asarray(mask)[:, None], is_causal=causal
    )


@pytest.mark.parametrize("kind", MASKS)
def test_notebook_configuration_matches_keras(keras, kind):
    """8 heads, key_dim 512, inputs (batch, 10, 512): the tutorial's layer."""
    layer = keras.layers.MultiHeadAttention(num_heads=8, key_dim=512)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 10, 512), F32))
    keras_kwargs, jattn_kwargs = keras_and_jattn_masks(kind, 2, 10)
    expected = keras_call(layer, x, x, **keras_kwargs)
    module = jnnx.MultiHeadAttention.from_keras(layer)
    assert (module.num_heads, module.head_dim, module.in_features) == (8, 512, 512)
    close(ours(module, x, **jattn_kwargs), expected)


@pytest.mark.parametrize("kind", MASKS)
def test_small_configuration_from_get_weights_matches_keras_with_scores(keras, kind):
    """value_dim != key_dim, output_shape, cross-attention; the weights match Keras's attention scores."""
    layer = keras.layers.MultiHeadAttention(num_heads=3, key_dim=5, value_dim=7, output_shape=11)
    xq = np.asarray(jax.random.normal(jax.random.key(1), (2, 6, 4), F32))
    xkv = np.asarray(jax.random.normal(jax.random.key(2), (2, 6, 9), F32))
    keras_kwargs, jattn_kwargs = keras_and_jattn_masks(kind, 2, 6)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        expected, scores = layer(xq, xkv, **keras_kwargs, return_attention_scores=True)
    module = jnnx.MultiHeadAttention.from_keras(layer.get_weights())
    assert (module.in_kv_features, module.value_head_dim, module.out_features) == (9, 7, 11)
    from flax import nnx

    y, w = nnx.jit(lambda m, q, kv: m(q, kv, **jattn_kwargs, return_weights=True))(module, xq, xkv)
    close(np.asarray(y), np.asarray(expected))
    close(np.asarray(w), np.asarray(scores))


def test_without_biases_and_into_an_existing_module(keras):
    from flax import nnx

    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, use_bias=False, dropout=0.25)
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 8), F32))
    expected = keras_call(layer, x, x, use_causal_mask=True)
    module = jnnx.MultiHeadAttention.from_keras(layer)
    assert module.dropout_rate == 0.25 and module.query.bias is None
    close(ours(module, x, is_causal=True, deterministic=True), expected)
    existing = jnnx.MultiHeadAttention(2, 8, head_dim=4, use_bias=False, rngs=nnx.Rngs(5))
    existing.load_keras_weights(layer)
    close(ours(existing, x, is_causal=True), expected)


@pytest.mark.parametrize("kind", ["none", "causal+padding"])
def test_notebook_block_matches_keras_mha_add_layer_norm(keras, kind):
    """The tutorial's block: MultiHeadAttention(8, 512), Add, LayerNormalization (Keras defaults)."""
    mha = keras.layers.MultiHeadAttention(num_heads=8, key_dim=512)
    norm = keras.layers.LayerNormalization()
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 10, 512), F32))
    keras_kwargs, jattn_kwargs = keras_and_jattn_masks(kind, 2, 10)

    def keras_block(x):
        return norm(keras.layers.Add()([x, mha(x, x, **keras_kwargs)]))

    keras_call(keras_block, x)  # builds the LayerNorm
    rng = np.random.default_rng(0)
    norm.set_weights([rng.normal(size=512).astype(np.float32), rng.normal(size=512).astype(np.float32)])
    expected = keras_call(keras_block, x)
    block = jnnx.AttentionBlock.from_keras(mha, norm)
    assert block.norm.epsilon == norm.epsilon == 1e-3
    close(ours(block, x, **jattn_kwargs), expected)


def test_keras_loading_errors(keras):
    from flax import nnx

    with pytest.raises(ValueError, match="has no weights yet; call it once"):
        jnnx.MultiHeadAttention.from_keras(keras.layers.MultiHeadAttention(num_heads=2, key_dim=4))
    with pytest.raises(ValueError, match=r"must be 8 arrays .* or 4 .*; got 3"):
        jnnx.MultiHeadAttention.from_keras([np.zeros((4, 2, 2), np.float32)] * 3)
    module = jnnx.MultiHeadAttention(2, 8, head_dim=4, use_bias=False, rngs=nnx.Rngs(0))
    weights = [np.zeros(s, np.float32) for s in [(8, 2, 4), (8, 2, 4), (8, 2, 4), (2, 4, 9)]]
    with pytest.raises(ValueError, match=r"Keras weight out/kernel must have shape \(2, 4, 8\) .*; got \(2, 4, 9\)"):
        module.load_keras_weights(weights)
    with pytest.raises(ValueError, match="the Keras weights have biases but this module has use_bias=False"):
        module.load_keras_weights([np.zeros(s, np.float32) for s in [(8, 2, 4), (2, 4)] * 3 + [(2, 4, 8), (8,)]])
    block = jnnx.AttentionBlock(2, 8, use_bias=False, epsilon=1e-6, rngs=nnx.Rngs(0))
    norm = keras.layers.LayerNormalization()
    keras_call(norm, np.ones((1, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"the Keras LayerNormalization has epsilon=0\.001 but this block 1e-06"):
        block.load_keras_weights([*weights[:3], np.zeros((2, 4, 8), np.float32)], norm)
