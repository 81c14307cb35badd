"""Shared test vocabulary: implementations, cases, inputs, tolerances, comparisons.

Every implementation listed in ``jattn.IMPLEMENTATIONS`` joins every
parametrized test automatically. ``"xla"`` and ``"cudnn"`` delegate to
``jax.nn.dot_product_attention``: they refuse segment ids, ``logits_soft_cap``
and ``v_dim != dim`` (ValueError), and return mean(V) instead of zeros for a
query row that sees no key, so those rows are left out of their comparisons.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

from . import oracle

DELEGATING = frozenset({"xla", "cudnn"})
"""Implementations that hand the work to ``jax.nn.dot_product_attention``."""


def implementation_params() -> list:
    """Every implementation as a pytest param; cuDNN only on a GPU backend."""
    params = []
    for name in jattn.IMPLEMENTATIONS:
        marks = []
        if name == "cudnn":
            marks.append(pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU backend"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def full_implementation_params() -> list:
    """The implementations with jattn's own semantics (zeros for rows that see nothing, every option)."""
    return [p for p in implementation_params() if p.values[0] not in DELEGATING]


@contextlib.contextmanager
def promotion_for(implementation: str, dtype):
    """Standard dtype promotion around the delegating implementations.

    jax.nn's XLA path mixes float32 constants with other float dtypes and int64
    positions with int32 lengths, which strict promotion rejects; jattn wraps
    its call (``test_delegating_under_strict_promotion`` checks that), and the
    peer calls made directly by the tests need the same.
    """
    del dtype
    if implementation in DELEGATING:
        with jax.numpy_dtype_promotion("standard"):
            yield
    else:
        yield


def skip_unsupported_upstream(implementation: str, dtype, query=None, key=None, *, bias_grad: bool = False) -> None:
    """Skips combinations jax.nn itself cannot run (not jattn bugs). For cuDNN, given the (batched) query and key,
    also the shapes its flash kernel refuses, as jax.nn checks them (``check_is_flash_attention``): a head dim
    up to 128 (256 from Hopper on) and a multiple of 8, and even sequence lengths for a bias gradient."""
    if implementation == "xla" and jnp.dtype(dtype) == jnp.float16 and jax.default_backend() == "cpu":
        pytest.skip("jax.nn.dot_product_attention does not compile float16 on CPU (F16_F16_F32 dot precision)")
    if implementation != "cudnn":
        return
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        pytest.skip("jax.nn's cuDNN kernel takes float16 and bfloat16 only (jattn refuses the rest: test_capabilities)")
    if query is None or key is None:
        return
    (q_seq, _, dim), kv_seq = np.shape(query)[-3:], np.shape(key)[-3]  # arrays or shapes, (..., seq, heads, dim)
    if dim % 8 or dim > 128:
        pytest.skip(f"jax.nn's cuDNN kernel needs a head dim <= 128 (256 on Hopper), a multiple of 8: {dim}")
    if bias_grad and (q_seq % 2 or kv_seq % 2):
        pytest.skip(f"jax.nn's cuDNN kernel needs even lengths for a bias gradient: {q_seq}, {kv_seq}")


# --- tolerances -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tolerance:
    out: float
    grad: float


TOLERANCES = {
    jnp.dtype(jnp.float64): Tolerance(out=1e-12, grad=1e-11),
    jnp.dtype(jnp.float32): Tolerance(out=1e-6, grad=5e-6),
    jnp.dtype(jnp.bfloat16): Tolerance(out=1.6e-2, grad=3e-2),
    jnp.dtype(jnp.float16): Tolerance(out=2e-3, grad=4e-3),
}
"""Per-dtype error bound, relative to ``max(1, max |expected|)`` of the compared array.

The oracle sees the inputs already rounded to the dtype, so these measure the
kernel's own rounding: softmax in float32 and the weights cast to the input
dtype before the weighted sum. The reference measures (out, grad) at about
(2e-16, 4e-16), (1e-7, 3e-7), (4e-3, 5e-3) and (4e-4, 5e-4); the bounds leave
room for blockwise kernels that round in another order (about 2 ulps for 16-bit).
"""


