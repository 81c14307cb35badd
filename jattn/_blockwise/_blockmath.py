"""Block-level maths shared by the forward, the backward and the dense second-order rule.

Inside the kernel q is head-major, ``(kv_heads, groups, q_padded, dim)``; k and v
keep the caller's layout ``(kv_padded, kv_heads, dim)`` and only visited
blocks are made head-major. Every block product is a batched matmul over the
``kv_heads`` axis (:func:`mm`, :func:`mm_nt`), so grouped-query heads share
each K/V block and K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _mods, _numerics
from .._options import StaticOptions
from ._geometry import Grid, Placement, grouped


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything static about one kernel call (hashable): the options and the tiling.

    With ``ring`` (a ``_ring.Ring``) the call is sequence-parallel inside a ``shard_map``: the
    operands are one device's shards in the caller's 4-D layout and ``grid`` tiles one chunk pair.
    """

    options: StaticOptions
    grid: Grid
    ring: Any = None


def mm(a: Array, b: Array) -> Array:
    """Batched ``a @ b`` over the leading (kv_heads) axis, accumulated in the compute dtype."""
    return _product("kij,kjl->kil", a, b)


def mm_nt(a: Array, b: Array) -> Array:
    """Batched ``a @ b^T`` over the leading (kv_heads) axis: ``(k, i, j) x (k, l, j) -> (k, i, l)``.

    XLA:CPU runs this product (both operands contracted on their last axis) as fast as :func:`mm`, so
    queries, keys and output cotangents are read in their head-major layout, never transposed for it. Its
    mirror (contracting the first axis of ``a``) is up to 3x slower there: the backward's dQ is built
    transposed instead (``_backward``).
    """
    return _product("kij,klj->kil", a, b)


def _product(subscripts: str, a: Array, b: Array) -> Array:
    acc = _numerics.compute_dtype(a.dtype)

    def native(a, b):
        return jnp.einsum(subscripts, a, b, preferred_element_type=acc)

    if a.dtype == acc:
        return native(a, b)

    def widened(a, b):  # XLA:CPU has no 16-bit x 16-bit -> float32 dot for every shape; widening is exact
        return native(a.astype(acc), b.astype(acc))

    # Chosen when the program is lowered for its platform (not by the default backend while tracing), so
    # a program exported or compiled ahead of time for another platform takes that platform's branch.
    return lax.platform_dependent(a, b, cpu=widened, default=native)


