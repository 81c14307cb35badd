"""jattn.nnx: MultiHeadAttention and AttentionBlock against independent oracles, dropout, errors, Flax interop.

Module calls run under ``nnx.jit`` (one compilation per call site rather than
one per eager op) and share a few small shapes, to keep the file fast.
"""

import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import nnx as jnnx

F32 = jnp.float32
# A cheap initializer (one RNG op to compile) with non-zero biases, so the bias wiring is tested too.
INIT = dict(kernel_init=nnx.initializers.normal(0.3), bias_init=nnx.initializers.normal(0.3))


def normal(seed, shape, dtype=F32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def make_mha(*args, rngs=None, **kwargs):
    return jnnx.MultiHeadAttention(*args, **INIT, **kwargs, rngs=nnx.Rngs(0) if rngs is None else rngs)


def project(x, proj):
    """An independent dense projection from the module's raw parameters."""
    y = jnp.tensordot(x, proj.kernel[...], axes=len(proj.in_shape))
    return y if proj.bias is None else y + proj.bias[...].reshape((1,) * (y.ndim - proj.bias.ndim) + proj.bias.shape)


def oracle(mha, xq, xkv=None, **kwargs):
    """Projections by hand, attention by jax.nn.dot_product_attention (GQA included)."""
    xkv = xq if xkv is None else xkv
    q, k, v = project(xq, mha.query), project(xkv, mha.key), project(xkv, mha.value)
    return project(jax.nn.dot_product_attention(q, k, v, **kwargs), mha.out)


def forward(module, *inputs, **kwargs):
    return nnx.jit(lambda m, *inputs: m(*inputs, **kwargs))(module, *inputs)


def expected(mha, *inputs, **kwargs):
    return nnx.jit(lambda m, *inputs: oracle(m, *inputs, **kwargs))(mha, *inputs)


def close(actual, desired, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), atol=tol, rtol=tol)


X = normal(1, (2, 7, 16))  # (batch, seq, in_features), shared by most tests


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention_matches_jax_nn_oracle(kv_heads, is_causal):
    mha = make_mha(4, 16, num_kv_heads=kv_heads)
    y = forward(mha, X, is_causal=is_causal)
    assert y.shape == (2, 7, 16) and y.dtype == F32
    close(y, expected(mha, X, is_causal=is_causal))
    assert mha.query.kernel.shape == (16, 4, 4)
    assert mha.key.kernel.shape == mha.value.kernel.shape == (16, kv_heads, 4)  # K/V: kv_heads only
    assert mha.out.kernel.shape == (4, 4, 16)


def test_cross_attention_with_all_sizes_different():
    mha = make_mha(2, 16, head_dim=3, value_head_dim=5, out_features=11, in_kv_features=6, use_bias=False)
    assert (mha.query.kernel.shape, mha.key.kernel.shape, mha.value.kernel.shape, mha.out.kernel.shape) == (
        (16, 2, 3),
        (6, 2, 3),
        (6, 2, 5),
        (2, 5, 11),
    )
    kv = normal(2, (2, 9, 6))
    y = forward(mha, X, kv)
    assert y.shape == (2, 7, 11)

    def by_hand(m, xq, xkv):  # jax.nn lacks v_dim != dim: the reference core on the same projections
        q, k, v = project(xq, m.query), project(xkv, m.key), project(xkv, m.value)
        return project(jattn.dot_product_attention(q, k, v, implementation="reference"), m.out)

    close(y, nnx.jit(by_hand)(mha, X, kv))
    close(forward(mha, X, kv, kv), y, tol=0)


def test_options_agree_between_fast_and_weights_paths():
    """Mask, causal, lengths and segment ids: the materialized path equals dot_product_attention."""
    mha = make_mha(4, 16, num_kv_heads=2)
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
    opts = dict(
        # random, but the first key of each segment stays visible
        mask=jax.random.bernoulli(jax.random.key(2), 0.7, (2, 1, 7, 7)).at[..., 0].set(True).at[..., 3].set(True),
        is_causal=True,
        query_seq_lengths=jnp.array([7, 5]),
        key_value_seq_lengths=jnp.array([6, 7]),
        query_segment_ids=ids,
        key_value_segment_ids=ids,
    )
    fast = forward(mha, X, **opts)
    slow, w = forward(mha, X, **opts, return_weights=True)
    close(slow, fast)
    assert w.shape == (2, 4, 7, 7)
    sums = np.asarray(w.sum(-1))
    np.testing.assert_array_equal(sums[1, :, 5:], 0)  # queries past query_seq_lengths see nothing
    close(sums[0], 1)  # every query of example 0 sees the first key of its segment
    assert not np.asarray(w[..., 3:, :3]).any()  # segment 1 never sees segment 0
    assert not np.asarray(jnp.triu(w, 1)).any()  # causal


