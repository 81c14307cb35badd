"""score_mod, mask_mod, block masks and sinks (FlexAttention for JAX): against the float64 oracle,
gradients and tangents to captured arrays, block sparsity, no recompilation, the nnx modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import oracle
from flax import nnx

import jattn
from jattn import masks, score_mods
from jattn import nnx as jnnx
from jattn.testing import check_attention_grads

B, T, S, N, KH, D = 2, 11, 13, 4, 2, 3  # GQA: 2 query heads per kv head
OWN = {"reference": {}, "blockwise": {"block_q": 4, "block_kv": 3}}


def normal(shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


Q, K, V = normal((B, T, N, D)), normal((B, S, KH, D), seed=1), normal((B, S, KH, D), seed=2)
ROW, COL = np.arange(T)[:, None], np.arange(S)[None, :]  # query and key positions for the oracle


def attend(implementation, **options):
    return jax.jit(
        lambda q, k, v, **arrays: jattn.dot_product_attention(
            q, k, v, implementation=implementation, **OWN[implementation], **options, **arrays
        )
    )


# --- score mods against the oracle (a score mod of the position is a bias) -----------------------------------


def t5_buckets(relative, num_buckets, max_distance, bidirectional):
    """T5's bucketing in NumPy, written from the paper's description (not from jattn's code)."""
    n = -relative
    out = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        out = np.where(n < 0, num_buckets, 0)
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    exact = num_buckets // 2
    far = np.maximum(n, exact)  # the logarithmic formula only matters from `exact` on
    large = exact + (np.log(far / exact) / np.log(max_distance / exact) * (num_buckets - exact)).astype(int)
    return out + np.where(n < exact, n, np.minimum(large, num_buckets - 1))


SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
TABLE = np.random.default_rng(3).standard_normal((16, N))
SCORE_MODS = {  # name: (score mod, the bias (N, T, S) it adds)
    "alibi": (lambda: score_mods.alibi(jnp.asarray(SLOPES)), SLOPES[:, None, None] * (COL - ROW)[None]),
    "t5_bidirectional": (
        lambda: score_mods.relative_position_bias(jnp.asarray(TABLE), 16, 20),
        TABLE[t5_buckets(COL - ROW, 16, 20, True)].transpose(2, 0, 1),
    ),
    "t5_causal": (
        lambda: score_mods.relative_position_bias(jnp.asarray(TABLE), 16, 20, bidirectional=False),
        TABLE[t5_buckets(COL - ROW, 16, 20, False)].transpose(2, 0, 1),
    ),
}


@pytest.mark.parametrize("name", list(SCORE_MODS))
@pytest.mark.parametrize("implementation", list(OWN))
def test_position_score_mods_equal_the_bias_they_add(implementation, name):
    make, bias = SCORE_MODS[name]
    out = attend(implementation, is_causal=True, score_mod=make())(Q, K, V)
    expected = oracle.attention(Q, K, V, bias[None], is_causal=True).out
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("implementation", list(OWN))
def test_soft_cap_and_temperature_score_mods(implementation):
    cap = attend(implementation, score_mod=score_mods.soft_cap(0.7), scale=1.0)(Q, K, V)
    np.testing.assert_allclose(cap, oracle.attention(Q, K, V, logits_soft_cap=0.7, scale=1.0).out, atol=1e-12)
    temps = jnp.array([1.0, 2.0, 0.5, 4.0])
    hot = attend(implementation, score_mod=score_mods.temperature(temps))(Q, K, V)
    for h in range(N):  # a temperature t is the scale divided by t
        expected = oracle.attention(Q[:, :, h : h + 1], K[:, :, h // 2 : h // 2 + 1], V[:, :, h // 2 : h // 2 + 1],
                                    scale=1 / np.sqrt(D) / float(temps[h])).out  # fmt: skip
        np.testing.assert_allclose(hot[:, :, h : h + 1], expected, atol=1e-12)


# --- mask mods against the oracle's dense mask ------------------------------------------------------------------

DOCS = np.array([[0] * 4 + [1] * 5 + [2] * 4, [0] * 9 + [1] * 4])  # (B, S): packed documents, T = first 11
MASK_MODS = {  # name: (mask mod, the dense (B, 1, T, S) mask it is)
    "prefix_lm": (
        lambda: masks.prefix_lm(jnp.array([3, 6])),
        (COL[None] < np.array([3, 6])[:, None, None]) | (COL <= ROW),
    ),
    "document": (
        lambda: masks.document(jnp.asarray(DOCS[:, :T]), jnp.asarray(DOCS)),
        DOCS[:, :T, None] == DOCS[:, None],
    ),
    "chunked_causal": (
        lambda: masks.and_masks(masks.causal(), masks.chunked(4)),
        (ROW // 4 == COL // 4) & (COL <= ROW),
    ),
    "dilated": (lambda: masks.dilated(3), (ROW - COL) % 3 == 0),
    "per_head": (lambda: lambda b, h, q, k: (k + h) % 2 == 0, None),
}


def dense_mask(name):
    mask = MASK_MODS[name][1]
    if mask is None:  # per head: (k + h) even
        return ((COL[None] + np.arange(N)[:, None, None]) % 2 == 0)[None]
    return np.broadcast_to(mask, (B, T, S))[:, None]


@pytest.mark.parametrize("name", list(MASK_MODS))
@pytest.mark.parametrize("implementation", list(OWN))
def test_mask_mods_equal_their_dense_masks(implementation, name):
    out = attend(implementation, mask_mod=MASK_MODS[name][0]())(Q, K, V)
    expected = oracle.attention(Q, K, V, mask=dense_mask(name))
    np.testing.assert_allclose(out, expected.out, atol=1e-12)


def test_the_jattn_predicates_work_as_mask_mods_and_with_the_other_options():
    lengths = jnp.array([9, 13], jnp.int32)
    mod = masks.and_masks(masks.sliding_window(2), masks.or_masks(masks.chunked(4), masks.dilated(2)))
    for implementation in OWN:
        out = attend(implementation, mask_mod=mod, is_causal=True)(Q, K, V, key_value_seq_lengths=lengths)
        dense = (np.abs(ROW - COL) <= 2) & ((ROW // 4 == COL // 4) | ((ROW - COL) % 2 == 0)) & (COL <= ROW)
        expected = oracle.attention(Q, K, V, mask=dense[None, None], is_causal=True, key_value_seq_lengths=lengths)
        np.testing.assert_allclose(out, expected.out, atol=1e-12)


# --- sinks -----------------------------------------------------------------------------------------------------------


def sink_oracle(q, k, v, sinks, visible):
    """softmax over [logits, sink] without the sink's (zero) value, in NumPy."""
    kk, vv = (np.repeat(np.asarray(x), N // KH, axis=2) for x in (k, v))
    s = np.einsum("btnd,bsnd->bnts", np.asarray(q), kk) / np.sqrt(D)
    s = np.where(visible, s, -np.inf)
    m = np.maximum(s.max(-1, keepdims=True), np.asarray(sinks)[None, :, None, None])
    e = np.exp(s - m)
    w = e / (e.sum(-1, keepdims=True) + np.exp(np.asarray(sinks)[None, :, None, None] - m))
    return np.einsum("bnts,bsnd->btnd", w, vv)


@pytest.mark.parametrize("implementation", list(OWN))
def test_sinks_join_the_denominator(implementation):
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    lengths = jnp.array([0, 8], jnp.int32)  # example 0 sees no key: zeros, with or without sinks
    out = attend(implementation, is_causal=True)(Q, K, V, sinks=sinks, key_value_seq_lengths=lengths)
    visible = (COL <= ROW)[None, None] & (COL[None] < np.asarray(lengths)[:, None, None])[:, None]
    np.testing.assert_allclose(out, sink_oracle(Q, K, V, sinks, visible), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)


# --- derivatives with respect to captured arrays and sinks -----------------------------------------------------------


def captured(implementation):
    """Attention whose score_mod closes over ``slopes`` and ``table``: made from the differentiated arrays."""
    ids = jnp.array([[0, 0, 0, 1, 1]])

    def f(q, k, v, slopes, table, sinks):
        def score_mod(score, b, h, qi, ki):
            return score_mods.alibi(slopes)(score, b, h, qi, ki) + table[jnp.abs(ki - qi), h]

        return jattn.dot_product_attention(
            q, k, v, is_causal=True, score_mod=score_mod, mask_mod=masks.document(ids[:, :5], ids), sinks=sinks,
            implementation=implementation, **OWN[implementation],
        )  # fmt: skip

    return f


@pytest.mark.parametrize("implementation", list(OWN))
def test_gradients_and_tangents_reach_captured_arrays_and_sinks(implementation):
    args = (
        Q[:1, :7],
        K[:1, :5],
        V[:1, :5],
        jnp.asarray(SLOPES),
        normal((7, N), seed=5),
        jnp.array([0.3, -0.2, 1.0, 0.1]),
    )
    reference = captured("reference") if implementation != "reference" else None
    report = check_attention_grads(captured(implementation), *args, reference=reference, modes=("fwd", "rev"),
                                   max_elements=48)  # fmt: skip
    assert {"slopes", "table", "sinks"} <= {m.argument for m in report.worst}


# --- block sparsity -----------------------------------------------------------------------------------------------


def test_block_masks_count_the_visited_blocks():
    ids = jnp.repeat(jnp.arange(8), 64)[None]  # 8 documents of 64 tokens, blocks of 32: 2 x 2 per document
    doc = masks.block_mask(masks.document(ids), 1, 1, 512, 512, block_q=32, block_kv=32)
    assert int(doc.visited[0]) == 8 * 4 and doc.kinds.shape == (1, 16, 16)
    assert int((doc.kinds == 1).sum()) == 8 * 4  # documents align with blocks: every visited block is FULL
    prefix = masks.block_mask(masks.prefix_lm(100), 1, 1, 256, 256, block_q=64, block_kv=64)
    # keys 0..99 (blocks 0, 1) for everyone, the rest causal: block row r visits max(2, r + 1) blocks
    assert int(prefix.visited[0]) == 2 + 2 + 3 + 4
    chunked = masks.block_mask(masks.and_masks(masks.causal(), masks.chunked(128)), 1, 1, 512, 512,
                               block_q=64, block_kv=64)  # fmt: skip
    assert int(chunked.visited[0]) == 4 * 3  # per chunk of 2 x 2 blocks, the causal lower triangle
    np.testing.assert_array_equal(chunked.kv_counts[0], [1, 2] * 4)


def test_a_mask_mod_that_ignores_the_head_is_summarized_once_and_one_that_reads_it_per_head():
    from jattn import _mods

    document, _ = _mods.convert(masks.document(jnp.asarray(DOCS)), "mask")
    per_head, _ = _mods.convert(lambda b, h, q, k: (k + h) % 2 == 0, "mask")
    nested, _ = _mods.convert(lambda b, h, q, k: jax.jit(lambda h, k: k > h)(h, k), "mask")
    assert [document.uses(a) for a in ("batch", "head", "q_idx", "kv_idx")] == [True, False, True, True]
    assert per_head.uses("head") and not per_head.uses("q_idx") and nested.uses("head")
    # Head 3 sees only key block 1, the others only key block 0: summarized on one head, block 1 would be SKIP.
    split = masks.block_mask(lambda b, h, q, k: jnp.where(h == 3, k >= 32, k < 32), 1, 4, 64, 64,
                             block_q=32, block_kv=32)  # fmt: skip
    np.testing.assert_array_equal(split.kinds[0], [[2, 2], [2, 2]])  # every block PARTIAL over the heads
    out = jattn.dot_product_attention(Q, K, V, mask_mod=lambda b, h, q, k: jnp.where(h == 3, k >= 5, k < 5),
                                      implementation="blockwise", block_q=4, block_kv=4)  # fmt: skip
    head = np.arange(N)[None, :, None, None]
    expected = oracle.attention(Q, K, V, mask=np.where(head == 3, COL >= 5, COL < 5)).out
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_the_kernel_visits_only_the_block_masks_blocks():
    """A mask_mod that hides everything the block mask says is invisible gives the same output: those
    blocks are never computed (NaN keys there would otherwise poison the rows)."""
    ids = jnp.repeat(jnp.arange(4), 16)[None]
    mod = masks.document(ids)
    summary = masks.block_mask(mod, 1, 1, 64, 64, block_q=16, block_kv=16)
    x = normal((1, 64, 2, 4))
    poisoned_v = x.at[:, 16:32].set(jnp.nan)  # document 1's values: only document 1's rows may read them
    out = jattn.dot_product_attention(x, x, poisoned_v, mask_mod=mod, block_mask=summary, implementation="blockwise")
    rows = np.isnan(np.asarray(out)).any(axis=(2, 3))[0]
    np.testing.assert_array_equal(rows, np.arange(64) // 16 == 1)


def test_changing_captured_arrays_and_a_traced_block_mask_does_not_recompile():
    traces = []

    @jax.jit
    def layer(x, ids, slopes):
        traces.append(1)
        mod = masks.document(ids)
        summary = masks.block_mask(mod, 1, 1, 64, 64, block_q=16, block_kv=16)
        return jattn.dot_product_attention(x, x, x, score_mod=score_mods.alibi(slopes), mask_mod=mod,
                                           block_mask=summary, implementation="blockwise")  # fmt: skip

    x = normal((1, 64, 2, 4), dtype=jnp.float32)
    for seed in range(3):
        ids = jnp.sort(jax.random.randint(jax.random.key(seed), (1, 64), 0, 4), axis=-1)
        layer(x, ids, jnp.array([0.1 * seed, 0.2], jnp.float32))
    assert len(traces) == 1 and layer._cache_size() == 1


# --- delegates and errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"score_mod": score_mods.soft_cap(1.0)}, "score_mod"),
        ({"mask_mod": masks.chunked(2)}, "mask_mod"),
        ({"sinks": jnp.zeros(N)}, "sinks"),
    ],
)
def test_jax_nn_delegates_refuse_mods_and_sinks(options, name):
    with pytest.raises(ValueError, match=rf"implementation='xla' .*does not support {name}"):
        jattn.dot_product_attention(Q, K, V, implementation="xla", **options)


ERRORS = [
    ({"score_mod": 3}, TypeError, r"score_mod must be callable or None; got int"),
    ({"score_mod": lambda s, b, h, q, k: s > 0}, TypeError, r"score_mod must return one score of the score's dtype"),
    ({"mask_mod": lambda b, h, q, k: q.astype(jnp.float32)}, TypeError, r"mask_mod must return one boolean .*float"),
    ({"sinks": jnp.zeros(3)}, ValueError, r"sinks must have shape \(heads,\)=\(4,\); got \(3,\)"),
    ({"sinks": jnp.zeros(4, jnp.int32)}, TypeError, r"sinks must have a floating-point dtype; got int32"),
    ({"block_mask": "blocks"}, TypeError, r"block_mask must be a jattn.masks.BlockMask"),
    ({"block_mask": masks.block_mask(masks.chunked(2), 1, 1, T, S)}, ValueError, r"pass that mask_mod too"),
    (
        {"mask_mod": masks.chunked(2), "block_mask": masks.block_mask(masks.chunked(2), 1, 1, T, T)},
        ValueError,
        r"block_mask was built for q_seq, kv_seq = \(11, 11\); this call has \(11, 13\)",
    ),
    (
        {"mask_mod": masks.chunked(2), "block_mask": masks.block_mask(masks.chunked(2), 3, 1, T, S)},
        ValueError,
        r"block_mask must have a batch of 1 or 2 \(the call's\); got 3",
    ),
]


@pytest.mark.parametrize(("options", "error", "match"), ERRORS)
def test_errors(options, error, match):
    with pytest.raises(error, match=match):
        jattn.dot_product_attention(Q, K, V, **options)


def test_mask_factory_errors():
    for call, match in [
        (lambda: masks.chunked(0), r"size must be a positive int; got 0"),
        (lambda: masks.dilated(1.5), r"stride must be a positive int; got 1.5"),
        (lambda: masks.document(jnp.zeros((2, 3), jnp.int32), jnp.zeros((3, 3), jnp.int32)), "one batch size"),
        (lambda: masks.block_mask(masks.chunked(2), 0, 1, 4, 4), r"batch must be a positive int; got 0"),
        (lambda: score_mods.alibi_slopes(0), r"heads must be a positive int; got 0"),
        (lambda: score_mods.soft_cap(-1.0), r"cap must be a positive finite float; got -1.0"),
        (lambda: score_mods.relative_position_bias(jnp.zeros((4, 2)), 8, 16), r"the first axis \(num_buckets\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    for call, match in [
        (lambda: masks.prefix_lm(1.5), r"prefix_length must have an integer dtype"),
        (lambda: score_mods.alibi(jnp.zeros(4, jnp.int32)), r"slopes must have a floating-point dtype"),
    ]:
        with pytest.raises(TypeError, match=match):
            call()


# --- the nnx modules ----------------------------------------------------------------------------------------------


def test_a_gpt_oss_style_block_learns_its_sinks_and_decodes_with_mods():
    rngs = nnx.Rngs(0)
    block = jnnx.AttentionBlock(4, 16, num_kv_heads=2, local_window_size=(3, 0), logits_soft_cap=30.0,
                                score_mod=score_mods.alibi(score_mods.alibi_slopes(4)), use_sinks=True,
                                rngs=rngs)  # fmt: skip
    assert block.attention.sinks.shape == (4,)
    x = normal((2, 9, 16), dtype=jnp.float32)

    def loss(module):
        return jnp.sum(module(x, is_causal=True) ** 2)

    grads = nnx.jit(nnx.grad(loss))(block)
    assert float(jnp.abs(grads.attention.sinks[...]).sum()) > 0  # the sinks are learned
    step = nnx.jit(lambda m, x: m(x, is_causal=True))  # one compilation per shape, not one per op
    full = step(block, x)
    block.init_cache(2, 16)
    first = step(block, x[:, :5])  # absolute positions: ALiBi, window and causal mask agree
    rest = [step(block, x[:, i : i + 1]) for i in range(5, 9)]
    np.testing.assert_allclose(jnp.concatenate([first, *rest], axis=1), full, atol=2e-5)


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "xla"])
def test_decoding_with_a_query_offset_on_every_implementation(implementation):
    mha = jnnx.MultiHeadAttention(2, 8, local_window_size=(2, 0), implementation=implementation, rngs=nnx.Rngs(0))
    x = normal((1, 7, 8), dtype=jnp.float32)
    step = nnx.jit(lambda m, x: m(x, is_causal=True))
    full = step(mha, x)
    mha.init_cache(1, 8)
    chunks = [step(mha, x[:, :3]), step(mha, x[:, 3:5]), step(mha, x[:, 5:])]
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5)
