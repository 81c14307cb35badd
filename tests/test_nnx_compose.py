"""jattn.nnx composition: ``attention_fn`` (Flax's hook), block sizes, the block holding a MultiHeadAttention.

Module calls run under ``nnx.jit``; Flax's own attention code runs under the standard promotion rules it
assumes (jattn's suite is strict).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import _api
from jattn import nnx as jnnx
from jattn.nnx import _attend
from jattn.sharding import SequenceParallel

F32 = jnp.float32
INIT = dict(kernel_init=nnx.initializers.normal(0.3), bias_init=nnx.initializers.normal(0.3))
X = jax.random.normal(jax.random.key(1), (2, 7, 16), F32)  # (batch, seq, in_features)
XKV = jax.random.normal(jax.random.key(2), (2, 5, 12), F32)  # (batch, kv_seq, in_kv_features)
MASK = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 7, 7)).at[..., 0].set(True)
BIAS = jax.random.normal(jax.random.key(4), (1, 4, 7, 7), F32)

# What flax.nnx.MultiHeadAttention passes to its attention_fn besides query, key, value.
FLAX_KEYWORDS = {
    "mask",
    "dropout_rng",
    "dropout_rate",
    "broadcast_dropout",
    "deterministic",
    "dtype",
    "precision",
    "module",
    "is_causal",
}


def make_mha(*args, **kwargs):
    return jnnx.MultiHeadAttention(*args, **INIT, **kwargs, rngs=nnx.Rngs(0))


def forward(module, *inputs, **kwargs):
    return nnx.jit(lambda m, *inputs: m(*inputs, **kwargs))(module, *inputs)


def close(actual, desired, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), atol=tol, rtol=tol)


def flax_rules():
    return jax.numpy_dtype_promotion("standard")


class Recorder:
    """An attention_fn that records its call and returns zeros ``(batch, q_seq, heads, v_dim)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, **kwargs):
        self.calls.append((query.shape, key.shape, value.shape, kwargs))
        return jnp.zeros((*query.shape[:-1], value.shape[-1]), query.dtype)


# ------------------------------------------------------------------ attention_fn


@pytest.mark.parametrize(
    ("inputs", "kwargs"),
    [
        ((X,), dict()),
        ((X,), dict(is_causal=True)),
        ((X,), dict(mask=MASK, bias=BIAS)),
        ((X, XKV), dict()),
    ],
    ids=["plain", "causal", "mask_bias", "cross"],
)
def test_flax_attention_fn_gives_the_default_output(inputs, kwargs):
    sizes = dict(num_kv_heads=2, in_kv_features=12 if len(inputs) > 1 else None)
    default = make_mha(4, 16, **sizes)
    hooked = make_mha(4, 16, **sizes, attention_fn=jnnx.flax_attention_fn)
    close(forward(hooked, *inputs, **kwargs), forward(default, *inputs, **kwargs))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flax_dot_product_attention_matches_flaxs_own_module(kv_heads):
    theirs = nnx.MultiHeadAttention(4, 16, qkv_features=32, num_kv_heads=kv_heads, decode=False, rngs=nnx.Rngs(3))
    ours = make_mha(4, 16, head_dim=8, num_kv_heads=kv_heads, attention_fn=nnx.dot_product_attention)
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    with flax_rules():
        for kwargs in (dict(), dict(mask=MASK), dict(is_causal=True)):
            close(forward(ours, X, **kwargs), forward(theirs, X, **kwargs))


def test_attention_fn_gets_flaxs_call():
    ours, theirs = Recorder(), Recorder()
    mha = make_mha(4, 16, num_kv_heads=2, value_head_dim=3, dropout_rate=0.25, attention_fn=ours)
    flax_mha = nnx.MultiHeadAttention(4, 16, decode=False, attention_fn=theirs, rngs=nnx.Rngs(0))
    flax_mha(X, mask=MASK, deterministic=True)
    key = jax.random.key(5)
    y = mha(X, mask=MASK, is_causal=True, rngs=key)  # training: a dropout key
    mha(X, bias=BIAS, deterministic=True)
    (q, k, v, training), (_, _, _, evaluating) = ours.calls
    assert set(theirs.calls[0][3]) == FLAX_KEYWORDS
    assert set(training) == FLAX_KEYWORDS and set(evaluating) == FLAX_KEYWORDS | {"bias"}
    assert (q, k, v) == ((2, 7, 4, 4), (2, 7, 2, 4), (2, 7, 2, 3))  # (batch, seq, heads, dim), GQA kept
    assert training["mask"] is MASK and training["is_causal"] is True
    assert training["dropout_rng"] is key and training["deterministic"] is False
    assert training["dropout_rate"] == 0.25 and training["broadcast_dropout"] is False
    assert training["dtype"] == F32 and training["precision"] is None and training["module"] is None
    assert evaluating["dropout_rng"] is None and evaluating["deterministic"] is True
    assert evaluating["bias"] is BIAS and evaluating["mask"] is None
    close(y, jnp.broadcast_to(mha.out.bias[...], y.shape))  # zero context: the output projection's bias


def test_dropout_is_one_implementation_on_both_paths():
    """The module's own dropout and flax_attention_fn's (per weight) drop the same weights the same way."""
    default = make_mha(4, 16, dropout_rate=0.3)
    hooked = make_mha(4, 16, dropout_rate=0.3, attention_fn=jnnx.flax_attention_fn)
    key = jax.random.key(6)
    dropped = forward(default, X, is_causal=True, rngs=key)
    close(forward(hooked, X, is_causal=True, rngs=key), dropped)
    assert not np.allclose(dropped, forward(default, X, is_causal=True, deterministic=True))