def test_weights_are_the_softmax_of_scaled_scores():
    mha = make_mha(4, 16)
    _, w = forward(mha, X, is_causal=True, return_weights=True)

    def by_hand(m, x):
        q, k = project(x, m.query), project(x, m.key)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / 2.0  # 1/sqrt(head_dim=4)
        return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((7, 7), bool)), logits, -jnp.inf), axis=-1)

    close(w, nnx.jit(by_hand)(mha, X), tol=1e-6)


def test_compute_dtype_follows_inputs_and_dtype_argument():
    mha = make_mha(4, 16)
    assert forward(mha, X.astype(jnp.float64)).dtype == jnp.float64  # promotion of inputs and params
    assert forward(mha, X.astype(jnp.bfloat16)).dtype == F32
    low = make_mha(4, 16, dtype=jnp.bfloat16)
    assert forward(low, X).dtype == jnp.bfloat16
    assert low.query.kernel.dtype == F32


# ------------------------------------------------------------------ dropout


def test_dropout_applies_to_the_weights_with_the_given_key():
    mha = make_mha(4, 16, num_kv_heads=1, dropout_rate=0.5)
    key = jax.random.key(7)
    y, w = forward(mha, X, is_causal=True, rngs=key, return_weights=True)
    keep = jax.random.bernoulli(key, 0.5, w.shape)

    def by_hand(m, x, w):
        v = jnp.repeat(project(x, m.value), 4, axis=2)  # (batch, kv_seq, heads, v_dim)
        return project(jnp.einsum("bhts,bshd->bthd", jnp.where(keep, w / 0.5, 0), v), m.out)

    close(y, nnx.jit(by_hand)(mha, X, w))
    close(forward(mha, X, is_causal=True, deterministic=True), expected(mha, X, is_causal=True))


def test_dropout_is_reproducible_from_rngs_and_off_in_eval_mode():
    def make():
        return make_mha(4, 16, dropout_rate=0.3, rngs=nnx.Rngs(params=0, dropout=1))

    step = nnx.jit(lambda m, x: m(x))
    a, b = make(), make()
    first = step(a, X)
    np.testing.assert_array_equal(first, step(b, X))  # same seed, same masks
    assert not np.allclose(step(a, X), first)  # the stream advances
    reference = expected(a, X)
    assert not np.allclose(first, reference)
    close(step(nnx.view(a, deterministic=True), X), reference)
    a.eval()
    close(step(a, X), reference)
    a.train()
    assert not np.allclose(step(a, X), reference)


# ------------------------------------------------------------------ block


@pytest.mark.parametrize("pre_norm", [False, True])
def test_attention_block_is_residual_plus_layer_norm(pre_norm):
    block = jnnx.AttentionBlock(4, 16, pre_norm=pre_norm, **INIT, rngs=nnx.Rngs(0))
    block.norm.scale[...] = normal(2, (16,))
    block.norm.bias[...] = normal(3, (16,))

    def by_hand(block, x):
        def norm(h):
            mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
            return (h - mean) / jnp.sqrt(var + 1e-3) * block.norm.scale[...][None, None] + block.norm.bias[...][
                None, None
            ]

        if pre_norm:
            return x + oracle(block.attention, norm(x), is_causal=True)
        return norm(x + oracle(block.attention, x, is_causal=True))

    close(forward(block, X, is_causal=True), nnx.jit(by_hand)(block, X))


def test_block_on_embedded_token_ids_and_wrong_inputs():
    rngs = nnx.Rngs(0)
    embed = nnx.Embed(50, 16, rngs=rngs)
    block = jnnx.AttentionBlock(4, 16, **INIT, rngs=rngs)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 50)
    assert nnx.jit(lambda e, b, t: b(e(t)))(embed, block, tokens).shape == (2, 7, 16)
    with pytest.raises(TypeError, match=r"inputs must be float .*got dtype int.* shape \(2, 7\).*nnx.Embed"):
        block(tokens)
    with pytest.raises(ValueError, match=re.escape("inputs must have rank 3 (batch, seq, in_features=16); got rank 2")):
        block(tokens.astype(F32))
    with pytest.raises(ValueError, match=re.escape("got rank 4 with shape (2, 7, 16, 16)")):
        block(jnp.ones((2, 7, 16, 16), F32))  # the tutorial's mistake: an embedding of embeddings


