"""Mask predicates: hand-written dense masks, combinations, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import masks


def dense(mod, q_seq, kv_seq):
    return np.asarray(jax.jit(lambda: masks.materialize(mod, q_seq, kv_seq))())


def test_causal_with_offset():
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)  # queries at positions 2, 3
    np.testing.assert_array_equal(dense(masks.causal(offset=2), 2, 5), expected)


def test_causal_offset_may_be_traced():
    f = jax.jit(lambda off: masks.materialize(masks.causal(offset=off), 1, 4))
    np.testing.assert_array_equal(f(jnp.int32(1)), [[1, 1, 0, 0]])


def test_sliding_window_matches_jax_nn_semantics():
    # jax.nn: query i sees key j when i <= j + left and i >= j - right.
    i, j = np.arange(7)[:, None], np.arange(5)[None, :]
    expected = (i <= j + 3) & (i >= j - 1)
    np.testing.assert_array_equal(dense(masks.sliding_window(3, 1), 7, 5), expected)


def test_lengths_and_segments():
    np.testing.assert_array_equal(dense(masks.lengths(kv_length=2), 2, 3), [[1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(dense(masks.lengths(q_length=1), 2, 2), [[1, 1], [0, 0]])
    q_ids, kv_ids = jnp.array([0, 1, 1]), jnp.array([1, 0, 0, 1, 2])
    expected = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0]], bool)
    np.testing.assert_array_equal(dense(masks.segments(q_ids, kv_ids), 3, 5), expected)


def test_dense_and_combinators():
    m = jnp.array([[True, False, True], [True, True, False]])
    np.testing.assert_array_equal(dense(masks.dense(m), 2, 3), m)
    both = masks.and_masks(masks.dense(m), masks.causal())
    np.testing.assert_array_equal(dense(both, 2, 3), [[1, 0, 0], [1, 1, 0]])
    either = masks.or_masks(masks.dense(m), masks.causal())
    np.testing.assert_array_equal(dense(either, 2, 3), [[1, 0, 1], [1, 1, 0]])
    assert masks.and_masks(both) is both


def test_predicates_work_per_block():
    # Kernels evaluate a predicate on a block of positions, not the whole grid.
    mod = masks.and_masks(masks.causal(), masks.sliding_window(2, 0))
    q_idx, kv_idx = jnp.arange(4, 7)[:, None], jnp.arange(2, 6)[None, :]
    np.testing.assert_array_equal(mod(q_idx, kv_idx), dense(mod, 7, 6)[4:7, 2:6])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: masks.sliding_window(-1), ValueError, r"sliding_window left must be a non-negative int; got -1"),
        (lambda: masks.sliding_window(2, 1.5), ValueError, r"sliding_window right must be a non-negative int; got 1.5"),
        (lambda: masks.lengths(1.0), TypeError, r"q_length must have an integer dtype; got float"),
        (
            lambda: masks.lengths(kv_length=jnp.array([1, 2])),
            ValueError,
            r"kv_length must have rank 0 \(\); got rank 1",
        ),
        (lambda: masks.segments(jnp.zeros(3), jnp.zeros(3, int)), TypeError, r"q_ids must have an integer dtype"),
        (
            lambda: masks.segments(jnp.zeros(3, int), jnp.zeros((3, 1), int)),
            ValueError,
            r"kv_ids must have rank 1 \(kv_seq,\); got rank 2",
        ),
        (lambda: masks.dense(jnp.ones((2, 2))), TypeError, r"mask must be boolean"),
        (
            lambda: masks.dense(jnp.ones((2, 2, 2), bool)),
            ValueError,
            r"mask must have rank 2 \(q_seq, kv_seq\); got rank 3",
        ),
        (lambda: masks.and_masks(), ValueError, r"and_masks needs at least one mask_mod"),
        (lambda: masks.or_masks(), ValueError, r"or_masks needs at least one mask_mod"),
        (lambda: masks.materialize(masks.causal(), -1, 2), ValueError, r"q_seq must be a non-negative int; got -1"),
        (lambda: masks.materialize(lambda q, k: q + k, 2, 2), TypeError, r"mask_mod result must be boolean"),
    ],
)
def test_mask_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
