"""Blockwise attention: O(N) memory online softmax with its own backward pass.

FlashAttention-2 structure in pure JAX, so it runs unchanged on CPU, GPU and TPU:

* forward: for each query block, loop over the key blocks it can see, carrying
  the float32 accumulator, running max and running sum (online softmax);
* backward: one pass over key blocks; for each, loop over the query blocks that
  see it, recompute the probabilities from the saved log-sum-exp, accumulate
  dK/dV for the key block and add into a full-size dQ carry. Five block
  matmuls per visited pair (QK^T, dV, dP, dK, dQ) and no second pass for dQ.

Nothing of size ``(q_seq, kv_seq)`` is built or saved (only a dense mask or
bias the caller passed, sliced per block; and dbias, which has bias's shape).
Block pairs are classified by ``_blocks.ExampleBlocks``: invisible pairs are
never visited, fully visible ones skip mask arithmetic, partial ones are
masked in-kernel. Grouped-query heads share each K/V block in the matmul, so
K/V are never repeated.

Inside the kernel q is head-major, ``(kv_heads, groups, q_seq, dim)``; k and v
keep the caller's layout ``(kv_seq, kv_heads, dim)`` and only visited blocks are
transposed (the backward, which visits everything, transposes them once).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from . import _core
from ._blocks import ExampleBlocks, Grid, block_start, fitted_block, slice_block
from ._options import AttentionOptions

NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, array-free configuration of one kernel call."""

    grid: Grid
    scale: float
    is_causal: bool
    local_window_size: tuple[int, int] | None
    logits_soft_cap: float | None

    def options(self) -> AttentionOptions:
        return AttentionOptions(
            scale=self.scale,
            is_causal=self.is_causal,
            local_window_size=self.local_window_size,
            logits_soft_cap=self.logits_soft_cap,
        )


def blockwise_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    opts: AttentionOptions,
    *,
    block_q: int,
    block_kv: int,
) -> tuple[Array, Array]:
    """Blockwise attention on normalized 4-D inputs (see ``reference_attention``).

    Returns ``(batch, q_seq, heads, v_dim)`` output and ``(batch, q_seq, heads)``
    float32 log-sum-exp.
    """
    kernel = functools.partial(_blockwise_attention, block_q=block_q, block_kv=block_kv)
    mesh = _explicit_mesh(query, key, value, bias, mask, *opts.per_example_arrays())
    if mesh is None:
        return kernel(query, key, value, bias, mask, opts)
    return _per_shard(kernel, mesh, query, key, value, bias, mask, opts)


# ---------------------------------------------------------------- explicit sharding
#
# On a mesh with explicit axes a value's sharding is part of its type, and the
# kernel's loops and switches would need every carry and branch retyped. The
# examples and heads are independent, so the kernel runs per shard instead, in
# a shard_map over the batch and head axes. Anything else (a sharded sequence
# or dim, heads that do not split into whole GQA groups) is gathered first.


def _explicit_mesh(*arrays):
    """The mesh of the first array sharded over an explicit mesh axis, or None."""
    for x in arrays:
        sharding = None if x is None else getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
        if explicit and any(a is not None for a in sharding.spec):
            return mesh
    return None


