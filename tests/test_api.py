"""`dot_product_attention`: against a NumPy float64 oracle and `jax.nn`, gradients, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

B, T, S, N, K, H = 2, 5, 7, 6, 3, 3  # prime-ish sizes so a swapped axis fails


def numpy_attention(
    q,
    k,
    v,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    q_len=None,
    kv_len=None,
    window=None,
    q_seg=None,
    kv_seg=None,
):
    """Float64 oracle, one loop per (example, head); rows that see nothing are zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h_) if scale is None else scale
    i, j = np.arange(t_)[:, None], np.arange(s_)[None, :]
    out = np.zeros((b_, t_, n_, v.shape[-1]))
    for b in range(b_):
        for n in range(n_):
            kh = n // (n_ // k_)
            logits = scale * q[b, :, n] @ k[b, :, kh].T
            if bias is not None:
                logits = logits + np.broadcast_to(bias, (b_, n_, t_, s_))[b, n]
            visible = np.ones((t_, s_), bool)
            if mask is not None:
                visible &= np.broadcast_to(mask, (b_, n_, t_, s_))[b, n]
            if is_causal:
                visible &= j <= i
            if window is not None:
                visible &= (j >= i - window[0]) & (j <= i + window[1])
            if q_len is not None:
                visible &= i < q_len[b]
            if kv_len is not None:
                visible &= j < kv_len[b]
            if q_seg is not None:
                visible &= q_seg[b][:, None] == kv_seg[b][None, :]
            shift = np.where(visible, logits, -np.inf).max(-1, keepdims=True, initial=-1e300)
            e = np.where(visible, np.exp(np.where(visible, logits - shift, 0.0)), 0.0)
            w = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
            out[b, :, n] = w @ v[b, :, kh]
    return out


def inputs(dtype, kv_heads=K, v_dim=H, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, S, kv_heads, H), dtype)
    v = jax.random.normal(keys[2], (B, S, kv_heads, v_dim), dtype)
    bias = jax.random.normal(keys[3], (B, 1, T, S), dtype)
    mask = jax.random.uniform(keys[4], (1, N, T, S)) < 0.7
    return q, k, v, bias, mask


OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (2, 1)},
    "window_int": {"local_window_size": 1},
    "lengths": {"query_seq_lengths": np.array([3, 5], np.int32), "key_value_seq_lengths": np.array([7, 2], np.int32)},
    "segments": {
        "query_segment_ids": np.array([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]]),
        "key_value_segment_ids": np.array([[0, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 0, 0, 0]]),
    },
    "scale": {"scale": 0.7},
    "combined": {"is_causal": True, "local_window_size": (3, 0), "key_value_seq_lengths": np.array([4, 6], np.int32)},
}


def oracle_kwargs(opts):
    window = opts.get("local_window_size")
    return dict(
        scale=opts.get("scale"),
        is_causal=opts.get("is_causal", False),
        q_len=opts.get("query_seq_lengths"),
        kv_len=opts.get("key_value_seq_lengths"),
        window=(window, window) if isinstance(window, int) else window,
        q_seg=opts.get("query_segment_ids"),
        kv_seg=opts.get("key_value_segment_ids"),
    )


@functools.cache
def jitted(implementation, use_bias, use_mask, **opts):
    def f(q, k, v, bias, mask, arrays):
        return jattn.dot_product_attention(
            q,
            k,
            v,
            bias if use_bias else None,
            mask if use_mask else None,
            implementation=implementation,
            **dict(opts),
            **arrays,
        )

    return jax.jit(f)


def split_options(opts):
    static = {k: v for k, v in opts.items() if not isinstance(v, np.ndarray)}
    arrays = {k: jnp.asarray(v) for k, v in opts.items() if isinstance(v, np.ndarray)}
    return static, arrays


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize(("use_bias", "use_mask"), [(False, False), (True, True)])
def test_reference_matches_numpy_oracle_float64(name, use_bias, use_mask):
    q, k, v, bias, mask = inputs(jnp.float64)
    static, arrays = split_options(OPTIONS[name])
    out = jitted("reference", use_bias, use_mask, **static)(q, k, v, bias, mask, arrays)
    expected = numpy_attention(
        q, k, v, bias if use_bias else None, mask if use_mask else None, **oracle_kwargs(OPTIONS[name])
    )
    np.testing.assert_allclose(out, expected, atol=1e-12)


