"""The error catalogue of jattn.paged: every message names the argument, the expected and the actual.

Shape, dtype and option errors are raised at trace time, so they are called under ``jax.jit`` with the
arrays traced. Metadata *values* are checked only when concrete (an eager call); those entries run
eagerly. Allocator errors are host-side Python.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jattn import paged

F32, I32 = jnp.float32, jnp.int32


def z(*shape, dtype=F32):
    return jnp.zeros(shape, dtype)


def ints(*values):
    return jnp.asarray(values, I32)


# 5 query rows, 4 heads, dim 3; 7 pages of 2 tokens, 2 kv heads, v_dim 6; 2 sequences: q_lens 1, 2.
Q, KP, VP = z(5, 4, 3), z(7, 2, 2, 3), z(7, 2, 2, 6)
KV, PI, CU, NS = ints(3, 2), jnp.asarray([[0, 1], [2, 3]], I32), ints(0, 1, 3), jnp.asarray(2, I32)
rpa, write = paged.ragged_paged_attention, paged.write


def entry(name, fn, args, error, match, jit=True, **kwargs):
    return pytest.param(fn, args, kwargs, error, match, jit, id=name)


def call(*replace, **kwargs):
    """``ragged_paged_attention``'s positional arguments with some replaced: ``call((index, value), ...)``."""
    args = [Q, KP, VP, KV, PI, CU, NS]
    for index, value in replace:
        args[index] = value
    return tuple(args)


