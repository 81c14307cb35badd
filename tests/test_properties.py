"""Properties of attention, checked with hypothesis (bounded: few shapes, few examples).

Inputs come from a drawn seed rather than drawn arrays, and shapes from a short
list, so each implementation compiles only a handful of functions. Everything
runs in float64 (float32-accurate for the delegating implementations, whose
softmax runs in float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import cases, oracle
from conformance.cases import DELEGATING, promotion_for
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn

IMPLEMENTATIONS = cases.implementation_params()
FULL_IMPLEMENTATIONS = cases.full_implementation_params()
BOUNDED = settings(max_examples=6, deadline=None, derandomize=True)

# (batch, q_seq, kv_seq, heads, kv_heads, dim)
SHAPES = [(1, 3, 5, 2, 1, 4), (2, 5, 7, 2, 2, 4), (1, 7, 3, 4, 2, 8)]


@functools.partial(jax.jit, static_argnames=("implementation", "is_causal", "local_window_size"))
def attend(query, key, value, bias, mask, *, implementation, is_causal=False, local_window_size=None):
    return jattn.dot_product_attention(
        query, key, value, bias, mask,
        is_causal=is_causal, local_window_size=local_window_size, implementation=implementation,
    )  # fmt: skip


def call(implementation, *args, **static):
    with promotion_for(implementation, jnp.float64):
        return np.asarray(attend(*args, implementation=implementation, **static))


def problem(seed, shape, *, masked=0.3):
    """q, k, v, a full bias and a dense mask (True = attend) drawn from ``seed``."""
    b, t, s, n, kh, d = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((b, t, n, d)), rng.standard_normal((b, s, kh, d)), rng.standard_normal((b, s, kh, d))
    bias = rng.standard_normal((b, n, t, s))
    mask = rng.random((b, n, t, s)) >= masked
    return [jnp.asarray(x, jnp.float64) for x in (q, k, v, bias)] + [jnp.asarray(mask)]


def tol(implementation):
    return cases.tolerance(implementation, jnp.float64).out


def rows_seeing_a_key(mask, **mask_options):
    """(B, T, N) bool: rows that see at least one key."""
    b, n, t, s = mask.shape
    return oracle.visibility(b, n, t, s, mask=np.asarray(mask), **mask_options).any(axis=3).transpose(0, 2, 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@BOUNDED
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), data=st.data())
def test_permuting_keys_and_values_together_changes_nothing(implementation, seed, shape, data):
    q, k, v, bias, mask = problem(seed, shape)
    perm = np.asarray(data.draw(st.permutations(range(shape[2]))))
    out = call(implementation, q, k, v, bias, mask)
    permuted = call(implementation, q, k[:, perm], v[:, perm], bias[..., perm], mask[..., perm])
    rows = rows_seeing_a_key(mask)
    np.testing.assert_allclose(permuted[rows], out[rows], atol=tol(implementation))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@BOUNDED
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(SHAPES),
    is_causal=st.booleans(),
    window=st.sampled_from([None, (1, 1), (2, 0)]),
)
def test_outputs_lie_between_min_and_max_of_visible_values(implementation, seed, shape, is_causal, window):
    q, k, v, bias, mask = problem(seed, shape)
    out = call(implementation, q, k, v, bias, mask, is_causal=is_causal, local_window_size=window)
    b, t, s, n, kh, _ = shape
    vis = oracle.visibility(b, n, t, s, mask=np.asarray(mask), is_causal=is_causal, local_window_size=window)
    v_heads = np.repeat(np.asarray(v), n // kh, axis=2).transpose(0, 2, 1, 3)[:, :, None]  # (B, N, 1, S, D)
    seen = vis[..., None]  # (B, N, T, S, 1)
    lo = np.where(seen, v_heads, np.inf).min(axis=3).transpose(0, 2, 1, 3)  # (B, T, N, D)
    hi = np.where(seen, v_heads, -np.inf).max(axis=3).transpose(0, 2, 1, 3)
    rows = vis.any(axis=3).transpose(0, 2, 1)
    slack = tol(implementation)
    assert (out[rows] >= lo[rows] - slack).all() and (out[rows] <= hi[rows] + slack).all()
    if implementation not in DELEGATING:
        np.testing.assert_array_equal(out[~rows], 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@BOUNDED
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(SHAPES),
    constant=st.floats(-1e3, 1e3, allow_nan=False),
    is_causal=st.booleans(),
)
def test_adding_a_constant_to_a_rows_logits_changes_nothing(implementation, seed, shape, constant, is_causal):
    q, k, v, bias, mask = problem(seed, shape)
    per_row = constant * np.random.default_rng(seed + 1).random((*bias.shape[:3], 1))  # a constant per (b, n, t)
    out = call(implementation, q, k, v, bias, mask, is_causal=is_causal)
    shifted = call(implementation, q, k, v, bias + jnp.asarray(per_row), mask, is_causal=is_causal)
    # Shifted logits are rounded in the softmax dtype: an error of about |constant| * eps in each weight.
    softmax_eps = np.finfo(np.float32 if implementation in DELEGATING else np.float64).eps
    np.testing.assert_allclose(shifted, out, atol=tol(implementation) + 8 * softmax_eps * abs(constant))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@BOUNDED
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), data=st.data())
def test_masking_a_key_equals_deleting_it(implementation, seed, shape, data):
    q, k, v, bias, mask = problem(seed, shape)
    j = data.draw(st.integers(0, shape[2] - 1))
    keep = np.arange(shape[2]) != j
    hidden = call(implementation, q, k, v, bias, mask & jnp.asarray(keep[None, None, None]))
    if keep.sum() == 0:
        np.testing.assert_array_equal(hidden, 0.0)
        return
    deleted = call(implementation, q, k[:, keep], v[:, keep], bias[..., keep], mask[..., keep])
    rows = rows_seeing_a_key(mask[..., keep])
    np.testing.assert_allclose(hidden[rows], deleted[rows], atol=tol(implementation))
    if implementation not in DELEGATING:
        np.testing.assert_array_equal(hidden[~rows], 0.0)


@functools.partial(jax.jit, static_argnames=("implementation",))
def output_and_grads(query, key, value, bias, mask, cotangent, *, implementation):
    def f(q, k, v, b):
        return jattn.dot_product_attention(q, k, v, b, mask, implementation=implementation)

    out, vjp = jax.vjp(f, query, key, value, bias)
    return out, vjp(cotangent)


@pytest.mark.parametrize("implementation", FULL_IMPLEMENTATIONS)
@BOUNDED
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), data=st.data())
def test_fully_masked_rows_give_zeros_and_zero_gradients(implementation, seed, shape, data):
    q, k, v, bias, mask = problem(seed, shape)
    b, t, _, n, _, d = shape
    dead = np.asarray(data.draw(st.lists(st.booleans(), min_size=b * n * t, max_size=b * n * t))).reshape(b, n, t)
    mask = mask & jnp.asarray(~dead[..., None])
    cot = jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, n, d)))
    out, (dq, dk, dv, dbias) = output_and_grads(q, k, v, bias, mask, cot, implementation=implementation)
    dead_rows = dead.transpose(0, 2, 1)  # (B, T, N)
    np.testing.assert_array_equal(np.asarray(out)[dead_rows], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[dead_rows], 0.0)
    np.testing.assert_array_equal(np.asarray(dbias)[dead], 0.0)
    for g in (dq, dk, dv, dbias):
        assert np.isfinite(np.asarray(g)).all()
