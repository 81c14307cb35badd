"""jattn.paged.ragged_paged_attention against a dense oracle (jattn.dot_product_attention per sequence) and
against JAX's own pure-jnp reference; gradients; page placement and sharing; recompilation; memory.

Batches use prime sizes and put NaN in every page no sequence owns, with stale page-table entries pointing
at them: a kernel that read past a sequence's pages, or let a hidden token through, would show NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import paged

F32 = jnp.float32


class Batch(NamedTuple):
    queries: jax.Array
    key_pages: jax.Array
    value_pages: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


def make_batch(q_lens, kv_lens, *, heads=6, kv_heads=2, dim=5, v_dim=3, page_size=3, pages_per_seq=5, seed=0):
    """Random sequences on shuffled pages; two padding rows, one unused sequence slot, NaN in spare pages."""
    rng = np.random.default_rng(seed)
    n, max_seqs, tokens = len(q_lens), len(q_lens) + 1, sum(q_lens) + 2
    needed = [-(-kv // page_size) for kv in kv_lens]
    spare = 3
    num_pages = sum(needed) + spare
    order = rng.permutation(num_pages)
    table = np.zeros((max_seqs, pages_per_seq), np.int32)
    table[:] = order[-spare:][rng.integers(0, spare, table.shape)]  # stale entries: NaN pages
    used = 0
    for s, k in enumerate(needed):
        table[s, :k] = order[used : used + k]
        used += k
    k_pages = rng.normal(size=(num_pages, page_size, kv_heads, dim))
    v_pages = rng.normal(size=(num_pages, page_size, kv_heads, v_dim))
    k_pages[order[-spare:]] = np.nan
    v_pages[order[-spare:]] = np.nan
    kv = np.zeros(max_seqs, np.int32)
    kv[:n] = kv_lens
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    q = rng.normal(size=(tokens, heads, dim))
    arrays = (q, k_pages, v_pages)
    return Batch(*(jnp.asarray(x, F32) for x in arrays), *map(jnp.asarray, (kv, table, cu)), jnp.asarray(n, jnp.int32))


def sequence_kv(b: Batch, s: int, scales=(None, None)):
    """Sequence ``s``'s cached keys and values, gathered from its pages (read as the kernel reads them)."""
    kv_len, page_size = int(np.asarray(b.kv_lens)[s]), b.key_pages.shape[1]
    pages = np.asarray(b.page_indices)[s, : -(-kv_len // page_size)]
    out = []
    for pool, scale in zip((b.key_pages, b.value_pages), scales, strict=True):
        x = pool[pages].reshape(-1, *pool.shape[2:])[:kv_len]
        out.append(x if scale is None else (x.astype(F32) * scale).astype(b.queries.dtype))
    return out


def dense(b: Batch, **kw):
    """The oracle, jitted over queries, pools and sinks with the (concrete) metadata closed over."""
    sinks = kw.pop("sinks", None)

    def run(q, k, v, sinks):
        return dense_eager(b._replace(queries=q, key_pages=k, value_pages=v), sinks=sinks, **kw)

    return jax.jit(run)(b.queries, b.key_pages, b.value_pages, sinks)


def dense_eager(b: Batch, *, sliding_window=None, score_mod=None, mask_mod=None, scales=(None, None), **kw):
    """The oracle: ``jattn.dot_product_attention`` on each sequence's gathered K/V with a bottom-right causal
    mask; mods get the sequence index and absolute positions, as the paged kernel gives them."""
    cu, kv_lens = np.asarray(b.cu_q_lens), np.asarray(b.kv_lens)
    out = jnp.zeros((*b.queries.shape[:2], b.value_pages.shape[-1]), b.queries.dtype)
    for s in range(int(b.num_seqs)):
        q0, q1, kv_len = int(cu[s]), int(cu[s + 1]), int(kv_lens[s])
        k, v = sequence_kv(b, s, scales)
        offset = kv_len - (q1 - q0)
        pos, j = offset + np.arange(q1 - q0)[:, None], np.arange(kv_len)[None]
        mask = (j <= pos) & (True if sliding_window is None else j > pos - sliding_window)
        mods = {}
        if score_mod is not None:
            mods["score_mod"] = lambda x, _, h, qi, ki, s=s, o=offset: score_mod(x, s, h, qi + o, ki)
        if mask_mod is not None:
            mods["mask_mod"] = lambda _, h, qi, ki, s=s, o=offset: mask_mod(s, h, qi + o, ki)
        o = jattn.dot_product_attention(b.queries[q0:q1], k, v, mask=jnp.asarray(mask)[None], **mods, **kw)
        out = out.at[q0:q1].set(o)
    return out


def attend(b: Batch, **kw):
    return jax.jit(functools.partial(paged.ragged_paged_attention, **kw))(*b)


# q_len 1 rows take the decode (one-row) blocks; longer ones the prefill blocks, here with block_q=2 so
# blocks straddle sequences; pages_per_chunk=2 with pages_per_seq=5 leaves a single-page tail.
Q_LENS, KV_LENS = (1, 4, 1, 3), (7, 11, 1, 3)
TUNING = dict(pages_per_chunk=2, block_q=2)


@pytest.mark.parametrize(
    "kv_heads, options",
    [
        (6, {}),
        (2, {}),
        (2, dict(sliding_window=4)),
        (3, dict(logits_soft_cap=1.5, scale=0.7)),
        (2, dict(sinks=jnp.asarray([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], F32))),
    ],
    ids=["mha", "gqa", "window", "soft_cap", "sinks"],
)
def test_matches_dense_oracle(kv_heads, options):
    b = make_batch(Q_LENS, KV_LENS, kv_heads=kv_heads)
    out = attend(b, **options, **TUNING)
    np.testing.assert_allclose(out, dense(b, **options), atol=2e-6)
    assert not np.asarray(out[sum(Q_LENS) :]).any(), "padding rows must be zeros"


def test_chunk_and_block_sizes_do_not_change_the_result():
    b = make_batch(Q_LENS, KV_LENS, seed=3)
    ref = attend(b, pages_per_chunk=1, block_q=1)
    for tuning in (dict(pages_per_chunk=3, block_q=5), dict(pages_per_chunk=8, block_q=32)):
        np.testing.assert_allclose(attend(b, **tuning), ref, atol=2e-6)


def test_matches_jax_reference_kernel():
    kernel = pytest.importorskip("jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel")
    b = make_batch(Q_LENS, KV_LENS, dim=5, v_dim=5, seed=1)
    # JAX's kernel interleaves K and V heads in one pool.
    kv_pages = jnp.stack([b.key_pages, b.value_pages], axis=3).reshape(*b.key_pages.shape[:2], -1, 5)
    options = dict(sliding_window=5, logits_soft_cap=2.0)
    ref = _jax_reference(kernel, b, kv_pages, sm_scale=0.6, soft_cap=2.0, sliding_window=5)
    out = attend(b, scale=0.6, **options, **TUNING)
    np.testing.assert_allclose(out[: ref.shape[0]], ref, atol=2e-6)


def _jax_reference(kernel, b, kv_pages, **options):
    """JAX's ``ref_ragged_paged_attention`` on batch ``b`` (its pool interleaves K and V heads)."""
    args = (b.queries, kv_pages, b.kv_lens, b.page_indices, b.cu_q_lens, b.num_seqs.reshape(1))
    return kernel.ref_ragged_paged_attention(*args, **options)


def test_int8_pages_with_scales_match_both_references():
    kernel = pytest.importorskip("jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel")
    b = make_batch(Q_LENS, KV_LENS, dim=5, v_dim=5, seed=2)
    quant = [jnp.clip(jnp.round(jnp.nan_to_num(p) * 40), -127, 127).astype(jnp.int8) for p in b[1:3]]
    b = b._replace(key_pages=quant[0], value_pages=quant[1])
    scales = (0.025, 0.02)
    out = attend(b, k_scale=scales[0], v_scale=scales[1], **TUNING)
    np.testing.assert_allclose(out, dense(b, scales=scales), atol=2e-6)
    kv_pages = jnp.stack(quant, axis=3).reshape(*quant[0].shape[:2], -1, 5)
    ref = _jax_reference(kernel, b, kv_pages, sm_scale=5**-0.5, k_scale=scales[0], v_scale=scales[1])
    np.testing.assert_allclose(out[: ref.shape[0]], ref, atol=2e-6)


def test_score_mod_and_mask_mod_see_sequence_index_and_absolute_positions():
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(4, 16)), F32)  # (sequence, kv position)

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + bias[batch, kv_idx] - 0.1 * (head * (q_idx - kv_idx)).astype(F32)

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx + batch + head) % 4 != 1

    b = make_batch(Q_LENS, KV_LENS, seed=4)
    out = attend(b, score_mod=score_mod, mask_mod=mask_mod, **TUNING)
    np.testing.assert_allclose(out, dense(b, score_mod=score_mod, mask_mod=mask_mod), atol=2e-6)


