"""Sequence parallel with a ``score_mod`` and a ``mask_mod`` on 4 simulated CPU devices (2 x 2: batch and
sequence): ring and all-gather, contiguous and zigzag, asked for or found on the query, equal one device in
outputs and in gradients, the arrays the mods captured included. The mods see global positions (all-gather:
each shard's queries at their offset, the mask_mod's block summary too; ring: each pair's queries and keys
at their chunks' starts, ``ExampleArrays.kv_offset``) and the global example and head (those axes are
gathered for a call with a mod). Before, every sequence-parallel call with a mod raised.
"""

import textwrap

from conformance.devices import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jattn
    from jattn.sharding import SequenceParallel, zigzag, unzigzag

    mesh = jax.make_mesh((2, 2), ("batch", "seq"), axis_types=(AxisType.Explicit,) * 2)
    B, N, H, KH, d = 2, 24, 4, 2, 8
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((B, N, H, d)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, N, KH, d)), jnp.float32) for _ in range(2))
    slopes = jnp.asarray(r.standard_normal((B, H)), jnp.float32)
    docs = jnp.asarray(np.sort(r.integers(0, 3, (N,))), jnp.int32)  # documents by absolute position

    def loss(sp, layout):
        order = (lambda x: unzigzag(x, 2, 1)) if layout == "zigzag" else (lambda x: x)
        def f(q, k, v, slopes):
            out = jattn.dot_product_attention(
                q, k, v, is_causal=True, implementation="blockwise", block_q=3, block_kv=3, sequence_parallel=sp,
                score_mod=lambda s, b, h, i, j: s + slopes[b, h] * (j - i).astype(s.dtype) / N,
                mask_mod=lambda b, h, i, j: docs[i] == docs[j])
            return jnp.sum(jnp.sin(order(out))), order(out)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    (_, want_out), want = jax.jit(loss(None, "contiguous"))(q, k, v, slopes)
    results = {}
    for strategy in ("ring", "all_gather", "found on the query"):
        for layout in ("contiguous", "zigzag"):
            if strategy == "found on the query" and layout == "zigzag":
                continue
            order = (lambda x: zigzag(x, 2, 1)) if layout == "zigzag" else (lambda x: x)
            back = (lambda x: unzigzag(x, 2, 1)) if layout == "zigzag" else (lambda x: x)
            put = lambda x: jax.device_put(order(x), NamedSharding(mesh, P("batch", "seq")))
            sp = None if strategy == "found on the query" else SequenceParallel(
                axis="seq", strategy=strategy, layout=layout)
            with jax.set_mesh(mesh):
                (_, out), grads = jax.jit(loss(sp, layout))(put(q), put(k), put(v), slopes)
                hlo = jax.jit(loss(sp, layout)).lower(put(q), put(k), put(v), slopes).as_text()
            errors = [float(jnp.max(jnp.abs(out - want_out)))]
            errors += [float(jnp.max(jnp.abs(back(g) - w))) for g, w in zip(grads[:3], want[:3])]
            errors.append(float(jnp.max(jnp.abs(grads[3] - want[3]))))
            collectives = {"ring": ["collective_permute"], "all_gather": ["all_gather"]}
            expected = collectives.get(strategy, ["collective_permute", "all_gather"])  # auto: either
            results[f"{strategy}/{layout}"] = dict(errors=errors, split=any(c in hlo for c in expected))
    print("RESULTS " + json.dumps(results))
    """
)


def test_sequence_parallel_with_mods_equals_one_device():
    results = run_on_cpu_devices(SCRIPT, 4)
    assert len(results) == 5
    for name, r in results.items():
        assert max(r["errors"]) < 1e-5, (name, r)
        assert r["split"], (name, r)  # sequence-parallel (a ring or all-gather K/V), not gathered before the kernel


NNX_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jattn import nnx as jnnx
    from jattn.sharding import SequenceParallel

    mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 16)), jnp.float32)

    def make(sp):
        m = jnnx.MultiHeadAttention(
            4, 16, num_kv_heads=2, use_sinks=True, implementation="blockwise", block_q=3, block_kv=3,
            score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).astype(s.dtype),
            mask_mod=lambda b, h, i, j: (i // 7) == (j // 7), sequence_parallel=sp, rngs=nnx.Rngs(0))
        m.sinks[...] = jnp.arange(4.0)
        return m

    loss = lambda m, x: jnp.sum(jnp.sin(m(x, is_causal=True)))
    one = make(None)
    want, want_grads = one(x, is_causal=True), nnx.grad(loss)(one, x)
    results = {}
    for strategy in ("ring", "all_gather"):
        m = make(SequenceParallel(axis="seq", strategy=strategy))
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
            got, grads = nnx.jit(lambda m, x: m(x, is_causal=True))(m, xs), nnx.jit(nnx.grad(loss))(m, xs)
        results[strategy] = dict(
            out=float(jnp.max(jnp.abs(got - want))),
            grads=max(float(jnp.max(jnp.abs(a - b)))
                      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))),
            spec=str(got.sharding.spec),
        )
    print("RESULTS " + json.dumps(results))
    """
)


