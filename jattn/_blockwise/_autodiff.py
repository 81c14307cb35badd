"""How the blockwise kernel meets JAX's autodiff: one primitive, three hand-written passes.

JAX offers no decorator for this: a ``custom_vjp`` function has no forward mode,
``custom_jvp`` and ``custom_vjp`` cannot be combined, and a tangent function
wrapped in ``custom_vjp`` cannot be transposed. JAX's own primitives get both
modes another way, and so does this kernel: ``kernel_p`` is a primitive whose
``kernel`` parameter says which pass it runs.

* :class:`Forward` ``(ops) -> (out, lse)``: the blockwise online softmax. Its
  JVP rule returns the primal from ``Forward`` and the tangent from
  :class:`Tangent`.
* :class:`Tangent` ``(ops, out, lse, dops) -> (dout, dlse)``: blockwise, linear
  in the tangents (dQ, dK, dV, dbias) given the saved log-sum-exp. Its
  transpose rule is :class:`Cotangent`.
* :class:`Cotangent` ``(ops, out, lse, g_out, g_lse) -> grads``: the
  hand-written blockwise backward.

So ``jax.jvp`` runs Forward + Tangent (O(N) memory, blocks skipped as in the
forward), and ``jax.grad`` linearizes (Forward, with Tangent staged as the
linear part) and transposes Tangent into Cotangent: the same two passes, the
same residuals (q, k, v, bias, out, lse) as a ``custom_vjp`` had, so reverse
mode keeps its speed and memory.

Higher orders are generic. The JVP of Tangent or Cotangent (an HVP forward
over reverse, ``jacfwd`` of ``jacfwd``, ``hessian``) is :class:`JvpOf` that
pass: JAX's forward mode of the pass's own blockwise code, loops and skipped
blocks included, so it stays O(N). Transposing a ``JvpOf`` (reverse over
reverse, e.g. grad of grad) differentiates the pass's dense twin
(``_dense.py``: the same step functions on one block spanning everything),
which costs O(q_seq * kv_seq) memory. Every pass has a batching rule that folds
a ``vmap`` axis into the kernel's batch axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array

from .. import _core
from ._backward import Grads, Wanted, backward
from ._blockmath import KernelSpec
from ._dense import dense_cotangent, dense_forward, dense_tangent
from ._forward import forward
from ._layout import Operands
from ._ring import ring_backward, ring_forward, ring_tangent
from ._tangent import Tangents, tangent

kernel_p = Primitive("jattn_blockwise_attention")
kernel_p.multiple_results = True


def attention(spec: KernelSpec, ops: Operands) -> tuple[Array, Array]:
    """``(out, lse)`` in the kernel layout (see ``forward``), differentiable in every mode."""
    leaves, treedef = jax.tree.flatten(ops)
    return tuple(kernel_p.bind(*leaves, kernel=Forward(spec, treedef)))


# ---------------------------------------------------------------- passes


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel pass as a function of a flat argument list (hashable: it is a primitive parameter)."""

    def blockwise(self, *args) -> tuple[Array, ...]:
        raise NotImplementedError

    def dense(self, *args) -> tuple[Array, ...]:
        raise NotImplementedError

    def out_avals(self, *avals) -> list[jax.core.ShapedArray]:
        raise NotImplementedError

    def broadcast(self) -> tuple[bool, ...]:
        """Per argument: whether its batch axis may be 1 and broadcast (a bias or mask)."""
        raise NotImplementedError

    def jvp(self, primals, tangents):
        """Generic: the primal from this pass, the tangent from :class:`JvpOf` it."""
        outs = kernel_p.bind(*primals, kernel=self)
        nonzero = tuple(not _is_zero(t) for t in tangents)
        if not any(nonzero):
            return outs, [_zero_like(o) for o in outs]
        given = [t for t, nz in zip(tangents, nonzero, strict=True) if nz]
        return outs, kernel_p.bind(*primals, *given, kernel=JvpOf(self, nonzero))

    def transpose(self, cotangents, *args):
        raise NotImplementedError(f"{type(self).__name__} is not linear in any argument")