def tolerance(implementation: str, dtype) -> Tolerance:
    dtype = jnp.dtype(dtype)
    if implementation in DELEGATING and dtype == jnp.float64:
        # jax.nn runs softmax in float32 whatever the input dtype (documented in jax.nn).
        return TOLERANCES[jnp.dtype(jnp.float32)]
    return TOLERANCES[dtype]


def assert_close(actual, expected, tol: float, what: str, rows=None) -> None:
    """``|actual - expected| <= tol * max(1, max|expected|)``; ``rows`` selects what is compared."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float64))
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    if rows is not None:
        actual, expected = actual[rows], expected[rows]
    if actual.size == 0:
        return
    bound = tol * max(1.0, float(np.abs(expected).max()))
    err = np.abs(actual - expected)
    worst = np.unravel_index(int(np.argmax(np.where(np.isnan(err), np.inf, err))), err.shape)
    assert np.isfinite(actual).all() and err.max() <= bound, (
        f"{what}: max |error| {err.max():.3e} > {bound:.3e} at {worst}: got {actual[worst]}, expected {expected[worst]}"
    )


# --- cases ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. ``batch=None`` means unbatched (3-D) inputs."""

    name: str
    batch: int | None = 2
    q_seq: int = 5
    kv_seq: int = 7
    heads: int = 2
    kv_heads: int = 2
    dim: int = 4
    v_dim: int | None = None
    bias: tuple[int, ...] | None = None  # batched shape, broadcastable to (B, N, T, S)
    mask: tuple[int, ...] | None = None  # likewise; one query row is always fully masked
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # static keyword options: is_causal, scale, ...
    seed: int = 0

    def __str__(self) -> str:
        return self.name

    @property
    def static(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def jax_nn_refuses(self) -> str | None:
        """Why the delegating implementations must refuse this case, or None."""
        reasons = []
        if self.segments:
            reasons.append("segment ids")
        if "logits_soft_cap" in self.static:
            reasons.append("logits_soft_cap")
        if self.v_dim is not None and self.v_dim != self.dim:
            reasons.append("v_dim != dim")
        return ", ".join(reasons) or None


def case(name: str, **kw) -> Case:
    options = tuple(sorted(kw.pop("options", {}).items()))
    return Case(name, options=options, **kw)


B, N, T, S = 2, 2, 5, 7
CASES = [
    case("plain"),
    case("single_position", batch=1, q_seq=1, kv_seq=1, heads=1, kv_heads=1),
    case("one_query_thirteen_keys_unscaled", q_seq=1, kv_seq=13, dim=8, options={"scale": 1.0}),
    case("ragged_31_causal", batch=1, q_seq=31, kv_seq=31, heads=1, kv_heads=1, dim=8, options={"is_causal": True}),
    case("ragged_123_kv_lengths", batch=1, q_seq=123, kv_seq=123, heads=1, kv_heads=1, kv_lengths=True),
    case("causal_short_queries", q_seq=3, kv_seq=7, options={"is_causal": True}),
    case("causal_long_queries", q_seq=7, kv_seq=3, options={"is_causal": True}),
    case("window_int", q_seq=7, kv_seq=7, options={"local_window_size": 2}),
    case("window_cross", q_seq=5, kv_seq=11, options={"local_window_size": (1, 3)}),
    case("window_and_causal", q_seq=7, kv_seq=7, options={"local_window_size": (1, 2), "is_causal": True}),
    case("kv_lengths", kv_lengths=True),
    case("both_lengths_causal", q_lengths=True, kv_lengths=True, options={"is_causal": True}),
    case("segments_cross_causal", segments=True, options={"is_causal": True}),
    case("mask_full", mask=(B, N, T, S)),
    case("mask_per_key", mask=(B, 1, 1, S)),
    case("mask_shared", mask=(1, 1, T, S)),
    case("bias_full", bias=(B, N, T, S)),
    case("bias_per_head", bias=(1, N, T, S)),
    case("gqa", heads=4, kv_heads=2, mask=(B, 4, T, S), options={"is_causal": True}),
    case("mqa_bias", heads=3, kv_heads=1, bias=(1, 3, T, S)),
    case("scale_custom", options={"scale": 0.3}),
    case("soft_cap", bias=(B, N, T, S), options={"logits_soft_cap": 1.5, "scale": 1.0}),
    case("v_dim", v_dim=6),
    case("unbatched", batch=None, bias=(1, N, T, S), mask=(1, N, T, S), q_lengths=True, kv_lengths=True),
    case("unbatched_causal_segments", batch=None, q_seq=7, kv_seq=7, segments=True, options={"is_causal": True}),
    case(
        "everything_jax_nn_has",
        q_seq=11,
        kv_seq=13,
        heads=4,
        kv_heads=2,
        bias=(B, 4, 11, 13),
        mask=(B, 1, 11, 13),
        q_lengths=True,
        kv_lengths=True,
        options={"is_causal": True, "local_window_size": (4, 1), "scale": 0.4},
    ),
    case(
        "everything",
        q_seq=11,
        kv_seq=13,
        heads=4,
        kv_heads=2,
        dim=4,
        v_dim=5,
        bias=(1, 4, 11, 13),
        mask=(B, 4, 11, 13),
        q_lengths=True,
        kv_lengths=True,
        segments=True,
        options={"is_causal": True, "local_window_size": (6, 0), "logits_soft_cap": 3.0},
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def known_bug_marks(case: Case) -> list:
    """Strict xfails for library bugs a case runs into; delete a mark when its bug is fixed (none open)."""
    return []


def case_params(selected, *, slow_unless: str | None = None) -> list:
    """Cases as pytest params; with ``slow_unless``, every other case joins the slow tier (``make test-all``)."""
    return [
        pytest.param(c, marks=[*known_bug_marks(c), *_slow_mark(slow_unless not in (None, c.name))], id=c.name)
        for c in selected
    ]


def slow_unless(params: list, *keep: str) -> list:
    """``params`` with the ones not named in ``keep`` in the slow tier (run by ``make test-all``)."""
    return [pytest.param(*p.values, marks=[*p.marks, *_slow_mark(p.values[0] not in keep)], id=p.id) for p in params]


def _slow_mark(slow: bool) -> list:
    return [pytest.mark.slow] if slow else []


DTYPE_CASES = [CASES_BY_NAME[n] for n in ("gqa", "everything_jax_nn_has", "everything")]
DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16]


# --- inputs ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """One case's arrays, for jattn (``call_*``) and for the oracle (batched float64)."""

    case: Case
    dtype: Any
    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    arrays: dict[str, jax.Array]  # lengths and segment ids, as jattn takes them
    oracle_kwargs: dict[str, Any]

    @property
    def batched(self) -> bool:
        return self.case.batch is not None

    def oracle(self, cotangent=None, tangents=None) -> oracle.OracleResult:
        """The float64 oracle; ``tangents`` is a dict like ``grads`` (query, key, value, bias)."""
        cot = None if cotangent is None else self.batch_axis(self.as64(cotangent))
        if tangents is not None:
            tangents = {name: self.batch_axis(self.as64(t)) for name, t in tangents.items()}
        return oracle.attention(
            *(self.batch_axis(self.as64(x)) for x in (self.query, self.key, self.value)),
            None if self.bias is None else self.batch_axis(self.as64(self.bias)),
            None if self.mask is None else self.batch_axis(np.asarray(self.mask)),
            cotangent=cot,
            tangents=tangents,
            **self.oracle_kwargs,
        )

    def differentiable(self) -> dict[str, jax.Array]:
        """query, key, value and (if any) bias: the arguments with derivatives."""
        named = {"query": self.query, "key": self.key, "value": self.value}
        return named if self.bias is None else {**named, "bias": self.bias}

    def batch_axis(self, x):
        return x if self.batched else x[None]

    def unbatch(self, x):
        """Drops the oracle's batch axis for unbatched cases."""
        return x if self.batched else x[0]

    @staticmethod
    def as64(x) -> np.ndarray:
        return np.asarray(jnp.asarray(x).astype(jnp.float64))


def make_inputs(case: Case, dtype=jnp.float32) -> Inputs:
    rng = np.random.default_rng(case.seed)
    b = case.batch or 1
    v_dim = case.v_dim or case.dim

    def normal(*shape):
        return rng.standard_normal(shape)

    q = normal(b, case.q_seq, case.heads, case.dim)
    k = normal(b, case.kv_seq, case.kv_heads, case.dim)
    v = normal(b, case.kv_seq, case.kv_heads, v_dim)
    bias = None if case.bias is None else 0.7 * normal(*case.bias)
    mask = None
    if case.mask is not None:
        mask = rng.random(case.mask) < 0.7
        if case.mask[-2] > 1:
            mask[(0,) * (mask.ndim - 2) + (-1,)] = False  # one query row sees no key
    arrays: dict[str, np.ndarray] = {}
    if case.q_lengths:
        arrays["query_seq_lengths"] = rng.integers(1, case.q_seq + 1, size=b)
    if case.kv_lengths:
        arrays["key_value_seq_lengths"] = rng.integers(1, case.kv_seq + 1, size=b)
    if case.segments:
        arrays["query_segment_ids"] = np.sort(rng.integers(0, 3, size=(b, case.q_seq)), axis=1)
        arrays["key_value_segment_ids"] = np.sort(rng.integers(0, 3, size=(b, case.kv_seq)), axis=1)

    oracle_kwargs = {**case.static, **arrays}
    if case.batch is None:
        q, k, v = q[0], k[0], v[0]
        bias = None if bias is None else bias[0]
        mask = None if mask is None else mask[0]
        arrays = {name: a[0] for name, a in arrays.items()}
    return Inputs(
        case=case,
        dtype=dtype,
        query=jnp.asarray(q, dtype),
        key=jnp.asarray(k, dtype),
        value=jnp.asarray(v, dtype),
        bias=None if bias is None else jnp.asarray(bias, dtype),
        mask=None if mask is None else jnp.asarray(mask),
        arrays={name: jnp.asarray(a, jnp.int32) for name, a in arrays.items()},
        oracle_kwargs=oracle_kwargs,
    )


def cotangent_like(out_shape, dtype, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(out_shape), dtype)


def attention_fn(implementation: str, case: Case, **extra) -> Callable:
    """``f(query, key, value, bias, mask, arrays)`` calling jattn with the case's static options."""
    static = {**case.static, **extra}

    def f(query, key, value, bias, mask, arrays):
        return jattn.dot_product_attention(
            query, key, value, bias, mask, **static, **arrays, implementation=implementation
        )

    return f


def forward_and_jvp(implementation: str, case: Case, **options) -> Callable:
    """A jitted ``(inputs..., tangents) -> (out, tangent_out)``; ``tangents`` as ``Inputs.differentiable``."""
    f = attention_fn(implementation, case, **options)

    @jax.jit
    def run(query, key, value, bias, mask, arrays, tangents):
        primals = {"query": query, "key": key, "value": value}
        if bias is not None:
            primals["bias"] = bias

        def g(named):
            return f(named["query"], named["key"], named["value"], named.get("bias"), mask, arrays)

        return jax.jvp(g, (primals,), (tangents,))

    return run


def forward_and_vjp(implementation: str, case: Case) -> Callable:
    """A jitted ``(inputs..., cotangent) -> (out, grads)`` with grads for query, key, value (and bias)."""
    f = attention_fn(implementation, case)

    @jax.jit
    def run(query, key, value, bias, mask, arrays, cotangent):
        if bias is None:
            out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, None, mask, arrays), query, key, value)
            names = ("query", "key", "value")
        else:
            out, vjp = jax.vjp(lambda q, k, v, b: f(q, k, v, b, mask, arrays), query, key, value, bias)
            names = ("query", "key", "value", "bias")
        return out, dict(zip(names, vjp(cotangent), strict=True))

    return run