def _spec(x) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _axes_size(mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return functools.reduce(lambda n, name: n * mesh.shape[name], names, 1)


def _per_shard(kernel, mesh, query, key, value, bias, mask, opts):
    """``kernel`` in a shard_map over the query's batch and head axes (see above)."""
    P = jax.sharding.PartitionSpec
    batch, kv_heads = query.shape[0], key.shape[2]
    batch_axes, head_axes = _spec(query)[0], _spec(query)[2]
    if batch_axes is not None and batch % _axes_size(mesh, batch_axes):
        batch_axes = None
    # Query heads split like kv heads only when every shard holds whole GQA groups.
    if head_axes is not None and kv_heads % _axes_size(mesh, head_axes):
        head_axes = None

    def logits_spec(x):  # (batch|1, heads|1, q|1, kv|1)
        return P(batch_axes if x.shape[0] > 1 else None, head_axes if x.shape[1] > 1 else None, None, None)

    per_example = opts.per_example_arrays()
    arrays = (query, key, value, bias, mask, *per_example)
    specs = (
        *(P(batch_axes, None, head_axes, None),) * 3,
        None if bias is None else logits_spec(bias),
        None if mask is None else logits_spec(mask),
        *(None if x is None else P(batch_axes, *(None,) * (x.ndim - 1)) for x in per_example),
    )
    arrays = [
        None if x is None else jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, s))
        for x, s in zip(arrays, specs, strict=True)
    ]

    def local(query, key, value, bias, mask, *per_example):
        return kernel(query, key, value, bias, mask, opts.with_per_example_arrays(*per_example))

    out_specs = (P(batch_axes, None, head_axes, None), P(batch_axes, None, head_axes))
    out, lse = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*arrays)
    # Back to the query's batch, sequence and head layout (v_dim need not split like dim).
    like_query = _spec(query)[:3]
    out = jax.sharding.reshard(out, jax.sharding.NamedSharding(mesh, P(*like_query, None)))
    lse = jax.sharding.reshard(lse, jax.sharding.NamedSharding(mesh, P(*like_query)))
    return out, lse


def _blockwise_attention(query, key, value, bias, mask, opts, *, block_q, block_kv):
    """The kernel on arrays that carry no explicit sharding (see ``blockwise_attention``)."""
    batch, q_seq, heads, dim = query.shape
    kv_seq, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grid = Grid(q_seq, kv_seq, fitted_block(q_seq, block_q), fitted_block(kv_seq, block_kv))
    static = _Static(grid, opts.scale, opts.is_causal, opts.local_window_size, opts.logits_soft_cap)
    pad_q, pad_kv = grid.q_padded - q_seq, grid.kv_padded - kv_seq

    q = query.reshape(batch, q_seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad_q), (0, 0)))
    # K/V keep the caller's (batch, kv_seq, kv_heads, dim) layout: the forward
    # transposes only the blocks it visits, so a decode step over a long cache
    # costs what its filled part costs (no whole-cache copy).
    k = jnp.pad(key, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    v = jnp.pad(value, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    bias = _pad_logits_operand(bias, pad_q, pad_kv, 0)
    mask = _pad_logits_operand(mask, pad_q, pad_kv, False)
    q_len, kv_len, q_ids, kv_ids = opts.per_example_arrays()
    if q_ids is not None:
        q_ids = jnp.pad(q_ids, ((0, 0), (0, pad_q)), mode="edge")
        kv_ids = jnp.pad(kv_ids, ((0, 0), (0, pad_kv)), mode="edge")

    per_example = (q_len, kv_len, q_ids, kv_ids)
    if batch > 1 and _can_fold_batch(batch, heads, bias, mask, per_example):
        # Nothing differs between examples but the data: fold the batch into
        # the kv_heads axis so every block matmul covers the whole batch.
        fold = lambda x: None if x is None else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])  # noqa: E731
        fold_kv = lambda x: x.transpose(1, 0, 2, 3).reshape(1, x.shape[1], batch * kv_heads, x.shape[3])  # noqa: E731
        out, lse = _attention(static, fold(q), fold_kv(k), fold_kv(v), fold(bias), fold(mask), per_example)
        out, lse = out.reshape(batch, kv_heads, *out.shape[2:]), lse.reshape(batch, kv_heads, *lse.shape[2:])
    else:
        out, lse = _attention(static, q, k, v, bias, mask, per_example)
    out = out[:, :, :, :q_seq].transpose(0, 3, 1, 2, 4).reshape(batch, q_seq, heads, value.shape[-1])
    lse = lse[:, :, :, :q_seq].transpose(0, 3, 1, 2).reshape(batch, q_seq, heads)
    return out, lax.stop_gradient(lse)


def _can_fold_batch(batch, heads, bias, mask, per_example) -> bool:
    """True when the batch can be treated as extra heads: no per-example masks or
    lengths, and bias/mask either span both batch and heads or neither."""
    if any(a is not None for a in per_example):
        return False
    return all(x is None or x.shape[:2] in ((1, 1), (batch, heads)) for x in (bias, mask))