FN = jnnx.flax_attention_fn
MODULE_ERRORS = [
    (
        dict(implementation="blockwise"),
        "implementation cannot be combined with attention_fn: .*got implementation='blockwise'",
    ),
    (dict(block_q=4), "block_q cannot be combined with attention_fn: .*got block_q=4"),
    (dict(block_kv=4), "block_kv cannot be combined with attention_fn: .*got block_kv=4"),
    (dict(local_window_size=2), "local_window_size cannot be combined with attention_fn: .*got local_window_size=2"),
    (dict(logits_soft_cap=5.0), "logits_soft_cap cannot be combined with attention_fn: .*got logits_soft_cap=5.0"),
    (dict(use_sinks=True), "use_sinks cannot be combined with attention_fn: .*got use_sinks=True"),
    (
        dict(sequence_parallel=SequenceParallel(axis="seq")),
        r"sequence_parallel cannot be combined with attention_fn: .*got sequence_parallel=SequenceParallel\(",
    ),
    (dict(score_mod=jattn.score_mods.alibi), "score_mod cannot be combined with attention_fn: .*got score_mod=<"),
    (dict(mask_mod=jattn.masks.causal), "mask_mod cannot be combined with attention_fn: .*got mask_mod=<"),
]


@pytest.mark.parametrize(("options", "match"), MODULE_ERRORS, ids=[next(iter(o)) for o, _ in MODULE_ERRORS])
def test_attention_fn_refuses_jattn_only_module_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_mha(4, 16, attention_fn=FN, **options)


def test_attention_fn_errors():
    with pytest.raises(TypeError, match="attention_fn must be a callable or None; got str"):
        make_mha(4, 16, attention_fn="flax")
    mha = make_mha(4, 16, attention_fn=FN)
    with pytest.raises(ValueError, match="return_weights=True cannot be combined with attention_fn"):
        mha(X, return_weights=True)
    message = "{} cannot be given to a MultiHeadAttention with attention_fn: Flax's calling convention passes only "
    with pytest.raises(ValueError, match=re.escape(message.format("query_seq_lengths"))):
        mha(X, query_seq_lengths=jnp.array([3, 7]))
    with pytest.raises(ValueError, match=re.escape(message.format("mask_mod"))):
        mha(X, mask_mod=lambda b, h, q, k: q >= k)
    with pytest.raises(ValueError, match="init_cache: KV-cache decoding runs jattn's own attention, not attention_fn"):
        mha.init_cache(2, 16)


# ------------------------------------------------------------------ block sizes


def test_block_sizes_reach_the_kernel(monkeypatch):
    seen = []

    def attend(*args, **kwargs):
        seen.append((kwargs["block_q"], kwargs["block_kv"]))
        return original(*args, **kwargs)

    original = _api.attend
    monkeypatch.setattr(_api, "attend", attend)
    _attend._fast_path.clear_cache()  # an earlier test may have traced these shapes: trace again
    sized = make_mha(4, 16, implementation="blockwise", block_q=2, block_kv=3)  # blocks that do not divide 7
    y = forward(sized, X, is_causal=True)
    assert seen == [(2, 3)]
    forward(make_mha(4, 16, implementation="blockwise"), X[:1], is_causal=True)
    assert seen == [(2, 3), (None, None)]  # None: the backend's default, jattn.DEFAULT_BLOCK_SIZES
    close(y, forward(make_mha(4, 16), X, is_causal=True))


def test_block_size_errors():
    with pytest.raises(ValueError, match=re.escape("block_q must be a positive int or None; got 0")):
        make_mha(4, 16, block_q=0)
    with pytest.raises(ValueError, match=re.escape("block_kv must be a positive int or None; got 2.0")):
        make_mha(4, 16, block_kv=2.0)


# ------------------------------------------------------------------ the block composes a MultiHeadAttention


def test_block_forwards_its_attention_options():
    block = jnnx.AttentionBlock(4, 16, num_kv_heads=2, block_q=2, block_kv=3, deterministic=True, rngs=nnx.Rngs(0))
    assert isinstance(block.attention, jnnx.MultiHeadAttention)
    attention = block.attention
    assert (attention.num_kv_heads, attention.block_q, attention.block_kv) == (2, 2, 3)
    assert attention.out_features == attention.in_kv_features == 16 and attention.deterministic
    hooked = jnnx.AttentionBlock(4, 16, num_kv_heads=2, attention_fn=FN, rngs=nnx.Rngs(0))
    assert hooked.attention.attention_fn is FN
    close(forward(hooked, X, is_causal=True), forward(block, X, is_causal=True))


def test_block_errors():
    with pytest.raises(TypeError, match="AttentionBlock maps in_features to in_features: out_features cannot be"):
        jnnx.AttentionBlock(4, 16, out_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="in_kv_features cannot be given; got in_kv_features=8"):
        jnnx.AttentionBlock(4, 16, in_kv_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_q cannot be combined with attention_fn"):
        jnnx.AttentionBlock(4, 16, attention_fn=FN, block_q=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache: KV-cache decoding runs jattn's own attention"):
        jnnx.AttentionBlock(4, 16, attention_fn=FN, rngs=nnx.Rngs(0)).init_cache(1, 8)


def test_a_refused_call_draws_no_dropout_key():
    mha = make_mha(4, 16, dropout_rate=0.5, attention_fn=Recorder())
    count = int(mha.rngs.count[...])
    with pytest.raises(ValueError, match="query_seq_lengths cannot be given"):
        mha(X, query_seq_lengths=jnp.array([3, 7]))
    assert int(mha.rngs.count[...]) == count
    mha(X)
    assert int(mha.rngs.count[...]) == count + 1