def test_placement_does_not_matter_shared_pages_and_permutation():
    b = make_batch((2, 1), (7, 8), seed=6)
    # The second sequence shares the first's two full pages (a common 6-token prefix).
    shared = b._replace(
        page_indices=b.page_indices.at[1, :2].set(b.page_indices[0, :2]),
        key_pages=b.key_pages.at[b.page_indices[1, :2]].set(jnp.nan),  # its own copies are gone
        value_pages=b.value_pages.at[b.page_indices[1, :2]].set(jnp.nan),
    )
    prefix = dict(key_pages=b.key_pages.at[b.page_indices[1, :2]].set(b.key_pages[b.page_indices[0, :2]]))
    prefix["value_pages"] = b.value_pages.at[b.page_indices[1, :2]].set(b.value_pages[b.page_indices[0, :2]])
    own_copies = b._replace(**prefix)
    np.testing.assert_allclose(attend(shared, **TUNING), attend(own_copies, **TUNING), atol=1e-6)
    perm = np.random.default_rng(7).permutation(b.key_pages.shape[0])
    inverse = np.argsort(perm)
    moved = b._replace(
        key_pages=b.key_pages[perm], value_pages=b.value_pages[perm], page_indices=inverse[b.page_indices]
    )
    np.testing.assert_allclose(attend(moved, **TUNING), attend(b, **TUNING), atol=1e-6)


