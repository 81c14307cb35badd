"""How the blockwise kernel meets JAX's autodiff: two primitives, four hand-written passes.

JAX offers no decorator for this: a ``custom_vjp`` function has no forward mode,
``custom_jvp`` and ``custom_vjp`` cannot be combined, and a tangent function
wrapped in ``custom_vjp`` cannot be transposed. JAX's own primitives get both
modes another way, and so does this kernel: ``kernel_p`` (and ``fused_p``) is
a primitive whose ``kernel`` parameter says which pass it runs.

* :class:`Forward` ``(ops) -> (out, lse)``: the blockwise online softmax. Its
  JVP rule binds :class:`FusedJvp` (``fused_p``, a primitive of its own).
* :class:`FusedJvp` ``(ops, dops) -> (out, lse, dout, dlse)``: the primal and
  its tangent in one online sweep (``_fused``), 6 block products where the
  forward followed by the tangent pass would take 7.
* :class:`Tangent` ``(ops, out, lse, dops) -> (dout, dlse)``: blockwise, linear
  in the tangents (dQ, dK, dV, dbias) given the saved log-sum-exp. Its
  transpose rule is :class:`Cotangent`.
* :class:`Cotangent` ``(ops, out, lse, g_out, g_lse) -> grads``: the
  hand-written blockwise backward.

So ``jax.jvp`` runs one fused sweep (O(N) memory, blocks skipped as in the
forward), and ``jax.grad`` linearizes: ``_partial_eval``'s rules split the
fused call with known primals into Forward (known) and Tangent (staged as the
linear part), and JAX transposes Tangent into Cotangent: the same two passes,
the same residuals (q, k, v, bias, out, lse) as a ``custom_vjp`` had, so
reverse mode keeps its speed and memory. ``vmap`` over the tangents alone
(``jacfwd``) runs Forward once and Tangent batched (``_primitive``); a ring
(sequence parallel) runs Forward and Tangent apart.

Higher orders are generic. The JVP of Tangent or Cotangent (an HVP forward
over reverse, ``jacfwd`` of ``jacfwd``, ``hessian``) is :class:`JvpOf` that
pass: JAX's forward mode of the pass's own blockwise code, loops and skipped
blocks included, so it stays O(N). Transposing a ``JvpOf`` (reverse over
reverse, e.g. grad of grad) differentiates the pass's dense twin
(``_dense.py``: the same step functions on one block spanning everything),
which costs O(q_seq * kv_seq) memory. Every pass has one batching rule: it folds
a ``vmap`` axis into the kernel's batch axis, or, when some operands are shared
by the vmapped slices (K/V under a vmap over queries), runs the slices one by
one with those operands closed over, never copied (``_primitive._batch``).
"""

from __future__ import annotations

import dataclasses

import jax
from jaxtyping import Array

from .. import _numerics
from .._jax_compat import ShapedArray, ad
from ._backward import Grads, Wanted, backward
from ._blockmath import KernelSpec
from ._dense import dense_cotangent, dense_forward, dense_tangent
from ._forward import forward
from ._fused import fused
from ._layout import Operands
from ._partial_eval import split_equation  # noqa: F401  (registers how reverse mode splits fused_p)
from ._passes import OperandsPass, grads_tree
from ._primitive import fused_p, is_zero, kernel_p, zero_like
from ._ring import ring_backward, ring_forward, ring_tangent
from ._tangent import tangent


def kernel_attention(spec: KernelSpec, ops: Operands) -> tuple[Array, Array]:
    """``(out, lse)`` in the kernel layout (see ``forward``), differentiable in every mode."""
    leaves, treedef = jax.tree.flatten(ops)
    return tuple(kernel_p.bind(*leaves, kernel=Forward(spec, treedef)))


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
        slots = self.slots()
        present = tuple(not is_zero(tangents[i]) for i in slots)
        if not any(present):
            out, lse = kernel_p.bind(*primals, kernel=self)
            return (out, lse), [zero_like(out), zero_like(lse)]
        given = [tangents[i] for i, p in zip(slots, present, strict=True) if p]
        if self.spec.ring is None:  # one sweep; partial evaluation splits it for reverse mode (_partial_eval)
            out, lse, dout, dlse = fused_p.bind(*primals, *given, kernel=FusedJvp(self.spec, self.treedef, present))
            return (out, lse), [dout, dlse]
        out, lse = kernel_p.bind(*primals, kernel=self)
        return (out, lse), kernel_p.bind(*primals, out, lse, *given, kernel=Tangent(self.spec, self.treedef, present))


