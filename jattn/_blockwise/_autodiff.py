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
from ._backward import backward
from ._blockmath import KernelSpec
from ._dense import dense_cotangent, dense_forward, dense_tangent
from ._forward import forward
from ._layout import Operands
from ._tangent import Tangents, tangent

kernel_p = Primitive("jattn_blockwise_attention")
kernel_p.multiple_results = True

DIFFERENTIABLE = ("q", "k", "v", "bias")
"""The operands with tangents and cotangents (the mask and the per-example arrays are integers or booleans)."""


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
    """A pass whose arguments start with the flattened kernel :class:`Operands`."""

    spec: KernelSpec
    treedef: Any  # of Operands

    @property
    def num_ops(self) -> int:
        return self.treedef.num_leaves

    def ops(self, args) -> Operands:
        return jax.tree.unflatten(self.treedef, list(args[: self.num_ops]))

    def ops_broadcast(self) -> tuple[bool, ...]:
        where = jax.tree.unflatten(self.treedef, list(range(self.num_ops)))
        return tuple(i in (where.bias, where.mask) for i in range(self.num_ops))

    def differentiable(self) -> list[int | None]:
        """Argument positions of q, k, v and bias (None for an absent bias)."""
        where = jax.tree.unflatten(self.treedef, list(range(self.num_ops)))
        return [getattr(where, name) for name in DIFFERENTIABLE]

    def result_avals(self, avals) -> tuple[jax.core.ShapedArray, jax.core.ShapedArray]:
        """``(out, lse)``: ``(batch, kv_heads, groups, q_padded, v_dim)`` in v's dtype and the softmax dtype."""
        q, v = avals[0], avals[2]
        return (
            jax.core.ShapedArray((*q.shape[:4], v.shape[-1]), v.dtype),
            jax.core.ShapedArray(q.shape[:4], _core.compute_dtype(q.dtype)),
        )


@dataclasses.dataclass(frozen=True)
class Forward(OperandsPass):
    def blockwise(self, *args):
        return forward(self.spec, self.ops(args))

    def dense(self, *args):
        return dense_forward(self.spec, self.ops(args))

    def out_avals(self, *avals):
        return list(self.result_avals(avals))

    def broadcast(self):
        return self.ops_broadcast()

    def jvp(self, primals, tangents):
        out, lse = kernel_p.bind(*primals, kernel=self)
        positions = self.differentiable()
        present = tuple(i is not None and not _is_zero(tangents[i]) for i in positions)
        if not any(present):
            return (out, lse), [_zero_like(out), _zero_like(lse)]
        given = [tangents[i] for i, p in zip(positions, present, strict=True) if p]
        kernel = Tangent(self.spec, self.treedef, present)
        return (out, lse), kernel_p.bind(*primals, out, lse, *given, kernel=kernel)


@dataclasses.dataclass(frozen=True)
class Tangent(OperandsPass):
    """Arguments: ops, out, lse, then the tangents of the ``present`` ones of q, k, v, bias."""

    present: tuple[bool, ...]

    def tangents(self, args) -> Tangents:
        given = iter(args[self.num_ops + 2 :])
        return Tangents(*(next(given) if p else None for p in self.present))

    def blockwise(self, *args):
        n = self.num_ops
        return tangent(self.spec, self.ops(args), args[n], args[n + 1], self.tangents(args))

    def dense(self, *args):
        n = self.num_ops
        return dense_tangent(self.spec, self.ops(args), args[n], args[n + 1], self.tangents(args))

    def out_avals(self, *avals):
        return list(self.result_avals(avals))

    def broadcast(self):
        bias_tangent = (False, False, False, True)
        return (*self.ops_broadcast(), False, False, *(b for b, p in zip(bias_tangent, self.present, strict=True) if p))

    def transpose(self, cotangents, *args):
        n = self.num_ops
        assert not any(ad.is_undefined_primal(x) for x in args[: n + 2]), "only the tangents are linear"
        out, lse = args[n], args[n + 1]
        g_out, g_lse = (ad.instantiate_zeros(c) for c in cotangents)
        kernel = Cotangent(self.spec, self.treedef, self.present[3])
        grads = kernel_p.bind(*args[:n], out, lse, g_out, g_lse, kernel=kernel)
        grads = dict(zip(DIFFERENTIABLE, grads, strict=False))
        if self.present[3]:  # per-example dbias -> the bias's own shape
            bias = args[self.differentiable()[3]]
            dbias = grads["bias"]
            grads["bias"] = (dbias.sum(axis=0, keepdims=True) if bias.shape[0] == 1 else dbias).astype(bias.dtype)
        linear = [grads[name] for name, p in zip(DIFFERENTIABLE, self.present, strict=True) if p]
        return [None] * (n + 2) + linear


@dataclasses.dataclass(frozen=True)
class Cotangent(OperandsPass):
    """Arguments: ops, out, lse, g_out, g_lse. Results: dq, dk, dv and, with ``bias_grad``, dbias per example."""

    bias_grad: bool

    def blockwise(self, *args):
        n = self.num_ops
        grads = backward(self.spec, self.ops(args), *args[n : n + 4], bias_grad=self.bias_grad)
        return grads if self.bias_grad else grads[:3]

    def dense(self, *args):
        n = self.num_ops
        grads = dense_cotangent(self.spec, self.ops(args), *args[n : n + 4], bias_grad=self.bias_grad)
        return grads if self.bias_grad else grads[:3]

    def out_avals(self, *avals):
        q, k, v = avals[:3]
        grads = [jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v)]
        if self.bias_grad:
            bias = avals[self.differentiable()[3]]
            grads.append(jax.core.ShapedArray((q.shape[0], *bias.shape[1:]), _core.compute_dtype(q.dtype)))
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