def test_gradients_match_the_dense_oracle():
    b = make_batch(Q_LENS, KV_LENS, seed=8)
    b = b._replace(key_pages=jnp.nan_to_num(b.key_pages), value_pages=jnp.nan_to_num(b.value_pages))
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], F32)
    slopes = jnp.asarray([0.3, -0.2, 0.1, 0.5, -0.4, 0.2], F32)
    ct = jnp.asarray(np.random.default_rng(9).normal(size=(b.queries.shape[0], 6, 3)), F32)

    def loss(fn, q, k, v, sinks, slopes):
        def mod(score, batch, head, q_idx, kv_idx):
            return score + slopes[head] * (kv_idx - q_idx).astype(F32)

        return (fn(b._replace(queries=q, key_pages=k, value_pages=v), sinks=sinks, score_mod=mod) * ct).sum()

    args = (b.queries, b.key_pages, b.value_pages, sinks, slopes)
    grad = jax.jit(jax.grad(functools.partial(loss, attend), argnums=(0, 1, 2, 3, 4)))
    want = jax.jit(jax.grad(functools.partial(loss, dense_eager), argnums=(0, 1, 2, 3, 4)))
    names = ("queries", "key_pages", "value_pages", "sinks", "slopes")
    for name, got, ref in zip(names, grad(*args), want(*args), strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=name)


def test_forward_mode_and_second_order_raise_clear_errors():
    b = make_batch((1,), (4,))

    def f(q):
        return paged.ragged_paged_attention(q, *b[1:])

    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(f, (b.queries,), (b.queries,))
    with pytest.raises(ValueError, match=r"Reverse-mode differentiation does not work for lax\.while_loop"):
        jax.grad(lambda q: jax.grad(lambda q: f(q).sum())(q).sum())(b.queries)


def test_new_metadata_values_never_recompile():
    b = make_batch((1, 3, 1), (5, 9, 2), seed=10)
    step = jax.jit(paged.ragged_paged_attention)
    step(*b)
    other = b._replace(kv_lens=jnp.asarray([9, 4, 6, 0], jnp.int32), cu_q_lens=jnp.asarray([0, 2, 3, 5, 5], jnp.int32))
    step(*other)
    step(*b._replace(num_seqs=jnp.asarray(1, jnp.int32)))
    assert step._cache_size() == 1


def test_compiled_memory_does_not_grow_with_the_pool():
    """Only a chunk's pages are gathered: temp memory is the same for a pool 16x larger."""

    def temp(num_pages):
        b = make_batch((1, 3), (5, 9))
        pool = jax.ShapeDtypeStruct((num_pages, *b.key_pages.shape[1:]), F32)
        args = (b.queries, pool, pool, *b[3:])
        return jax.jit(paged.ragged_paged_attention).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp(160) == temp(10)


def test_bad_metadata_under_jit_never_leaks_other_sequences():
    b = make_batch((1, 2), (4, 6), seed=11)
    ref = attend(b)
    # A page index outside the pool hides that page's tokens; sequence 1 is unaffected.
    table = b.page_indices.at[0, 0].set(10_000)
    out = attend(b._replace(page_indices=table))
    np.testing.assert_allclose(out[1:], ref[1:], atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()
    # Decreasing cu_q_lens: that sequence is empty (zeros). kv_lens past the table is clipped to the
    # sequence's own row of it (whose stale entries here point at NaN pages: row 0 is its own business).
    bad = b._replace(cu_q_lens=jnp.asarray([0, 1, 0, 0], jnp.int32), kv_lens=jnp.asarray([99, 6, 0], jnp.int32))
    assert not np.asarray(attend(bad)[1:]).any()


def test_empty_batches_give_zeros():
    b = make_batch((1, 2), (4, 6))
    assert not np.asarray(attend(b._replace(num_seqs=jnp.asarray(0, jnp.int32)))).any()
    empty = paged.ragged_paged_attention(b.queries[:0], *b[1:6], jnp.asarray(0, jnp.int32))
    assert empty.shape == (0, 6, 3)


def test_bfloat16_queries_and_pages():
    b = make_batch(Q_LENS, KV_LENS, seed=12)
    b16 = b._replace(**{f: getattr(b, f).astype(jnp.bfloat16) for f in ("queries", "key_pages", "value_pages")})
    out = attend(b16, **TUNING)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(F32), dense(b16).astype(F32), atol=2e-2)
