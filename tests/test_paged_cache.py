"""jattn.paged.write and PageAllocator: slots, padding, quantization, in-place updates, page bookkeeping,
and a small continuous-batching loop (requests arriving, prefilling in chunks, decoding and finishing)
that must equal plain attention over each request's own history, with one compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import paged

F32, I32 = jnp.float32, jnp.int32


def test_write_places_tokens_and_skips_padding():
    pools = jnp.zeros((3, 2, 1, 2), F32), jnp.zeros((3, 2, 1, 1), F32)
    keys = jnp.asarray([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]], F32)
    values = jnp.asarray([[[1.0]], [[2.0]], [[3.0]]], F32)
    k, v = jax.jit(paged.write)(*pools, keys, values, jnp.asarray([5, -1, 0], I32))
    np.testing.assert_array_equal(k[2, 1, 0], [1.0, 2.0])  # slot 5 = page 2, offset 1
    np.testing.assert_array_equal(k[0, 0, 0], [5.0, 6.0])
    assert float(jnp.abs(k).sum()) == 14.0 and float(v.sum()) == 4.0  # the padding token wrote nothing


def test_write_quantizes_into_int8_and_reads_back():
    pools = jnp.zeros((2, 2, 1, 2), jnp.int8), jnp.zeros((2, 2, 1, 2), jnp.int8)
    keys = jnp.asarray([[[0.26, -50.0]]], F32)
    k, _ = jax.jit(lambda *a: paged.write(*a, k_scale=0.1, v_scale=0.1))(*pools, keys, keys, jnp.asarray([3], I32))
    np.testing.assert_array_equal(k[1, 1, 0], [3, -128])  # rounded, saturated


def test_donated_write_updates_the_pools_in_place():
    pool = jax.ShapeDtypeStruct((67, 4, 2, 8), F32)
    new = jax.ShapeDtypeStruct((5, 2, 8), F32)
    compiled = jax.jit(paged.write, donate_argnums=(0, 1)).lower(pool, pool, new, new, jax.ShapeDtypeStruct((5,), I32))
    stats = compiled.compile().memory_analysis()
    pool_bytes = 67 * 4 * 2 * 8 * 4
    assert stats.alias_size_in_bytes == 2 * pool_bytes  # both outputs are the donated inputs
    assert stats.temp_size_in_bytes < pool_bytes // 10  # no second pool


def test_allocator_hands_out_distinct_pages_and_takes_them_back():
    alloc = paged.PageAllocator(num_pages=5, page_size=3, pages_per_seq=4)
    alloc.reserve("a", 4)
    alloc.reserve("b", 3)
    alloc.reserve("a", 7)  # grows by one page
    assert len(set(alloc.pages("a")) | set(alloc.pages("b"))) == 4 and alloc.num_free == 1
    with pytest.raises(paged.OutOfPagesError):
        alloc.reserve("c", 6)
    assert alloc.num_free == 1 and alloc.capacity("c") == 0  # all or nothing
    freed = set(alloc.pages("a"))
    alloc.free("a")
    alloc.reserve("c", 9)
    assert set(alloc.pages("c")) <= freed | set(range(5)) - set(alloc.pages("b"))
    assert not set(alloc.pages("c")) & set(alloc.pages("b"))


def test_fork_shares_a_prefix_until_the_last_sequence_frees_it():
    alloc = paged.PageAllocator(num_pages=4, page_size=2, pages_per_seq=3)
    alloc.reserve("parent", 4)
    alloc.fork("parent", "child", 4)
    alloc.reserve("child", 6)
    assert alloc.pages("child")[:2] == alloc.pages("parent") and alloc.num_free == 1
    np.testing.assert_array_equal(alloc.slots("child", 4, 6) // 2, alloc.pages("child")[2])
    alloc.free("parent")
    assert alloc.num_free == 1  # still used by the child
    alloc.free("child")
    assert alloc.num_free == 4


def test_metadata_pads_to_fixed_shapes():
    alloc = paged.PageAllocator(num_pages=6, page_size=2, pages_per_seq=3)
    alloc.reserve("a", 5)
    alloc.reserve("b", 1)
    meta = alloc.metadata([("a", 4, 1), ("b", 0, 1)], max_seqs=3, max_tokens=4)
    np.testing.assert_array_equal(meta.kv_lens, [5, 1, 0])
    np.testing.assert_array_equal(meta.cu_q_lens, [0, 1, 2, 2])
    np.testing.assert_array_equal(meta.num_seqs, [2])
    a_last = alloc.pages("a")[2] * 2
    np.testing.assert_array_equal(meta.slot_mapping, [a_last, alloc.pages("b")[0] * 2, -1, -1])
    np.testing.assert_array_equal(meta.page_indices[0], alloc.pages("a"))


def attention_numpy(q, k, v, q_positions):
    """Plain causal attention of rows ``q (n, heads, dim)`` at ``q_positions`` over ``k, v (kv, heads, x)``."""
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.arange(k.shape[0])[None, None] <= q_positions[None, :, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v)


def test_continuous_batching_equals_attention_over_each_history():
    heads, dim, page_size, max_seqs, max_tokens = 2, 3, 2, 4, 8
    rng = np.random.default_rng(0)
    alloc = paged.PageAllocator(num_pages=9, page_size=page_size, pages_per_seq=4)
    pools = jnp.zeros((9, page_size, heads, dim), F32), jnp.zeros((9, page_size, heads, dim), F32)

    def step(k_pages, v_pages, q, k, v, slots, kv_lens, page_indices, cu_q_lens, num_seqs):
        k_pages, v_pages = paged.write(k_pages, v_pages, k, v, slots)
        out = paged.ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
        return out, k_pages, v_pages

    step = jax.jit(step, donate_argnums=(0, 1))
    # (arrival step, prompt length, tokens decoded); prompts are prefilled 3 tokens per step.
    requests = {"r0": (0, 5, 2), "r1": (0, 1, 3), "r2": (2, 4, 1), "r3": (3, 2, 2)}
    history = {r: (np.zeros((0, heads, dim)), np.zeros((0, heads, dim))) for r in requests}
    done: set[str] = set()
    for t in range(8):
        batch = []
        for r, (arrival, prompt, _) in requests.items():
            cached = len(history[r][0])
            if arrival <= t and r not in done:
                new = min(3, prompt - cached) if cached < prompt else 1
                alloc.reserve(r, cached + new)
                batch.append((r, cached, new))
        meta = alloc.metadata(batch, max_seqs, max_tokens)
        q, k, v = (rng.normal(size=(max_tokens, heads, dim)).astype(np.float32) for _ in range(3))
        args = (q, k, v, meta.slot_mapping, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs)
        out, *pools = step(*pools, *args)
        for i, (r, cached, new) in enumerate(batch):
            rows = slice(meta.cu_q_lens[i], meta.cu_q_lens[i + 1])
            history[r] = tuple(np.concatenate([h, x[rows]]) for h, x in zip(history[r], (k, v), strict=True))
            want = attention_numpy(q[rows], *history[r], cached + np.arange(new))
            np.testing.assert_allclose(out[rows], want, atol=1e-5, err_msg=f"step {t}, {r}")
            if len(history[r][0]) == requests[r][1] + requests[r][2]:
                alloc.free(r)
                done.add(r)
    assert done == set(requests) and alloc.num_free == 9
    assert step._cache_size() == 1
