"""Blockwise kernel specifics: ragged lengths, block skipping, memory, higher-order autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _dispatch
from jattn._blockwise import _geometry
from jattn._dispatch import CallSignature
from jattn._options import AttentionOptions, ExampleArrays, StaticOptions


def _inputs(q_seq, kv_seq, dtype=jnp.float64, heads=2, kv_heads=1, dim=4, batch=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, q_seq, heads, dim), dtype)
    k = jax.random.normal(ks[1], (batch, kv_seq, kv_heads, dim), dtype)
    v = jax.random.normal(ks[2], (batch, kv_seq, kv_heads, dim), dtype)
    return q, k, v


@functools.cache
def _pair(block, **options):
    def f(implementation):
        def run(q, k, v):
            return jattn.dot_product_attention(
                q, k, v, implementation=implementation, block_q=block, block_kv=block, **options
            )

        return jax.jit(run)

    return f("blockwise"), f("reference")


def _assert_matches_reference(q, k, v, block, atol, **options):
    if any(isinstance(x, jax.Array) for x in options.values()):
        blockwise, reference = _pair.__wrapped__(block, **options)
    else:
        blockwise, reference = _pair(block, **options)
    out, vjp = jax.vjp(blockwise, q, k, v)
    ref, ref_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(out, ref, atol=atol)
    cotangent = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    for g, g_ref in zip(vjp(cotangent), ref_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, g_ref, atol=atol)


@pytest.mark.parametrize(
    ("block", "q_seq", "kv_seq", "is_causal"),
    [
        pytest.param(64, 1, 1, False, marks=pytest.mark.slow),
        (64, 31, 31, True),
        pytest.param(64, 123, 31, False, marks=pytest.mark.slow),
        pytest.param(64, 123, 31, True, marks=pytest.mark.slow),
        pytest.param(64, 31, 123, True, marks=pytest.mark.slow),
        pytest.param(64, 131, 127, False, marks=pytest.mark.slow),
        (64, 131, 127, True),
        pytest.param(128, 131, 127, True, marks=pytest.mark.slow),
        (128, 31, 123, False),
    ],
)
def test_lengths_that_do_not_divide_the_block(block, q_seq, kv_seq, is_causal):
    q, k, v = _inputs(q_seq, kv_seq)
    _assert_matches_reference(q, k, v, block, 1e-12, is_causal=is_causal)


@pytest.mark.parametrize(
    ("seq", "block", "fitted"),
    [(8192, 512, 512), (8000, 512, 500), (123, 64, 41), (131, 64, 64), (97, 512, 97), (9, 2, 1), (5, 1, 1)],
)
def test_block_sizes_fit_the_sequence_when_a_divisor_is_at_least_half_the_block(seq, block, fitted):
    """123 and 8000 get a dividing block (no padding, so no copy of K/V); primes keep the block and pad."""
    assert _geometry.fitted_block(seq, block) == fitted
    grid = _geometry.Grid(seq, seq, fitted, fitted)
    assert (grid.kv_padded == seq) == (seq % fitted == 0)


def test_long_ragged_sequence_with_window_and_lengths():
    q, k, v = _inputs(1000, 1000, dim=3, heads=1)
    lengths = jnp.array([1000, 517], jnp.int32)
    _assert_matches_reference(
        q, k, v, 128, 1e-12, local_window_size=(200, 3), key_value_seq_lengths=lengths, query_seq_lengths=lengths
    )


def _kinds(q_seq, kv_seq, block, **options):
    opts = AttentionOptions(StaticOptions(scale=1.0, **options))
    grid = _geometry.Grid(q_seq, kv_seq, block, block)
    blocks = _geometry.ExampleBlocks(opts, grid, None, 0, heads=(1, 1))
    kinds = np.zeros((grid.num_q_blocks, grid.num_kv_blocks), int)
    for qb in range(grid.num_q_blocks):
        lo, hi = (int(x) for x in blocks.kv_block_range(qb))
        kinds[qb, lo:hi] = [int(blocks.kind(qb, kb)) for kb in range(lo, hi)]
    return kinds


def test_causal_visits_about_half_the_blocks_and_masks_only_the_diagonal():
    kinds = _kinds(1024, 1024, 128, is_causal=True)
    expected = np.tril(np.full((8, 8), _geometry.FULL), -1) + np.eye(8, dtype=int) * _geometry.PARTIAL
    np.testing.assert_array_equal(kinds, expected)


def test_sliding_window_visits_a_band():
    kinds = _kinds(512, 512, 128, local_window_size=(128, 0))
    assert (kinds[np.triu_indices(4, 1)] == _geometry.SKIP).all()
    assert (kinds[np.tril_indices(4, -2)] == _geometry.SKIP).all()
    assert (np.diag(kinds) == _geometry.PARTIAL).all()


def test_key_value_blocks_visit_only_the_queries_that_see_them():
    opts = AttentionOptions(StaticOptions(scale=1.0, is_causal=True), ExampleArrays(kv_length=jnp.int32(300)))
    blocks = _geometry.ExampleBlocks(opts, _geometry.Grid(500, 500, 128, 128), None, 0, heads=(1, 1))
    assert [tuple(int(x) for x in blocks.q_block_range(kb)) for kb in range(4)] == [(0, 4), (1, 4), (2, 4), (0, 0)]


def _temp_bytes_of_forward_and_backward(q_seq):
    q, k, v = (jax.ShapeDtypeStruct((1, q_seq, 2, 16), jnp.float32) for _ in range(3))

    def loss(q, k, v):
        out = jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="blockwise", block_q=128, block_kv=128
        )
        return out.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_forward_and_backward_memory_is_linear_in_sequence_length():
    small, large = _temp_bytes_of_forward_and_backward(2048), _temp_bytes_of_forward_and_backward(4096)
    one_seq_by_seq_array = 2048 * 2048 * 4
    assert small < one_seq_by_seq_array / 4, (
        f"temp {small} bytes; one (q_seq, kv_seq) float32 array is {one_seq_by_seq_array}"
    )
    assert large <= 2.2 * small, f"temp grew from {small} to {large} bytes when the sequence doubled"


def test_grad_of_grad_matches_reference():
    q, k, v = _inputs(11, 13, heads=4, kv_heads=2, dim=3)
    bias = jax.random.normal(jax.random.key(3), (2, 1, 11, 13))

    def second_order(implementation):
        def f(q, k, v, b):
            out = jattn.dot_product_attention(
                q, k, v, b, is_causal=True, implementation=implementation, block_q=4, block_kv=5, logits_soft_cap=2.0
            )
            return jnp.sum(jnp.sin(out))

        def g(q, k, v, b):
            return sum(jnp.sum(x**2) for x in jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, b))

        return jax.jit(jax.grad(g, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for got, expected in zip(second_order("blockwise"), second_order("reference"), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_16_bit_inputs_accumulate_in_float32(dtype, atol):
    q, k, v = _inputs(37, 29, jnp.float32, heads=4, kv_heads=2, dim=8)
    blockwise, _ = _pair(16, is_causal=True)
    _, reference = _pair(16, is_causal=True)
    out = blockwise(q.astype(dtype), k.astype(dtype), v.astype(dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v), atol=atol)


def auto_implementation(q_seq, kv_seq, *, exact_with_jax_nn=False, dtype=jnp.float32):
    features = frozenset() if exact_with_jax_nn else frozenset({"logits_soft_cap"})  # an option jax.nn lacks
    return _dispatch.choose(CallSignature("cpu", jnp.dtype(dtype), q_seq, kv_seq, 64, 64, features))


def test_auto_dispatch_rule():
    assert auto_implementation(64, 64) == "reference"
    assert auto_implementation(64, 64, exact_with_jax_nn=True) == "xla"
    assert auto_implementation(128, 128, exact_with_jax_nn=True) == "xla"
    assert auto_implementation(128, 128) == "blockwise"
    assert auto_implementation(1, 8192) == "blockwise"
    assert auto_implementation(1, 1024) == "reference"
    assert auto_implementation(1, 1025) == "blockwise"  # a decode step can skip blocks past the filled length
    assert auto_implementation(4096, 4096, exact_with_jax_nn=True) == "blockwise"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "xla"),
        ({"is_causal": True}, "xla"),
        ({"key_value_seq_lengths": jnp.array([3, 0], jnp.int32)}, "xla"),  # rows that see nothing: repaired
        ({"logits_soft_cap": 2.0}, "reference"),  # jax.nn lacks it
    ],
)
def test_auto_picks_jax_nn_only_where_it_computes_exactly_what_jattn_does(options, expected, monkeypatch):
    picked = []
    real = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda *a, **k: picked.append(real(*a, **k)) or picked[-1])
    q, k, v = _inputs(7, 5, jnp.float32)
    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, **options))(q, k, v)
    assert picked == [expected]
    reference = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="reference", **options))
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-6)


@pytest.mark.parametrize("name", ["block_q", "block_kv"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_block_sizes_must_be_positive_ints(name, value):
    q, k, v = _inputs(5, 5)
    with pytest.raises(ValueError, match=rf"{name} must be a positive int or None; got {value!r}"):
        jattn.dot_product_attention(q, k, v, implementation="blockwise", **{name: value})