@dataclasses.dataclass(frozen=True)
class OperandsPass(Pass):
    """A pass whose arguments start with the flattened kernel :class:`Operands`.

    Its differentiable operands ("slots") are q, k, v, the bias, the sinks and
    the arrays a score_mod captured, in that order (absent ones left out).
    """

    spec: KernelSpec
    treedef: Any  # of Operands

    @property
    def num_ops(self) -> int:
        return self.treedef.num_leaves

    def ops(self, args) -> Operands:
        return jax.tree.unflatten(self.treedef, list(args[: self.num_ops]))

    def _where(self) -> Operands:
        return jax.tree.unflatten(self.treedef, list(range(self.num_ops)))

    def ops_broadcast(self) -> tuple[bool, ...]:
        """Bias, mask, sinks and captured arrays may have a batch axis of 1 (shared by every example)."""
        where = self._where()
        shared = {where.bias, where.mask, *jax.tree.leaves(where.opts.shared)}
        return tuple(i in shared for i in range(self.num_ops))

    def slots(self) -> list[int]:
        """Argument positions of the differentiable operands, in slot order."""
        where = self._where()
        shared = where.opts.shared
        return [i for i in (where.q, where.k, where.v, where.bias, shared.sinks, *shared.score_consts) if i is not None]

    def tangents(self, present: tuple[bool, ...], given) -> Tangents:
        """The given tangents (of the ``present`` slots) as :class:`Tangents`."""
        where, it = self._where(), iter(given)
        by_position = {i: next(it) if p else None for i, p in zip(self.slots(), present, strict=True)}
        consts = tuple(by_position[i] for i in where.opts.shared.score_consts)
        sinks = where.opts.shared.sinks
        return Tangents(
            by_position[where.q],
            by_position[where.k],
            by_position[where.v],
            None if where.bias is None else by_position[where.bias],
            None if sinks is None else by_position[sinks],
            consts,
        )

    def wanted(self, present: tuple[bool, ...]) -> Wanted:
        """Which gradients a backward computes for the ``present`` slots (q, k, v always)."""
        where = self._where()
        flags = dict(zip(self.slots(), present, strict=True))
        shared = where.opts.shared
        return Wanted(
            bias=where.bias is not None and flags[where.bias],
            sinks=shared.sinks is not None and flags[shared.sinks],
            consts=tuple(flags[i] for i in shared.score_consts),
        )

    def result_avals(self, avals) -> tuple[jax.core.ShapedArray, jax.core.ShapedArray]:
        """``(out, lse)``: ``(batch, kv_heads, groups, q_padded, v_dim)`` in v's dtype and the softmax dtype
        (``(batch, q_local, heads, v_dim)`` in a ring, see ``_ring``)."""
        q, v = avals[0], avals[2]
        rows = q.shape[:3] if self.spec.ring is not None else q.shape[:4]
        return (
            jax.core.ShapedArray((*rows, v.shape[-1]), v.dtype),
            jax.core.ShapedArray(rows, _core.compute_dtype(q.dtype)),
        )


@dataclasses.dataclass(frozen=True)
class Forward(OperandsPass):
    def blockwise(self, *args):
        if self.spec.ring is not None:
            return ring_forward(self.spec, self.ops(args), forward)
        return forward(self.spec, self.ops(args))

    def dense(self, *args):
        if self.spec.ring is not None:
            return ring_forward(self.spec, self.ops(args), dense_forward)
        return dense_forward(self.spec, self.ops(args))

    def out_avals(self, *avals):
        return list(self.result_avals(avals))

    def broadcast(self):
        return self.ops_broadcast()

    def jvp(self, primals, tangents):
        out, lse = kernel_p.bind(*primals, kernel=self)
        slots = self.slots()
        present = tuple(not _is_zero(tangents[i]) for i in slots)
        if not any(present):
            return (out, lse), [_zero_like(out), _zero_like(lse)]
        given = [tangents[i] for i, p in zip(slots, present, strict=True) if p]
        kernel = Tangent(self.spec, self.treedef, present)
        return (out, lse), kernel_p.bind(*primals, out, lse, *given, kernel=kernel)


