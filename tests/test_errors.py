"""The error catalogue: malformed calls fail at trace time, naming the argument, the expected and the actual.

Each entry is called under ``jax.jit`` with its arrays as traced arguments (so
no check may depend on values); mask constructors that take Python options are
called directly. Nothing malformed may be silently broadcast, truncated or
clamped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks

F32, F64, BF16, I32 = jnp.float32, jnp.float64, jnp.bfloat16, jnp.int32


def z(*shape, dtype=F32):
    return jnp.zeros(shape, dtype)


def ones_bool(*shape):
    return jnp.ones(shape, bool)


Q, K, V = z(2, 5, 4, 8), z(2, 7, 2, 8), z(2, 7, 2, 8)  # (batch, q_seq, heads, dim), GQA with 2 kv heads
dpa = jattn.dot_product_attention


def entry(name, fn, args, error, match, jit=True, **kwargs):
    return pytest.param(fn, args, kwargs, error, match, jit, id=name)


CATALOGUE = [
    # --- dot_product_attention: q/k/v ranks, shapes, dtypes -------------------------------------
    entry("query_rank_2", dpa, (z(5, 8), K, V), ValueError,
          r"query must have rank 3 or more \(\*batch, q_seq, heads, dim\); got rank 2 with shape \(5, 8\)"),
    entry("key_rank_3_with_batched_query", dpa, (Q, z(7, 2, 8), V), ValueError,
          r"key must have rank 4 \(batch, kv_seq, kv_heads, dim\) like query; got rank 3 with shape \(7, 2, 8\)"),
    entry("key_dim", dpa, (Q, z(2, 7, 2, 6), V), ValueError,
          r"key must have shape \(batch, kv_seq, kv_heads, dim\)=\(2, 7, 2, 8\); got \(2, 7, 2, 6\)"),
    entry("key_batch", dpa, (Q, z(3, 7, 2, 8), V), ValueError,
          r"key must have shape \(batch, kv_seq, kv_heads, dim\)=\(2, 7, 2, 8\); got \(3, 7, 2, 8\)"),
    entry("value_kv_seq", dpa, (Q, K, z(2, 6, 2, 8)), ValueError,
          r"value must have shape \(batch, kv_seq, kv_heads, v_dim\)=\(2, 7, 2, 8\); got \(2, 6, 2, 8\)"),
    entry("value_kv_heads", dpa, (Q, K, z(2, 7, 1, 8)), ValueError,
          r"value must have shape \(batch, kv_seq, kv_heads, v_dim\)=\(2, 7, 2, 8\); got \(2, 7, 1, 8\)"),
    entry("heads_not_multiple_of_kv_heads", dpa, (Q, z(2, 7, 3, 8), z(2, 7, 3, 8)), ValueError,
          r"multiple of key/value heads \(kv_heads\); got heads=4, kv_heads=3"),
    entry("integer_query", dpa, (z(2, 5, 4, 8, dtype=I32), K, V), TypeError,
          r"query must have a floating-point dtype; got int32"),
    entry("mixed_dtypes", dpa, (Q, z(2, 7, 2, 8, dtype=BF16), V), TypeError,
          r"query, key, value must share one dtype; got query=float32, key=bfloat16, value=float32"),
    # --- mask and bias --------------------------------------------------------------------------
    entry("float_mask", lambda q, k, v, m: dpa(q, k, v, mask=m), (Q, K, V, z(2, 4, 5, 7)), TypeError,
          r"mask must be boolean \(True = attend\); got dtype float32"),
    entry("mask_kv_seq", lambda q, k, v, m: dpa(q, k, v, mask=m), (Q, K, V, ones_bool(2, 4, 5, 6)), ValueError,
          r"mask must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to \(2, 4, 5, 7\); got \(2, 4, 5, 6\)"),
    entry("mask_rank_2_not_broadcast", lambda q, k, v, m: dpa(q, k, v, mask=m), (Q, K, V, ones_bool(6, 7)),
          ValueError, r"mask must have shape \(batch, heads, q_seq, kv_seq\) \(missing leading axes count as 1\) "
          r"broadcastable to \(2, 4, 5, 7\); got \(6, 7\)"),
    entry("mask_rank_5_with_one_batch_axis", lambda q, k, v, m: dpa(q, k, v, mask=m),
          (Q, K, V, ones_bool(2, 2, 4, 5, 7)), ValueError,
          r"mask must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to \(2, 4, 5, 7\); "
          r"got \(2, 2, 4, 5, 7\)"),
    entry("mask_with_kv_heads_axis", lambda q, k, v, m: dpa(q, k, v, mask=m), (Q, K, V, ones_bool(2, 2, 5, 7)),
          ValueError, r"mask must have shape .* broadcastable to \(2, 4, 5, 7\); got \(2, 2, 5, 7\)"),
    entry("integer_bias", dpa, (Q, K, V, z(2, 4, 5, 7, dtype=I32)), TypeError,
          r"bias must have a floating-point dtype; got int32"),
    entry("bias_transposed", dpa, (Q, K, V, z(2, 4, 7, 5)), ValueError,
          r"bias must have shape \(batch, heads, q_seq, kv_seq\) broadcastable to \(2, 4, 5, 7\); got \(2, 4, 7, 5\)"),
    entry("bias_rank_3_not_broadcast", dpa, (Q, K, V, z(2, 5, 7)), ValueError,
          r"bias must have shape .* broadcastable to \(2, 4, 5, 7\); got \(2, 5, 7\)"),
    entry("key_batch_axes", dpa, (z(3, 2, 5, 4, 8), z(2, 3, 7, 2, 8), z(2, 3, 7, 2, 8)), ValueError,
          r"key must have shape \(\*batch, kv_seq, kv_heads, dim\)=\(3, 2, 7, 2, 8\); got \(2, 3, 7, 2, 8\)"),
    # --- lengths and segment ids ------------------------------------------------------------------
    entry("query_seq_lengths_shape", lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n),
          (Q, K, V, z(3, dtype=I32)), ValueError, r"query_seq_lengths must have shape \(batch,\)=\(2,\); got \(3,\)"),
    entry("kv_seq_lengths_scalar_when_batched", lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n),
          (Q, K, V, z(dtype=I32)), ValueError, r"key_value_seq_lengths must have shape \(batch,\)=\(2,\); got \(\)"),
    entry("float_kv_seq_lengths", lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n),
          (Q, K, V, z(2)), TypeError, r"key_value_seq_lengths must have an integer dtype; got float32"),
    entry("query_segment_ids_shape",
          lambda q, k, v, a, b: dpa(q, k, v, query_segment_ids=a, key_value_segment_ids=b),
          (Q, K, V, z(2, 7, dtype=I32), z(2, 7, dtype=I32)), ValueError,
          r"query_segment_ids must have shape \(batch, q_seq\)=\(2, 5\); got \(2, 7\)"),
    entry("float_kv_segment_ids",
          lambda q, k, v, a, b: dpa(q, k, v, query_segment_ids=a, key_value_segment_ids=b),
          (Q, K, V, z(2, 5, dtype=I32), z(2, 7)), TypeError,
          r"key_value_segment_ids must have an integer dtype; got float32"),
    entry("only_query_segment_ids", lambda q, k, v, a: dpa(q, k, v, query_segment_ids=a),
          (Q, K, V, z(2, 5, dtype=I32)), ValueError,
          r"query_segment_ids and key_value_segment_ids must be given together; got only one"),
    entry("segment_ids_without_a_common_integer_type",
          lambda q, k, v, a, b: dpa(q, k, v, query_segment_ids=a, key_value_segment_ids=b),
          (Q, K, V, z(2, 5, dtype=jnp.int64), z(2, 7, dtype=jnp.uint64)), TypeError,
          r"must have integer dtypes with a common integer type; got int64 and uint64"),
    # --- static options -----------------------------------------------------------------------------
    entry("negative_window", dpa, (Q, K, V), ValueError,
          r"local_window_size must be a non-negative int or a \(left, right\) tuple of them; got -1",
          local_window_size=-1),
    entry("window_negative_side", dpa, (Q, K, V), ValueError,
          r"local_window_size must be .*; got \(2, -1\)", local_window_size=(2, -1)),
    entry("window_three_sides", dpa, (Q, K, V), ValueError,
          r"local_window_size must be .*; got \(1, 2, 3\)", local_window_size=(1, 2, 3)),
    entry("window_float", dpa, (Q, K, V), ValueError,
          r"local_window_size must be .*; got \(1.5, 2\)", local_window_size=(1.5, 2)),
    entry("unknown_implementation", dpa, (Q, K, V), ValueError,
          r"implementation must be one of \(None, 'reference', .*\); got 'flash'", implementation="flash"),
    entry("scale_string", dpa, (Q, K, V), TypeError, r"scale must be a Python float or None; got str", scale="0.5"),
    entry("soft_cap_zero", dpa, (Q, K, V), ValueError,
          r"logits_soft_cap must be a positive finite float or None; got 0", logits_soft_cap=0),
    entry("soft_cap_string", dpa, (Q, K, V), TypeError,
          r"logits_soft_cap must be a positive float or None; got '1'", logits_soft_cap="1"),
    entry("is_causal_int", dpa, (Q, K, V), TypeError, r"is_causal must be a Python bool; got int", is_causal=1),
    # --- options an implementation cannot honour ------------------------------------------------
    entry("xla_segment_ids",
          lambda q, k, v, a, b: dpa(q, k, v, query_segment_ids=a, key_value_segment_ids=b, implementation="xla"),
          (Q, K, V, z(2, 5, dtype=I32), z(2, 7, dtype=I32)), ValueError,
          r"implementation='xla' \(jax.nn.dot_product_attention\) does not support "
          r"query_segment_ids/key_value_segment_ids; use implementation='reference', 'blockwise' or None"),
    entry("xla_soft_cap", dpa, (Q, K, V), ValueError,
          r"implementation='xla' .*does not support logits_soft_cap", logits_soft_cap=5.0, implementation="xla"),
    entry("xla_v_dim", dpa, (Q, K, z(2, 7, 2, 3)), ValueError,
          r"implementation='xla' .*does not support v_dim != dim \(3 != 8\)", implementation="xla"),
    # --- unbatched calls ---------------------------------------------------------------------------
    pytest.param(dpa, (Q[0], K[0], V[0], None, ones_bool(5, 6)), {}, ValueError,
                 r"mask must have shape \(heads, q_seq, kv_seq\) \(missing leading axes count as 1\) "
                 r"broadcastable to \(4, 5, 7\); got \(5, 6\)", True,
                 id="unbatched_mask_rank_2"),
    pytest.param(lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n), (Q[0], K[0], V[0], z(2, dtype=I32)), {},
                 ValueError, r"query_seq_lengths must have shape .*; got \(2,\)", True,
                 id="unbatched_lengths_vector"),
    # --- the per-example core ---------------------------------------------------------------------
    entry("scores_dim", jattn.scores, (z(5, 4), z(7, 3)), ValueError,
          r"k: the last axis \(dim\) of k, as in q must be 4; got 3"),
    entry("scores_rank", jattn.scores, (z(2, 5, 4), z(7, 4)), ValueError,
          r"q must have rank 1 or 2 \(q_seq, dim\) or \(dim,\); got rank 3 with shape \(2, 5, 4\)"),
    entry("scores_integer", jattn.scores, (z(5, 4, dtype=I32), z(7, 4)), TypeError,
          r"q must have a floating-point dtype; got int32"),
    entry("scores_mixed_dtypes", jattn.scores, (z(5, 4), z(7, 4, dtype=F64)), TypeError,
          r"q, k must share one dtype; got q=float32, k=float64"),
    entry("scores_scale_array", jattn.scores, (z(5, 4), z(7, 4)), TypeError,
          r"scale must be a Python float or None; got ndarray", scale=np.array(0.5)),
    entry("softmax_axis", functools.partial(jattn.softmax, axis=2), (z(3, 4),), ValueError,
          r"axis must be in \[-2, 2\) for scores of shape \(3, 4\); got 2"),
    entry("softmax_mask_shape", jattn.softmax, (z(3, 4), ones_bool(3, 5)), ValueError,
          r"mask must have shape \(same rank as scores\) broadcastable to \(3, 4\); got \(3, 5\)"),
    entry("softmax_integer_mask", jattn.softmax, (z(3, 4), z(3, 4, dtype=I32)), TypeError,
          r"mask must be boolean \(True = attend\); got dtype int32"),
    entry("softmax_integer_scores", jattn.softmax, (z(3, 4, dtype=I32),), TypeError,
          r"scores must have a floating-point dtype; got int32"),
    entry("context_kv_seq", jattn.context, (z(3, 4), z(5, 2)), ValueError,
          r"v: the first axis \(kv_seq\) of v, as in weights must be 4; got 5"),
    entry("context_mixed_dtypes", jattn.context, (z(3, 4), z(4, 2, dtype=F64)), TypeError,
          r"weights, v must share one dtype; got weights=float32, v=float64"),
    entry("attention_v_kv_seq", jattn.attention, (z(5, 4), z(7, 4), z(6, 4)), ValueError,
          r"v: the first axis \(kv_seq\) of v, as in k must be 7; got 6"),
    entry("attention_bias_shape", jattn.attention, (z(5, 4), z(7, 4), z(7, 4), None, z(7, 5)), ValueError,
          r"bias must have shape \(q_seq, kv_seq\) broadcastable to \(5, 7\); got \(7, 5\)"),
    entry("attention_mask_rank", jattn.attention, (z(5, 4), z(7, 4), z(7, 4), ones_bool(1, 5, 7)), ValueError,
          r"mask must have shape \(q_seq, kv_seq\) broadcastable to \(5, 7\); got \(1, 5, 7\)"),
    entry("attention_soft_cap_negative", jattn.attention, (z(5, 4), z(7, 4), z(7, 4)), ValueError,
          r"logits_soft_cap must be a positive finite float or None; got -1.0", logits_soft_cap=-1.0),
    # --- mask predicates ----------------------------------------------------------------------------
    entry("window_left_negative", masks.sliding_window, (-1,), ValueError,
          r"sliding_window left must be a non-negative int; got -1", jit=False),
    entry("window_right_float", masks.sliding_window, (1, 2.5), ValueError,
          r"sliding_window right must be a non-negative int; got 2.5", jit=False),
    entry("lengths_float", masks.lengths, (2.0,), TypeError, r"q_length must have an integer dtype; got float",
          jit=False),
    entry("lengths_vector", masks.lengths, (None, np.array([1, 2])), ValueError,
          r"kv_length must have rank 0 \(\); got rank 1 with shape \(2,\)", jit=False),
    entry("segments_rank_2", masks.segments, (np.zeros((2, 3), int), np.zeros(3, int)), ValueError,
          r"q_ids must have rank 1 \(q_seq,\); got rank 2 with shape \(2, 3\)", jit=False),
    entry("segments_float", masks.segments, (np.zeros(3, int), np.zeros(3)), TypeError,
          r"kv_ids must have an integer dtype; got float", jit=False),
    entry("dense_integer", masks.dense, (np.zeros((2, 2), int),), TypeError,
          r"mask must be boolean \(True = attend\); got dtype int", jit=False),
    entry("dense_rank_3", masks.dense, (np.ones((1, 2, 2), bool),), ValueError,
          r"mask must have rank 2 \(q_seq, kv_seq\); got rank 3 with shape \(1, 2, 2\)", jit=False),
    entry("and_masks_empty", masks.and_masks, (), ValueError, r"and_masks needs at least one mask_mod; got none",
          jit=False),
    entry("or_masks_empty", masks.or_masks, (), ValueError, r"or_masks needs at least one mask_mod; got none",
          jit=False),
    entry("materialize_negative", masks.materialize, (masks.causal(), -1, 3), ValueError,
          r"q_seq must be a non-negative int; got -1", jit=False),
    entry("materialize_float_size", masks.materialize, (masks.causal(), 3, 3.0), ValueError,
          r"kv_seq must be a non-negative int; got 3.0", jit=False),
    entry("materialize_non_boolean_predicate", masks.materialize, (lambda i, j: i - j, 3, 3), TypeError,
          r"mask_mod result must be boolean \(True = attend\); got dtype int32", jit=False),
    # --- once accepted silently (NaN output, truncated offsets); now refused ------------------------
    pytest.param(dpa, (Q, K, V), {"logits_soft_cap": float("inf")}, ValueError,
                 r"logits_soft_cap must be a positive finite float or None; got inf", True, id="soft_cap_infinite"),
    pytest.param(masks.causal, (), {"offset": 1.5}, TypeError, r"offset must have an integer dtype; got float",
                 False, id="causal_float_offset"),
    pytest.param(masks.sliding_window, (1,), {"offset": 0.5}, TypeError,
                 r"offset must have an integer dtype; got float", False, id="window_float_offset"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "args", "kwargs", "error", "match", "jit"), CATALOGUE)
def test_malformed_call_is_refused(fn, args, kwargs, error, match, jit):
    call = jax.jit(functools.partial(fn, **kwargs)) if jit else functools.partial(fn, **kwargs)
    with pytest.raises(error, match=match):
        call(*args)


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 20


@pytest.mark.parametrize(
    "kwargs", [{"scale": np.float32(0.5)}, {"local_window_size": np.int64(2)}], ids=["np_float32_scale", "np_window"]
)
def test_numpy_scalar_options_are_accepted_like_jax_nn(kwargs):
    out = jax.jit(functools.partial(dpa, **kwargs))(Q, K, V)
    assert out.shape == Q.shape
