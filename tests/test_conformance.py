"""The conformance suite: every implementation against a float64 NumPy oracle and jax.nn.

Adding a name to ``jattn.IMPLEMENTATIONS`` adds it to every test here.
Outputs and ``jax.vjp`` gradients (query, key, value, bias) are compared with
the oracle in ``tests/conformance/oracle.py`` under the per-dtype tolerances
of ``tests/conformance/cases.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import cases
from conformance.cases import (
    CASES,
    DELEGATING,
    DTYPE_CASES,
    DTYPES,
    assert_close,
    cotangent_like,
    forward_and_vjp,
    make_inputs,
    promotion_for,
    tolerance,
)
from jax.test_util import check_grads

import jattn
from jattn.testing import check_attention_grads

IMPLEMENTATIONS = cases.implementation_params()
FULL_IMPLEMENTATIONS = cases.full_implementation_params()


def check_against_oracle(implementation, case, dtype):
    if implementation in DELEGATING and case.jax_nn_refuses:
        pytest.skip(f"{implementation} refuses {case.jax_nn_refuses}: see test_delegating_implementations_refuse")
    inputs = make_inputs(case, dtype)
    cases.skip_unsupported_upstream(implementation, dtype, inputs.query, inputs.key, bias_grad=inputs.bias is not None)
    v_dim = case.v_dim or case.dim
    out_shape = (*inputs.query.shape[:-1], v_dim)
    cotangent = cotangent_like(out_shape, dtype)
    if implementation in DELEGATING:
        # jax.nn returns mean(V) on rows that see no key (jattn: zeros); leave those rows out everywhere.
        visible = inputs.unbatch(inputs.oracle().visible_rows)
        cotangent = jnp.where(visible[..., None], cotangent, jnp.zeros((), dtype))
        rows = visible
    else:
        rows = None
    expected = inputs.oracle(cotangent)
    run = forward_and_vjp(implementation, case)
    with promotion_for(implementation, dtype):
        out, grads = run(inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask, inputs.arrays, cotangent)
    tol = tolerance(implementation, dtype)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected the input dtype {dtype}"
    assert_close(out, inputs.unbatch(expected.out), tol.out, "output", rows)
    for name, grad in grads.items():
        assert grad.dtype == dtype, f"{name} gradient dtype {grad.dtype}, expected {dtype}"
        assert_close(grad, inputs.unbatch(expected.grads[name]), tol.grad, f"d{name}")


def float32_params():
    """Every case for jattn's own implementations; every other one for the delegates, which are jax.nn
    itself (tested by JAX): enough to check that the delegation passes every option through."""
    for impl in IMPLEMENTATIONS:
        for i, case in enumerate(cases.case_params(CASES)):
            if impl.values[0] not in DELEGATING or i % 2 == 0:
                yield pytest.param(impl.values[0], case.values[0], marks=[*impl.marks, *case.marks],
                                   id=f"{impl.id}-{case.id}")  # fmt: skip


@pytest.mark.parametrize(("implementation", "case"), list(float32_params()))
def test_float32_outputs_and_gradients_match_oracle(implementation, case):
    check_against_oracle(implementation, case, jnp.float32)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.case_params(DTYPE_CASES, slow_unless="everything"))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_other_dtypes_match_oracle(implementation, case, dtype):
    check_against_oracle(implementation, case, dtype)


def test_cudnn_cases_skip_exactly_where_jax_nn_refuses_the_shapes():
    """The GPU run's cuDNN failures were jax.nn refusing shapes (head dim 4, odd lengths under a bias gradient);
    the helper skips those, as jax.nn's ``check_is_flash_attention`` refuses them, and nothing it takes."""
    skip, bf16 = cases.skip_unsupported_upstream, jnp.bfloat16
    q8, q4, q_odd = jnp.zeros((2, 6, 2, 8)), jnp.zeros((2, 6, 2, 4)), jnp.zeros((2, 5, 2, 8))
    skip("cudnn", bf16, q8, q8, bias_grad=True)  # taken: no skip
    skip("cudnn", bf16, q_odd, q_odd)  # odd lengths without a bias gradient: taken
    for args, reason in (((jnp.float32, q8, q8), "float16 and bfloat16 only"), ((bf16, q4, q4), "head dim"),
                         ((bf16, q_odd, q8), "even lengths")):  # fmt: skip
        with pytest.raises(pytest.skip.Exception, match=reason):
            skip("cudnn", *args, bias_grad=True)


@pytest.mark.parametrize("case", [c for c in CASES if c.jax_nn_refuses and c.batch is not None], ids=str)
@pytest.mark.parametrize("implementation", [p for p in IMPLEMENTATIONS if p.values[0] in DELEGATING])
def test_delegating_implementations_refuse(implementation, case):
    inputs = make_inputs(case)
    f = jax.jit(cases.attention_fn(implementation, case))
    first_reason = case.jax_nn_refuses.split(", ")[0].split(" ")[0]
    with pytest.raises(ValueError, match=rf"implementation='{implementation}'.*does not support.*{first_reason}"):
        f(inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask, inputs.arrays)


JAX_NN_CASES = [
    *[c for c in CASES if not c.jax_nn_refuses and c.batch is not None][::2],
    cases.CASES_BY_NAME["unbatched"],
]