@dataclasses.dataclass(frozen=True)
class FusedJvp(OperandsPass):
    """``jax.jvp`` of :class:`Forward` in one sweep (``_fused``), a pass of ``fused_p``.

    Arguments: ops, then the tangents of the ``present`` slots. Results: out, lse, dout, dlse. It is the
    composition of :class:`Forward` and :class:`Tangent`, which is how it is split for reverse mode and
    how it is differentiated again (so it needs no dense twin: only a ``JvpOf`` is transposed densely).
    """

    present: tuple[bool, ...]

    def forward_pass(self) -> Forward:
        return Forward(self.spec, self.treedef)

    def tangent_pass(self) -> Tangent:
        return Tangent(self.spec, self.treedef, self.present)

    def blockwise(self, *args):
        n = self.num_ops
        return fused(self.spec, self.ops(args), self.tangents(self.present, args[n:]))

    def out_avals(self, *avals):
        results = self.result_avals(avals)
        return [*results, *results]

    def broadcast(self):
        ops = self.ops_broadcast()
        return (*ops, *(ops[i] for i, p in zip(self.slots(), self.present, strict=True) if p))

    def jvp(self, primals, tangents):
        """The JVP of the composition (jacfwd of jacfwd, reverse over forward): what the unfused passes give."""
        n = self.num_ops

        def unfused(*args):
            out, lse = kernel_p.bind(*args[:n], kernel=self.forward_pass())
            return (out, lse, *kernel_p.bind(*args[:n], out, lse, *args[n:], kernel=self.tangent_pass()))

        return jax.jvp(unfused, tuple(primals), tuple(ad.instantiate_zeros(t) for t in tangents))


@dataclasses.dataclass(frozen=True)
class Tangent(OperandsPass):
    """Arguments: ops, out, lse, then the tangents of the ``present`` slots."""

    present: tuple[bool, ...]

    def _call(self, fn, args):
        n = self.num_ops
        call = (self.spec, self.ops(args), args[n], args[n + 1], self.tangents(self.present, args[n + 2 :]))
        return fn(*call) if self.spec.ring is None else ring_tangent(*call, pass_fn=fn)

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
                grads_tree(want),
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


@dataclasses.dataclass(frozen=True)
class Cotangent(OperandsPass):
    """Arguments: ops, out, lse, g_out, g_lse. Results: the leaves of :class:`Grads` (per example)."""

    want: Wanted

    def _call(self, fn, args):
        n = self.num_ops
        out, lse, dout, dlse = args[n : n + 4]
        call = (self.spec, self.ops(args), out, lse, dout)
        if self.spec.ring is not None:
            return tuple(jax.tree.leaves(ring_backward(*call, dlse=dlse, want=self.want, pass_fn=fn)))
        return tuple(jax.tree.leaves(fn(*call, dlse=dlse, want=self.want)))

    def blockwise(self, *args):
        return self._call(backward, args)

    def dense(self, *args):
        return self._call(dense_cotangent, args)

    def out_avals(self, *avals):
        ops = self.ops(avals)
        q = ops.q
        acc = _numerics.compute_dtype(q.dtype)
        grads = [ShapedArray(x.shape, x.dtype) for x in (ops.q, ops.k, ops.v)]
        if self.want.bias:
            grads.append(ShapedArray((q.shape[0], *ops.bias.shape[1:]), acc))
        if self.want.sinks:
            grads.append(ShapedArray(q.shape[:3], acc))
        for c, w in zip(ops.opts.shared.score_consts, self.want.consts, strict=True):
            if w:
                grads.append(ShapedArray((q.shape[0], *c.shape[1:]), acc))
        return grads

    def broadcast(self):
        return (*self.ops_broadcast(), False, False, False, False)