def visible_rows(opts, mask=None):
    """(batch, q_seq, heads) True where the query sees at least one key (jax.nn differs elsewhere)."""
    ones = np.ones((B, T, N, 1))
    seen = numpy_attention(
        np.zeros((B, T, N, H)), np.zeros((B, S, K, H)), np.ones((B, S, K, 1)), None, mask, **oracle_kwargs(opts)
    )
    return (seen == ones)[..., 0]


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "segments"])
def test_reference_matches_jax_nn_float32_with_gradients(name):
    q, k, v, bias, mask = inputs(jnp.float32)
    static, arrays = split_options(OPTIONS[name])
    ours = jitted("reference", True, True, **static)
    theirs = jitted("xla", True, True, **static)
    rows = jnp.asarray(visible_rows(OPTIONS[name], np.asarray(mask)))[..., None]
    out, vjp = jax.vjp(lambda q, k, v, b: ours(q, k, v, b, mask, arrays), q, k, v, bias)
    ref, ref_vjp = jax.vjp(lambda q, k, v, b: theirs(q, k, v, b, mask, arrays), q, k, v, bias)
    np.testing.assert_allclose(jnp.where(rows, out, 0), jnp.where(rows, ref, 0), atol=2e-6)
    cotangent = jnp.where(rows, jax.random.normal(jax.random.key(9), out.shape, jnp.float32), 0)
    for g, g_ref in zip(vjp(cotangent), ref_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, g_ref, atol=5e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_grouped_query_attention_equals_repeated_kv(kv_heads):
    q, k, v, _, _ = inputs(jnp.float64, kv_heads=kv_heads)
    f = jax.jit(jattn.dot_product_attention)
    repeat = N // kv_heads
    expected = f(q, jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2))
    np.testing.assert_allclose(f(q, k, v), expected, atol=1e-12)


def test_value_dim_may_differ_and_unbatched_inputs():
    q, k, v, bias, mask = inputs(jnp.float64, v_dim=2)
    f = jax.jit(lambda q, k, v, b, m: jattn.dot_product_attention(q, k, v, b, m, is_causal=True))
    batched = f(q, k, v, bias, mask)
    assert batched.shape == (B, T, N, 2)
    np.testing.assert_allclose(f(q[1], k[1], v[1], bias[1], mask[0]), batched[1], atol=1e-12)
    np.testing.assert_allclose(batched, numpy_attention(q, k, v, bias, mask, is_causal=True), atol=1e-12)


def test_vmap_over_an_extra_axis():
    q, k, v, _, _ = inputs(jnp.float64)
    f = jax.jit(jax.vmap(functools.partial(jattn.dot_product_attention, is_causal=True)))
    out = f(q[:, None], k[:, None], v[:, None])
    np.testing.assert_allclose(out[:, 0], jattn.dot_product_attention(q, k, v, is_causal=True), atol=1e-12)


def test_return_residual_is_log_sum_exp():
    q, k, v, _, _ = inputs(jnp.float64)
    f = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, return_residual=True))
    _, lse = f(q, k, v)
    kk = jnp.repeat(k, N // K, axis=2)
    logits = jnp.einsum("btnh,bsnh->btns", q, kk) / np.sqrt(H)
    np.testing.assert_allclose(lse, jax.scipy.special.logsumexp(logits, axis=-1), atol=1e-12)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v, _, _ = inputs(jnp.float32)
    lengths = jnp.array([0, 3], jnp.int32)
    f = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths))
    out, vjp = jax.vjp(f, q, k, v)
    np.testing.assert_array_equal(out[0], 0.0)
    grads = vjp(jnp.ones_like(out))
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)


def test_logits_soft_cap_matches_oracle():
    q, k, v, _, _ = inputs(jnp.float64)
    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, logits_soft_cap=0.5, scale=1.0))(q, k, v)
    kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    logits = 0.5 * jnp.tanh(jnp.einsum("btnh,bsnh->bnts", q, kk) / 0.5)
    expected = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), vv)
    np.testing.assert_allclose(out, expected, atol=1e-12)


