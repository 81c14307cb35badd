"""The kernel's operands: head-major queries, padding to the block grid, batch folding, the loop over examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _checks
from .._options import AttentionInputs, AttentionOptions
from ._geometry import Grid


class Operands(NamedTuple):
    """One call's inputs in the kernel layout, padded to the grid.

    K/V keep the caller's ``(batch, kv_padded, kv_heads, x)`` layout: the forward
    transposes only the blocks it visits, so a decode step over a long cache
    costs what its filled part costs (no whole-cache copy).
    """

    q: Array  # (batch, kv_heads, groups, q_padded, dim)
    k: Array  # (batch, kv_padded, kv_heads, dim)
    v: Array  # (batch, kv_padded, kv_heads, v_dim)
    bias: Array | None  # (batch|1, heads|1, q_padded|1, kv_padded|1)
    mask: Array | None  # likewise, boolean, padded with False
    opts: AttentionOptions  # segment ids padded to the grid (with their edge value)


def to_kernel_layout(inputs: AttentionInputs, grid: Grid) -> Operands:
    """Normalized 4-D inputs (see ``reference_attention``) as kernel :class:`Operands`."""
    query, key, value, bias, mask, opts = inputs
    batch, q_seq, heads, dim = query.shape
    kv_heads = key.shape[2]
    pad_q, pad_kv = grid.q_padded - grid.q_seq, grid.kv_padded - grid.kv_seq
    q = query.reshape(batch, q_seq, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad_q), (0, 0)))
    k = jnp.pad(key, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    v = jnp.pad(value, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    arrays = opts.arrays
    if arrays.q_segment_ids is not None and arrays.kv_segment_ids is not None:
        arrays = arrays._replace(
            q_segment_ids=jnp.pad(arrays.q_segment_ids, ((0, 0), (0, pad_q)), mode="edge"),
            kv_segment_ids=jnp.pad(arrays.kv_segment_ids, ((0, 0), (0, pad_kv)), mode="edge"),
        )
    return Operands(
        q, k, v, pad_logits_operand(bias, grid, 0), pad_logits_operand(mask, grid, False), opts.with_arrays(arrays)
    )


def from_kernel_layout(out: Array, lse: Array, grid: Grid) -> tuple[Array, Array]:
    """``(batch, kv_heads, groups, q_padded, ...)`` results -> ``(batch, q_seq, heads, ...)``."""
    batch, kv_heads, groups = out.shape[:3]
    heads, q_seq = kv_heads * groups, grid.q_seq
    out = out[:, :, :, :q_seq].transpose(0, 3, 1, 2, 4).reshape(batch, q_seq, heads, out.shape[-1])
    lse = lse[:, :, :, :q_seq].transpose(0, 3, 1, 2).reshape(batch, q_seq, heads)
    return out, lse


def pad_logits_operand(x: Array | None, grid: Grid, fill) -> Array | None:
    """Pads the q_seq/kv_seq axes of a ``(batch|1, heads|1, q|1, kv|1)`` operand."""
    if x is None:
        return None
    pad_q, pad_kv = grid.q_padded - grid.q_seq, grid.kv_padded - grid.kv_seq
    pads = ((0, 0), (0, 0), (0, pad_q if x.shape[2] > 1 else 0), (0, pad_kv if x.shape[3] > 1 else 0))
    return jnp.pad(x, pads, constant_values=fill)


def can_fold_batch(ops: Operands) -> bool:
    """True when the batch can be treated as extra kv heads: nothing differs between examples but
    the data (no per-example arrays; bias and mask span both batch and heads or neither)."""
    batch, kv_heads, groups = ops.q.shape[:3]
    if not _checks.is_concrete(batch) or batch == 1 or jax.tree.leaves(ops.opts):
        return False
    if ops.opts.static.score_mod is not None or ops.opts.static.mask_mod is not None:
        return False  # user mods see each example's batch and head index
    return all(x is None or x.shape[:2] in ((1, 1), (batch, kv_heads * groups)) for x in (ops.bias, ops.mask))


def fold_batch(ops: Operands) -> Operands:
    """Folds the batch into the kv_heads axis, so every block matmul covers the whole batch."""
    batch, kv_heads = ops.q.shape[:2]

    def fold(x):  # (batch|1, heads|1, ...) -> (1, batch * heads | 1, ...)
        return None if x is None else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])

    def fold_kv(x):  # (batch, kv_padded, kv_heads, x) -> (1, kv_padded, batch * kv_heads, x)
        return x.transpose(1, 0, 2, 3).reshape(1, x.shape[1], batch * kv_heads, x.shape[3])

    return ops._replace(q=fold(ops.q), k=fold_kv(ops.k), v=fold_kv(ops.v), bias=fold(ops.bias), mask=fold(ops.mask))


def unfold_batch(x: Array, batch: int) -> Array:
    """``(1, batch * kv_heads, ...)`` results -> ``(batch, kv_heads, ...)``."""
    return x.reshape(batch, x.shape[1] // batch, *x.shape[2:])


def without_kv(ops: Operands) -> Operands:
    """``ops`` with K/V taken out (None): the per-example tree of :func:`over_batch`, K/V going in ``whole``."""
    return ops._replace(k=None, v=None)  # type: ignore[arg-type]  # only this tree holds Operands without K/V


def over_batch(fn: Callable, batch: int, mapped, whole=None):
    """``fn(example, mapped_example, whole)`` for every example, outputs stacked on a new batch axis.

    ``mapped`` is a pytree whose leaves have a leading axis of ``batch`` (sliced
    per example) or 1 (a broadcast bias or mask: given whole to every example,
    without the axis). ``whole`` (K/V in the forward) is passed untouched with
    the example's index: slicing out a whole example first would copy all of
    its K/V on every call, which is what a decode step over a long, mostly
    empty cache must not pay for. ``lax.map`` keeps each example's block
    skipping exact; one example needs no loop. (On explicit mesh axes the
    kernel runs per shard, see ``jattn._sequence_parallel._placement``, so the batch seen here is
    never explicitly sharded.)
    """
    leaves, treedef = jax.tree.flatten(mapped)
    single = _checks.is_concrete(batch) and batch == 1  # a symbolic batch may be 1 too: it is mapped
    is_mapped = [not single and x.shape[0] != 1 for x in leaves]
    shared = [None if m else x[0] for x, m in zip(leaves, is_mapped, strict=True)]

    def one(example, mapped_leaves):
        it = iter(mapped_leaves)
        example_leaves = [next(it) if m else s for m, s in zip(is_mapped, shared, strict=True)]
        return fn(example, jax.tree.unflatten(treedef, example_leaves), whole)

    if single:
        return jax.tree.map(lambda y: y[None], one(jnp.int32(0), []))
    mapped_leaves = [x for x, m in zip(leaves, is_mapped, strict=True) if m]
    return lax.map(lambda xs: one(*xs), (jnp.arange(batch, dtype=jnp.int32), mapped_leaves))