@dataclasses.dataclass(frozen=True)
class Tangent(OperandsPass):
    """Arguments: ops, out, lse, then the tangents of the ``present`` slots."""

    present: tuple[bool, ...]

    def _call(self, fn, args):
        n = self.num_ops
        call = (self.spec, self.ops(args), args[n], args[n + 1], self.tangents(self.present, args[n + 2 :]))
        return fn(*call) if self.spec.ring is None else ring_tangent(*call, fn)

    def blockwise(self, *args):
        return self._call(tangent, args)

    def dense(self, *args):
        return self._call(dense_tangent, args)

    def out_avals(self, *avals):
        return list(self.result_avals(avals))

    def broadcast(self):
        ops = self.ops_broadcast()
        return (*ops, False, False, *(ops[i] for i, p in zip(self.slots(), self.present, strict=True) if p))

    def transpose(self, cotangents, *args):
        n = self.num_ops
        assert not any(ad.is_undefined_primal(x) for x in args[: n + 2]), "only the tangents are linear"
        out, lse = args[n], args[n + 1]
        g_out, g_lse = (ad.instantiate_zeros(c) for c in cotangents)
        want = self.wanted(self.present)
        grads = Grads(
            *jax.tree.unflatten(
                _grads_tree(want),
                kernel_p.bind(*args[:n], out, lse, g_out, g_lse, kernel=Cotangent(self.spec, self.treedef, want)),
            )
        )
        by_position = {**dict(zip(self.slots()[:3], grads[:3], strict=True)), **self._shared_grads(args, grads)}
        linear = [by_position[i] for i, p in zip(self.slots(), self.present, strict=True) if p]
        return [None] * (n + 2) + linear

    def _shared_grads(self, args, grads: Grads) -> dict:
        """Per-example gradients of the bias, sinks and captured arrays, summed to their operands' shapes."""
        where, out = self._where(), {}
        shared = where.opts.shared

        def reduce(position, per_example):
            primal = args[position]
            summed = per_example.sum(axis=0, keepdims=True) if primal.shape[0] == 1 else per_example
            out[position] = summed.reshape(primal.shape).astype(primal.dtype)

        if grads.bias is not None:
            reduce(where.bias, grads.bias)
        if grads.sinks is not None:
            reduce(shared.sinks, grads.sinks)
        wanted_consts = [i for i, w in zip(shared.score_consts, self.wanted(self.present).consts, strict=True) if w]
        for position, d in zip(wanted_consts, grads.consts, strict=True):
            reduce(position, d)
        return out


def _grads_tree(want: Wanted):
    """The pytree structure of a :class:`Grads` with the ``want``ed fields present."""
    dummy = Grads(0, 0, 0, 0 if want.bias else None, 0 if want.sinks else None, tuple(0 for w in want.consts if w))
    return jax.tree.structure(dummy)


@dataclasses.dataclass(frozen=True)
class Cotangent(OperandsPass):
    """Arguments: ops, out, lse, g_out, g_lse. Results: the leaves of :class:`Grads` (per example)."""

    want: Wanted

    def _call(self, fn, args):
        n = self.num_ops
        call = (self.spec, self.ops(args), *args[n : n + 4])
        if self.spec.ring is not None:
            return tuple(jax.tree.leaves(ring_backward(*call, want=self.want, pass_fn=fn)))
        return tuple(jax.tree.leaves(fn(*call, want=self.want)))

    def blockwise(self, *args):
        return self._call(backward, args)

    def dense(self, *args):
        return self._call(dense_cotangent, args)

    def out_avals(self, *avals):
        ops = self.ops(avals)
        q = ops.q
        acc = _core.compute_dtype(q.dtype)
        grads = [jax.core.ShapedArray(x.shape, x.dtype) for x in (ops.q, ops.k, ops.v)]
        if self.want.bias:
            grads.append(jax.core.ShapedArray((q.shape[0], *ops.bias.shape[1:]), acc))
        if self.want.sinks:
            grads.append(jax.core.ShapedArray(q.shape[:3], acc))
        for c, w in zip(ops.opts.shared.score_consts, self.want.consts, strict=True):
            if w:
                grads.append(jax.core.ShapedArray((q.shape[0], *c.shape[1:]), acc))
        return grads

    def broadcast(self):
        return (*self.ops_broadcast(), False, False, False, False)


