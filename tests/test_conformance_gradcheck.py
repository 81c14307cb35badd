"""jattn.testing.check_attention_grads: catches wrong gradients and says where."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import testing

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((1, 3, 2, 4))  # (batch, q_seq, heads, dim)
K = RNG.standard_normal((1, 5, 2, 4))  # (batch, kv_seq, kv_heads, dim)
V = RNG.standard_normal((1, 5, 2, 4))
MASK = RNG.random((1, 2, 3, 5)) < 0.7


def plain_attention(query, key, value, mask=None):
    """A user's variant: materialized attention in plain jax.numpy."""
    s = jnp.einsum("btnd,bsnd->bnts", query, key) / 2.0
    if mask is not None:
        s = jnp.where(mask, s, -1e30)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, axis=-1), value)


@jax.custom_vjp
def wrong_value_grad(query, key, value):
    return plain_attention(query, key, value)


def _fwd(query, key, value):
    out, vjp = jax.vjp(plain_attention, query, key, value)
    return out, vjp


def _bwd(vjp, g):
    dq, dk, dv = vjp(g)
    return dq, dk, dv.at[0, 2, 1, 3].add(0.5)  # one wrong element


wrong_value_grad.defvjp(_fwd, _bwd)


@jax.custom_vjp
def wrong_second_order(query, key, value):
    return plain_attention(query, key, value)


def _bwd_frozen(res, g):
    # Correct first-order cotangents, but computed from frozen residuals: d(grad)/dx is lost.
    query, key, value = (jax.lax.stop_gradient(x) for x in res)
    return jax.vjp(plain_attention, query, key, value)[1](g)


wrong_second_order.defvjp(lambda q, k, v: (plain_attention(q, k, v), (q, k, v)), _bwd_frozen)


def test_passes_on_correct_gradients_and_names_arguments():
    def reference(q, k, v, m):  # jattn takes the mask as a keyword (its 4th positional is bias)
        return jattn.dot_product_attention(q, k, v, mask=m)

    report = testing.check_attention_grads(plain_attention, Q, K, V, MASK, reference=reference)
    assert report.passed
    checked = {(m.check, m.argument) for m in report.worst}
    assert ("finite differences", "value") in checked
    assert ("reference autodiff", "key") in checked
    assert ("reference output", "output") in checked
    assert "passed" in str(report)


def test_reports_argument_index_and_values_of_a_wrong_gradient():
    with pytest.raises(testing.GradCheckError, match=r"finite differences: value\[0, 2, 1, 3\]") as info:
        testing.check_attention_grads(wrong_value_grad, Q, K, V)
    worst = info.value.report.failures[0]
    assert (worst.argument, worst.index) == ("value", (0, 2, 1, 3))
    assert abs(worst.actual - worst.expected) == pytest.approx(0.5, abs=1e-6)
    assert "expected" in str(info.value) and "tolerance" in str(info.value)


def test_order_2_catches_a_backward_pass_that_is_not_differentiable():
    assert testing.check_attention_grads(wrong_second_order, Q, K, V, order=1).passed
    report = testing.check_attention_grads(wrong_second_order, Q, K, V, order=2, raise_on_failure=False)
    assert not report.passed
    assert all("Hessian-vector product" in m.check for m in report.failures)


@jax.custom_jvp
def wrong_tangent(query, key, value):
    return plain_attention(query, key, value)


@wrong_tangent.defjvp
def _wrong_tangent_jvp(primals, tangents):
    out, tangent_out = jax.jvp(plain_attention, primals, tangents)
    return out, tangent_out.at[0, 1, 0, 2].add(0.25)  # one wrong tangent element


def test_forward_mode_checks_name_the_wrong_tangent_element():
    report = testing.check_attention_grads(wrong_tangent, Q, K, V, modes=("fwd",), raise_on_failure=False)
    assert {m.check for m in report.failures} == {"JVP vs finite differences"}
    assert report.failures[0].argument == "output" and report.failures[0].index == (0, 1, 0, 2)
    assert report.modes == ("fwd",) and "modes fwd" in str(report)


def test_forward_and_reverse_mode_must_agree():
    """A correct reverse mode cannot hide a wrong forward mode: <J t, c> = <t, J^T c> fails."""
    report = testing.check_attention_grads(wrong_tangent, Q, K, V, modes=("rev", "fwd"), raise_on_failure=False)
    failed = {m.check for m in report.failures}
    assert "<J t, c> vs <t, J^T c>" in failed and "finite differences" not in failed


def test_both_modes_to_second_order_on_a_correct_variant():
    report = testing.check_attention_grads(plain_attention, Q, K, V, order=2, modes=("fwd", "rev"))
    checked = {m.check for m in report.worst}
    assert {
        "Hessian-vector product (forward over reverse) vs finite differences",
        "Hessian-vector product forward over reverse vs reverse over reverse",
        "<J t, c> vs <t, J^T c>",
    } <= checked
    forward_only = testing.check_attention_grads(plain_attention, Q, K, V, order=2, modes=("fwd",))
    assert "second directional derivative vs finite differences" in {m.check for m in forward_only.worst}


def test_reference_disagreement_is_reported():
    scaled = functools.partial(jattn.dot_product_attention, scale=0.3)
    report = testing.check_attention_grads(
        jattn.dot_product_attention, Q, K, V, reference=scaled, raise_on_failure=False
    )
    assert {m.check for m in report.failures} == {"reference output", "reference autodiff"}


def test_runs_in_float64_even_when_x64_is_off():
    with jax.enable_x64(False):
        report = testing.check_attention_grads(plain_attention, Q.astype(np.float32), K, V, atol=1e-7, rtol=1e-6)
    assert report.passed, str(report)


def test_argnums_and_sampling():
    report = testing.check_attention_grads(plain_attention, Q, K, V, argnums=(1,), max_elements=5)
    assert {m.argument for m in report.worst} == {"key"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"order": 3}, ValueError, r"order must be 1 or 2; got 3"),
        ({"eps": 0.0}, ValueError, r"eps must be a positive float; got 0.0"),
        ({"argnums": (3,)}, TypeError, r"argument 3 in argnums must be floating point; got dtype bool"),
        ({"argnums": (7,)}, ValueError, r"argnums must index the 4 positional args; got 7"),
        ({"reference": "reference"}, TypeError, r"reference must be callable or None; got str"),
        ({"modes": "fwd"}, ValueError, r"modes must be a non-empty sequence of \('fwd', 'rev'\); got 'fwd'"),
        ({"modes": ("rev", "jvp")}, ValueError, r"modes must be a non-empty sequence of .*; got \('rev', 'jvp'\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        testing.check_attention_grads(plain_attention, Q, K, V, MASK, **kwargs)


def test_reference_with_other_output_shape_is_refused():
    with pytest.raises(ValueError, match=r"reference output 0 must have shape \(1, 3, 2, 4\) like fn's; got"):
        testing.check_attention_grads(plain_attention, Q, K, V, reference=lambda q, k, v: q[:, :1])
