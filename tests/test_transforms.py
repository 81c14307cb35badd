"""Transforms and compilation: jit, vmap, grad, value_and_grad, checkpoint, scan, sharded jit, caching, determinism."""

from __future__ import annotations

import functools
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import cases
from conformance.cases import DELEGATING
from conformance.devices import run_on_cpu_devices

import jattn

IMPLEMENTATIONS = cases.implementation_params()
F32 = jnp.float32
RNG = np.random.default_rng(0)
E, B, T, S, N, KH, D = 3, 2, 5, 7, 4, 2, 8  # extra vmapped axis, batch, q_seq, kv_seq, heads, kv_heads, dim


def normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), F32)


Q, K, V = normal(B, T, N, D), normal(B, S, KH, D), normal(B, S, KH, D)
BIAS = normal(1, N, T, S)


def attention(implementation, **options):
    return functools.partial(jattn.dot_product_attention, is_causal=True, implementation=implementation, **options)


def test_suite_runs_with_strict_promotion_and_x64():
    assert jax.config.jax_enable_x64
    assert jax.config.jax_numpy_rank_promotion == "raise"
    assert jax.config.jax_numpy_dtype_promotion == "strict"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_over_an_extra_axis(implementation):
    q, k, v = normal(E, B, T, N, D), normal(E, B, S, KH, D), normal(E, B, S, KH, D)
    mask = jnp.asarray(RNG.random((E, B, 1, T, S)) < 0.8)
    mask = mask.at[..., 0].set(True)  # every row sees a key: jax.nn and jattn agree everywhere
    f = attention(implementation)
    batched = jax.jit(jax.vmap(lambda q, k, v, m: f(q, k, v, BIAS, m)))(q, k, v, mask)
    one_by_one = jnp.stack([jax.jit(f)(q[e], k[e], v[e], BIAS, mask[e]) for e in range(E)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    shared_kv = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(q, K, V)
    np.testing.assert_allclose(shared_kv[1], jax.jit(f)(q[1], K, V), atol=1e-6)


def loss_fn(implementation):
    f = attention(implementation)

    def loss(q, k, v, bias):
        return jnp.sum(f(q, k, v, bias) ** 2)

    return loss


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grad_and_value_and_grad_agree(implementation):
    loss = loss_fn(implementation)
    args = (Q, K, V, BIAS)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(value, jax.jit(loss)(*args), rtol=1e-6)
    for g, g2, x in zip(grads, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args), args, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_allclose(g, g2, rtol=1e-6, atol=1e-6)
        assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_checkpoint_gives_the_same_gradients(implementation):
    loss = loss_fn(implementation)
    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(Q, K, V, BIAS)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3)))(Q, K, V, BIAS)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_scan_over_layers(implementation):
    """A 3-layer residual attention stack: lax.scan and a Python loop agree, forward and backward."""
    f = attention(implementation)
    layers = 3
    weights = 0.3 * normal(layers, 3, D, D)  # per layer: W_q, W_k, W_v
    x0 = normal(B, T, N, D)

    def layer(x, w):
        q, k, v = (jnp.einsum("btnd,de->btne", x, w[i]) for i in range(3))
        return x + f(q, k, v), None

    def by_scan(w, x):
        return jnp.sum(jax.lax.scan(layer, x, w)[0] ** 2)

    def by_loop(w, x):
        for i in range(layers):
            x = layer(x, w[i])[0]
        return jnp.sum(x**2)

    scan_value, scan_grad = jax.jit(jax.value_and_grad(by_scan))(weights, x0)
    loop_value, loop_grad = jax.jit(jax.value_and_grad(by_loop))(weights, x0)
    np.testing.assert_allclose(scan_value, loop_value, rtol=1e-5)
    np.testing.assert_allclose(scan_grad, loop_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_same_shapes_compile_once_and_results_are_bitwise_repeatable(implementation):
    f = jax.jit(attention(implementation))
    first = f(Q, K, V, BIAS)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        f(*(jnp.asarray(rng.standard_normal(x.shape), F32) for x in (Q, K, V, BIAS)))
    assert f._cache_size() == 1, "same shapes and dtypes must not recompile"
    np.testing.assert_array_equal(f(Q, K, V, BIAS), first)
    np.testing.assert_array_equal(f(Q, K, V, BIAS), first)
    f(Q[:, :3], K, V, BIAS[:, :, :3])
    assert f._cache_size() == 2, "a new q_seq compiles once more"

    grad = jax.jit(jax.grad(loss_fn(implementation), argnums=(0, 1, 2)))
    g1, g2 = grad(Q, K, V, BIAS), grad(Q, K, V, BIAS)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert grad._cache_size() == 1


SHARDED_SCRIPT = textwrap.dedent(
    """
    import contextlib, json, sys, traceback
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jattn

    implementations, delegating = json.loads(sys.argv[1])
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 5, 4, 8)), jnp.float32)   # (batch, q_seq, heads, dim)
    k = jnp.asarray(rng.standard_normal((4, 7, 2, 8)), jnp.float32)   # (batch, kv_seq, kv_heads, dim)
    v = jnp.asarray(rng.standard_normal((4, 7, 2, 8)), jnp.float32)
    lengths = jnp.asarray([7, 3, 5, 1], jnp.int32)

    def check(impl, mesh, with_grads):
        def loss(q, k, v, n):
            out = jattn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=n, implementation=impl)
            return out, jnp.sum(out ** 2)
        f = jax.jit(loss)
        g = jax.jit(jax.grad(lambda *a: loss(*a)[1], argnums=(0, 1, 2)))
        # The expected values come from the same call under standard promotion.
        promotion = jax.numpy_dtype_promotion("standard") if impl in delegating else contextlib.nullcontext()
        with promotion:
            expected = f(q, k, v, lengths)[0]
            expected_grads = g(q, k, v, lengths) if with_grads else None
            heads = NamedSharding(mesh, P("data", None, "model", None))
            args = (jax.device_put(q, heads), jax.device_put(k, heads), jax.device_put(v, heads),
                    jax.device_put(lengths, NamedSharding(mesh, P("data"))))
            out, grads = f(*args)[0], (g(*args) if with_grads else expected_grads)
        assert len(out.sharding.device_set) == 4, out.sharding
        np.testing.assert_allclose(out, expected, atol=1e-6)
        for a, b in zip(grads, expected_grads) if with_grads else ():
            assert len(a.sharding.device_set) == 4, a.sharding
            np.testing.assert_allclose(a, b, atol=1e-5)

    results = {}
    for mode, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))
        for impl in implementations:
            try:
                check(impl, mesh, with_grads=True)
                results[f"{mode}-{impl}"] = "ok"
            except Exception as e:
                results[f"{mode}-{impl}"] = "".join(traceback.format_exception_only(e))[-2000:]

    # Explicit axes, blockwise: layouts the kernel cannot split as they come
    # (heads not divisible, a sharded sequence, bias and segment ids).
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    layouts = {
        "kv-heads-1": (1, P("data", None, "model", None), P("data", None, None, None), None, False),
        "sequence": (2, P(None, "data", None, None), P(None, None, None, None), None, False),
        "bias-swapped-axes": (2, P("model", None, "data", None), P("model", None, "data", None), (1, 4, 6, 10), False),
        "bias-segments": (4, P("data", None, "model", None), P("data", None, "model", None), (4, 1, 6, 10), True),
        "two-axis-batch": (2, *(P(("data", "model"), None, None, None),) * 2, None, False),
        "mods-and-sinks": (2, P("data", None, "model", None), P("data", None, "model", None), None, False),
    }
    for name, (kv_heads, q_spec, kv_spec, bias_shape, with_segments) in layouts.items():
        q = jnp.asarray(rng.standard_normal((4, 6, 4, 8)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((4, 10, kv_heads, 8)), jnp.float32) for _ in range(2))
        bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
        ids = [jnp.asarray(rng.integers(0, 2, (4, n)), jnp.int32) for n in (6, 10)] if with_segments else [None, None]
        n = jnp.asarray([10, 3, 5, 1], jnp.int32)

        mods = {}
        if name == "mods-and-sinks":  # they index by the global example and head
            slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
            docs = jnp.asarray(rng.integers(0, 2, (4, 10)), jnp.int32)
            mods = dict(score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i).astype(s.dtype) + b.astype(s.dtype),
                        mask_mod=lambda b, h, i, j: (docs[b, i] == docs[b, j]) | (h == 0), sinks=slopes)

        def loss(q, k, v, bias, n):
            out = jattn.dot_product_attention(
                q, k, v, bias=bias, is_causal=True, key_value_seq_lengths=n, query_segment_ids=ids[0],
                key_value_segment_ids=ids[1], implementation="blockwise", block_q=4, block_kv=4, **mods)
            return jnp.sum(out ** 2), out
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3), has_aux=True))
        put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))
        try:
            (_, expected), expected_grads = g(q, k, v, bias, n)
            (_, out), grads = g(put(q, q_spec), put(k, kv_spec), put(v, kv_spec), put(bias, P()), put(n, P(q_spec[0])))
            assert out.sharding.spec == q_spec, (out.sharding.spec, q_spec)
            np.testing.assert_allclose(out, expected, atol=1e-6)
            for a, b in zip(grads, expected_grads, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5)
            results[f"layout-{name}"] = "ok"
        except Exception as e:
            results[f"layout-{name}"] = "".join(traceback.format_exception_only(e))[-2000:]
    print("RESULTS", json.dumps(results))
    """
)
EXPLICIT_LAYOUTS = ["kv-heads-1", "sequence", "bias-swapped-axes", "bias-segments", "two-axis-batch", "mods-and-sinks"]
SHARDABLE = [p.values[0] for p in IMPLEMENTATIONS if p.values[0] != "cudnn"]


@pytest.fixture(scope="session")  # once per worker, however pytest-xdist orders the tests
def sharded_results():
    """Runs every implementation on a 2x2 CPU mesh (auto and explicit axes) in one subprocess."""
    return run_on_cpu_devices(SHARDED_SCRIPT, 4, json.dumps([SHARDABLE, sorted(DELEGATING)]))


# One subprocess for all of them: under pytest-xdist the group keeps them on one worker.
@pytest.mark.xdist_group("four_cpu_devices")
@pytest.mark.parametrize("key", [f"{mode}-{impl}" for mode in ("auto", "explicit") for impl in SHARDABLE])
def test_jit_with_inputs_sharded_over_four_cpu_devices(sharded_results, key):
    """Batch over 'data', heads over 'model': same outputs and gradients as on one device, sharded."""
    assert sharded_results[key] == "ok", sharded_results[key]


@pytest.mark.xdist_group("four_cpu_devices")
@pytest.mark.parametrize("layout", EXPLICIT_LAYOUTS)
def test_blockwise_on_explicit_axes_runs_per_shard_for_any_layout(sharded_results, layout):
    """Layouts it cannot split as given are resharded for the kernel; the output is laid out like the query."""
    assert sharded_results[f"layout-{layout}"] == "ok", sharded_results[f"layout-{layout}"]