def _pad_logits_operand(x, pad_q, pad_kv, fill):
    """Pads the q_seq/kv_seq axes of a ``(batch|1, heads|1, q|1, kv|1)`` operand."""
    if x is None:
        return None
    pads = ((0, 0), (0, 0), (0, pad_q if x.shape[2] > 1 else 0), (0, pad_kv if x.shape[3] > 1 else 0))
    return jnp.pad(x, pads, constant_values=fill)


def _over_batch(fn, *operands, whole=()):
    """Maps ``fn`` over the batch axis of its operands, one example at a time.

    An operand whose batch axis has extent 1 (broadcast bias or mask) is given
    whole to every example. ``lax.map`` keeps each example's block skipping
    exact. (On explicit mesh axes the kernel runs per shard, see
    ``_per_shard``, so the batch seen here is never explicitly sharded.)

    The ``whole`` operands (K/V in the forward) are not sliced per example:
    ``fn(example, *operands, *whole)`` gets them with their batch axis and the
    example's index, and slices only the blocks it visits. Slicing out a whole
    example first would copy all of its K/V on every call, which is what a
    decode step over a long, mostly empty cache must not pay for.
    """
    batch = operands[0].shape[0]
    mapped = [None if x is None or x.shape[0] != batch else x for x in operands]
    if batch == 1:
        mapped = [None] * len(operands)  # one example: index it directly
    shared = [x[0] if x is not None and m is None else None for x, m in zip(operands, mapped, strict=True)]

    def one(example, xs, ws):
        return fn(example, *(s if m is None else x for x, s, m in zip(xs, shared, mapped, strict=True)), *ws)

    if batch == 1:
        return jax.tree.map(lambda y: y[None], one(jnp.int32(0), [None] * len(operands), whole))
    return lax.map(lambda args: one(args[0], args[1], whole), (jnp.arange(batch, dtype=jnp.int32), mapped))


def _grouped(x, kv_heads, groups):
    """``(heads|1, ...)`` -> ``(kv_heads|1, groups|1, ...)`` to broadcast against logits."""
    if x.shape[0] == 1:
        return x[:, None]
    return x.reshape(kv_heads, groups, *x.shape[1:])


def _block(x, idx, size, axis):
    return lax.dynamic_slice_in_dim(x, idx * size, size, axis)


def _kv_block(x, example, kb, size):
    """Block ``kb`` of ``example`` from a whole ``(batch, kv_padded, kv_heads, x)`` array: ``(size, kv_heads, x)``."""
    zero = jnp.zeros((), jnp.int32)
    start = (lax.convert_element_type(example, jnp.int32), lax.convert_element_type(kb, jnp.int32) * size, zero, zero)
    return lax.dynamic_slice(x, start, (1, size, *x.shape[2:]))[0]


def _mm(a: Array, b: Array) -> Array:
    """Batched ``a @ b`` over the leading (kv_heads) axis, accumulated in the compute dtype.

    Every block product in this file is arranged as this plain (non-transposed)
    matmul by keeping transposed copies of K, Q and dO: on CPU, XLA runs
    transposed-operand products up to 4x slower than plain ones.
    """
    acc = _core.compute_dtype(a.dtype)
    if a.dtype != acc and jax.default_backend() == "cpu":
        # XLA:CPU has no 16-bit x 16-bit -> float32 dot for every shape; widening is exact.
        a, b = a.astype(acc), b.astype(acc)
    return jnp.einsum("kij,kjl->kil", a, b, preferred_element_type=acc)


