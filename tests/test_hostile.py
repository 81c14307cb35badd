"""Hostile inputs: huge logits, extreme norms, masked-out batches, one visible key, garbage padding, NaN.

Finite inputs must give finite outputs and gradients in every dtype; NaN
inputs must show up in the outputs that depend on them rather than be hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import cases, oracle
from conformance.cases import DELEGATING, assert_close, promotion_for, skip_unsupported_upstream

import jattn

IMPLEMENTATIONS = cases.implementation_params()
FULL_IMPLEMENTATIONS = cases.full_implementation_params()
LOW_PRECISION = [jnp.float32, jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)]  # f16: slow tier
DTYPE_IDS = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16", jnp.float64: "float64"}

B, T, S, N, KH, D = 2, 5, 7, 4, 2, 8  # (batch, q_seq, kv_seq, heads, kv_heads, dim); GQA


@functools.partial(jax.jit, static_argnames=("implementation", "scale", "is_causal"))
def forward_and_grads(query, key, value, bias, mask, kv_lengths, cotangent, *, implementation, scale, is_causal):
    """Output and the gradients of <output, cotangent> with respect to query, key, value and bias."""

    def f(q, k, v, b):
        return jattn.dot_product_attention(
            q, k, v, b, mask, scale=scale, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
            implementation=implementation,
        )  # fmt: skip

    out, vjp = jax.vjp(f, query, key, value, bias)
    return out, vjp(cotangent)


def run(implementation, dtype, query, key, value, bias=None, mask=None, kv_lengths=None, scale=None, causal=False):
    skip_unsupported_upstream(implementation, dtype, query, key, bias_grad=True)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    cot = jnp.asarray(np.random.default_rng(7).standard_normal((*np.shape(query)[:-1], np.shape(value)[-1])), dtype)
    bias = jnp.zeros((1, 1, 1, 1), dtype) if bias is None else bias
    with promotion_for(implementation, dtype):
        out, grads = forward_and_grads(
            cast(query), cast(key), cast(value), cast(bias), None if mask is None else jnp.asarray(mask),
            None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32), cot,
            implementation=implementation, scale=scale, is_causal=causal,
        )  # fmt: skip
    return out, grads, cot


def assert_finite(out, grads):
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all(), "non-finite output"
    for name, g in zip(("query", "key", "value", "bias"), grads, strict=True):
        assert np.isfinite(np.asarray(g.astype(jnp.float32))).all(), f"non-finite gradient of {name}"


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def in_visible_hull(out, value, rows_visible=None, slack=1e-2):
    """Each output lies between min and max of the (here: all) values of its kv head, per feature."""
    v = np.asarray(jnp.asarray(value).astype(jnp.float64))
    lo = np.repeat(v.min(axis=1), N // KH, axis=1)[:, None]  # (B, 1, N, D)
    hi = np.repeat(v.max(axis=1), N // KH, axis=1)[:, None]
    o = np.asarray(out.astype(jnp.float64))
    span = slack * (hi - lo + 1e-30)
    assert ((o >= lo - span) & (o <= hi + span)).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_logits_up_to_1e4(implementation, dtype):
    q, k, v = 35 * normal(B, T, N, D), 35 * normal(B, S, KH, D, seed=1), normal(B, S, KH, D, seed=2)
    bias = 1e4 * np.sign(normal(B, N, T, S, seed=3))  # every logit is about ±1e4 (plus up to ~1e4 from q·k)
    out, grads, _ = run(implementation, dtype, q, k, v, bias=bias, scale=1.0)
    assert_finite(out, grads)
    in_visible_hull(out, jnp.asarray(v, dtype))


MAGNITUDES = {  # (query/key scale, value scale): finite logits and gradients in the dtype's range
    ("huge", jnp.float32): (1e12, 1e30),
    ("huge", jnp.bfloat16): (1e12, 1e30),
    ("huge", jnp.float16): (1e2, 1e3),
    ("tiny", jnp.float32): (1e-30, 1e-30),
    ("tiny", jnp.bfloat16): (1e-30, 1e-30),
    ("tiny", jnp.float16): (1e-3, 1e-4),
}


@pytest.mark.parametrize("size", ["huge", "tiny"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_extreme_input_norms(implementation, dtype, size):
    qk, vs = MAGNITUDES[(size, dtype)]
    q, k, v = qk * normal(B, T, N, D), qk * normal(B, S, KH, D, seed=1), vs * normal(B, S, KH, D, seed=2)
    out, grads, _ = run(implementation, dtype, q, k, v, causal=True)
    assert_finite(out, grads)
    # The oracle on the dtype-rounded inputs, compared relative to the value scale.
    rounded = [np.asarray(jnp.asarray(x, dtype).astype(jnp.float64)) for x in (q, k, v)]
    expected = oracle.attention(*rounded, is_causal=True).out
    assert_close(np.asarray(out.astype(jnp.float64)) / vs, expected / vs, 0.05, f"{size} output / {vs}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_all_rows_of_one_batch_masked(implementation, dtype):
    q, k, v, bias = normal(B, T, N, D), normal(B, S, KH, D, seed=1), normal(B, S, KH, D, seed=2), normal(1, N, T, S)
    mask = np.ones((B, 1, 1, S), bool)
    mask[0] = False
    out, grads, _ = run(implementation, dtype, q, k, v, bias=bias, mask=mask)
    assert_finite(out, grads)
    if implementation in DELEGATING:
        return  # jax.nn gives mean(V) there; finiteness is what it promises
    np.testing.assert_array_equal(np.asarray(out[0].astype(jnp.float32)), 0.0)
    for name, g in zip(("query", "key", "value"), grads[:3], strict=False):
        np.testing.assert_array_equal(np.asarray(g[0].astype(jnp.float32)), 0.0, err_msg=f"d{name} of masked batch")
    rounded = [np.asarray(jnp.asarray(x, dtype).astype(jnp.float64)) for x in (q, k, v, bias)]
    expected = oracle.attention(*rounded, mask=mask).out
    assert_close(out[1], expected[1], cases.TOLERANCES[jnp.dtype(dtype)].out, "unmasked batch")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_visible_key(implementation, dtype):
    q, k, v = normal(B, T, N, D), normal(B, S, KH, D, seed=1), normal(B, S, KH, D, seed=2)
    out, grads, cot = run(implementation, dtype, q, k, v, kv_lengths=[1, 1])
    assert_finite(out, grads)
    v0 = np.repeat(np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))[:, :1], N // KH, axis=2)  # (B, 1, N, D)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.broadcast_to(v0, out.shape), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(grads[0].astype(jnp.float32)), 0.0, atol=1e-6)  # softmax of one entry
    np.testing.assert_allclose(np.asarray(grads[1].astype(jnp.float32)), 0.0, atol=1e-6)
    cot_sum = np.asarray(cot.astype(jnp.float32)).reshape(B, T, KH, N // KH, D).sum(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(grads[2][:, 0].astype(jnp.float32)), cot_sum, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_garbage_in_padded_keys_is_ignored(implementation, dtype):
    """Large finite junk past key_value_seq_lengths changes nothing (0 * junk must not overflow)."""
    junk = 1e3 if dtype == jnp.float16 else 1e30
    q, k, v = normal(B, T, N, D), normal(B, S, KH, D, seed=1), normal(B, S, KH, D, seed=2)
    k_junk, v_junk = k.copy(), v.copy()
    k_junk[:, 4:], v_junk[:, 4:] = junk, -junk
    clean, clean_grads, _ = run(implementation, dtype, q, k, v, kv_lengths=[4, 4])
    dirty, dirty_grads, _ = run(implementation, dtype, q, k_junk, v_junk, kv_lengths=[4, 4])
    assert_finite(dirty, dirty_grads)
    np.testing.assert_array_equal(np.asarray(dirty.astype(jnp.float32)), np.asarray(clean.astype(jnp.float32)))
    np.testing.assert_array_equal(
        np.asarray(dirty_grads[0].astype(jnp.float32)), np.asarray(clean_grads[0].astype(jnp.float32))
    )


@pytest.mark.parametrize("where", ["query", "key", "value", "bias"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_inputs_propagate(implementation, where):
    arrays = {
        "query": normal(B, T, N, D),
        "key": normal(B, S, KH, D, seed=1),
        "value": normal(B, S, KH, D, seed=2),
        "bias": normal(B, N, T, S, seed=3),
    }
    poisoned = {  # index of the NaN, and the (batch, q_seq, heads) rows that must turn NaN
        "query": ((0, 2, 1, 0), (0, 2, 1)),
        "key": ((1, 3, 0, 5), (1, slice(None), slice(0, N // KH))),
        "value": ((1, 3, 1, 5), (1, slice(None), slice(N // KH, N))),
        "bias": ((0, 3, 4, 6), (0, 4, 3)),
    }
    index, rows = poisoned[where]
    arrays[where][index] = np.nan
    out, _, _ = run(implementation, jnp.float32, arrays["query"], arrays["key"], arrays["value"], arrays["bias"])
    out = np.asarray(out)
    assert np.isnan(out).any(axis=-1)[rows].all(), f"NaN in {where}{list(index)} was hidden"
    untouched = np.ones(out.shape[:3], bool)
    untouched[rows] = False
    assert np.isfinite(out[untouched]).all(), f"NaN in {where} leaked into rows that do not read it"
