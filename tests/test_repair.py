"""Auto on jax.nn with rows that may see no key: jax.nn's result, repaired to jattn's (zeros, zero gradients)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn._jax_nn import rows_with_a_key
from jattn._options import CallOptions
from jattn._prepare import clipped_lengths, prepare
from jattn.masks import _combine

B, T, S, H, D = 3, 7, 5, 2, 4


def _visible(inputs):
    """(batch, heads|1, q_seq, kv_seq): every position mask materialized, the slow way."""
    opts = clipped_lengths(inputs).opts

    def one(arrays):
        predicate = opts.with_arrays(arrays).mask_mod()
        return jnp.ones((T, S), bool) if predicate is None else _combine.materialize(predicate, T, S)

    dense = jax.vmap(one, axis_size=B)(opts.arrays)[:, None]
    return dense if inputs.mask is None else dense & inputs.mask


CONFIGS = list(itertools.product([False, True], [None, (1, 0), (0, 2)], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize(("causal", "window", "lengths", "offset", "mask"), CONFIGS)
def test_rows_with_a_key_is_the_any_of_the_materialized_masks(causal, window, lengths, offset, mask):
    r = np.random.default_rng(len(str((causal, window, lengths, offset, mask))))
    q = jnp.ones((B, T, H, D))
    call = CallOptions(
        is_causal=causal,
        local_window_size=window,
        query_seq_lengths=jnp.asarray([7, 0, 3], jnp.int32) if lengths else None,
        key_value_seq_lengths=jnp.asarray([0, 9, 2], jnp.int32) if lengths else None,  # 9: past the sequence
        query_offset=jnp.asarray([0, 2, -3], jnp.int32) if offset else None,
        mask=jnp.asarray(r.random((B, H, T, S)) > 0.7) if mask else None,
    )
    inputs = prepare(q, q[:, :S], q[:, :S], call).inputs
    want = _visible(inputs).any(-1).transpose(0, 2, 1)  # (batch, q_seq, heads|1)
    got = jax.jit(rows_with_a_key)(inputs)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


def test_auto_on_jax_nn_gives_zeros_and_zero_gradients_where_jax_nn_gives_the_mean_of_v():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((B, n, H, D)), jnp.float32) for n in (T, S, S))
    lengths = jnp.asarray([5, 0, 2], jnp.int32)
    options = dict(key_value_seq_lengths=lengths, is_causal=True)
    assert jattn.auto_implementation(q, k, v, backend="cpu", **options) == "xla"

    def loss(implementation):
        return lambda q, k, v: jnp.sum(
            jnp.sin(jattn.dot_product_attention(q, k, v, implementation=implementation, **options))
        )

    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, **options))(q, k, v)
    with jax.numpy_dtype_promotion("standard"):  # jax.nn mixes int32 lengths with default-int positions
        mean_of_v = jax.nn.dot_product_attention(q, k, v, **options)[1]
    assert not jnp.any(out[1]) and jnp.any(mean_of_v)  # example 1 sees no key: jax.nn gives the mean of V
    want = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="reference", **options))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-6)
    grads = jax.jit(jax.grad(loss(None), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, k, v)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert jnp.all(jnp.isfinite(g))
        np.testing.assert_allclose(g, rg, atol=1e-5)
    assert not jnp.any(grads[0][1])


def test_auto_runs_packed_sequences_through_jax_nn_as_a_dense_mask():
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.standard_normal((B, n, H, D)), jnp.float32) for n in (T, S, S))
    q_ids = jnp.asarray([[0, 0, 1, 1, 2, 2, 3]] * B, jnp.int32)  # segment 3 has no key
    kv_ids = jnp.asarray([[0, 1, 1, 2, 2]] * B, jnp.int32)
    options = dict(query_segment_ids=q_ids, key_value_segment_ids=kv_ids)
    assert jattn.auto_implementation(q, k, v, backend="cpu", **options) == "xla"
    with pytest.raises(ValueError, match="does not support query_segment_ids"):
        jattn.dot_product_attention(q, k, v, implementation="xla", **options)

    def loss(implementation):
        def f(q, k, v):
            return jnp.sum(jnp.sin(jattn.dot_product_attention(q, k, v, implementation=implementation, **options)))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    (value, grads), (ref_value, ref_grads) = loss(None)(q, k, v), loss("reference")(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, atol=1e-5)
    assert not jnp.any(grads[0][:, 6])  # the query of segment 3 sees no key: zero gradient


@pytest.mark.parametrize("empty", [False, True], ids=["every-row-sees-a-key", "one-example-sees-none"])
def test_a_padding_mask_through_jax_nn_is_repaired_only_where_a_row_sees_no_key(empty):
    # On CPU the repair is a branch taken only when some row sees no key (jattn._jax_nn.repair_rows): both
    # branches, forward and gradients, against jax.nn where it is exact and the reference everywhere.
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.standard_normal((B, n, H, D)), jnp.float32) for n in (T, S, S))
    keep = jnp.asarray([S, 0 if empty else 2, 3], jnp.int32)
    mask = (jnp.arange(S, dtype=jnp.int32)[None, :] < keep[:, None])[:, None, None, :]  # a padding mask
    assert jattn.auto_implementation(q, k, v, mask=mask, backend="cpu") == "xla"

    def loss(implementation):
        def f(q, k, v):
            return jnp.sum(jnp.sin(jattn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    seen = [0, 2] if empty else [0, 1, 2]
    np.testing.assert_array_equal(out[jnp.asarray(seen)], theirs[jnp.asarray(seen)])
    assert not jnp.any(out[1]) if empty else jnp.all(out[1] == theirs[1])
    (value, grads), (ref_value, ref_grads) = loss(None)(q, k, v), loss("reference")(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, atol=1e-5)
    assert not jnp.any(grads[0][1]) if empty else jnp.any(grads[0][1])
    # Forward mode: the repair's tangent is a plain select (no branch), so check it and a Hessian-vector
    # product against the reference too.
    tangents = tuple(jnp.asarray(r.standard_normal(x.shape), jnp.float32) for x in (q, k, v))

    def jvp_and_hvp(implementation):
        def attend(q, k, v):
            return jattn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

        def loss_of_q(q):
            return jnp.sum(jnp.sin(attend(q, k, v)))

        tangent = jax.jvp(attend, (q, k, v), tangents)[1]
        return tangent, jax.jvp(jax.grad(loss_of_q), (q,), tangents[:1])[1]

    (tangent, hvp), (ref_tangent, ref_hvp) = (
        jax.jit(jvp_and_hvp, static_argnums=0)(None),
        jax.jit(jvp_and_hvp, static_argnums=0)("reference"),
    )
    np.testing.assert_allclose(tangent, ref_tangent, atol=1e-5)
    np.testing.assert_allclose(hvp, ref_hvp, atol=1e-4)
    assert not jnp.any(tangent[1]) if empty else jnp.any(tangent[1])