def _rows(x: Array) -> Array:
    """``(kv_heads, groups, rows, x)`` -> ``(kv_heads, groups * rows, x)`` (free: a reshape)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _scaled(static: _Static, x: Array) -> Array:
    """Multiplies the (small) query block by the scale, for 32/64-bit inputs.

    16-bit inputs keep the scale for the float32 logits, so no precision is lost.
    """
    return x * jnp.asarray(static.scale, x.dtype) if jnp.finfo(x.dtype).bits >= 32 else x


def _finish_logits(static: _Static, s: Array, dtype) -> tuple[Array, Array | None]:
    if jnp.finfo(dtype).bits < 32:
        s = s * static.scale
    t = None
    if static.logits_soft_cap is not None:
        t = jnp.tanh(s / static.logits_soft_cap)
        s = static.logits_soft_cap * t
    return s, t


def _logits(static: _Static, q_blk, kt_blk, bias_blk):
    """Float32 logits ``(kv_heads, groups, bq, bk)`` of a block, and tanh for the soft-cap gradient.

    ``q_blk`` is ``(kv_heads, groups, bq, dim)``, ``kt_blk`` the transposed keys ``(kv_heads, dim, bk)``.
    """
    kv_heads, groups, bq, _ = q_blk.shape
    s = _mm(_rows(_scaled(static, q_blk)), kt_blk).reshape(kv_heads, groups, bq, -1)
    s, t = _finish_logits(static, s, q_blk.dtype)
    if bias_blk is not None:
        s = s + _grouped(bias_blk, kv_heads, groups).astype(s.dtype)
    return s, t


def _transposed_block(x: Array) -> Array:
    """A ``(kv_heads|1, groups|1, bq|1, bk|1)`` mask or bias block as ``(kv_heads|1, bk|1, groups|1, bq|1)``."""
    return x.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- forward


def _forward_example(static: _Static, q, k, v, example, bias, mask, per_example):
    """One example's forward; ``k``/``v`` are the whole ``(batch, kv_padded, kv_heads, x)`` arrays."""
    grid = static.grid
    kv_heads, groups, _, _ = q.shape
    v_dim = v.shape[-1]
    acc_dtype = _core.compute_dtype(q.dtype)
    blocks = ExampleBlocks(static.options(), grid, per_example, mask)

    def one_q_block(qb):
        q_blk = _block(q, qb, grid.block_q, 2)
        shape = (kv_heads, groups, grid.block_q)

        def visit(carry, kt_blk, v_blk, bias_blk, dense_blk, kb, masked):
            acc, m, row_sum = carry
            s, _ = _logits(static, q_blk, kt_blk, bias_blk)
            if masked:
                visible = _grouped(blocks.block_mask(qb, kb, dense_blk), kv_heads, groups)
                s = jnp.where(visible, s, NEG)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            if masked:
                p = jnp.where(visible, p, 0)
            alpha = jnp.exp(m - m_new)
            pv = _mm(_rows(p.astype(v.dtype)), v_blk).reshape(acc.shape)
            return acc * alpha[..., None] + pv, m_new, row_sum * alpha + p.sum(axis=-1)

        def step(kb, carry):  # branches in the order of _blocks.SKIP, FULL, PARTIAL
            # Blocks are sliced here, outside the switch: a branch that took the
            # whole K/V (or mask) as an operand could copy it on every step.
            # (bk, kv_heads, x) blocks -> K^T (kv_heads, dim, bk) and V (kv_heads, bk, v_dim)
            operands = (
                _kv_block(k, example, kb, grid.block_kv).transpose(1, 2, 0),
                _kv_block(v, example, kb, grid.block_kv).transpose(1, 0, 2),
                None if bias is None else slice_block(bias, qb, kb, grid),
                None if mask is None else slice_block(mask, qb, kb, grid),
            )
            branches = [
                lambda c, *_: c,
                lambda c, *o: visit(c, *o, kb, masked=False),
                lambda c, *o: visit(c, *o, kb, masked=True),
            ]
            return lax.switch(blocks.kind(qb, kb), branches, carry, *operands)

        init = (
            jnp.zeros((*shape, v_dim), acc_dtype),
            jnp.full(shape, NEG, acc_dtype),
            jnp.zeros(shape, acc_dtype),
        )
        lo, hi = blocks.kv_block_range(qb)
        acc, m, row_sum = lax.fori_loop(lo, hi, step, init)
        seen = row_sum != 0  # NaN rows count as seen, so NaN inputs propagate
        safe_sum = jnp.where(seen, row_sum, 1)
        out = jnp.where(seen[..., None], acc / safe_sum[..., None], 0)
        lse = jnp.where(seen, m + jnp.log(safe_sum), NEG)
        return out.astype(v.dtype), lse

    if grid.num_q_blocks == 1:  # e.g. a decode step: no loop needed over one query block
        out, lse = jax.tree.map(lambda x: x[None], one_q_block(jnp.int32(0)))
    else:
        out, lse = lax.map(one_q_block, jnp.arange(grid.num_q_blocks, dtype=jnp.int32))
    # (num_q_blocks, kv_heads, groups, bq, ...) -> (kv_heads, groups, q_padded, ...)
    out = jnp.moveaxis(out, 0, 2).reshape(kv_heads, groups, grid.q_padded, v_dim)
    lse = jnp.moveaxis(lse, 0, 2).reshape(kv_heads, groups, grid.q_padded)
    return out, lse


