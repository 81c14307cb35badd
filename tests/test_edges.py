"""Edge inputs: empty shapes, symbolic shapes (jax.export), 64-bit ids and lengths, -inf bias rows, NaN in padding.

One table per edge; every row runs on every implementation jattn computes itself
(and the jax.nn delegates where the row is about them), with blockwise block
sizes that put the edge inside a block and on a block boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jattn
from jattn import nnx as jnnx

OWN = [("reference", {}), ("blockwise", {"block_q": 2, "block_kv": 2}), ("blockwise", {"block_q": 3, "block_kv": 5})]
OWN_IDS = ["reference", "blockwise-2x2", "blockwise-3x5"]
ALL = [*OWN, ("xla", {}), (None, {})]
ALL_IDS = [*OWN_IDS, "xla", "auto"]


def normal(shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def attention(implementation, blocks, **options):
    def f(q, k, v, bias=None):
        return jattn.dot_product_attention(q, k, v, bias, implementation=implementation, **blocks, **options)

    return f


def value_and_grads(f, *args):
    """Output, log-sum-exp-free gradients of sum(out**2) and a JVP, all jitted."""

    @jax.jit
    def run(*args):
        grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args))))(*args)
        tangent = jax.jvp(f, args, args)[1]
        return f(*args), grads, tangent

    return run(*args)


# --- 1. zero-size inputs ---------------------------------------------------------------------------

EMPTY = {  # (query shape, key/value shape): batch 0, q_seq 0, kv_seq 0, heads 0
    "batch_0": ((0, 5, 2, 3), (0, 7, 2, 3)),
    "q_seq_0": ((2, 0, 2, 3), (2, 7, 2, 3)),
    "kv_seq_0": ((2, 5, 2, 3), (2, 0, 2, 3)),
    "heads_0": ((2, 5, 0, 3), (2, 7, 0, 3)),
    "unbatched_kv_seq_0": ((5, 2, 3), (0, 2, 3)),
}


@pytest.mark.parametrize("shapes", list(EMPTY.values()), ids=list(EMPTY))
@pytest.mark.parametrize(("implementation", "blocks"), ALL, ids=ALL_IDS)
def test_empty_inputs_give_empty_or_zero_outputs_and_zero_gradients(implementation, blocks, shapes):
    q_shape, kv_shape = shapes
    q, kv = normal(q_shape), normal(kv_shape, seed=1)
    f = attention(implementation, blocks, is_causal=True)
    out, (dq, dk, dv), tangent = value_and_grads(f, q, kv, kv)
    assert out.shape == q_shape and dq.shape == q_shape and dk.shape == kv_shape
    for x in (out, dq, dk, dv, tangent):  # kv_seq 0: no query sees a key, so zeros
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    _, lse = jattn.dot_product_attention(q, kv, kv, implementation=implementation, return_residual=True, **blocks)
    assert lse.shape == q_shape[:-1]
    np.testing.assert_array_equal(np.asarray(lse), float(jnp.finfo(q.dtype).min))


def test_empty_batch_and_sequence_through_the_nnx_module():
    mha = jnnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    for shape in ((0, 5, 8), (3, 0, 8)):
        out, weights = mha(jnp.zeros(shape, jnp.float32), is_causal=True, return_weights=True)
        assert out.shape == shape and weights.shape == (shape[0], 2, shape[1], shape[1])


# --- 2. symbolic shapes ------------------------------------------------------------------------------


def round_trip(f, spec):
    exported = export.export(jax.jit(f))(spec)
    return export.deserialize(exported.serialize())


@pytest.mark.parametrize(("implementation", "blocks"), ALL, ids=ALL_IDS)
def test_symbolic_batch_exports_and_runs_at_two_sizes(implementation, blocks):
    (b,) = export.symbolic_shape("b")
    f = attention(implementation, blocks, is_causal=True)
    restored = round_trip(lambda x: f(x, x, x), jax.ShapeDtypeStruct((b, 7, 2, 4), jnp.float32))
    for batch in (1, 3):
        x = normal((batch, 7, 2, 4), seed=batch, dtype=jnp.float32)
        np.testing.assert_allclose(restored.call(x), jax.jit(lambda x: f(x, x, x))(x), atol=1e-6)


@pytest.mark.parametrize(("implementation", "blocks"), [ALL[0], ALL[3], ALL[4]], ids=["reference", "xla", "auto"])
def test_symbolic_sequence_exports_on_the_default_path(implementation, blocks):
    (t,) = export.symbolic_shape("t")
    f = attention(implementation, blocks, is_causal=True)
    restored = round_trip(lambda x: f(x, x, x), jax.ShapeDtypeStruct((2, t, 2, 4), jnp.float32))
    for seq in (5, 11):
        x = normal((2, seq, 2, 4), seed=seq, dtype=jnp.float32)
        np.testing.assert_allclose(restored.call(x), jax.jit(lambda x: f(x, x, x))(x), atol=1e-6)


def test_blockwise_names_the_symbolic_length_and_the_way_around_it():
    (t,) = export.symbolic_shape("t")
    f = attention("blockwise", {})
    with pytest.raises(
        ValueError,
        match=r"implementation='blockwise' .* does not support symbolic sequence length \(q_seq=t, kv_seq=t\); "
        r"use implementation='reference', 'xla' or None",  # not cudnn: it takes 16-bit inputs only
    ):
        export.export(jax.jit(lambda x: f(x, x, x)))(jax.ShapeDtypeStruct((2, t, 2, 4), jnp.float32))


# --- 3. 64-bit segment ids and lengths -------------------------------------------------------------------


@pytest.mark.parametrize(("implementation", "blocks"), OWN, ids=OWN_IDS)
def test_64_bit_ids_compare_in_their_own_dtype(implementation, blocks):
    q = normal((1, 6, 2, 3))
    ids = jnp.array([[0, 0, 0, 2**32, 2**32, 2**32]], jnp.int64)  # int32 would wrap both to segment 0

    @jax.jit
    def out_and_expected(q, ids):
        out = attention(implementation, blocks, query_segment_ids=ids, key_value_segment_ids=ids)(q, q, q)
        first = jattn.dot_product_attention(q[:, :3], q[:, :3], q[:, :3], implementation="reference")
        second = jattn.dot_product_attention(q[:, 3:], q[:, 3:], q[:, 3:], implementation="reference")
        return out, jnp.concatenate([first, second], axis=1)

    out, expected = out_and_expected(q, ids)
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize(("implementation", "blocks"), [*OWN, ALL[3]], ids=[*OWN_IDS, "xla"])
def test_64_bit_lengths_clip_to_the_sequence_and_never_wrap(implementation, blocks):
    q = normal((2, 5, 2, 3))
    lengths = jnp.array([2**32 + 2, -(2**33)], jnp.int64)  # past the end: every key; negative: none

    @jax.jit
    def out_and_first_unmasked(q, lengths):
        out = attention(implementation, blocks, key_value_seq_lengths=lengths)(q, q, q)
        return out, jattn.dot_product_attention(q[0], q[0], q[0])

    out, first_unmasked = out_and_first_unmasked(q, lengths)
    atol = 1e-6 if implementation == "xla" else 1e-12  # jax.nn runs float64 softmax in float32
    np.testing.assert_allclose(out[0], first_unmasked, atol=atol)
    if implementation != "xla":  # jax.nn: mean(V) on rows that see no key
        np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


def test_ids_without_a_common_integer_type_are_refused():
    q = normal((1, 4, 1, 3))
    with pytest.raises(TypeError, match=r"must have integer dtypes with a common integer type; got int64 and uint64"):
        jattn.dot_product_attention(
            q, q, q, query_segment_ids=jnp.zeros((1, 4), jnp.int64), key_value_segment_ids=jnp.zeros((1, 4), jnp.uint64)
        )


# --- 4. bias rows of -inf ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("implementation", "blocks"), [*OWN, ALL[4]], ids=[*OWN_IDS, "auto"])
def test_a_bias_row_of_minus_inf_sees_no_key(implementation, blocks):
    q = normal((2, 5, 2, 3))
    bias = jnp.zeros((2, 1, 5, 5)).at[0, 0, 3].set(-jnp.inf).at[1, 0, :, 4].set(-jnp.inf)  # a row; a column
    out, (dq, dk, dv, dbias), tangent = value_and_grads(attention(implementation, blocks), q, q, q, bias)
    for x in (out, dq, dk, dv, dbias, tangent):
        assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_array_equal(np.asarray(out[0, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[0, 3]), 0.0)

    @jax.jit
    def expected(q, bias):
        finite = jnp.where(jnp.isinf(bias), 0.0, bias)  # column 4 of example 1: hidden like a mask
        return jattn.dot_product_attention(q, q, q, finite, mask=~jnp.isinf(bias), implementation="reference")

    np.testing.assert_allclose(out, expected(q, bias), atol=1e-12)


def test_nan_in_the_bias_still_propagates():
    q = normal((1, 5, 2, 3))
    bias = jnp.zeros((1, 1, 5, 5)).at[0, 0, 2, 1].set(jnp.nan)
    for implementation, blocks in OWN:
        out = jax.jit(attention(implementation, blocks))(q, q, q, bias)
        assert np.isnan(np.asarray(out[0, 2])).all() and np.isfinite(np.asarray(out[0, jnp.array([0, 1, 3, 4])])).all()


# --- 5. NaN or Inf stored past key_value_seq_lengths ------------------------------------------------------------


@pytest.mark.parametrize(("implementation", "blocks"), OWN, ids=OWN_IDS)
def test_junk_in_padded_keys_and_values_changes_nothing(implementation, blocks):
    q, k, v = normal((2, 5, 2, 3)), normal((2, 7, 2, 3), seed=1), normal((2, 7, 2, 3), seed=2)
    lengths = jnp.array([5, 3], jnp.int32)  # the padding shares a block with real keys
    padded = jnp.arange(7, dtype=jnp.int32)[None, :, None, None] >= lengths[:, None, None, None]
    f = attention(implementation, blocks, key_value_seq_lengths=lengths, is_causal=False)
    clean = value_and_grads(f, q, k, v)
    tangent = jax.jit(lambda k, v: jax.jvp(f, (q, k, v), (q, k, v))[1])
    for junk in (jnp.nan, jnp.inf):  # same shapes: one compilation serves both
        dirty_k, dirty_v = jnp.where(padded, junk, k), jnp.where(padded, -junk, v)
        dirty = value_and_grads(f, q, dirty_k, dirty_v)
        np.testing.assert_array_equal(np.asarray(dirty[0]), np.asarray(clean[0]))
        np.testing.assert_array_equal(np.asarray(dirty[1][0]), np.asarray(clean[1][0]))  # dQ
        for d, c in zip(dirty[1][1:], clean[1][1:], strict=True):  # dK, dV of the real keys
            np.testing.assert_array_equal(np.where(padded, 0.0, np.asarray(d)), np.where(padded, 0.0, np.asarray(c)))
        np.testing.assert_allclose(tangent(dirty_k, dirty_v), tangent(k, v), atol=1e-12)


@pytest.mark.parametrize(("implementation", "blocks"), OWN, ids=OWN_IDS)
def test_a_sink_of_minus_infinity_is_no_sink(implementation, blocks):
    """Head 0's sink is -inf: its rows are those of a call without sinks, the row that sees no key included."""
    q, k, v = normal((2, 7, 2, 4), 1), normal((2, 7, 2, 4), 2), normal((2, 7, 2, 4), 3)
    options = dict(is_causal=True, key_value_seq_lengths=jnp.array([0, 5]))
    sinks = jnp.array([-jnp.inf, 0.5])
    with_sink = attention(implementation, blocks, sinks=sinks, **options)(q, k, v)
    without = attention(implementation, blocks, **options)(q, k, v)
    np.testing.assert_allclose(with_sink[:, :, 0], without[:, :, 0], rtol=1e-12, atol=1e-12)
    assert np.isfinite(np.asarray(with_sink)).all()
    assert not np.allclose(with_sink[1, :, 1], without[1, :, 1])  # head 1's finite sink takes its share
