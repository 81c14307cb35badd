"""Drop-in parity with jax.nn.dot_product_attention: lower-rank masks and biases, the residual's dtype,
and any number of leading batch axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

IMPLEMENTATIONS = ["reference", "blockwise", None]
B, T, S, N, D = 2, 5, 7, 3, 4


def normal(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def mask_of(shape, seed=1):
    """A random boolean mask whose last key is always visible, so no row is empty (where jax.nn differs)."""
    m = np.random.default_rng(seed).random(shape) < 0.6
    m[..., -1] = True
    return jnp.asarray(m)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize(
    ("mask_shape", "bias_shape"),
    [
        ((S,), None),
        ((T, S), None),
        ((1, 1, S), None),
        ((N, T, S), None),
        (None, (S,)),
        (None, (T, S)),
        (None, (N, T, S)),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "implementation", [pytest.param(i, marks=[] if i == "blockwise" else [pytest.mark.slow]) for i in IMPLEMENTATIONS]
)  # normalization is shared; blockwise by default, the others in the slow tier
def test_masks_and_biases_of_lower_rank_broadcast_as_in_jax_nn(implementation, mask_shape, bias_shape, batched):
    lead = (B,) if batched else ()
    q, k, v = normal((*lead, T, N, D)), normal((*lead, S, N, D), seed=1), normal((*lead, S, N, D), seed=2)
    mask = None if mask_shape is None else mask_of(mask_shape)
    bias = None if bias_shape is None else normal(bias_shape, seed=3)

    @jax.jit
    def both(q, k, v, bias, mask):
        ours = jattn.dot_product_attention(q, k, v, bias, mask, implementation=implementation, block_q=2, block_kv=3)
        return ours, jax.nn.dot_product_attention(q, k, v, bias, mask)

    with jax.numpy_dtype_promotion("standard"):
        ours, theirs = both(q, k, v, bias, mask)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=str)
def test_residual_is_in_the_input_dtype_and_takes_a_cotangent_of_it(implementation, dtype):
    q = normal((B, T, N, D), dtype)

    @jax.jit
    def vjp_of_ones(q):
        (out, lse), vjp = jax.vjp(
            lambda q: jattn.dot_product_attention(q, q, q, return_residual=True, implementation=implementation), q
        )
        return out, lse, vjp((jnp.ones_like(out), jnp.ones(lse.shape, q.dtype)))[0]

    with jax.numpy_dtype_promotion("standard"):  # jax.nn's own backward (auto picks "xla" here) mixes dtypes
        out, lse, grad = vjp_of_ones(q)
    assert (out.dtype, lse.dtype, grad.dtype) == (dtype, dtype, dtype)
    assert lse.shape == (B, T, N)
    wide = q.astype(jnp.float64)
    expected = jax.nn.logsumexp(jnp.einsum("btnd,bsnd->bnts", wide, wide) / np.sqrt(D), axis=-1).transpose(0, 2, 1)
    np.testing.assert_allclose(lse.astype(jnp.float64), expected, rtol=2e-2 if jnp.finfo(dtype).bits == 16 else 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_residual_of_a_row_that_sees_no_key_is_the_lowest_finite_value(implementation, dtype):
    q = normal((B, T, N, D), dtype)
    _, lse = jax.jit(
        lambda q: jattn.dot_product_attention(
            q, q, q, key_value_seq_lengths=jnp.array([0, 3]), return_residual=True, implementation=implementation
        )
    )(q)
    np.testing.assert_array_equal(np.asarray(lse[0].astype(jnp.float32)), float(jnp.finfo(dtype).min))
    assert np.isfinite(np.asarray(lse.astype(jnp.float32))).all()


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "xla", None], ids=str)
def test_any_number_of_leading_batch_axes(implementation):
    """(3, 2, ...) batches give what each (2, ...) slice gives alone, outputs, residuals and gradients."""
    lead = (3, 2)
    q, k, v = normal((*lead, T, N, D)), normal((*lead, S, 1, D), seed=1), normal((*lead, S, 1, D), seed=2)
    bias = normal((3, 1, N, T, S), seed=3)  # broadcast over the second batch axis
    lengths = jnp.array([[7, 4], [6, 5], [3, 7]], jnp.int32)
    options = dict(is_causal=True, implementation=implementation, block_q=2, block_kv=3)
    if implementation != "xla":
        ids = np.sort(np.random.default_rng(4).integers(0, 2, (*lead, S)), axis=-1)
        options.update(query_segment_ids=jnp.asarray(ids[..., :T]), key_value_segment_ids=jnp.asarray(ids))

    def f(q, k, v, bias, lengths, options):
        return jattn.dot_product_attention(
            q, k, v, bias, key_value_seq_lengths=lengths, return_residual=True, **options
        )

    per_slice_options = {name: x for name, x in options.items() if not name.endswith("segment_ids")}

    @jax.jit
    def grads(q, k, v, bias):
        return jax.grad(lambda *a: jnp.sum(f(*a, lengths, options)[0] ** 2), argnums=(0, 1, 2, 3))(q, k, v, bias)

    @jax.jit
    def one_slice(q, k, v, bias, lengths, ids):  # compiled once, called for each slice
        slice_options = dict(per_slice_options)
        if ids is not None:
            slice_options.update(query_segment_ids=ids[0], key_value_segment_ids=ids[1])
        out = f(q, k, v, bias, lengths, slice_options)
        g = jax.grad(lambda *a: jnp.sum(f(*a, lengths, slice_options)[0] ** 2), argnums=(0, 1, 2, 3))(q, k, v, bias)
        return out, g

    with jax.numpy_dtype_promotion("standard"):
        out, lse = jax.jit(lambda *a: f(*a, lengths, options))(q, k, v, bias)
        assert out.shape == (*lead, T, N, D) and lse.shape == (*lead, T, N)
        g = grads(q, k, v, bias)
        for i in range(3):
            ids = None
            if "query_segment_ids" in options:
                ids = (options["query_segment_ids"][i], options["key_value_segment_ids"][i])
            (o, lse_i), gi = one_slice(q[i], k[i], v[i], bias[i], lengths[i], ids)
            np.testing.assert_allclose(out[i], o, atol=1e-6)
            np.testing.assert_allclose(lse[i], lse_i, atol=1e-6)
            for got, want in zip(g, gi, strict=True):
                np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_lengths_and_segment_ids_follow_every_batch_axis():
    q = normal((3, 2, T, N, D))
    with pytest.raises(ValueError, match=r"key_value_seq_lengths must have shape \(\*batch,\)=\(3, 2\); got \(6,\)"):
        jattn.dot_product_attention(q, q, q, key_value_seq_lengths=jnp.ones(6, jnp.int32))
    with pytest.raises(
        ValueError, match=r"query_segment_ids must have shape \(\*batch, q_seq\)=\(3, 2, 5\); got \(6, 5\)"
    ):
        ids = jnp.zeros((6, T), jnp.int32)
        jattn.dot_product_attention(q, q, q, query_segment_ids=ids, key_value_segment_ids=ids)
    with pytest.raises(ValueError, match=r"bias must have shape \(\*batch, heads, q_seq, kv_seq\) broadcastable"):
        jattn.dot_product_attention(q, q, q, bias=jnp.zeros((2, 3, N, T, T)))