def _forward(static, q, k, v, bias, mask, per_example):
    def one_example(example, q, bias, mask, *rest):
        *per_example, k, v = rest
        return _forward_example(static, q, k, v, example, bias, mask, per_example)

    return _over_batch(one_example, q, bias, mask, *per_example, whole=(k, v))


# ---------------------------------------------------------------- backward


def _backward_example(static: _Static, q, k, v, bias, mask, per_example, out, lse, dout):
    k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # head-major (kv_heads, kv_padded, x)
    grid = static.grid
    kv_heads, groups, _, dim = q.shape
    v_dim = v.shape[-1]
    acc_dtype = _core.compute_dtype(q.dtype)
    blocks = ExampleBlocks(static.options(), grid, per_example, mask)
    # D_i = sum_d dO_id O_id: the softmax-Jacobian term of every row.
    delta = jnp.einsum("kgqd,kgqd->kgq", dout, out, preferred_element_type=acc_dtype)

    # The backward works on transposed logits ``(kv_heads, bk, groups * bq)``
    # so that all five block products are plain matmuls (see ``_mm``).
    rows = groups * grid.block_q
    qt = q.transpose(0, 3, 1, 2)  # (kv_heads, dim, groups, q_padded)
    dout_t = dout.transpose(0, 3, 1, 2)  # (kv_heads, v_dim, groups, q_padded)
    kt = k.transpose(0, 2, 1)  # (kv_heads, dim, kv_padded)
    row_block = lambda x, qb: _block(x, qb, grid.block_q, 2).reshape(kv_heads, 1, rows)  # noqa: E731
    col_block = lambda x, qb: _block(x, qb, grid.block_q, 3).reshape(kv_heads, x.shape[1], rows)  # noqa: E731

    def one_kv_block(carry, kb):
        k_blk, v_blk = _block(k, kb, grid.block_kv, 1), _block(v, kb, grid.block_kv, 1)
        kt_blk = _block(kt, kb, grid.block_kv, 2)
        as_4d = lambda x: x.reshape(kv_heads, grid.block_kv, groups, grid.block_q)  # noqa: E731

        def visit(dk, dv, q_blk, qt_blk, do_blk, dot_blk, lse_row, delta_row, bias_blk, dense_blk, qb, masked):
            """New dK/dV accumulators, and this pair's transposed dQ block and dlogits."""
            st = _mm(k_blk, _scaled(static, qt_blk))  # (kv_heads, bk, rows)
            st, t = _finish_logits(static, st, q.dtype)
            if bias_blk is not None:
                bias_t = _transposed_block(_grouped(bias_blk, kv_heads, groups))
                st = (as_4d(st) + bias_t.astype(st.dtype)).reshape(st.shape)
            # p <= 1: the recomputed logit may exceed the saved log-sum-exp by an ulp of
            # its size (another summation order), and exp of 1e17 overflows.
            pt = jnp.exp(jnp.minimum(st - lse_row, 0))
            if masked:
                visible = _transposed_block(_grouped(blocks.block_mask(qb, kb, dense_blk), kv_heads, groups))
                pt = jnp.where(visible, as_4d(pt), 0).reshape(pt.shape)
            dv = dv + _mm(pt.astype(dout.dtype), do_blk)
            dpt = _mm(v_blk, dot_blk)
            dlogits_t = pt * (dpt - delta_row)
            dst = (dlogits_t if t is None else dlogits_t * (1 - t * t)).astype(q.dtype)
            # d(logits)/dq = scale * k and d(logits)/dk = scale * q: scale the small products.
            dk = dk + _mm(dst, q_blk) * static.scale
            dqt_blk = _mm(kt_blk, dst) * static.scale  # (kv_heads, dim, rows)
            dlogits = None if bias is None else as_4d(dlogits_t).transpose(0, 2, 3, 1)
            return dk, dv, dqt_blk, dlogits

        def skip(dk, dv):
            dlogits = None if bias is None else jnp.zeros((kv_heads, groups, grid.block_q, grid.block_kv), acc_dtype)
            return dk, dv, jnp.zeros((kv_heads, dim, rows), acc_dtype), dlogits

        def step(qb, c):  # branches in the order of _blocks.SKIP, FULL, PARTIAL
            # The switch only carries block-sized values: the full-size dQ (and
            # dbias) are updated in place outside it, so no branch copies them.
            # Blocks are sliced here, outside the switch, so no branch takes a
            # full-size array as an operand.
            dk, dv, dqt, dbias = c
            operands = (
                _rows(_block(q, qb, grid.block_q, 2)),
                col_block(qt, qb),
                _rows(_block(dout, qb, grid.block_q, 2)),
                col_block(dout_t, qb),
                row_block(lse, qb),
                row_block(delta, qb),
                None if bias is None else slice_block(bias, qb, kb, grid),
                None if mask is None else slice_block(mask, qb, kb, grid),
            )
            branches = [
                lambda dk, dv, *_: skip(dk, dv),
                lambda dk, dv, *o: visit(dk, dv, *o, qb, masked=False),
                lambda dk, dv, *o: visit(dk, dv, *o, qb, masked=True),
            ]
            dk, dv, dqt_blk, dlogits = lax.switch(blocks.kind(qb, kb), branches, dk, dv, *operands)
            dqt_blk = _block(dqt, qb, grid.block_q, 3) + dqt_blk.reshape(kv_heads, dim, groups, grid.block_q)
            dqt = lax.dynamic_update_slice_in_dim(dqt, dqt_blk, qb * grid.block_q, 3)
            if dbias is not None:
                dbias = _add_bias_block(dbias, dlogits, qb, kb, grid)
            return dk, dv, dqt, dbias

        dqt, dbias = carry
        init = (
            jnp.zeros((kv_heads, grid.block_kv, dim), acc_dtype),
            jnp.zeros((kv_heads, grid.block_kv, v_dim), acc_dtype),
            dqt,
            dbias,
        )
        lo, hi = blocks.q_block_range(kb)
        dk, dv, dqt, dbias = lax.fori_loop(lo, hi, step, init)
        return (dqt, dbias), (dk, dv)

    dqt0 = jnp.zeros(qt.shape, acc_dtype)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, acc_dtype)
    (dqt, dbias), (dk, dv) = lax.scan(one_kv_block, (dqt0, dbias0), jnp.arange(grid.num_kv_blocks, dtype=jnp.int32))
    # (num_kv_blocks, kv_heads, bk, ...) -> (kv_heads, kv_padded, ...)
    # (num_kv_blocks, kv_heads, bk, x) -> the primal layout (kv_padded, kv_heads, x)
    dk = jnp.moveaxis(dk, 1, 2).reshape(grid.kv_padded, kv_heads, dim)
    dv = jnp.moveaxis(dv, 1, 2).reshape(grid.kv_padded, kv_heads, v_dim)
    dq = dqt.transpose(0, 2, 3, 1)  # (kv_heads, groups, q_padded, dim)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _add_bias_block(dbias, ds, qb, kb, grid: Grid):
    """Adds a block's dlogits into dbias ``(heads|1, q|1, kv|1)``, summing broadcast axes."""
    heads_b, tq, tk = dbias.shape
    ds = ds.reshape(-1, *ds.shape[2:])  # (heads, bq, bk)
    ds = ds.sum(axis=0, keepdims=True) if heads_b == 1 else ds
    ds = ds.sum(axis=1, keepdims=True) if tq == 1 else ds
    ds = ds.sum(axis=2, keepdims=True) if tk == 1 else ds
    start = block_start(dbias.shape, qb, kb, grid)
    current = lax.dynamic_slice(dbias, start, ds.shape)
    return lax.dynamic_update_slice(dbias, current + ds, start)