def test_nnx_module_sequence_parallel_with_sinks_and_mods_equals_one_device():
    """``jattn.nnx.MultiHeadAttention(sequence_parallel=...)`` with GQA, sinks, a score_mod and a mask_mod:
    the output and every parameter's gradient (the sinks' included) equal one device."""
    results = run_on_cpu_devices(NNX_SCRIPT, 4)
    for strategy, r in results.items():
        assert r["out"] < 1e-5 and r["grads"] < 1e-4, (strategy, r)
        assert r["spec"] == "P(None, 'seq', None)", (strategy, r)


def test_ring_pair_block_summary_is_the_global_one_at_the_pairs_chunks():
    """A ring pair builds its mask_mod's block summary at its chunks' absolute positions (query ``q_offset +
    kv_offset + i``, key ``kv_offset + j``), so it skips the blocks one device skips: the pair's kinds equal
    the global summary's blocks at those chunks (before, a pair had no summary and visited every block)."""
    import jax.numpy as jnp
    import numpy as np

    from jattn import _mods
    from jattn._tiling import Grid
    from jattn.masks import block_mask
    from jattn.masks._block_mask import block_mask_of

    n, chunk, blk = 30, 6, 3
    docs = jnp.asarray(np.repeat(np.arange(5), [4, 7, 2, 9, 8]), jnp.int32)

    def mask(b, h, i, j):
        return (docs[i] == docs[j]) & (j <= i)

    whole = block_mask(mask, 1, 1, n, n, block_q=blk, block_kv=blk).kinds[0]
    mod, consts = _mods.convert(mask, "mask")
    grid = Grid(chunk, chunk, blk, blk)
    skipped = 0
    for q0 in range(0, n, chunk):
        for k0 in range(0, n, chunk):
            offsets = jnp.asarray([q0 - k0], jnp.int32), jnp.asarray([k0], jnp.int32)
            got = block_mask_of(mod, consts, 1, 1, grid, q_offset=offsets[0], kv_offset=offsets[1]).kinds[0]
            want = whole[q0 // blk : (q0 + chunk) // blk, k0 // blk : (k0 + chunk) // blk]
            np.testing.assert_array_equal(got, want, err_msg=f"pair at queries {q0}, keys {k0}")
            skipped += int((got == 0).sum())
    assert skipped > 0


EVERYTHING_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jattn
    from jattn.sharding import SequenceParallel, zigzag, unzigzag

    mesh = jax.make_mesh((2, 2), ("data", "context"), axis_types=(AxisType.Explicit,) * 2)
    axes = ("data", "context")
    B, N, H, KH, d = 1, 40, 2, 1, 8
    r = np.random.default_rng(1)
    q = jnp.asarray(r.standard_normal((B, N, H, d)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, N, KH, d)), jnp.float32) for _ in range(2))
    sinks = jnp.asarray(r.standard_normal((H,)), jnp.float32)
    bias = jnp.asarray(r.standard_normal((N,)), jnp.float32)  # captured by the score_mod, per key
    ids = jnp.asarray(np.sort(r.integers(0, 3, (B, N))), jnp.int32)

    def loss(sp, layout):
        order = (lambda x: unzigzag(x, 4, 1)) if layout == "zigzag" else (lambda x: x)
        def f(q, k, v, sinks, bias, ids):
            out = jattn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(11, 0), logits_soft_cap=3.0, sinks=sinks,
                query_segment_ids=ids, key_value_segment_ids=ids, implementation="blockwise", block_q=5,
                block_kv=5, sequence_parallel=sp, score_mod=lambda s, b, h, i, j: s + bias[j],
                mask_mod=lambda b, h, i, j: (i - j) % 7 != 3)
            return jnp.sum(jnp.sin(order(out))), order(out)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)

    (_, want_out), want = jax.jit(loss(None, "contiguous"))(q, k, v, sinks, bias, ids)
    results = {}
    for strategy in ("ring", "all_gather"):
        for layout in ("contiguous", "zigzag"):
            order = (lambda x: zigzag(x, 4, 1)) if layout == "zigzag" else (lambda x: x)
            back = (lambda x: unzigzag(x, 4, 1)) if layout == "zigzag" else (lambda x: x)
            put = lambda x: jax.device_put(order(x), NamedSharding(mesh, P(None, axes)))
            sp = SequenceParallel(axis=axes, strategy=strategy, layout=layout)
            with jax.set_mesh(mesh):
                args = (put(q), put(k), put(v), sinks, bias, put(ids))
                (_, out), grads = jax.jit(loss(sp, layout))(*args)
            errors = [float(jnp.max(jnp.abs(out - want_out)))]
            errors += [float(jnp.max(jnp.abs(back(g) - w))) for g, w in zip(grads[:3], want[:3])]
            errors += [float(jnp.max(jnp.abs(g - w))) for g, w in zip(grads[3:], want[3:])]
            results[f"{strategy}/{layout}"] = errors
    print("RESULTS " + json.dumps(results))
    """
)


def test_mods_with_every_option_over_a_tuple_of_mesh_axes_equal_one_device():
    """The sequence over ('data', 'context') (4 devices), ring and all-gather, contiguous and zigzag, with a
    score_mod capturing a per-key array, a mask_mod, sinks, segment ids, a causal local window and a soft
    cap together: output and gradients (q, k, v, sinks, the captured array) equal one device."""
    results = run_on_cpu_devices(EVERYTHING_SCRIPT, 4)
    assert len(results) == 4
    for name, errors in results.items():
        assert max(errors) < 1e-5, (name, errors)