def rows(x: Array) -> Array:
    """``(kv_heads, groups, rows, x)`` -> ``(kv_heads, groups * rows, x)`` (free: a reshape)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def transposed_block(x: Array) -> Array:
    """A ``(kv_heads|1, groups|1, bq|1, bk|1)`` mask or bias block as ``(kv_heads|1, bk|1, groups|1, bq|1)``."""
    return x.transpose(0, 3, 1, 2)


def dynamic_block(x: Array, index, size: int, axis: int) -> Array:
    """Block ``index`` of ``size`` elements along ``axis``."""
    return lax.dynamic_slice_in_dim(x, index * size, size, axis)


def kv_block(x: Array, example, kb, size: int) -> Array:
    """Block ``kb`` of ``example`` from a whole ``(batch, kv_padded, kv_heads, x)`` array: ``(size, kv_heads, x)``."""
    zero = jnp.zeros((), jnp.int32)
    start = (lax.convert_element_type(example, jnp.int32), lax.convert_element_type(kb, jnp.int32) * size, zero, zero)
    return lax.dynamic_slice(x, start, (1, size, *x.shape[2:]))[0]


def scaled_query(options: StaticOptions, x: Array) -> Array:
    """Multiplies the (small) query block by the scale, for 32/64-bit inputs.

    16-bit inputs keep the scale for the float32 logits, so no precision is lost.
    """
    return x * jnp.asarray(options.scale, x.dtype) if jnp.finfo(x.dtype).bits >= 32 else x


def seen_keys(visible: Array, key_axis: int) -> Array:
    """Which keys of a partial block some row sees: ``(kv_heads|1, bk)`` from a grouped visibility block."""
    other = tuple(a for a in range(1, visible.ndim) if a != key_axis)
    return visible.any(axis=other)


def hide_unseen(x: Array, seen: Array, key_axis: int) -> Array:
    """``x`` (a ``(kv_heads, ..., bk, ...)`` K/V block) with the keys no row sees set to 0 by a select.

    Padding past ``key_value_seq_lengths`` may hold NaN or Inf; a weight of 0 times
    NaN is NaN, so hidden keys are selected out, never multiplied by zero.
    """
    shape = [seen.shape[0]] + [1] * (x.ndim - 1)
    shape[key_axis] = seen.shape[1]
    return jnp.where(seen.reshape(shape), x, jnp.zeros((), x.dtype))


def exp_below_zero(x: Array) -> Array:
    """``exp(x)`` for ``x = logit - lse <= 0`` (exact arithmetic), with ``x`` clipped at 0.

    A logit recomputed in another summation order may exceed the saved
    log-sum-exp by an ulp of its size, and exp of 1e17 overflows. The clip keeps
    derivative 1 at 0, as the unclipped exponent has, so higher derivatives
    stay exact.
    """
    return jnp.exp(jnp.where(x > 0, 0, x))


FORWARD_LAYOUT = "kgqs"  # logits (kv_heads, groups, bq, bk): the forward and the tangent pass
BACKWARD_LAYOUT = "ksgq"  # transposed logits (kv_heads, bk, groups, bq): the backward


class Logits(NamedTuple):
    s: Array  # the logits softmax sees
    tanh: Array | None  # tanh(raw / cap), for the soft cap's derivative
    pre_mod: Array  # the logits before the score_mod (equal to s without one)


def score_mod(options: StaticOptions, consts, s: Array, layout: str, *, groups: int, place: Placement) -> Array:
    """The user's ``score_mod`` on a block of logits laid out as ``layout`` (identity without one)."""
    if options.score_mod is None:
        return s
    return _mods.evaluate(
        options.score_mod,
        consts,
        s.shape,
        _mods.Layout(layout, groups),
        example=place.example,
        q_start=place.q_start,
        kv_start=place.kv_start,
        score=s,
    )


def wanted(consts: tuple, want: tuple[bool, ...]) -> tuple:
    """The ``consts`` that get derivatives (``want``), in order."""
    return tuple(c for c, w in zip(consts, want, strict=True) if w)


def with_wanted(consts: tuple, want: tuple[bool, ...], values: tuple) -> tuple:
    """``consts`` with the wanted ones replaced by ``values`` (what a derivative is taken with respect to)."""
    it = iter(values)
    return tuple(next(it) if w else c for c, w in zip(consts, want, strict=True))


def finish_logits(options: StaticOptions, raw: Array, dtype, bias: Array | None) -> tuple[Array, Array | None]:
    """Scale (16-bit inputs), soft cap and bias on raw block products; also tanh, for the soft cap's derivative.

    ``bias`` is laid out like ``raw`` already.
    """
    s = raw * options.scale if jnp.finfo(dtype).bits < 32 else raw
    t = None
    if options.logits_soft_cap is not None:
        t = jnp.tanh(s / options.logits_soft_cap)
        s = options.logits_soft_cap * t
    if bias is not None:
        s = s + bias.astype(s.dtype)
    return s, t


def block_logits(spec, q_blk: Array, k_blk: Array, bias_blk: Array | None, *, consts, place: Placement) -> Logits:
    """Logits ``(kv_heads, groups, bq, bk)`` of a block in the compute dtype.

    ``q_blk`` is ``(kv_heads, groups, bq, dim)``, ``k_blk`` the keys, head-major ``(kv_heads, bk, dim)``.
    """
    kv_heads, groups, bq, _ = q_blk.shape
    raw = mm_nt(rows(scaled_query(spec.options, q_blk)), k_blk).reshape(kv_heads, groups, bq, -1)
    bias = None if bias_blk is None else grouped(bias_blk, kv_heads, groups)
    pre, t = finish_logits(spec.options, raw, q_blk.dtype, bias)
    return Logits(score_mod(spec.options, consts, pre, FORWARD_LAYOUT, groups=groups, place=place), t, pre)
