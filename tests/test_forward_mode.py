"""Forward-mode autodiff on every implementation: tangents against the float64 oracle, every JAX transform.

The blockwise kernel runs with small blocks (4 x 3, dividing nothing) so its
loops, skipped and partial blocks take part.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import cases
from conformance.cases import CASES_BY_NAME, DELEGATING, assert_close, make_inputs, promotion_for, tolerance

import jattn

BLOCKS = {"block_q": 4, "block_kv": 3}
IMPLEMENTATIONS = [p.values[0] for p in cases.implementation_params() if p.values[0] != "cudnn"]
FORWARD_CASES = [
    CASES_BY_NAME[n]
    for n in (
        "everything",
        "everything_jax_nn_has",
        "gqa",
        "mask_full",
        "both_lengths_causal",
        "segments_cross_causal",
        "soft_cap",
        "v_dim",
        "mqa_bias",
        "unbatched",
        "ragged_31_causal",
    )
]


def options_for(implementation):
    return BLOCKS if implementation == "blockwise" else {}


def tangents_like(named: dict, dtype, seed=3) -> dict:
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(x.shape), dtype) for name, x in named.items()}


FLOAT32_CASES = ("everything", "gqa")  # float64 covers every case; float32 checks the tolerance of two


def jvp_params():
    for implementation in IMPLEMENTATIONS:
        for case in cases.case_params(FORWARD_CASES):
            dtypes = [jnp.float64] + ([jnp.float32] if case.values[0].name in FLOAT32_CASES else [])
            for dtype in dtypes:
                yield pytest.param(
                    implementation,
                    case.values[0],
                    dtype,
                    id=f"{implementation}-{case.id}-{dtype.__name__}",
                    marks=[] if implementation == "blockwise" else [pytest.mark.slow],  # the others: plain JAX
                )


@pytest.mark.parametrize(("implementation", "case", "dtype"), list(jvp_params()))
def test_jvp_matches_float64_oracle(implementation, case, dtype):
    if implementation in DELEGATING and case.jax_nn_refuses:
        pytest.skip(f"{implementation} refuses {case.jax_nn_refuses}")
    inputs = make_inputs(case, dtype)
    tangents = tangents_like(inputs.differentiable(), dtype)
    run = cases.forward_and_jvp(implementation, case, **options_for(implementation))
    with promotion_for(implementation, dtype):
        out, tangent_out = run(
            inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask, inputs.arrays, tangents
        )
    expected = inputs.oracle(tangents=tangents)
    visible = inputs.unbatch(expected.visible_rows)
    rows = visible if implementation in DELEGATING else None  # jax.nn: mean(V) on rows that see nothing
    tol = tolerance(implementation, dtype)
    assert tangent_out.dtype == dtype
    assert_close(out, inputs.unbatch(expected.out), tol.out, "output", rows)
    assert_close(tangent_out, inputs.unbatch(expected.tangent), tol.grad, "tangent", rows)
    if implementation not in DELEGATING:  # rows that see no key: zero, finite tangents
        hidden = np.asarray(tangent_out)[~np.asarray(visible)]
        np.testing.assert_array_equal(hidden, 0.0)


def small_problem(dtype=jnp.float64):
    """Prime sizes, GQA, a bias, causal + window + lengths, soft cap: every option the kernel has."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((2, 5, 4, 3), (2, 7, 2, 3), (2, 7, 2, 2)))
    bias = jnp.asarray(rng.standard_normal((1, 4, 5, 7)), dtype)
    options = dict(
        is_causal=True,
        local_window_size=(3, 1),
        key_value_seq_lengths=jnp.array([6, 3], jnp.int32),
        logits_soft_cap=2.5,
    )
    return (q, k, v, bias), options


def attention(implementation, options):
    extra = options_for(implementation)

    def f(q, k, v, bias):
        return jattn.dot_product_attention(q, k, v, bias, implementation=implementation, **options, **extra)

    return f


TRANSFORMS = {
    "jvp": lambda f, args, t: jax.jvp(f, args, t),
    "linearize": lambda f, args, t: jax.linearize(f, *args)[1](*t),
    "jacfwd": lambda f, args, t: jax.jacfwd(lambda q: f(q, *args[1:]).sum(axis=(0, 1)))(args[0]),
    "jacrev": lambda f, args, t: jax.jacrev(lambda k: f(args[0], k, *args[2:]).sum(axis=(0, 1)))(args[1]),
    "hessian": lambda f, args, t: jax.hessian(lambda v: jnp.sin(f(args[0], args[1], v, args[3])).sum())(args[2][:1]),
    "grad_of_grad": lambda f, args, t: jax.grad(
        lambda *a: sum(jnp.sum(g**2) for g in jax.grad(lambda *b: jnp.sin(f(*b)).sum(), argnums=(0, 1, 2, 3))(*a)),
        argnums=(0, 1, 2, 3),
    )(*args),
    "hvp_forward_over_reverse": lambda f, args, t: jax.jvp(
        jax.grad(lambda *a: jnp.sin(f(*a)).sum(), argnums=(0, 1, 2, 3)), args, t
    ),
    "grad_of_jvp": lambda f, args, t: jax.grad(lambda *a: jnp.sum(jax.jvp(f, a, t)[1] ** 2), argnums=(0, 1, 2, 3))(
        *args
    ),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_every_autodiff_transform_through_blockwise_matches_reference(transform):
    args, options = small_problem()
    if transform == "hessian":  # the hessian of one example's values: (1, 7, 2, 2) x (1, 7, 2, 2)
        args = (args[0][:1], args[1][:1], args[2], args[3])
        options = {**options, "key_value_seq_lengths": options["key_value_seq_lengths"][:1]}
    tangents = tuple(jnp.asarray(np.random.default_rng(9).standard_normal(x.shape)) for x in args)

    def run(implementation):
        f = attention(implementation, options)
        return jax.jit(lambda *a: TRANSFORMS[transform](f, a, tangents))(*args)

    got, expected = run("blockwise"), run("reference")
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_log_sum_exp_residual_carries_no_derivative(implementation):
    args, _ = small_problem(jnp.float32)
    q, k, v, _ = args
    v = jnp.concatenate([v, v[..., :1]], axis=-1)  # v_dim == dim, as jax.nn needs

    def f(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=True, return_residual=True, implementation=implementation, **options_for(implementation)
        )

    (out, lse), (tangent_out, tangent_lse) = jax.jit(lambda *a: jax.jvp(f, a, a))(q, k, v)
    assert tangent_out.shape == out.shape and tangent_lse.shape == lse.shape
    np.testing.assert_array_equal(np.asarray(tangent_lse), 0.0)


def _temp_bytes_of_jvp(seq: int) -> int:
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)

    def jvp(q, k, v):
        f = functools.partial(
            jattn.dot_product_attention, is_causal=True, implementation="blockwise", block_q=128, block_kv=128
        )
        return jax.jvp(f, (q, k, v), (q, k, v))

    return jax.jit(jvp).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_jvp_memory_is_linear_in_sequence_length():
    small, large = _temp_bytes_of_jvp(2048), _temp_bytes_of_jvp(4096)
    one_seq_by_seq_array = 2048 * 2048 * 4
    assert small < one_seq_by_seq_array / 4, (
        f"temp {small} bytes; one (q_seq, kv_seq) float32 array is {one_seq_by_seq_array}"
    )
    assert large <= 2.2 * small, f"temp grew from {small} to {large} bytes when the sequence doubled"