X = jnp.ones((2, 5, 6, 3))  # float64: the tests run with x64 enabled
KV = jnp.ones((2, 7, 3, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"query": jnp.ones((5, 3))}, ValueError, r"query must have rank 3 or more .*got rank 2 with shape \(5, 3\)"),
        (
            {"key": jnp.ones((7, 3, 3))},
            ValueError,
            r"key must have rank 4 \(batch, kv_seq, kv_heads, dim\) like query; got rank 3",
        ),
        (
            {"key": jnp.ones((2, 7, 3, 4))},
            ValueError,
            r"key must have shape \(batch, kv_seq, kv_heads, dim\)=\(2, 7, 3, 3\); got \(2, 7, 3, 4\)",
        ),
        (
            {"key": jnp.ones((2, 7, 4, 3)), "value": jnp.ones((2, 7, 4, 3))},
            ValueError,
            r"multiple of key/value heads \(kv_heads\); got heads=6, kv_heads=4",
        ),
        (
            {"value": jnp.ones((2, 6, 3, 3))},
            ValueError,
            r"value must have shape \(batch, kv_seq, kv_heads, v_dim\)=\(2, 7, 3, 3\); got \(2, 6, 3, 3\)",
        ),
        (
            {"query": jnp.ones((3, 5, 6, 3))},
            ValueError,
            r"key must have shape \(batch, kv_seq, kv_heads, dim\)=\(3, 7, 3, 3\); got \(2, 7, 3, 3\)",
        ),
        ({"query": jnp.ones((2, 5, 6, 3), int)}, TypeError, r"query must have a floating-point dtype; got int"),
        (
            {"value": jnp.ones((2, 7, 3, 3), jnp.bfloat16)},
            TypeError,
            r"query, key, value must share one dtype; got query=float64, key=float64, value=bfloat16",
        ),
        (
            {"mask": jnp.ones((2, 6, 5, 6), bool)},
            ValueError,
            r"mask must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to \(2, 6, 5, 7\); got \(2, 6, 5, 6\)",
        ),
        (
            {"mask": jnp.ones((4, 7), bool)},
            ValueError,
            r"mask must have shape \(batch, heads, q_seq, kv_seq\) \(missing leading axes count as 1\) "
            r"broadcastable to \(2, 6, 5, 7\); got \(4, 7\)",
        ),
        ({"mask": jnp.ones((2, 6, 5, 7))}, TypeError, r"mask must be boolean \(True = attend\); got dtype float64"),
        (
            {"bias": jnp.ones((2, 3, 5, 7))},
            ValueError,
            r"bias must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to \(2, 6, 5, 7\); got \(2, 3, 5, 7\)",
        ),
        ({"bias": jnp.ones((2, 6, 5, 7), int)}, TypeError, r"bias must have a floating-point dtype; got int"),
        (
            {"implementation": "flash"},
            ValueError,
            r"implementation must be one of \(None, 'reference', .*\); got 'flash'",
        ),
        (
            {"local_window_size": -1},
            ValueError,
            r"local_window_size must be a non-negative int or a \(left, right\) tuple of them; got -1",
        ),
        ({"local_window_size": (1, 2, 3)}, ValueError, r"local_window_size must be .*; got \(1, 2, 3\)"),
        (
            {"query_seq_lengths": jnp.ones((3,), jnp.int32)},
            ValueError,
            r"query_seq_lengths must have shape \(batch,\)=\(2,\); got \(3,\)",
        ),
        (
            {"key_value_seq_lengths": jnp.ones((2,))},
            TypeError,
            r"key_value_seq_lengths must have an integer dtype; got float",
        ),
        (
            {"query_segment_ids": jnp.ones((2, 5), int)},
            ValueError,
            r"query_segment_ids and key_value_segment_ids must be given together",
        ),
        (
            {"query_segment_ids": jnp.ones((2, 4), int), "key_value_segment_ids": jnp.ones((2, 7), int)},
            ValueError,
            r"query_segment_ids must have shape \(batch, q_seq\)=\(2, 5\); got \(2, 4\)",
        ),
        (
            {"key_value_segment_ids": jnp.ones((2, 7)), "query_segment_ids": jnp.ones((2, 5), int)},
            TypeError,
            r"key_value_segment_ids must have an integer dtype",
        ),
        ({"is_causal": 1}, TypeError, r"is_causal must be a Python bool; got int"),
        ({"scale": jnp.float32(2)}, TypeError, r"scale must be a Python float or None"),
        ({"logits_soft_cap": -1.0}, ValueError, r"logits_soft_cap must be a positive finite float or None; got -1.0"),
        (
            {"implementation": "xla", "logits_soft_cap": 2.0},
            ValueError,
            r"implementation='xla' .* does not support logits_soft_cap",
        ),
        (
            {
                "implementation": "xla",
                "query_segment_ids": jnp.ones((2, 5), int),
                "key_value_segment_ids": jnp.ones((2, 7), int),
            },
            ValueError,
            r"does not support query_segment_ids",
        ),
        (
            {"implementation": "xla", "value": jnp.ones((2, 7, 3, 2))},
            ValueError,
            r"does not support v_dim != dim \(2 != 3\)",
        ),
    ],
)
def test_errors_name_argument_expected_and_actual(kwargs, error, match):
    args = {"query": X, "key": KV, "value": KV, **kwargs}
    with pytest.raises(error, match=match):
        jattn.dot_product_attention(**args)


def test_unbatched_shape_errors():
    with pytest.raises(
        ValueError, match=r"mask must have shape \(heads, q_seq, kv_seq\) broadcastable to \(6, 5, 7\); got \(6, 5, 8\)"
    ):
        jattn.dot_product_attention(X[0], KV[0], KV[0], mask=jnp.ones((6, 5, 8), bool))
    with pytest.raises(ValueError, match=r"key_value_segment_ids must have shape \(kv_seq,\)=\(7,\); got \(5,\)"):
        jattn.dot_product_attention(
            X[0], KV[0], KV[0], query_segment_ids=jnp.ones(5, int), key_value_segment_ids=jnp.ones(5, int)
        )