@dataclasses.dataclass(frozen=True)
class JvpOf(Pass):
    """The tangent of ``inner``'s results; arguments: inner's, then tangents of the ``nonzero`` ones."""

    inner: Pass
    nonzero: tuple[bool, ...]

    def _split(self, args):
        m = len(self.nonzero)
        return args[:m], args[m:]

    def _linearized(self, fn, args):
        primals, given = self._split(args)

        def at(*diff):
            full, it = list(primals), iter(diff)
            for i, nz in enumerate(self.nonzero):
                if nz:
                    full[i] = next(it)
            return fn(*full)

        at_primals = [p for p, nz in zip(primals, self.nonzero, strict=True) if nz]
        return at, at_primals, given

    def blockwise(self, *args):
        at, at_primals, given = self._linearized(self.inner.blockwise, args)
        return jax.jvp(at, at_primals, list(given))[1]

    def dense(self, *args):
        at, at_primals, given = self._linearized(self.inner.dense, args)
        return jax.jvp(at, at_primals, list(given))[1]

    def out_avals(self, *avals):
        primals, _ = self._split(avals)
        return self.inner.out_avals(*primals)

    def broadcast(self):
        inner = self.inner.broadcast()
        return (*inner, *(b for b, nz in zip(inner, self.nonzero, strict=True) if nz))

    def transpose(self, cotangents, *args):
        """Reverse mode of a second derivative: the VJP of the dense twin's tangent (O(N^2) memory)."""
        primals, given = self._split(args)
        assert not any(ad.is_undefined_primal(x) for x in primals), "only the tangents are linear"
        linear = [ad.is_undefined_primal(t) for t in given]
        known = iter(t for t, lin in zip(given, linear, strict=True) if not lin)
        zeros = [jnp.zeros(t.aval.shape, t.aval.dtype) for t, lin in zip(given, linear, strict=True) if lin]

        def tangent_of(*linear_tangents):
            it = iter(linear_tangents)
            full = [next(it) if lin else next(known) for lin in linear]
            return self.dense(*primals, *full)

        _, vjp = jax.vjp(tangent_of, *zeros)
        cts = iter(vjp(tuple(ad.instantiate_zeros(c) for c in cotangents)))
        return [None] * len(primals) + [next(cts) if lin else None for lin in linear]


# ---------------------------------------------------------------- rules


def _is_zero(tangent) -> bool:
    """A symbolic zero, or the float0 tangent of an integer or boolean operand."""
    return type(tangent) is ad.Zero or jnp.result_type(tangent) == jax.dtypes.float0


def _zero_like(x) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


@functools.partial(jax.jit, static_argnames="kernel")
def _compiled(*args, kernel: Pass):
    return kernel.blockwise(*args)


def _abstract_eval(*avals, kernel: Pass):
    return kernel.out_avals(*avals)


def _lowering(*args, kernel: Pass):
    return kernel.blockwise(*args)


def _jvp(primals, tangents, *, kernel: Pass):
    return kernel.jvp(primals, tangents)


def _transpose(cotangents, *args, kernel: Pass):
    return kernel.transpose(cotangents, *args)


def _batch(args, dims, *, kernel: Pass):
    """Folds the vmapped axis into the kernel's batch axis (every result has a full batch axis)."""
    n = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    q, q_dim = args[0], dims[0]
    batch = q.shape[0] if q_dim is None or q_dim > 0 else q.shape[1]
    folded = []
    for x, d, broadcast in zip(args, dims, kernel.broadcast(), strict=True):
        if d is None:
            if broadcast and x.shape[0] == 1:
                folded.append(x)  # stays broadcast over every example of every vmapped slice
                continue
            x = jnp.broadcast_to(x[None], (n, *x.shape))
        else:
            x = jnp.moveaxis(x, d, 0)
            if x.shape[1] != batch:  # a broadcast bias or mask given per slice
                x = jnp.broadcast_to(x, (n, batch, *x.shape[2:]))
        folded.append(x.reshape(n * x.shape[1], *x.shape[2:]))
    outs = kernel_p.bind(*folded, kernel=kernel)
    return [o.reshape(n, batch, *o.shape[1:]) for o in outs], [0] * len(outs)


kernel_p.def_impl(lambda *args, kernel: _compiled(*args, kernel=kernel))
kernel_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(kernel_p, mlir.lower_fun(_lowering, multiple_results=True))
ad.primitive_jvps[kernel_p] = _jvp
ad.primitive_transposes[kernel_p] = _transpose
batching.primitive_batchers[kernel_p] = _batch
