"""``paged_step`` of the NNX modules: a ragged batch over a paged cache equals the contiguous KV cache.

Sequences of different prompt lengths arrive at different steps, prefill in chunks mixed with other
sequences' decode tokens, in one jitted step with the pools donated; every sequence's rows must equal
what the same module gives that sequence alone after ``init_cache`` (whole prompt, then one token per
call). Then every error ``paged_step`` and ``init_pages`` raise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import nnx as jnnx
from jattn import paged

F32 = jnp.float32
FEATURES, PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ, MAX_SEQS, MAX_TOKENS, CHUNK = 14, 3, 13, 5, 3, 7, 5
# name: (arrival step, prompt length, decoded tokens); prompts prefill CHUNK tokens per step.
REQUESTS = {"a": (0, 11, 2), "b": (0, 2, 4), "c": (2, 7, 3)}


def schedule() -> list[list[tuple[str, int, int]]]:
    """Each step's ``(sequence, cached, new)`` rows, as a continuous-batching engine would send them."""
    cached = dict.fromkeys(REQUESTS, 0)
    steps = []
    while any(cached[r] < p + d for r, (_, p, d) in REQUESTS.items()):
        t, batch = len(steps), []
        for r, (arrival, prompt, decoded) in REQUESTS.items():
            if arrival <= t and cached[r] < prompt + decoded:
                new = min(CHUNK, prompt - cached[r]) if cached[r] < prompt else 1
                batch.append((r, cached[r], new))
                cached[r] += new
        steps.append(batch)
    return steps


def inputs() -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(7), len(REQUESTS))
    return {
        r: jax.random.normal(k, (p + d, FEATURES), F32)
        for k, (r, (_, p, d)) in zip(keys, REQUESTS.items(), strict=True)
    }


@nnx.jit
def cached_call(module: Any, x: jax.Array) -> jax.Array:
    return module(x, is_causal=True)


def contiguous(module: Any, x: jax.Array, prompt: int) -> jax.Array:
    """The sequence alone through the contiguous KV cache: the prompt in one call, then one token per call."""
    module.init_cache(1, max(p + d for _, p, d in REQUESTS.values()))  # one cache shape: fewer compilations
    rows = [cached_call(module, x[None, :prompt])[0]]
    rows += [cached_call(module, x[None, i : i + 1])[0] for i in range(prompt, x.shape[0])]
    module.clear_cache()
    return jnp.concatenate(rows)


def served(module: Any) -> tuple[dict[str, np.ndarray], Any]:
    """Every sequence's rows from jitted ragged paged steps (pools donated), and the compiled step."""
    graphdef, state = nnx.split(module)

    def step(state, pages, x, meta):
        return nnx.merge(graphdef, state).paged_step(x, pages, meta)

    step = jax.jit(step, donate_argnums=(1,))
    alloc = paged.PageAllocator(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ)
    pages, xs = module.init_pages(NUM_PAGES, PAGE_SIZE), inputs()
    rows: dict[str, list[np.ndarray]] = {r: [] for r in REQUESTS}
    for batch in schedule():
        for r, cached, new in batch:
            alloc.reserve(r, cached + new)
        meta = alloc.metadata(batch, MAX_SEQS, MAX_TOKENS)
        x = np.zeros((MAX_TOKENS, FEATURES), np.float32)
        for i, (r, cached, new) in enumerate(batch):
            x[meta.cu_q_lens[i] : meta.cu_q_lens[i + 1]] = xs[r][cached : cached + new]
        out, pages = step(state, pages, jnp.asarray(x), meta)
        for i, (r, cached, new) in enumerate(batch):
            rows[r].append(np.asarray(out[meta.cu_q_lens[i] : meta.cu_q_lens[i + 1]]))
            if cached + new == sum(REQUESTS[r][1:]):
                alloc.free(r)
    assert alloc.num_free == NUM_PAGES
    return {r: np.concatenate(v) for r, v in rows.items()}, step


def check_equal_to_contiguous(module: Any) -> None:
    got, step = served(module)
    xs = inputs()
    for r, (_, prompt, _) in REQUESTS.items():
        np.testing.assert_allclose(got[r], contiguous(module, xs[r], prompt), atol=2e-5, rtol=2e-5, err_msg=r)
    assert step._cache_size() == 1  # new metadata every step, one compilation


def test_schedule_mixes_prefill_chunks_and_decode_tokens():
    steps = schedule()
    assert any(len({new > 1 for _, _, new in b}) == 2 for b in steps)  # a chunk beside a decode token
    assert max(sum(new for *_, new in b) for b in steps) <= MAX_TOKENS and len(steps) > 4


@pytest.mark.parametrize(
    "options",
    [
        dict(num_kv_heads=1, head_dim=3),  # 2 query heads on one kv head
        dict(num_kv_heads=2, head_dim=5, value_head_dim=3, out_features=11, use_bias=False),
        dict(head_dim=3, num_kv_heads=2, local_window_size=4, logits_soft_cap=5.0, use_sinks=True),
    ],
    ids=["mqa", "gqa-vdim", "window-cap-sinks"],
)
def test_mha_paged_step_equals_the_contiguous_cache(options):
    heads = 2 if options.get("num_kv_heads") == 1 else 4
    mha = jnnx.MultiHeadAttention(heads, FEATURES, **options, rngs=nnx.Rngs(3))
    if mha.sinks is not None:
        mha.sinks[...] = jnp.asarray([0.5, -1.0, 2.0, 0.0], F32)
    check_equal_to_contiguous(mha)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_block_paged_step_equals_the_contiguous_cache(pre_norm):
    block = jnnx.AttentionBlock(4, FEATURES, head_dim=3, num_kv_heads=2, pre_norm=pre_norm, rngs=nnx.Rngs(5))
    check_equal_to_contiguous(block)