@pytest.mark.parametrize("case", cases.case_params(JAX_NN_CASES))
@pytest.mark.parametrize("implementation", FULL_IMPLEMENTATIONS)  # the delegates are jax.nn itself
def test_drop_in_for_jax_nn(implementation, case):
    """Same call, same result as jax.nn.dot_product_attention wherever a row sees a key."""
    inputs = make_inputs(case)
    args = (inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask)
    with promotion_for(implementation, jnp.float32):
        ours = jax.jit(cases.attention_fn(implementation, case))(*args, inputs.arrays)
    with jax.numpy_dtype_promotion("standard"):  # jax.nn mixes int64 positions with int32 lengths
        # jax.nn takes unbatched lengths as shape (1,); jattn also takes scalars.
        jax_nn_arrays = {k: a.reshape(1) if a.ndim == 0 else a for k, a in inputs.arrays.items()}
        theirs = jax.jit(lambda *a, arrays: jax.nn.dot_product_attention(*a, **case.static, **arrays))(
            *args, arrays=jax_nn_arrays
        )
    visible = inputs.unbatch(inputs.oracle().visible_rows)
    assert_close(ours, theirs, cases.TOLERANCES[jnp.dtype(jnp.float32)].out, "output vs jax.nn", visible)


@pytest.mark.parametrize(
    ("dtype", "lengths"),
    [
        pytest.param(jnp.float32, False, id="float32"),
        pytest.param(jnp.float32, True, id="float32-lengths"),
        pytest.param(jnp.float64, False, id="float64"),
        pytest.param(jnp.bfloat16, False, id="bfloat16"),
    ],
)
@pytest.mark.parametrize("implementation", [p for p in IMPLEMENTATIONS if p.values[0] in DELEGATING])
def test_delegating_under_strict_promotion(implementation, dtype, lengths):
    """The suite runs with strict promotion; the delegating paths must work under it too."""
    inputs = make_inputs(cases.CASES_BY_NAME["both_lengths_causal" if lengths else "plain"], dtype)
    cases.skip_unsupported_upstream(implementation, dtype, inputs.query, inputs.key)
    f = jax.jit(cases.attention_fn(implementation, inputs.case))
    out = f(inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask, inputs.arrays)
    assert out.dtype == dtype


RESIDUAL_CASES = [cases.CASES_BY_NAME[n] for n in ("everything_jax_nn_has", "everything", "unbatched")]


def residual_params():
    for impl in IMPLEMENTATIONS:
        name = impl.values[0]
        for case in RESIDUAL_CASES:
            if name in DELEGATING and case.jax_nn_refuses:
                continue
            for dtype in DTYPES if case.name == "everything_jax_nn_has" else [jnp.float32]:
                marks = list(impl.marks) + cases.known_bug_marks(case)
                if name in DELEGATING and dtype == jnp.float16 and jax.default_backend() == "cpu":
                    marks.append(pytest.mark.skip(reason="jax.nn's XLA path has no float16 dot on CPU"))
                yield pytest.param(name, case, dtype, marks=marks, id=f"{name}-{case}-{jnp.dtype(dtype).name}")


@pytest.mark.parametrize(("implementation", "case", "dtype"), list(residual_params()))
def test_residual_is_log_sum_exp(implementation, case, dtype):
    inputs = make_inputs(case, dtype)
    cases.skip_unsupported_upstream(implementation, dtype, inputs.query, inputs.key)
    f = jax.jit(cases.attention_fn(implementation, case, return_residual=True))
    with promotion_for(implementation, dtype):
        out, lse = f(inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask, inputs.arrays)
    expected = inputs.oracle()
    assert out.dtype == dtype
    assert lse.shape == out.shape[:-1]
    assert lse.dtype == dtype, f"log-sum-exp dtype {lse.dtype}; jax.nn (and jattn) return the input dtype {dtype}"
    assert np.isfinite(np.asarray(lse)).all()
    visible = inputs.unbatch(expected.visible_rows)
    tol = tolerance(implementation, dtype).out
    assert_close(lse, np.where(visible, inputs.unbatch(expected.lse), 0.0), tol, "log-sum-exp", visible)


# --- float64 gradient checks -----------------------------------------------------------------------

GRAD_CHECK_CASES = [cases.CASES_BY_NAME["everything"]]  # bias, dense mask, lengths, segments, cap, GQA, v_dim


def float64_args(case):
    inputs = make_inputs(case, jnp.float64)
    diff = (inputs.query, inputs.key, inputs.value) + (() if inputs.bias is None else (inputs.bias,))

    def fn(*xs, implementation):
        q, k, v, *b = xs
        return jattn.dot_product_attention(
            q,
            k,
            v,
            b[0] if b else None,
            inputs.mask,
            **case.static,
            **inputs.arrays,
            implementation=implementation,
        )

    return inputs, diff, fn


@pytest.mark.parametrize("case", cases.case_params(GRAD_CHECK_CASES))
@pytest.mark.parametrize("implementation", cases.slow_unless(FULL_IMPLEMENTATIONS, "blockwise"))
def test_check_grads_order_2_float64(implementation, case):
    _, diff, fn = float64_args(case)
    f = jax.jit(functools.partial(fn, implementation=implementation))
    check_grads(f, diff, order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("case", [cases.CASES_BY_NAME["everything"]], ids=str)
@pytest.mark.parametrize("implementation", cases.slow_unless(FULL_IMPLEMENTATIONS, "blockwise"))
def test_gradient_helper_against_finite_differences_and_reference(implementation, case):
    _, diff, fn = float64_args(case)
    report = check_attention_grads(
        functools.partial(fn, implementation=implementation),
        *diff,
        reference=functools.partial(fn, implementation="reference"),
        modes=("fwd", "rev"),
        max_elements=64,
    )
    assert report.passed, str(report)
