"""The one-query form auto runs for a ``jattn.nnx`` decode step (``_one_query``): the reference's results and
derivatives for every option it takes, the rule that picks it, and the cache write it relies on."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import _api, _dispatch, _one_query
from jattn import nnx as jnnx
from jattn._options import CallOptions, Execution
from jattn._prepare import prepare

B, S, D = 3, 13, 5  # prime sizes; batch 3 so one example each sees no key, some keys, every key
LENGTHS = jnp.array([0, 6, S], jnp.int32)
OFFSETS = jnp.array([4, 11, 2], jnp.int32)


def normal(seed, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def attend(q, k, v, call, implementation=None):
    return _api.attend(q, k, v, call, implementation=implementation, return_residual=True, kv_cache=True)


CALLS = {
    "plain": CallOptions(),
    "lengths": CallOptions(key_value_seq_lengths=LENGTHS),
    "causal+offset": CallOptions(is_causal=True, query_offset=OFFSETS),
    "causal+offset+lengths": CallOptions(is_causal=True, query_offset=OFFSETS, key_value_seq_lengths=LENGTHS),
    "window+offset": CallOptions(local_window_size=(3, 1), query_offset=OFFSETS, key_value_seq_lengths=LENGTHS),
    "causal (no offset)": CallOptions(is_causal=True, scale=0.3),
}
HEADS = {"mha": (3, 3), "gqa": (6, 2)}
CASES = [(name, "gqa" if i % 2 else "mha") for i, name in enumerate(CALLS)]  # each head layout, half the options


@pytest.mark.parametrize(("name", "heads"), CASES)
def test_the_one_query_form_is_the_reference_with_its_derivatives(name, heads):
    (h, kv), call = HEADS[heads], CALLS[name]
    q, k, v = normal(1, (B, 1, h, D)), normal(2, (B, S, kv, D)), normal(3, (B, S, kv, D + 2))
    route = _dispatch.route(prepare(q, k, v, call), Execution(kv_cache=True), backend="cpu")
    assert route == _dispatch.Route("reference", one_query=True)

    def out_and_lse(implementation):
        return jax.jit(lambda q, k, v: attend(q, k, v, call, implementation))

    fast, ref = out_and_lse(None), out_and_lse("reference")
    for a, b in zip(fast(q, k, v), ref(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    def loss(implementation):
        w = normal(4, (B, 1, h, D + 2))
        return jax.jit(jax.grad(lambda *qkv: jnp.sum(w * attend(*qkv, call, implementation)[0]), argnums=(0, 1, 2)))

    for a, b in zip(loss(None)(q, k, v), loss("reference")(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    tangents = (normal(5, q.shape), normal(6, k.shape), normal(7, v.shape))
    jvps = [jax.jvp(lambda *qkv, i=i: attend(*qkv, call, i)[0], (q, k, v), tangents)[1] for i in (None, "reference")]
    np.testing.assert_allclose(jvps[0], jvps[1], rtol=1e-10, atol=1e-12)


def test_a_row_that_sees_no_key_gives_zeros_and_zero_gradients():
    q, k, v = normal(1, (B, 1, 2, D)), normal(2, (B, S, 2, D)), normal(3, (B, S, 2, D))
    call = CallOptions(key_value_seq_lengths=LENGTHS)
    out, lse = attend(q, k, v, call)
    assert not np.asarray(out[0]).any() and np.isfinite(np.asarray(lse)).all()
    dq = jax.grad(lambda q: attend(q, k, v, call)[0].sum())(q)
    assert not np.asarray(dq[0]).any() and np.asarray(dq[1]).any()


SIGNATURE = _dispatch.CallSignature(
    "cpu", jnp.dtype(jnp.float32), 1, 1024, 64, 64, frozenset({"scale"}), kv_bytes=2**21, kv_heads=8, kv_cache=True
)


def test_auto_picks_the_one_query_form_only_for_a_small_nnx_cache_it_can_compute():
    assert _dispatch.choose(SIGNATURE) == "reference"
    others = {
        "a cache not jattn.nnx's": SIGNATURE._replace(kv_cache=False),
        "two queries": SIGNATURE._replace(q_seq=2),
        "16 kv heads": SIGNATURE._replace(kv_heads=16),
        "bfloat16": SIGNATURE._replace(dtype=jnp.dtype(jnp.bfloat16)),
        "a bias": SIGNATURE._replace(features=frozenset({"scale", "bias"})),
        "a GPU": SIGNATURE._replace(backend="gpu"),
    }
    assert {why: _dispatch.choose(s) for why, s in others.items()} == dict.fromkeys(others, "xla")
    assert _dispatch.choose(SIGNATURE._replace(kv_bytes=2**24)) == "blockwise"  # a big cache skips its empty blocks
    assert not _one_query.applies(1, 8, jnp.float32, {"scale", "sinks"})


def test_a_batch_1_decode_step_copies_no_cache():
    """On CPU jattn.nnx writes its cache by a scatter with one dropped update (``KVCache.write``): with a single
    update XLA makes the write a dynamic-update-slice, fuses it into the one-query form's reads and copies the
    cache for each of them. (Other backends write the one update; on an H200 this step had no copy either.)"""
    mha = jnnx.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    mha.init_cache(1, 64)
    graphdef, params, cache, rest = nnx.split(mha, nnx.Param, nnx.Cache, ...)

    def step(params, cache, token):
        m = nnx.merge(graphdef, params, cache, rest)
        return m(token, is_causal=True), nnx.state(m, nnx.Cache)

    token = normal(1, (1, 1, 16), jnp.float32)
    hlo = jax.jit(step, donate_argnums=1).lower(params, cache, token).compile().as_text()
    cache_shape = "f32[1,64,4,4]"
    assert f"{cache_shape}" in hlo
    assert not re.findall(rf"= {re.escape(cache_shape)}\S* copy\(", hlo)
