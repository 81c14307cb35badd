"""Sequence parallel with attention sinks: ring and all-gather, contiguous and zigzag, on 4 simulated CPU
devices, equal to one device in outputs and gradients (the sinks' included), also with the sequence
sharded over a tuple of mesh axes; and in bfloat16 no less accurate than one device.

Sinks join after the shards' partial results are merged (``_plan.with_sinks``): a sink is one more logit
in each row's softmax denominator, so ``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``.
Before, an explicit ``SequenceParallel`` with ``sinks`` raised "does not support".
"""

import textwrap

import jax.numpy as jnp
import numpy as np
from conformance.devices import run_on_cpu_devices

from jattn._sequence_parallel._plan import with_sinks

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jattn
    from jattn.sharding import SequenceParallel, zigzag, unzigzag

    jax.config.update("jax_enable_x64", True)  # the float64 truth of the bfloat16 check
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))
    B, N, H, KH, d = 2, 24, 4, 2, 8
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((B, N, H, d)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, N, KH, d)), jnp.float32) for _ in range(2))
    sinks = jnp.asarray(r.standard_normal((H,)), jnp.float32)
    lengths = jnp.array([N, 0], jnp.int32)  # the second example sees no key: its rows stay zeros

    def loss(sp):
        def f(q, k, v, sinks):
            out = jattn.dot_product_attention(q, k, v, sinks=sinks, is_causal=True, key_value_seq_lengths=lengths,
                                              implementation="blockwise", block_q=3, block_kv=3, sequence_parallel=sp)
            return jnp.sum(jnp.sin(out)), out
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    (_, want_out), want = jax.jit(loss(None))(q, k, v, sinks)
    results = {}
    for strategy in ("ring", "all_gather"):
        for layout in ("contiguous", "zigzag"):
            order = (lambda x: zigzag(x, 4, 1)) if layout == "zigzag" else (lambda x: x)
            back = (lambda x: unzigzag(x, 4, 1)) if layout == "zigzag" else (lambda x: x)
            put = lambda x: jax.device_put(order(x), NamedSharding(mesh, P(None, "seq")))
            with jax.set_mesh(mesh):
                sp = SequenceParallel(strategy=strategy, layout=layout)
                (_, out), grads = jax.jit(loss(sp))(put(q), put(k), put(v), sinks)
            errors = [float(jnp.max(jnp.abs(back(out) - want_out)))]
            errors += [float(jnp.max(jnp.abs(back(g) - w))) for g, w in zip(grads[:3], want[:3])]
            errors.append(float(jnp.max(jnp.abs(grads[3] - want[3]))))
            results[f"{strategy}/{layout}"] = dict(errors=errors, spec=str(out.sharding.spec))
    results["zero rows"] = float(jnp.max(jnp.abs(want_out[1])))

    # bfloat16: the shards' partial results merge in float32 (the softmax dtype), so the error against a
    # float64 truth is no worse than one device's bfloat16 error.
    def attend(x, sp=None):
        q, k, v = x
        return jattn.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise", block_q=3,
                                           block_kv=3, sequence_parallel=sp).astype(jnp.float64)
    q64, k64, v64 = (jnp.asarray(r.standard_normal((B, 4 * N, H, d))) for _ in range(3))
    truth = attend((q64, k64[:, :, :KH], v64[:, :, :KH]))
    low = tuple(x.astype(jnp.bfloat16) for x in (q64, k64[:, :, :KH], v64[:, :, :KH]))
    bf16 = {"one device": float(jnp.max(jnp.abs(attend(low) - truth)))}
    for strategy in ("ring", "all_gather"):
        with jax.set_mesh(mesh):
            split = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in low)
            out = jax.jit(lambda x: attend(x, SequenceParallel(strategy=strategy)))(split)
        bf16[strategy] = float(jnp.max(jnp.abs(out - truth)))
    results["bf16"] = bf16

    # The sequence over a tuple of mesh axes (2 x 2 devices): one ring over all four, sinks and all.
    grid = jax.make_mesh((2, 2), ("data", "context"), axis_types=(AxisType.Explicit,) * 2)
    for strategy in ("ring", "all_gather", None):
        put = lambda x: jax.device_put(x, NamedSharding(grid, P(None, ("data", "context"))))
        sp = None if strategy is None else SequenceParallel(axis=("data", "context"), strategy=strategy)
        with jax.set_mesh(grid):
            (_, out), grads = jax.jit(loss(sp))(put(q), put(k), put(v), sinks)
        errors = [float(jnp.max(jnp.abs(out - want_out)))]
        errors += [float(jnp.max(jnp.abs(g - w))) for g, w in zip(grads, want)]
        results[f"tuple/{strategy or 'found on the query'}"] = dict(errors=errors, spec=str(out.sharding.spec))
    print("RESULTS " + json.dumps(results))
    """
)


def test_sequence_parallel_with_sinks_equals_one_device():
    results = run_on_cpu_devices(SCRIPT, 4)
    assert results.pop("zero rows") == 0.0
    bf16 = results.pop("bf16")
    for strategy in ("ring", "all_gather"):
        assert bf16[strategy] <= 1.25 * bf16["one device"], bf16
    assert len(results) == 4 + 3
    for name, r in results.items():
        assert max(r["errors"]) < 1e-5, (name, r)
        axes = "('data', 'context')" if name.startswith("tuple/") else "'seq'"
        assert r["spec"] == f"P(None, {axes}, None, None)", (name, r)


def test_with_sinks_is_a_softmax_with_one_more_logit_of_value_zero():
    rng = np.random.default_rng(1)
    logits, values = rng.standard_normal((3, 5)), rng.standard_normal((5, 2))  # one query, 3 heads x 5 keys
    sinks = rng.standard_normal(3)
    lse = np.log(np.exp(logits).sum(-1))
    out = np.exp(logits - lse[:, None]) @ values  # (heads, v_dim), without the sinks
    got_out, got_lse = with_sinks(jnp.asarray(out[None, None]), jnp.asarray(lse[None, None]), jnp.asarray(sinks))
    both = np.concatenate([logits, sinks[:, None]], axis=1)  # the sink as one more key, its value zero
    weights = np.exp(both) / np.exp(both).sum(-1, keepdims=True)
    np.testing.assert_allclose(got_out[0, 0], weights[:, :5] @ values, rtol=1e-6)
    np.testing.assert_allclose(got_lse[0, 0], np.log(np.exp(both).sum(-1)), rtol=1e-6)