CATALOGUE = [
    # --- ragged_paged_attention: shapes and dtypes (trace time) ------------------------------------
    entry("queries_rank", rpa, call((0, z(5, 12))), ValueError,
          r"queries must have rank 3 \(tokens, heads, dim\); got rank 2 with shape \(5, 12\)"),
    entry("queries_int", rpa, call((0, z(5, 4, 3, dtype=I32))), TypeError,
          r"queries must have a floating-point dtype; got int32"),
    entry("key_pages_rank", rpa, call((1, z(7, 2, 3))), ValueError,
          r"key_pages must have rank 4 \(num_pages, page_size, kv_heads, dim\); got rank 3 with shape \(7, 2, 3\)"),
    entry("key_pages_dim", rpa, call((1, z(7, 2, 2, 4))), ValueError,
          r"key_pages must have shape \(num_pages, page_size, kv_heads, dim\)=\(7, 2, 2, 3\); got \(7, 2, 2, 4\)"),
    entry("value_pages_page_size", rpa, call((2, z(7, 3, 2, 6))), ValueError,
          r"value_pages must have shape \(num_pages, page_size, kv_heads, v_dim\)=\(7, 2, 2, 6\); got \(7, 3, 2, 6\)"),
    entry("heads_not_multiple", rpa, call((0, z(5, 3, 3))), ValueError,
          r"queries' heads must be a multiple of the pages' kv_heads \(grouped-query attention\); got heads=3, "
          r"kv_heads=2"),
    entry("pool_dtype", rpa, call((1, KP.astype(jnp.bfloat16))), TypeError,
          r"queries, key_pages must share one dtype; got queries=float32, key_pages=bfloat16"),
    entry("bool_pool_with_scale", rpa, call((1, KP.astype(bool))), TypeError,
          r"key_pages must hold integers or floats \(quantized with a scale\); got bool", k_scale=1.0),
    entry("kv_lens_float", rpa, call((3, KV.astype(F32))), TypeError,
          r"kv_lens must have an integer dtype; got float32"),
    entry("page_indices_float", rpa, call((4, PI.astype(F32))), TypeError,
          r"page_indices must have an integer dtype; got float32"),
    entry("kv_lens_rank", rpa, call((3, KV[None])), ValueError,
          r"kv_lens must have rank 1 \(max_seqs,\); got rank 2 with shape \(1, 2\)"),
    entry("page_indices_rows", rpa, call((4, PI[:1])), ValueError,
          r"page_indices must have shape \(max_seqs, pages_per_seq\)=\(2, 2\); got \(1, 2\)"),
    entry("cu_q_lens_shape", rpa, call((5, CU[:2])), ValueError,
          r"cu_q_lens must have shape \(max_seqs \+ 1,\)=\(3,\); got \(2,\)"),
    entry("num_seqs_shape", rpa, call((6, ints(1, 2))), ValueError,
          r"num_seqs must be a scalar or have shape \(1,\); got shape \(2,\)"),
    # --- options -------------------------------------------------------------------------------------
    entry("sinks_shape", rpa, call(), ValueError, r"sinks must have shape \(heads,\)=\(4,\); got \(3,\)", sinks=z(3)),
    entry("sliding_window", rpa, call(), ValueError, r"sliding_window must be a positive int or None; got 0",
          sliding_window=0),
    entry("soft_cap", rpa, call(), ValueError, r"logits_soft_cap must be a positive finite float or None; got -1.0",
          logits_soft_cap=-1.0),
    entry("scale_type", rpa, call(), TypeError, r"scale must be a Python float or None; got str", scale="1"),
    entry("k_scale_array", rpa, call((1, KP.astype(jnp.int8))), TypeError,
          r"k_scale must be a Python float or None \(one scale for the whole pool\); got Array", k_scale=jnp.ones(())),
    entry("v_scale_negative", rpa, call((2, VP.astype(jnp.int8))), ValueError,
          r"v_scale must be a positive finite float or None; got -1.0", v_scale=-1.0),
    entry("score_mod_not_callable", rpa, call(), TypeError, r"score_mod must be callable or None; got int",
          score_mod=3),
    entry("mask_mod_returns_float", rpa, call(), TypeError, r"mask_mod must return one boolean",
          mask_mod=lambda b, h, q, k: 1.0),
    entry("pages_per_chunk", rpa, call(), ValueError, r"pages_per_chunk must be a positive int; got 0",
          pages_per_chunk=0),
    entry("block_q", rpa, call(), ValueError, r"block_q must be a positive int; got 1.5", block_q=1.5),
    # --- concrete metadata values (eager) -----------------------------------------------------------
    entry("num_seqs_too_many", rpa, call((6, jnp.asarray(3, I32))), ValueError,
          r"num_seqs must lie in \[0, max_seqs=2\]; got 3", jit=False),
    entry("cu_q_lens_negative", rpa, call((5, ints(-1, 1, 3))), ValueError, r"cu_q_lens\[0\] must be >= 0; got -1",
          jit=False),
    entry("cu_q_lens_decreasing", rpa, call((5, ints(0, 2, 1))), ValueError,
          r"cu_q_lens must be non-decreasing over its first num_seqs \+ 1 = 3 entries; got cu_q_lens\[1\]=2 > "
          r"cu_q_lens\[2\]=1", jit=False),
    entry("cu_q_lens_past_tokens", rpa, call((5, ints(0, 1, 6))), ValueError,
          r"cu_q_lens\[num_seqs\] must be <= tokens=5 \(the rows of queries\); got 6", jit=False),
    entry("kv_lens_beyond_pages", rpa, call((3, ints(3, 5))), ValueError,
          r"kv_lens\[1\] must lie in \[0, pages_per_seq \* page_size = 2 \* 2 = 4\]; got 5", jit=False),
    entry("q_len_exceeds_kv_len", rpa, call((3, ints(3, 1))), ValueError,
          r"sequence 1 has q_len=2 new tokens but kv_lens\[1\]=1: kv_lens counts this call's tokens too, so "
          r"q_len <= kv_len", jit=False),
    entry("page_outside_pool", rpa, call((4, jnp.asarray([[0, 7], [2, 3]], I32))), ValueError,
          r"page_indices\[0, 1\] must lie in \[0, num_pages=7\) \(sequence 0 uses its first 2 pages\); got 7",
          jit=False),
    entry("page_negative", rpa, call((4, jnp.asarray([[0, 1], [-1, 3]], I32))), ValueError,
          r"page_indices\[1, 0\] must lie in \[0, num_pages=7\) \(sequence 1 uses its first 1 pages\); got -1",
          jit=False),
    # --- write ---------------------------------------------------------------------------------------
    entry("write_pool_rank", write, (z(7, 2, 3), VP, z(3, 2, 3), z(3, 2, 6), ints(0, 1, 2)), ValueError,
          r"key_pages must have rank 4 \(num_pages, page_size, kv_heads, dim\); got rank 3 with shape \(7, 2, 3\)"),
    entry("write_keys_shape", write, (KP, VP, z(3, 2, 4), z(3, 2, 6), ints(0, 1, 2)), ValueError,
          r"keys must have shape \(tokens, kv_heads, dim\)=\(3, 2, 3\); got \(3, 2, 4\)"),
    entry("write_values_tokens", write, (KP, VP, z(3, 2, 3), z(2, 2, 6), ints(0, 1, 2)), ValueError,
          r"values must have shape \(tokens, kv_heads, v_dim\)=\(3, 2, 6\); got \(2, 2, 6\)"),
    entry("write_keys_int", write, (KP, VP, z(3, 2, 3, dtype=I32), z(3, 2, 6), ints(0, 1, 2)), TypeError,
          r"keys must have a floating-point dtype; got int32"),
    entry("write_dtype", write, (KP, VP, z(3, 2, 3, dtype=jnp.bfloat16), z(3, 2, 6), ints(0, 1, 2)), TypeError,
          r"keys, key_pages must share one dtype; got keys=bfloat16, key_pages=float32"),
    entry("write_slots_float", write, (KP, VP, z(3, 2, 3), z(3, 2, 6), z(3)), TypeError,
          r"slot_mapping must have an integer dtype; got float32"),
    entry("write_slots_shape", write, (KP, VP, z(3, 2, 3), z(3, 2, 6), ints(0, 1)), ValueError,
          r"slot_mapping must have shape \(tokens,\)=\(3,\); got \(2,\)"),
    entry("write_slot_past_pool", write, (KP, VP, z(3, 2, 3), z(3, 2, 6), ints(0, 14, 2)), ValueError,
          r"slot_mapping\[1\] must be < num_pages \* page_size = 14 \(or < 0: padding\); got 14", jit=False),
    entry("write_slot_twice", write, (KP, VP, z(3, 2, 3), z(3, 2, 6), ints(0, 2, 2)), ValueError,
          r"slot_mapping must write each slot at most once; slot 2 appears twice or more", jit=False),
]  # fmt: skip


