"""The NNX modules on an ``Explicit`` mesh with the batch split over 4 simulated CPU devices: a training step
(forward and parameter gradients) and KV-cache decoding (prefill, then one token per call, under ``nnx.jit``)
equal one device, for every implementation, and XLA logs no warning.

Before the fix the decode step raised (the cache from ``init_cache`` is whole, the new keys split:
"Incompatible types for broadcasting"), and the overflow check's callback took the split batch of end
positions to device 0, which XLA logged as an "Involuntary full rematerialization".
"""

import re
import textwrap

from conformance.devices import run_with_log

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jattn import nnx as jnnx

    mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Explicit,))
    B, T, F = 4, 6, 16
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, F)), jnp.float32)

    def loss(m, x):
        return jnp.sum(m(x, is_causal=True) ** 2)

    def decode(m, x, step):
        m.init_cache(B, 8)
        out = [step(m, x[:, :4])] + [step(m, x[:, i : i + 1]) for i in (4, 5)]
        cache = m.cached_key[...]
        m.clear_cache()
        return jnp.concatenate(out, axis=1), cache

    def error(a, b):  # relative to each leaf's scale: the loss's gradients run into the hundreds
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
        return max(float(jnp.max(jnp.abs(u - v)) / jnp.maximum(1.0, jnp.max(jnp.abs(u)))) for u, v in pairs)

    results = {}
    for impl in (None, "reference", "blockwise", "xla"):
        for kind in ("MultiHeadAttention", "AttentionBlock"):
            module = getattr(jnnx, kind)(2, F, implementation=impl, rngs=nnx.Rngs(0))
            target = module if kind == "MultiHeadAttention" else module.attention
            eager = lambda m, x: m(x, is_causal=True)
            one = (module(x, is_causal=True), nnx.grad(loss)(module, x), decode(target, x, eager))
            xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
            with jax.set_mesh(mesh):
                step = nnx.jit(lambda m, x: m(x, is_causal=True))
                split = (step(module, xs), nnx.jit(nnx.grad(loss))(module, xs), decode(target, xs, step))
            results[f"{kind}/{impl}"] = dict(
                error=error(one, split),
                out=str(split[0].sharding.spec),
                decoded=str(split[2][0].sharding.spec),
                cache=str(split[2][1].sharding.spec),
            )
    print("RESULTS " + json.dumps(results))
    """
)


def test_nnx_modules_train_and_decode_with_the_batch_split():
    results, log = run_with_log(SCRIPT, 4)
    assert len(results) == 8
    for name, r in results.items():
        assert r["error"] < 1e-5, (name, r)
        assert r["out"] == r["decoded"] == "P('batch', None, None)", (name, r)
        assert r["cache"] == "P('batch', None, None, None)", (name, r)  # the cache stays split
    xla_warnings = re.findall(r"^[EW]\d{4} .*$", log, flags=re.MULTILINE)  # glog: E/W, month and day
    assert not xla_warnings, xla_warnings
