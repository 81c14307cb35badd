"""Tensor parallelism for the paged cache: ``ragged_paged_attention`` and ``write`` with the query heads and
the pools' kv heads split over 4 simulated CPU devices equal one device, outputs and gradients.

On an ``Explicit`` mesh the kernel runs per head shard (``jattn._paged._placement``): no collective in the
compiled step. Calls that cannot split (a ``score_mod``, kv heads that do not divide into the shards) are
gathered and still equal one device; ``Auto`` mesh axes are left to XLA.
"""

import textwrap

from conformance.devices import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jattn import paged

    H, D, PS, NP, T = 8, 4, 3, 11, 7
    r = np.random.default_rng(0)
    meta = (jnp.array([5, 7, 2, 0], jnp.int32), jnp.array([[0, 1, 2], [3, 4, 5], [6, 0, 0], [0, 0, 0]], jnp.int32),
            jnp.array([0, 2, 3, 5, 5], jnp.int32), jnp.array(3, jnp.int32))
    q = jnp.asarray(r.standard_normal((T, H, D)), jnp.float32)
    sinks = jnp.asarray(r.standard_normal((H,)), jnp.float32)
    slopes = jnp.asarray(r.standard_normal((H,)), jnp.float32)
    CASES = {  # name: (kv_heads, options)
        "gqa-window-sinks": (4, dict(sliding_window=4, sinks=sinks)),
        "mha-softcap": (8, dict(logits_soft_cap=5.0)),
        "score_mod (gathered)": (4, dict(score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i))),
        "kv_heads 2, pools whole (gathered)": (2, {}),
    }

    def grads(kp, vp, opts, q=q):
        def loss(q, kp, vp):
            return jnp.sum(jnp.sin(paged.ragged_paged_attention(q, kp, vp, *meta, **opts)))
        out = paged.ragged_paged_attention(q, kp, vp, *meta, **opts)
        return (out, *jax.grad(loss, argnums=(0, 1, 2))(q, kp, vp))

    def error(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))

    results = {}
    for axis_type in ("explicit", "auto"):
        mesh = jax.make_mesh((4,), ("model",), axis_types=(getattr(AxisType, axis_type.capitalize()),))
        for name, (kv_heads, opts) in CASES.items():
            if axis_type == "auto" and name != "gqa-window-sinks":  # Auto axes are XLA's: one case shows it
                continue
            kp = jnp.asarray(r.standard_normal((NP, PS, kv_heads, D)), jnp.float32)
            vp = jnp.asarray(r.standard_normal((NP, PS, kv_heads, D)), jnp.float32)
            one = jax.jit(lambda kp, vp: grads(kp, vp, opts))(kp, vp)
            split = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
            pools = P(None, None, "model") if kv_heads % 4 == 0 else P()  # 2 kv heads: pools whole, heads split
            qs, kps, vps = split(q, P(None, "model")), split(kp, pools), split(vp, pools)
            with jax.set_mesh(mesh):
                step = jax.jit(lambda q, kp, vp: grads(kp, vp, opts, q=q))
                many = step(qs, kps, vps)
                hlo = step.lower(qs, kps, vps).compile().as_text()
            results[f"{axis_type}/{name}"] = dict(
                error=error(one, many),
                out_spec=str(many[0].sharding.spec),
                collectives=sum(hlo.count(c) for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute")),
            )

    # write: new tokens' K/V (kv heads split) into pools split the same way, in place when donated.
    mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Explicit,))
    kp, vp = (jnp.asarray(r.standard_normal((NP, PS, 4, D)), jnp.float32) for _ in range(2))
    new = jnp.asarray(r.standard_normal((T, 4, D)), jnp.float32)
    slots = jnp.array([0, 4, -1, 7, 30, 31, 32], jnp.int32)
    want = paged.write(kp, vp, new, new, slots)
    split = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        got = jax.jit(paged.write)(split(kp, P(None, None, "model")), split(vp, P(None, None, "model")),
                                   split(new, P(None, "model")), split(new, P(None, "model")), slots)
    results["write"] = dict(error=error(want, got), out_spec=str(got[0].sharding.spec), collectives=0)
    print("RESULTS " + json.dumps(results))
    """
)


def test_paged_attention_with_heads_split_equals_one_device():
    results = run_on_cpu_devices(SCRIPT, 4)
    assert len(results) == 6
    for name, r in results.items():
        assert r["error"] < 1e-5, (name, r)
    for name in ("explicit/gqa-window-sinks", "explicit/mha-softcap"):  # each device attends its own heads
        assert results[name]["collectives"] == 0, (name, results[name])
        assert results[name]["out_spec"] == "P(None, 'model', None)", (name, results[name])
    for name in ("explicit/score_mod (gathered)", "explicit/kv_heads 2, pools whole (gathered)"):
        assert results[name]["out_spec"] == "P(None, 'model', None)", (name, results[name])  # back like the queries
    assert results["write"]["out_spec"] == "P(None, None, 'model', None)"
