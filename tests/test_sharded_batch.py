"""Every implementation on an Explicit mesh with the batch split over 8 CPU devices, every array option sharded
like the batch, replicated, or broadcast with a batch of 1: the same outputs and gradients as one device.

Before the fix 13 of these combinations raised: the reference path (and auto, which picks it at these sizes)
with a replicated mask, bias, lengths or segment ids (its vmap saw batch axes split two ways), and blockwise
with a score_mod (the mod was lowered under the explicit mesh inside a shard_map's manual one).

Then batch and heads split together (a 4 x 2 mesh), each option laid out with them: the reference with sinks
raised (it indexed the whole sinks with a head index split over devices); it now gathers the heads for sinks.
"""

import json
import textwrap

import pytest
from conformance.devices import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jattn
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType

    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
    B, T, S, H, D = 8, 5, 7, 2, 4
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((B, n, H, D)), jnp.float32) for n in (T, S, S))
    arrays = dict(
        mask=jnp.asarray(r.random((B, 1, T, S)) > 0.3),
        bias=jnp.asarray(r.standard_normal((B, H, T, S)), jnp.float32),
        key_value_seq_lengths=jnp.asarray(r.integers(1, S + 1, (B,)), jnp.int32),
        query_segment_ids=jnp.asarray(np.sort(r.integers(0, 3, (B, T)), axis=1), jnp.int32),
        key_value_segment_ids=jnp.asarray(np.sort(r.integers(0, 3, (B, S)), axis=1), jnp.int32),
    )
    KINDS = {"mask": ["mask"], "bias": ["bias"], "lengths": ["key_value_seq_lengths"],
             "segments": ["query_segment_ids", "key_value_segment_ids"], "sinks": [], "score_mod": []}
    sinks = jnp.asarray(r.standard_normal((H,)), jnp.float32)
    slopes = jnp.asarray(r.standard_normal((H,)), jnp.float32)

    def options(kind, how, on_mesh):
        def put(x):
            if how == "batch1":
                return x[:1]
            return jax.device_put(x, NamedSharding(mesh, P("batch" if how == "sharded" else None))) if on_mesh else x
        out = {name: put(arrays[name]) for name in KINDS[kind]}
        if kind == "sinks":
            out["sinks"] = jax.device_put(sinks, NamedSharding(mesh, P())) if on_mesh else sinks
        if kind == "score_mod":
            s = jax.device_put(slopes, NamedSharding(mesh, P())) if on_mesh and how == "replicated" else slopes
            out["score_mod"] = lambda x, b, h, i, j: x + s[h] * (j - i).astype(x.dtype)
        return out

    def loss(impl, opts):
        def f(q, k, v):
            return jnp.sum(jnp.sin(jattn.dot_product_attention(q, k, v, implementation=impl, **opts)))
        return f

    results = {}
    split = tuple(jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in (q, k, v))
    for impl in IMPLEMENTATIONS:
        for kind in KINDS:
            for how in ("sharded", "replicated", "batch1"):
                if how == "batch1" and kind in ("lengths", "segments"):
                    continue  # per-example arrays: no broadcast form
                if impl == "xla" and kind in ("segments", "sinks", "score_mod"):
                    continue  # jax.nn lacks them (the capability table)
                key = f"{impl}-{kind}-{how}"
                try:
                    one = options(kind, how, False)
                    want = jax.jit(jax.value_and_grad(loss(impl, one), argnums=(0, 1, 2)))(q, k, v)
                    with jax.set_mesh(mesh):
                        grads = jax.value_and_grad(loss(impl, options(kind, how, True)), argnums=(0, 1, 2))
                        got = jax.jit(grads)(*split)
                        out = jax.jit(lambda q, k, v: jattn.dot_product_attention(
                            q, k, v, implementation=impl, **options(kind, how, True)))(*split)
                    assert out.sharding.spec[0] == "batch", out.sharding.spec
                    errors = [abs(float(got[0] - want[0]))]
                    errors += [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got[1], want[1])]
                    results[key] = "ok" if max(errors) < 1e-4 else f"mismatch {errors}"
                except Exception as e:
                    results[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    # The sequence split instead: paths that contract over it with plain jnp ops (reference, jax.nn, a mod
    # that keeps auto off the sequence-parallel ring) gather it first, and the output is laid out like the query.
    seq_mesh = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Explicit,))
    x = jnp.asarray(r.standard_normal((2, 16, H, D)), jnp.float32)
    for impl, opts in (("reference", {}), ("xla", {}), (None, {"score_mod": lambda s, b, h, i, j: s * 0.5})):
        key = f"seq-split-{impl}"
        try:
            f = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(
                jattn.dot_product_attention(x, x, x, is_causal=True, implementation=impl, **opts))))
            want = jax.jit(f)(x)
            with jax.set_mesh(seq_mesh):
                got = jax.jit(f)(jax.device_put(x, NamedSharding(seq_mesh, P(None, "seq"))))
            errors = [abs(float(got[0] - want[0])), float(jnp.max(jnp.abs(got[1] - want[1])))]
            results[key] = "ok" if max(errors) < 1e-4 else f"mismatch {errors}"
        except Exception as e:
            results[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    # Batch and heads split (a 4 x 2 mesh, 2 heads on 2 devices): each option as the inputs are laid out.
    bh_mesh = jax.make_mesh((4, 2), ("batch", "heads"), axis_types=(AxisType.Explicit,) * 2)
    HEADS_OPTIONS = {
        "mask": lambda: dict(mask=put(arrays["mask"], P("batch"))),
        "bias": lambda: dict(bias=put(arrays["bias"], P("batch", "heads"))),
        "lengths": lambda: dict(key_value_seq_lengths=put(arrays["key_value_seq_lengths"], P("batch"))),
        "sinks": lambda: dict(sinks=put(sinks, P("heads"))),
    }
    put = lambda x, spec: jax.device_put(x, NamedSharding(bh_mesh, spec))
    for impl in IMPLEMENTATIONS:
        for kind, make in HEADS_OPTIONS.items():
            if impl == "xla" and kind == "sinks":
                continue
            key = f"batch-heads-{impl}-{kind}"
            try:
                f = lambda opts: jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(
                    jattn.dot_product_attention(q, k, v, implementation=impl, **opts))), argnums=(0, 1, 2))
                plain = {"mask": arrays["mask"], "bias": arrays["bias"], "sinks": sinks,
                         "lengths": arrays["key_value_seq_lengths"]}[kind]
                name = "key_value_seq_lengths" if kind == "lengths" else kind
                want = jax.jit(f({name: plain}))(q, k, v)
                with jax.set_mesh(bh_mesh):
                    qkv = tuple(put(x, P("batch", None, "heads")) for x in (q, k, v))
                    got = jax.jit(f(make()))(*qkv)
                    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(
                        q, k, v, implementation=impl, **make()))(*qkv)
                assert tuple(out.sharding.spec)[:3] == ("batch", None, "heads"), out.sharding.spec
                errors = [abs(float(got[0] - want[0]))]
                errors += [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got[1], want[1])]
                results[key] = "ok" if max(errors) < 1e-4 else f"mismatch {errors}"
            except Exception as e:
                results[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print("RESULTS", json.dumps(results))
    """
)
IMPLEMENTATIONS = ["reference", "blockwise", "xla", None]


@pytest.fixture(scope="session")  # once per worker, however pytest-xdist orders the tests
def batch_split_results():
    script = f"IMPLEMENTATIONS = {IMPLEMENTATIONS!r}\n{SCRIPT}"
    return run_on_cpu_devices(script, 8, json.dumps(IMPLEMENTATIONS))


@pytest.mark.xdist_group("eight_cpu_devices_batch")
def test_every_implementation_and_array_option_matches_one_device_split_over_8_devices(batch_split_results):
    assert len(batch_split_results) == 59 + 15, sorted(batch_split_results)
    failed = {key: value for key, value in batch_split_results.items() if value != "ok"}
    assert not failed, failed
