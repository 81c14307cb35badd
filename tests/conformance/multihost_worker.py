"""One process of a two-process (multi-host) check on CPU: ``python multihost_worker.py PROCESS_ID PORT``.

Each process has 4 CPU devices and joins the other through ``jax.distributed.initialize`` on localhost
with gloo collectives, so the 8-device mesh spans two processes as it would span two hosts. Every check
computes on the global mesh and compares, on the host, with the same call on one local device. Process 0
prints ``RESULTS {json}``.
"""

import json
import os
import sys


def main(process: int, port: str) -> None:
    """Joins the other process, runs every check, prints the results (process 0)."""

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jattn
    import jattn.nnx
    from jattn.sharding import SequenceParallel

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    B, T, H, D = 2, 64, 4, 8
    rng = np.random.default_rng(0)  # the same global data in both processes
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(3))
    local = jax.local_devices()[0]

    def global_array(x, mesh, spec):
        """A global array on ``mesh`` from the host data every process holds whole."""
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    def on_host(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def loss(**options):
        def f(q, k, v):
            return jnp.sum(jnp.sin(jattn.dot_product_attention(q, k, v, is_causal=True, **options)))

        return jax.value_and_grad(f, argnums=(0, 1, 2))

    def one_device(fn, *args):
        with jax.default_device(local):
            return jax.tree.map(np.asarray, jax.jit(fn)(*args))

    def compare(got, want) -> str:
        errors = [
            float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        ]
        return "ok" if max(errors) < 2e-4 else f"mismatch {errors}"

    results = {}
    auto = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Explicit,))
    want = one_device(loss(), q, k, v)

    for strategy in ("ring", "all_gather"):
        for layout in ("contiguous", "zigzag"):
            sp = SequenceParallel(axis="seq", mesh=auto, strategy=strategy, layout=layout)
            order = (lambda x: x) if layout == "contiguous" else (lambda x: np.asarray(jattn.sharding.zigzag(x, 8)))
            args = [global_array(order(x), auto, P(None, "seq")) for x in (q, k, v)]
            value, grads = jax.jit(loss(sequence_parallel=sp))(*args)
            grads = [on_host(g) for g in grads]
            if layout == "zigzag":  # gradients come back in the layout of the inputs
                grads = [np.asarray(jattn.sharding.unzigzag(g, 8)) for g in grads]
            results[f"{strategy}-{layout}"] = compare((np.asarray(value), grads), want)

    slopes = jattn.score_mods.alibi_slopes(H)
    mod_want = one_device(loss(score_mod=jattn.score_mods.alibi(slopes)), q, k, v)
    with jax.set_mesh(explicit):  # no keyword: a query sharded along its sequence runs sequence-parallel
        args = [global_array(x, explicit, P(None, "seq")) for x in (q, k, v)]
        value, grads = jax.jit(loss())(*args)
        results["auto"] = compare((np.asarray(value), [on_host(g) for g in grads]), want)
        value, grads = jax.jit(loss(score_mod=jattn.score_mods.alibi(slopes)))(*args)
        results["score_mod"] = compare((np.asarray(value), [on_host(g) for g in grads]), mod_want)

    module = jattn.nnx.MultiHeadAttention(num_heads=H, in_features=16, rngs=nnx.Rngs(0))
    x = rng.standard_normal((B, T, 16)).astype(np.float32)
    module_want = one_device(lambda x: module(x, is_causal=True), x)
    with jax.set_mesh(explicit):
        out = nnx.jit(lambda m, x: m(x, is_causal=True))(module, global_array(x, explicit, P(None, "seq")))
        results["nnx"] = compare(on_host(out), module_want)

    if process == 0:
        print("RESULTS", json.dumps(results), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