# ------------------------------------------------------------------ errors


def test_error_in_features_mismatch():
    mha = make_mha(4, 16)
    with pytest.raises(
        ValueError, match=re.escape("inputs_q must have shape (batch, q_seq, in_features=16); got (2, 5, 7)")
    ):
        mha(jnp.ones((2, 5, 7), F32))
    with pytest.raises(ValueError, match=re.escape("inputs_k must have shape (batch, kv_seq, in_kv_features=16)")):
        mha(X, jnp.ones((2, 5, 8), F32))


def test_error_heads_not_divisible_by_kv_heads():
    with pytest.raises(
        ValueError, match="num_heads must be a multiple of num_kv_heads; got num_heads=6, num_kv_heads=4"
    ):
        make_mha(6, 24, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"in_features must be divisible by num_heads .*in_features=10, num_heads=4"):
        make_mha(4, 10)


@pytest.mark.parametrize("return_weights", [False, True])
def test_error_mask_of_wrong_shape(return_weights):
    mha = make_mha(4, 16)
    message = (
        "mask must have shape (batch, heads, q_seq, kv_seq) (missing leading axes count as 1) "
        "broadcastable to (2, 4, 7, 7); got (2, 7, 7)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        mha(X, mask=jnp.ones((2, 7, 7), bool), return_weights=return_weights)


def test_error_wrong_input_rank():
    mha = make_mha(4, 16)
    message = "inputs_q must have rank 3 (batch, q_seq, in_features); got rank {}"
    with pytest.raises(ValueError, match=re.escape(message.format(4))):
        mha(jnp.ones((2, 7, 5, 16), F32))
    with pytest.raises(ValueError, match=re.escape(message.format(2))):
        mha(jnp.ones((7, 16), F32))


def test_error_other_arguments():
    with pytest.raises(ValueError, match=r"dropout_rate must be a float in \[0, 1\); got 1.0"):
        make_mha(4, 16, dropout_rate=1.0)
    mha = make_mha(4, 16)
    with pytest.raises(ValueError, match="inputs_v was given without inputs_k"):
        mha(X, inputs_v=X)
    with pytest.raises(TypeError, match="inputs_q must have a floating-point dtype; got int"):
        mha(jnp.ones((2, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match="implementation must be one of"):
        make_mha(4, 16, implementation="fast")(X)


# ------------------------------------------------------------------ Flax interop


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_parity_with_flax_multi_head_attention(kv_heads):
    theirs = nnx.MultiHeadAttention(4, 16, qkv_features=32, num_kv_heads=kv_heads, decode=False, rngs=nnx.Rngs(3))
    ours = make_mha(4, 16, head_dim=8, num_kv_heads=kv_heads)
    nnx.update(ours, nnx.state(theirs, nnx.Param))  # same names and layout: query/key/value/out kernel, bias
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, (2, 1, 7, 7)).at[..., 0].set(True)
    for kwargs in (dict(), dict(mask=mask), dict(is_causal=True)):
        close(forward(ours, X, **kwargs), forward(theirs, X, **kwargs))


def test_from_flax_linen_through_the_nnx_bridge():
    from flax import linen as nn
    from flax.nnx import bridge

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16)(x)
            return bridge.to_linen(jnnx.MultiHeadAttention, 4, 16, head_dim=8, name="attention")(x, is_causal=True)

    x = X[..., :3]
    model = Model()
    variables = jax.jit(model.init)(jax.random.key(0), x)
    y = jax.jit(model.apply)(variables, x)
    params = nn.meta.unbox(variables["params"])
    assert params["attention"]["query"]["kernel"].shape == (16, 4, 8)
    mha = make_mha(4, 16, head_dim=8, rngs=nnx.Rngs(1))
    nnx.update(mha, nnx.State(params["attention"]))
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None, None]
    close(y, expected(mha, h, is_causal=True))


def test_the_declared_module_fields_cover_every_checked_size():
    """``MultiHeadAttention.__init__`` sets every ``HeadSizes`` field by name (a loop the type checker cannot
    follow); ``ModuleFields`` declares them for it. A size added to one list and not the other fails here."""
    from jattn.nnx._fields import ModuleFields
    from jattn.nnx._projection import HeadSizes

    declared = typing.get_type_hints(ModuleFields)
    assert {name: declared.get(name) for name in HeadSizes._fields} == dict.fromkeys(HeadSizes._fields, int)
    mha = make_mha(4, 16)
    assert all(isinstance(getattr(mha, name), int) for name in HeadSizes._fields)