def _backward(static, q, k, v, bias, mask, per_example, out, lse, dout):
    def one_example(_, q, k, v, out, lse, dout, bias, mask, *per_example):
        return _backward_example(static, q, k, v, bias, mask, per_example, out, lse, dout)

    dq, dk, dv, dbias = _over_batch(one_example, q, k, v, out, lse, dout, bias, mask, *per_example)
    if bias is not None:
        dbias = dbias.sum(axis=0, keepdims=True) if bias.shape[0] == 1 else dbias
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------- autodiff
#
# First order: the blockwise backward above. Second order (grad of grad) goes
# through the backward's own custom VJP, which differentiates a dense version
# of the same maths: O(q_seq * kv_seq) memory, but only for higher derivatives.
# Each rule calls its own function again for its primal value, so that value
# stays differentiable when an outer transformation traces the rule.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, mask, per_example):
    return _forward(static, q, k, v, bias, mask, per_example)


def _attention_fwd(static, q, k, v, bias, mask, per_example):
    out, lse = _attention(static, q, k, v, bias, mask, per_example)
    return (out, lse), (q, k, v, bias, mask, per_example, out, lse)


def _attention_bwd(static, residuals, cotangents):
    dout, _ = cotangents  # the log-sum-exp output carries no gradient (stop_gradient above)
    dq, dk, dv, dbias = _attention_grads(static, *residuals, dout)
    return dq, dk, dv, dbias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_grads(static, q, k, v, bias, mask, per_example, out, lse, dout):
    return _backward(static, q, k, v, bias, mask, per_example, out, lse, dout)