def test_a_donated_step_updates_the_pools_in_place():
    mha = jnnx.MultiHeadAttention(4, FEATURES, num_kv_heads=2, head_dim=3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mha)

    def step(state, pages, x, meta):
        return nnx.merge(graphdef, state).paged_step(x, pages, meta)

    alloc = paged.PageAllocator(997, 8, 4)
    alloc.reserve("a", 5)
    meta = alloc.metadata([("a", 0, 5)], MAX_SEQS, MAX_TOKENS)
    x = jnp.zeros((MAX_TOKENS, FEATURES), F32)
    stats = jax.jit(step, donate_argnums=(1,)).lower(state, mha.init_pages(997, 8), x, meta).compile()
    pool_bytes = 997 * 8 * 2 * 3 * 4
    assert stats.memory_analysis().alias_size_in_bytes == 2 * pool_bytes  # both pools written in place
    assert stats.memory_analysis().temp_size_in_bytes < pool_bytes // 4  # no copy of a pool


def test_int8_pages_with_scales_stay_close():
    mha = jnnx.MultiHeadAttention(2, FEATURES, rngs=nnx.Rngs(0))
    alloc = paged.PageAllocator(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ)
    alloc.reserve("a", 7)
    meta = alloc.metadata([("a", 0, 7)], 1, 7)
    x = inputs()["c"][:7]
    pages = mha.init_pages(NUM_PAGES, PAGE_SIZE, dtype=jnp.int8)
    out, pages = mha.paged_step(x, pages, meta, k_scale=0.05, v_scale=0.05)
    assert pages.key_pages.dtype == jnp.int8
    np.testing.assert_allclose(out, mha(x[None], is_causal=True)[0], atol=0.1)


# Errors.


def one_step(module: Any, x: Any = None, **change: Any) -> Any:
    alloc = paged.PageAllocator(4, 2, 2)
    alloc.reserve("a", 3)
    args = dict(
        inputs=jnp.ones((3, FEATURES), F32) if x is None else x,
        pages=module.init_pages(4, 2),
        meta=alloc.metadata([("a", 0, 3)], 1, 3),
    )
    args.update(change)
    return module.paged_step(args.pop("inputs"), args.pop("pages"), args.pop("meta"), **args)


def mha(**options: Any) -> jnnx.MultiHeadAttention:
    return jnnx.MultiHeadAttention(2, FEATURES, **options, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "module, match",
    [
        (lambda: mha(attention_fn=nnx.dot_product_attention), "not attention_fn"),
        (lambda: mha(in_kv_features=5), "in_kv_features must equal in_features"),
        (lambda: mha(dropout_rate=0.5), "no dropout"),
    ],
    ids=["attention_fn", "cross-attention", "dropout"],
)
def test_modules_that_cannot_serve_raise(module, match):
    with pytest.raises(ValueError, match=match):
        one_step(module())


def test_dropout_off_serves():
    module = mha(dropout_rate=0.5)
    module.eval()
    assert one_step(module)[0].shape == (3, FEATURES)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(inputs=jnp.ones((3, FEATURES), jnp.int32)), TypeError, "inputs"),
        (dict(inputs=jnp.ones((1, 3, FEATURES), F32)), ValueError, r"inputs must have rank 2"),
        (dict(inputs=jnp.ones((3, 5), F32)), ValueError, r"in_features=14\); got \(3, 5\)"),
        (dict(pages=(jnp.zeros((4, 2, 2, 7)),) * 2), TypeError, "must be a jattn.nnx.PagedKV"),
        (dict(meta={"kv_lens": 3}), TypeError, "must be a jattn.paged.BatchMetadata"),
        (dict(pages=jnnx.PagedKV(jnp.zeros((4, 2, 1, 7)), jnp.zeros((4, 2, 2, 7)))), ValueError, "kv_heads=2"),
        (dict(pages=jnnx.PagedKV(jnp.zeros((4, 2, 2, 7)), jnp.zeros((4, 2, 2, 6)))), ValueError, "v_dim=7"),
        (dict(inputs=jnp.ones((4, FEATURES), F32)), ValueError, r"slot_mapping must have shape \(tokens,\)=\(4,\)"),
        (dict(pages=jnnx.PagedKV(*(jnp.zeros((4, 2, 2, 7), jnp.bfloat16),) * 2)), ValueError, "dtype bfloat16"),
    ],
    ids=["int-inputs", "rank", "features", "pages-type", "meta-type", "kv-heads", "v-dim", "tokens", "dtype"],
)
def test_bad_inputs_raise(change, error, match):
    with pytest.raises(error, match=match):
        one_step(mha(), **change)


def test_metadata_errors_of_the_core_come_through():
    alloc = paged.PageAllocator(4, 2, 2)
    alloc.reserve("a", 3)
    meta = alloc.metadata([("a", 0, 3)], 1, 3)._replace(kv_lens=np.asarray([2], np.int32))  # q_len 3 > kv_len
    with pytest.raises(ValueError, match="kv_len"):
        one_step(mha(), meta=meta)


@pytest.mark.parametrize("num_pages, page_size", [(0, 2), (3, -1)])
def test_init_pages_needs_positive_sizes(num_pages, page_size):
    with pytest.raises(ValueError, match="must be a positive int"):
        mha().init_pages(num_pages, page_size)


def test_block_rejects_token_ids_and_batched_inputs():
    block = jnnx.AttentionBlock(2, FEATURES, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="inputs"):
        one_step(block, jnp.ones((3, FEATURES), jnp.int32))
    with pytest.raises(ValueError, match="inputs must have rank 2"):
        one_step(block, jnp.ones((1, 3, FEATURES), F32))
