"""jattn.nnx.flax_attention_fn against Flax's own attention: the functions, the modules, dropout, sowing, errors.

Flax's ``nnx.dot_product_attention`` (and Linen's) is the oracle: its
materialized path, which is exact in float64 (``flax_exact``); its fast path
is ``jax.nn.dot_product_attention``, whose softmax runs in float32 even for
float64 inputs, so comparisons with it use a float32 tolerance. Flax relies on
standard dtype promotion and implicit rank promotion (a ``(q_seq, kv_seq)``
bias added to 4-D logits), so every Flax call runs inside those rules. Inputs
are float64 unless a test is about dtypes; every query row sees at least one
key except in the one test of the documented difference (a row that sees
nothing).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from jattn import nnx as jnnx

F16, F32, F64 = jnp.float16, jnp.float32, jnp.float64
adapter = jnnx.flax_attention_fn


def flax_rules():
    """Flax's own code assumes JAX's default promotion rules (jattn's tests run strict)."""
    return jax.numpy_dtype_promotion("standard")


def flax_dpa(*args, **kwargs):
    with flax_rules(), jax.numpy_rank_promotion("allow"):
        return nnx.dot_product_attention(*args, **kwargs)


def flax_exact(*args, **kwargs):
    """Flax's materialized path, exact in float64 (its fast path, jax.nn, runs softmax in float32 whatever the dtype).

    A dropout rate with ``deterministic=True`` routes Flax there without dropping anything.
    """
    return flax_dpa(*args, dropout_rate=0.5, deterministic=True, **kwargs)


def normal(seed, shape, dtype=F64):
    # NumPy draws: a jax.random draw compiles one program per shape (about a second each on CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv(batch=(2,), q_seq=5, kv_seq=7, heads=3, kv_heads=3, dim=4, v_dim=4, dtype=F64):
    return (
        normal(0, (*batch, q_seq, heads, dim), dtype),
        normal(1, (*batch, kv_seq, kv_heads, dim), dtype),
        normal(2, (*batch, kv_seq, kv_heads, v_dim), dtype),
    )


def random_mask(shape, seed=3):
    """Random True/False with key 0 always visible, so no row is empty."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


def close(actual, desired, tol=1e-12):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64), atol=tol, rtol=tol)


class Holder(nnx.Module):
    """A module to sow into."""


def both(options, *arrays, **static):
    """(adapter, Flax's exact path) on the same arguments, in one compiled function."""

    def run(*arrays):
        return adapter(*arrays, **options, **static), flax_exact(*arrays, **static)

    return jax.jit(run)(*arrays)


# ------------------------------------------------------------------ the signature


def test_signature_is_flaxs_then_jattn_options_keyword_only():
    ours = inspect.signature(adapter).parameters
    theirs = inspect.signature(nnx.dot_product_attention).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert [(p.kind, p.default) for p in list(ours.values())[: len(theirs)]] == [
        (p.kind, p.default) for p in theirs.values()
    ]
    extra = list(ours.values())[len(theirs) :]
    assert [p.name for p in extra] == ["implementation", "block_q", "block_kv"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


# ------------------------------------------------------------------ outputs without dropout


def mask_bias_case(name):
    q, k, v = qkv()
    b, t, s, h = 2, 5, 7, 3
    return {
        "bool_mask": ((q, k, v, None, random_mask((b, 1, t, s))), {}),
        "float_mask": ((q, k, v, None, random_mask((b, h, t, s)).astype(F64) * 2.5), {}),
        "rank2_mask": ((q, k, v, None, random_mask((t, s))), {}),
        "bias_and_mask": ((q, k, v, normal(4, (1, h, t, s)), random_mask((b, 1, 1, s))), {}),
        "causal_and_mask": ((q, k, v, None, random_mask((b, h, t, s))), {"is_causal": True}),
        "batch_axes_2x3_mqa": (
            (*qkv(batch=(2, 3), kv_heads=1), normal(4, (2, 3, h, t, s)), random_mask((2, 3, 1, t, s))),
            {"is_causal": True},
        ),
        "unbatched": ((*qkv(batch=()), None, random_mask((h, t, s))), {}),
        "gqa": ((*qkv(heads=6, kv_heads=3), None, random_mask((b, 6, t, s))), {"is_causal": True}),
        "v_dim_6": (qkv(v_dim=6), {"precision": jax.lax.Precision.HIGHEST}),  # precision: accepted, unused
    }[name]


CASES = [
    "bool_mask",
    "float_mask",
    "rank2_mask",
    "bias_and_mask",
    "causal_and_mask",
    "batch_axes_2x3_mqa",
    "unbatched",
    "gqa",
    "v_dim_6",
]


@pytest.mark.parametrize("name", CASES)
def test_fast_path_matches_flax(name):
    arrays, static = mask_bias_case(name)
    ours, theirs = both({}, *arrays, **static)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == F64
    close(ours, theirs)


def test_flaxs_default_path_agrees_to_float32_accuracy():
    """Without dropout or sowing Flax calls jax.nn, whose softmax runs in float32 even for float64 inputs."""
    arrays, static = mask_bias_case("bias_and_mask")
    ours = jax.jit(functools.partial(adapter, **static))(*arrays)
    theirs = jax.jit(functools.partial(flax_dpa, **static))(*arrays)
    close(ours, theirs, tol=1e-6)
    assert not np.allclose(ours, theirs, atol=1e-12, rtol=1e-12)  # jattn's float64 softmax is float64


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])  # auto picks "reference" at these sizes
def test_every_implementation_matches_flax(implementation):
    arrays, static = mask_bias_case("batch_axes_2x3_mqa")
    options = dict(implementation=implementation, block_q=2, block_kv=3)  # blocks that do not divide 5 or 7
    ours, theirs = both(options, *arrays, **static)
    close(ours, theirs, tol=1e-6 if implementation == "xla" else 1e-12)  # "xla" is jax.nn: float32 softmax


@pytest.mark.parametrize(
    ("dtypes", "dtype", "expected"),
    [((F32, F16, F16), None, F32), ((F32, F32, F32), F16, F16)],
)
def test_dtype_promotion_as_flax(dtypes, dtype, expected):
    q, k, v = (x.astype(t) for x, t in zip(qkv(), dtypes, strict=True))
    mask = random_mask((2, 1, 5, 7))
    with flax_rules():
        ours, theirs = both({}, q, k, v, None, mask, dtype=dtype, is_causal=True)
    assert ours.dtype == theirs.dtype == expected
    close(ours, theirs, tol=2e-3 if expected == F16 else 1e-5)


def test_a_row_that_sees_no_key_gives_zeros_where_flax_gives_the_mean_of_v():
    """The one documented difference (jattn.dot_product_attention's rule), on both paths."""
    q, k, v = qkv()
    mask = np.array(random_mask((2, 1, 5, 7)))
    mask[1, :, 3, :] = False  # example 1, query 3: no key
    ours, theirs = both({}, q, k, v, None, mask)
    assert not np.any(ours[1, 3]) and np.allclose(theirs[1, 3], np.mean(v[1], axis=0), atol=1e-12, rtol=0)
    seen = np.ones(ours.shape, bool)
    seen[1, 3] = False
    close(ours[seen], theirs[seen])

    def sown(fn):
        def run(m):
            return fn(q, k, v, mask=mask, module=m)

        return nnx.jit(nnx.capture(run, nnx.Intermediate))(Holder())

    (_, ours_state), (_, theirs_state) = sown(adapter), sown(flax_dpa)
    ours_w, theirs_w = ours_state["attention_weights"][0], theirs_state["attention_weights"][0]
    assert not np.any(ours_w[1, :, 3]) and np.allclose(theirs_w[1, :, 3], 1 / 7, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ dropout


# Flax's keep mask: (1, ..., 1, q_seq, kv_seq) when broadcast, else (*batch, heads, q_seq, kv_seq). Drawing
# over an N-D shape costs XLA:CPU seconds of compilation, so only one case draws the full mask.
DROPOUT_CASES = [
    ("batch", dict(batch=(2,)), True, jax.random.key),
    ("batch_axes_2x3", dict(batch=(2, 3)), True, jax.random.key),
    ("unbatched_gqa_legacy_key", dict(batch=(), heads=6, kv_heads=3), True, jax.random.PRNGKey),
    ("batch_axes_2x3_mqa", dict(batch=(2, 3), q_seq=3, kv_seq=5, heads=2, kv_heads=1), False, jax.random.key),
]


@pytest.mark.parametrize(
    ("shapes", "broadcast_dropout", "make_key"),
    [case[1:] for case in DROPOUT_CASES],
    ids=[f"{name}-{'broadcast' if b else 'full'}" for name, _, b, _ in DROPOUT_CASES],
)
def test_dropout_matches_flax_given_the_same_key(shapes, broadcast_dropout, make_key):
    q, k, _ = qkv(**shapes)
    *batch, kv_seq, kv_heads, _ = k.shape
    # One-hot values: the output rows are the dropped-out weights themselves, zeros where a weight was dropped.
    v = jnp.broadcast_to(jnp.eye(kv_seq, dtype=F64)[:, None, :], (*batch, kv_seq, kv_heads, kv_seq))
    bias = normal(4, (q.shape[-2], q.shape[-3], kv_seq))  # (heads, q_seq, kv_seq)
    static = dict(dropout_rate=0.4, broadcast_dropout=broadcast_dropout, is_causal=True)

    def run(rng):
        ours = adapter(q, k, v, bias, dropout_rng=rng, **static)
        return ours, flax_dpa(q, k, v, bias, dropout_rng=rng, **static), adapter(q, k, v, bias, is_causal=True)

    ours, theirs, undropped = jax.jit(run)(make_key(11))
    np.testing.assert_array_equal(ours == 0, theirs == 0)  # the same weights dropped, exactly
    close(ours, theirs)
    assert np.sum(ours == 0) > np.sum(undropped == 0)  # and some were dropped


def test_dropout_is_off_when_deterministic_or_rate_zero():
    q, k, v = qkv()

    def run(rng):
        return (
            adapter(q, k, v),
            adapter(q, k, v, dropout_rng=rng, dropout_rate=0.5, deterministic=True),
            adapter(q, k, v, dropout_rng=rng),  # rate 0
            adapter(q, k, v, dropout_rate=0.5, deterministic=True),  # no key needed
        )

    plain, *off = jax.jit(run)(jax.random.key(0))
    for out in off:
        close(out, plain)


# ------------------------------------------------------------------ sowing


def test_nnx_sows_the_weights_before_dropout_as_flax_does():
    q, k, v = qkv(batch=(2, 3), heads=6, kv_heads=3)
    rng = jax.random.key(7)

    def capture(fn):
        def run(m):
            return fn(q, k, v, dropout_rng=rng, dropout_rate=0.3, is_causal=True, module=m)

        return nnx.jit(nnx.capture(run, nnx.Intermediate))(Holder())

    (ours, ours_state), (theirs, theirs_state) = capture(adapter), capture(flax_dpa)
    close(ours, theirs)
    (ours_w,), (theirs_w,) = ours_state["attention_weights"], theirs_state["attention_weights"]
    assert ours_w.shape == (2, 3, 6, 5, 7)
    close(ours_w, theirs_w)
    close(ours_w.sum(-1), np.ones((2, 3, 6, 5)))  # before dropout: rows sum to one


class LinenAttention(linen.Module):
    attention_fn: object

    @linen.compact
    def __call__(self, q, k, v, rng):
        return self.attention_fn(q, k, v, dropout_rng=rng, dropout_rate=0.3, module=self)


def test_linen_sows_into_intermediates_as_flax_does():
    q, k, v = qkv()
    rng = jax.random.key(8)

    def run(fn):
        with flax_rules(), jax.numpy_rank_promotion("allow"):
            return LinenAttention(fn).apply({}, q, k, v, rng, mutable=["intermediates"])

    (ours, ours_vars), (theirs, theirs_vars) = jax.jit(lambda: (run(adapter), run(linen.dot_product_attention)))()
    close(ours, theirs)
    (ours_w,), (theirs_w,) = (c["intermediates"]["attention_weights"] for c in (ours_vars, theirs_vars))
    assert ours_w.shape == (2, 3, 5, 7)
    close(ours_w, theirs_w)


# ------------------------------------------------------------------ through Flax's modules


def numpy_init(key, shape, dtype=F64):
    """Parameters from NumPy, seeded by the key: Flax's jax.random initializers compile one program per shape."""
    seed = np.asarray(jax.random.key_data(key)).tolist()
    return jnp.asarray(0.4 * np.random.default_rng(seed).standard_normal(shape), dtype)


INIT = dict(kernel_init=numpy_init, bias_init=numpy_init)


def nnx_pair(**kwargs):
    """The same nnx.MultiHeadAttention (same parameters and dropout stream) with jattn and with Flax inside."""

    def make(**attention_fn):
        return nnx.MultiHeadAttention(
            num_heads=3,
            in_features=6,
            qkv_features=9,
            param_dtype=F64,
            rngs=nnx.Rngs(0, dropout=1),
            **INIT,
            **attention_fn,
            **kwargs,
        )

    return make(attention_fn=adapter), make()


def module_call(**kwargs):
    """``(module, *args) -> (module(*args, **kwargs), what it sowed)`` under ``nnx.jit``; reuse it to compile once."""

    def run(m, *args):
        with flax_rules():
            return m(*args, **kwargs)

    return nnx.jit(nnx.capture(run, nnx.Intermediate))


def test_nnx_multi_head_attention_end_to_end():
    ours, theirs = nnx_pair(dropout_rate=0.4, decode=False)
    x, y = normal(5, (2, 5, 6)), normal(6, (2, 7, 6))
    mask = random_mask((2, 1, 5, 7))
    calls = module_call(mask=mask, deterministic=True), module_call(mask=mask, deterministic=False, sow_weights=True)
    (out, state), (ref, ref_state) = (calls[0](m, x, y) for m in (ours, theirs))
    assert not state and not ref_state  # nothing sown unless asked
    close(out, ref)
    (out, state), (ref, ref_state) = (calls[1](m, x, y) for m in (ours, theirs))  # dropout from the modules' rngs
    close(out, ref)
    close(state["attention_weights"][0], ref_state["attention_weights"][0])


def test_nnx_multi_head_attention_decodes_with_flaxs_cache():
    ours, theirs = nnx_pair(num_kv_heads=1, decode=False)
    x = normal(5, (2, 5, 6))
    full, _ = module_call(is_causal=True)(ours, x)
    for m in (ours, theirs):
        m.init_cache(x.shape, dtype=F64)
    decode = module_call(decode=True)
    for i in range(5):
        (step, _), (ref, _) = (decode(m, x[:, i : i + 1]) for m in (ours, theirs))
        close(step, ref, tol=1e-6)  # Flax: jax.nn, float32 softmax
        close(step, full[:, i : i + 1])  # the cached decode is causal attention, one token at a time


def linen_variables(layer, x):
    """Parameters from NumPy and an empty cache, in the structure ``layer.init`` gives (traced, not compiled)."""
    with flax_rules():
        shapes = jax.eval_shape(functools.partial(layer.init, deterministic=True), jax.random.key(0), x)
    leaves, tree = jax.tree.flatten(shapes["params"])
    params = [
        jnp.asarray(0.4 * np.random.default_rng(i).standard_normal(s.shape), s.dtype) for i, s in enumerate(leaves)
    ]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get("cache", {}))
    return {"params": jax.tree.unflatten(tree, params), **({"cache": cache} if cache else {})}


@pytest.mark.parametrize("decode", [False, True])
def test_linen_multi_head_dot_product_attention_end_to_end(decode):
    options = dict(num_heads=3, qkv_features=9, param_dtype=F64, dropout_rate=0.4, decode=decode)
    ours_layer = linen.MultiHeadDotProductAttention(**options, attention_fn=adapter)
    theirs_layer = linen.MultiHeadDotProductAttention(**options)
    x = normal(5, (2, 5, 6))
    variables = linen_variables(theirs_layer, x)

    def run(layer, variables, x):
        mutable = ["intermediates", "cache"] if decode else ["intermediates"]
        with flax_rules(), jax.numpy_rank_promotion("allow"):
            return layer.apply(
                variables,
                x,
                rngs={"dropout": jax.random.key(3)},
                deterministic=False,
                sow_weights=True,
                mutable=mutable,
            )

    ours_run, theirs_run = (jax.jit(functools.partial(run, layer)) for layer in (ours_layer, theirs_layer))
    ours_vars, theirs_vars = variables, variables
    for i in range(5 if decode else 1):  # decode: one token at a time through Linen's cache
        xi = x[:, i : i + 1] if decode else x
        (ours, ours_new), (theirs, theirs_new) = ours_run(ours_vars, xi), theirs_run(theirs_vars, xi)
        close(ours, theirs)
        ours_w = ours_new["intermediates"]["attention_weights"][0]
        close(ours_w, theirs_new["intermediates"]["attention_weights"][0])
        if decode:
            ours_vars = {**ours_vars, "cache": ours_new["cache"]}
            theirs_vars = {**theirs_vars, "cache": theirs_new["cache"]}


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_flax(dropout):
    q, k, v = qkv(heads=6, kv_heads=3)
    bias, mask = normal(4, (2, 6, 5, 7)), random_mask((2, 1, 5, 7))
    # Without dropout: deterministic=True with a rate, so that Flax runs its exact float64 path too.
    static = dict(dropout_rng=jax.random.key(9), dropout_rate=0.4, deterministic=not dropout, is_causal=True)
    cotangent = normal(10, (2, 5, 6, 4))

    def grads(fn):
        def loss_vjp(q, k, v, bias):
            out, vjp = jax.vjp(lambda q, k, v, bias: fn(q, k, v, bias, mask, **static), q, k, v, bias)
            return out, vjp(cotangent)

        return jax.jit(loss_vjp)(q, k, v, bias)

    (ours, ours_grads), (theirs, theirs_grads) = grads(adapter), grads(flax_dpa)
    close(ours, theirs)
    for name, g, ref in zip("qkvb", ours_grads, theirs_grads, strict=True):
        assert np.any(g), name
        close(g, ref, tol=1e-11)


# ------------------------------------------------------------------ errors


Q, K, V = qkv(dtype=F32)
ERRORS = [
    (dict(broadcast_dropout=1), TypeError, r"broadcast_dropout must be a Python bool; got int"),
    (dict(deterministic=None), TypeError, r"deterministic must be a Python bool; got NoneType"),
    (dict(is_causal="yes"), TypeError, r"is_causal must be a Python bool; got str"),
    (dict(dropout_rate=1.0), ValueError, r"dropout_rate must be a float in \[0, 1\); got 1.0"),
    (dict(dropout_rate=-0.1), ValueError, r"dropout_rate must be a float in \[0, 1\); got -0.1"),
    (dict(dropout_rate=True), ValueError, r"dropout_rate must be a float in \[0, 1\); got True"),
    (
        dict(dropout_rate=0.5),
        ValueError,
        r"dropout_rng must be a PRNG key when dropout is on \(dropout_rate=0.5, deterministic=False\); got None",
    ),
    (dict(implementation="flash"), ValueError, r"implementation must be one of \(None, 'reference', .*got 'flash'"),
    (dict(block_q=0), ValueError, r"block_q must be a positive int or None; got 0"),
    (dict(block_kv=2.0), ValueError, r"block_kv must be a positive int or None; got 2.0"),
    (dict(module=object()), TypeError, r"module must be a flax.nnx.Module, a flax.linen.Module or None; got object"),
]


@pytest.mark.parametrize(("options", "error", "match"), ERRORS, ids=[m[:40] for *_, m in ERRORS])
def test_errors_name_the_argument_expected_and_actual(options, error, match):
    with pytest.raises(error, match=match):
        jax.jit(functools.partial(adapter, **options))(Q, K, V)


@pytest.mark.parametrize("module", [None, Holder()])
def test_jattns_own_errors_come_through_on_both_paths(module):
    run = functools.partial(adapter, module=module)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to"):
        nnx.jit(run)(Q, K, V, None, jnp.ones((2, 1, 5, 6), bool))
    with pytest.raises(TypeError, match=r"bias must have a floating-point dtype; got int32"):
        nnx.jit(run)(Q, K, V, jnp.ones((5, 7), jnp.int32))