def _attention_grads_fwd(static, q, k, v, bias, mask, per_example, out, lse, dout):
    grads = _attention_grads(static, q, k, v, bias, mask, per_example, out, lse, dout)
    return grads, (q, k, v, bias, mask, per_example, out, lse, dout)


def _attention_grads_bwd(static, residuals, cotangents):
    q, k, v, bias, mask, per_example, out, lse, dout = residuals

    def first_order(q, k, v, bias, dout):
        _, vjp = jax.vjp(lambda q, k, v, bias: _dense(static, q, k, v, bias, mask, per_example), q, k, v, bias)
        return vjp(dout)

    _, vjp = jax.vjp(first_order, q, k, v, bias, dout)
    dq, dk, dv, dbias, ddout = vjp(tuple(cotangents))
    # out and lse are functions of q, k, v, bias; the dense maths already
    # accounts for that path, so they get zero cotangents.
    return dq, dk, dv, dbias, None, None, jnp.zeros_like(out), jnp.zeros_like(lse), ddout


_attention_grads.defvjp(_attention_grads_fwd, _attention_grads_bwd)


def _dense(static: _Static, q, k, v, bias, mask, per_example):
    """The kernel's maths with one block spanning everything (for second derivatives)."""
    grid = static.grid
    whole = Grid(grid.q_seq, grid.kv_seq, grid.q_padded, grid.kv_padded)
    dense_static = dataclasses.replace(static, grid=whole)

    def one_example(q, k, v, bias, mask, per_example):
        blocks = ExampleBlocks(static.options(), whole, per_example, mask)
        s, _ = _logits(dense_static, q, k.transpose(1, 2, 0), bias)
        visible = _grouped(blocks.block_mask(0, 0, mask), *q.shape[:2])
        weights, _ = _core.softmax_with_lse(s, visible)
        return jnp.einsum("kgqc,ckd->kgqd", weights.astype(v.dtype), v, preferred_element_type=s.dtype).astype(v.dtype)

    return _over_batch(
        lambda _, q, k, v, bias, mask, *pe: one_example(q, k, v, bias, mask, pe), q, k, v, bias, mask, *per_example
    )