@pytest.mark.parametrize("fn, args, kwargs, error, match, jit", CATALOGUE)
def test_error_catalogue(fn, args, kwargs, error, match, jit):
    def run(*args):
        return fn(*args, **kwargs)

    with pytest.raises(error, match=match):
        (jax.jit(run) if jit else run)(*args)


def test_allocator_errors():
    with pytest.raises(ValueError, match=r"num_pages must be a positive int; got 0"):
        paged.PageAllocator(num_pages=0, page_size=2, pages_per_seq=2)
    alloc = paged.PageAllocator(num_pages=3, page_size=2, pages_per_seq=2)
    with pytest.raises(ValueError, match=r"num_tokens must lie in \[0, pages_per_seq \* page_size = 4\]; got 5"):
        alloc.reserve("x", 5)
    alloc.reserve("x", 4)
    with pytest.raises(paged.OutOfPagesError, match=r"sequence 'y' needs 2 more pages for 3 tokens; 1 of 3 are free"):
        alloc.reserve("y", 3)
    with pytest.raises(ValueError, match=r"fork shares whole pages: num_tokens must be a multiple of page_size=2"):
        alloc.fork("x", "z", 3)
    with pytest.raises(ValueError, match=r"fork needs a new child sequence; 'x' already has pages"):
        alloc.fork("x", "x", 2)
    with pytest.raises(KeyError, match=r"sequence 'nope' has no pages \(reserve first\)"):
        alloc.free("nope")
    with pytest.raises(ValueError, match=r"positions \[0, 5\) must lie within sequence 'x''s 4 reserved tokens"):
        alloc.slots("x", 0, 5)
    alloc.fork("x", "child", 2)
    with pytest.raises(ValueError, match=r"writing sequence 'x' at \[1, 2\) would overwrite shared page 0"):
        alloc.slots("x", 1, 2)
    with pytest.raises(ValueError, match=r"a batch of 1 sequences and 4 new tokens does not fit max_seqs=1, max_tok"):
        alloc.metadata([("x", 0, 4)], max_seqs=1, max_tokens=3)
