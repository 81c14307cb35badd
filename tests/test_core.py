"""The per-example core: hand-computed values, the notebook's numbers, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jattn

F64 = jnp.float64

# The tutorial notebook's inputs and printed results.
NOTEBOOK_QUERY = np.array([0.41, 0.42, 0.43])
NOTEBOOK_KEYS = np.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23]])
NOTEBOOK_BATCH = np.array([[[0.11, 0.12, 0.13], [0.21, 0.22, 0.23], [0.31, 0.32, 0.33]]])


def test_notebook_single_query_unscaled():
    f = jax.jit(lambda q, k: jattn.attention(q, k, k, scale=1.0, return_weights=True))
    out, weights = f(jnp.asarray(NOTEBOOK_QUERY, F64), jnp.asarray(NOTEBOOK_KEYS, F64))
    np.testing.assert_allclose(weights, [0.46854161, 0.53145839], atol=1e-8)
    np.testing.assert_allclose(out, [0.16314584, 0.17314584, 0.18314584], atol=1e-8)


def test_notebook_steps_one_by_one():
    q, k = jnp.asarray(NOTEBOOK_QUERY, F64), jnp.asarray(NOTEBOOK_KEYS, F64)
    s = jax.jit(lambda q, k: jattn.scores(q, k, scale=1.0))(q, k)
    np.testing.assert_allclose(s, [0.41 * 0.11 + 0.42 * 0.12 + 0.43 * 0.13, 0.41 * 0.21 + 0.42 * 0.22 + 0.43 * 0.23])
    w = jax.jit(jattn.softmax)(s)
    np.testing.assert_allclose(w, [0.46854161, 0.53145839], atol=1e-8)
    np.testing.assert_allclose(jax.jit(jattn.context)(w, k), [0.16314584, 0.17314584, 0.18314584], atol=1e-8)


def test_notebook_scaled_self_attention_batch():
    x = jnp.asarray(NOTEBOOK_BATCH, F64)
    out = jax.jit(jax.vmap(lambda x: jattn.attention(x, x, x)))(x)
    first = np.array([0.21138554, 0.21253973, 0.21369315])
    expected = np.stack([first, first + 0.01, first + 0.02], axis=-1)[None]
    np.testing.assert_allclose(out, expected, atol=1e-8)


def test_default_scale_is_inverse_sqrt_dim():
    q, k = jnp.ones((2, 4), F64), jnp.ones((3, 4), F64)
    np.testing.assert_allclose(jax.jit(jattn.scores)(q, k), np.full((2, 3), 4 / 2))


def test_softmax_hand_computed_and_masked_rows():
    x = jnp.array([[0.0, np.log(3.0), 9.0], [1.0, 2.0, 3.0]], F64)
    mask = jnp.array([[True, True, False], [False, False, False]])
    w = jax.jit(jattn.softmax)(x, mask)
    np.testing.assert_allclose(w, [[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])


def test_softmax_axis():
    x = jnp.array([[0.0, 1.0], [np.log(3.0), 1.0]], F64)
    w = jax.jit(lambda x: jattn.softmax(x, axis=0))(x)
    np.testing.assert_allclose(w, [[0.25, 0.5], [0.75, 0.5]])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_softmax_16bit_runs_in_float32_and_casts_back(dtype):
    x = jnp.array([100.0, 100.0 + np.log(3.0)], dtype)
    w = jax.jit(jattn.softmax)(x)
    assert w.dtype == dtype
    expected = jax.nn.softmax(x.astype(jnp.float32))
    np.testing.assert_allclose(w.astype(np.float32), expected, rtol=1e-2)


def test_softmax_huge_logits_and_masked_rows_have_finite_gradients():
    x = jnp.array([[1e4, -1e4, 0.0], [5.0, 6.0, 7.0], [-1e4, 1e4, 1e4]], F64)
    mask = jnp.array([[True, True, True], [False, False, False], [True, False, True]])
    w = jax.jit(jattn.softmax)(x, mask)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, [[1, 0, 0], [0, 0, 0], [0, 0, 1]], atol=1e-12)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jattn.softmax(x, mask) * jnp.arange(3.0, dtype=F64)[None])))(x)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[1], 0.0)


def test_softmax_propagates_nan():
    w = jax.jit(jattn.softmax)(jnp.array([1.0, np.nan], F64))
    assert np.isnan(w).all()


def test_attention_hand_computed_with_mask_and_bias():
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]], F64)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], F64)
    v = jnp.array([[1.0], [2.0], [4.0]], F64)
    mask = jnp.array([[True, True, False], [False, False, False]])
    bias = jnp.array([[np.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]], F64)
    # Row 0: logits (1 + log 3, 0) -> weights (3e, 1) / (3e + 1).
    out, w = jax.jit(lambda *a: jattn.attention(*a, scale=1.0, return_weights=True))(q, k, v, mask, bias)
    e = np.e
    np.testing.assert_allclose(w, [[3 * e / (3 * e + 1), 1 / (3 * e + 1), 0.0], [0, 0, 0]])
    np.testing.assert_allclose(out, [[(3 * e + 2) / (3 * e + 1)], [0.0]])


def test_attention_logits_soft_cap():
    q, k = jnp.array([[3.0]], F64), jnp.array([[1.0], [0.0]], F64)
    v = jnp.array([[1.0], [0.0]], F64)
    out = jax.jit(lambda q, k, v: jattn.attention(q, k, v, scale=1.0, logits_soft_cap=2.0))(q, k, v)
    capped = 2.0 * np.tanh(3.0 / 2.0)
    np.testing.assert_allclose(out, [[np.exp(capped) / (np.exp(capped) + 1.0)]])


def test_attention_output_dtype_follows_input():
    x = jnp.ones((3, 5), jnp.bfloat16)
    assert jax.jit(jattn.attention)(x, x, x).dtype == jnp.bfloat16


def _rand(key, *shapes):
    keys = jax.random.split(jax.random.key(key), len(shapes))
    return [jax.random.normal(k, s, F64) for k, s in zip(keys, shapes, strict=True)]


def test_check_grads_scores_softmax_context():
    q, k, v = _rand(0, (3, 5), (7, 5), (7, 2))
    mask = jnp.array(np.random.default_rng(0).random((3, 7)) < 0.6).at[1].set(False)
    check_grads(jax.jit(lambda q, k: jattn.scores(q, k)), (q, k), order=2, modes=["rev"])
    check_grads(jax.jit(lambda s: jattn.softmax(s, mask)), (q @ k.T,), order=2, modes=["rev"])
    check_grads(jax.jit(jattn.context), (jax.nn.softmax(q @ k.T), v), order=2, modes=["rev"])


def test_check_grads_attention_masked_rows_and_bias():
    q, k, v, bias = _rand(1, (5, 3), (7, 3), (7, 2), (5, 7))
    mask = jnp.array(np.random.default_rng(1).random((5, 7)) < 0.5).at[2].set(False)
    f = jax.jit(lambda q, k, v, b: jattn.attention(q, k, v, mask, b, logits_soft_cap=3.0))
    check_grads(f, (q, k, v, bias), order=2, modes=["rev"])


def test_fully_masked_row_has_zero_gradient():
    q, k, v = _rand(2, (2, 3), (5, 3), (5, 4))
    mask = jnp.array([[True] * 5, [False] * 5])
    grads = jax.jit(jax.grad(lambda q: jnp.sum(jattn.attention(q, k, v, mask) ** 2)))(q)
    np.testing.assert_array_equal(grads[1], 0.0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: jattn.scores(jnp.ones((2, 3, 4)), jnp.ones((5, 4))),
            ValueError,
            r"q must have rank 1 or 2 .*got rank 3",
        ),
        (
            lambda: jattn.scores(jnp.ones((2, 4)), jnp.ones((4,))),
            ValueError,
            r"k must have rank 2 \(kv_seq, dim\); got rank 1",
        ),
        (
            lambda: jattn.scores(jnp.ones((2, 4)), jnp.ones((5, 3))),
            ValueError,
            r"last axis \(dim\) of k.* must be 4; got 3",
        ),
        (
            lambda: jattn.scores(jnp.ones((2, 4), int), jnp.ones((5, 4), int)),
            TypeError,
            r"q must have a floating-point dtype; got int",
        ),
        (
            lambda: jattn.scores(jnp.ones((2, 4), F64), jnp.ones((5, 4), jnp.float32)),
            TypeError,
            r"q, k must share one dtype; got q=float64, k=float32",
        ),
        (
            lambda: jattn.scores(jnp.ones((2, 4)), jnp.ones((5, 4)), scale="x"),
            TypeError,
            r"scale must be a Python float or None; got str",
        ),
        (
            lambda: jattn.softmax(jnp.ones((2, 3)), jnp.ones((2, 3))),
            TypeError,
            r"mask must be boolean \(True = attend\); got dtype float",
        ),
        (
            lambda: jattn.softmax(jnp.ones((2, 3)), jnp.ones((2, 4), bool)),
            ValueError,
            r"mask must have shape .* broadcastable to \(2, 3\); got \(2, 4\)",
        ),
        (
            lambda: jattn.softmax(jnp.ones((2, 3)), jnp.ones((3,), bool)),
            ValueError,
            r"broadcastable to \(2, 3\); got \(3,\)",
        ),
        (lambda: jattn.softmax(jnp.ones((2, 3)), axis=2), ValueError, r"axis must be in \[-2, 2\) .*got 2"),
        (lambda: jattn.softmax(jnp.ones((2, 3), int)), TypeError, r"scores must have a floating-point dtype; got int"),
        (
            lambda: jattn.context(jnp.ones((2, 3)), jnp.ones((4, 5))),
            ValueError,
            r"first axis \(kv_seq\) of v.* must be 3; got 4",
        ),
        (
            lambda: jattn.context(jnp.ones((2, 3)), jnp.ones((3,))),
            ValueError,
            r"v must have rank 2 \(kv_seq, v_dim\); got rank 1",
        ),
        (
            lambda: jattn.context(jnp.ones((2, 3), F64), jnp.ones((3, 2), jnp.float32)),
            TypeError,
            r"weights, v must share one dtype",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((5, 4))),
            ValueError,
            r"first axis \(kv_seq\) of v.* must be 3; got 5",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), jnp.ones((2, 4), bool)),
            ValueError,
            r"mask must have shape \(q_seq, kv_seq\) broadcastable to \(2, 3\); got \(2, 4\)",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), bias=jnp.ones((2, 3), int)),
            TypeError,
            r"bias must have a floating-point dtype; got int",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), bias=jnp.ones((3, 2))),
            ValueError,
            r"bias must have shape \(q_seq, kv_seq\) broadcastable to \(2, 3\); got \(3, 2\)",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), logits_soft_cap=0.0),
            ValueError,
            r"logits_soft_cap must be a positive finite float or None; got 0.0",
        ),
        (
            lambda: jattn.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), logits_soft_cap="2"),
            TypeError,
            r"logits_soft_cap must be a positive float or None",
        ),
    ],
)
def test_core_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
