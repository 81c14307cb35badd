"""Kernel passes as primitive parameters: the base classes and the generic higher-order pass.

A :class:`Pass` is one kernel pass as a function of a flat argument list; it is hashable, so it can be
``kernel_p``'s parameter. :class:`OperandsPass` reads its arguments as the kernel's :class:`Operands`;
:class:`JvpOf` is the tangent of any pass (second derivatives), see ``_autodiff``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .. import _numerics
from .._jax_compat import ShapedArray, ad
from ._backward import Grads, Wanted
from ._blockmath import KernelSpec
from ._layout import Operands
from ._primitive import is_zero, kernel_p, zero_like
from ._tangent import Tangents


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel pass as a function of a flat argument list (hashable: it is a primitive parameter)."""

    def blockwise(self, *args) -> tuple[Array, ...]:
        raise NotImplementedError

    def dense(self, *args) -> tuple[Array, ...]:
        raise NotImplementedError

    def out_avals(self, *avals) -> list[ShapedArray]:
        raise NotImplementedError

    def broadcast(self) -> tuple[bool, ...]:
        """Per argument: whether its batch axis may be 1 and broadcast (a bias or mask)."""
        raise NotImplementedError

    def jvp(self, primals, tangents):
        """Generic: the primal from this pass, the tangent from :class:`JvpOf` it."""
        outs = kernel_p.bind(*primals, kernel=self)
        nonzero = tuple(not is_zero(t) for t in tangents)
        if not any(nonzero):
            return outs, [zero_like(o) for o in outs]
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

    def _where(self) -> Any:
        """The :class:`Operands` tree with each leaf's argument position (an int) in place of the array."""
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

    def result_avals(self, avals) -> tuple[ShapedArray, ShapedArray]:
        """``(out, lse)``: ``(batch, kv_heads, groups, q_padded, v_dim)`` in v's dtype and the softmax dtype
        (``(batch, q_local, heads, v_dim)`` in a ring, see ``_ring``)."""
        q, v = avals[0], avals[2]
        rows = q.shape[:3] if self.spec.ring is not None else q.shape[:4]
        return (
            ShapedArray((*rows, v.shape[-1]), v.dtype),
            ShapedArray(rows, _numerics.compute_dtype(q.dtype)),
        )


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


def grads_tree(want: Wanted):
    """The pytree structure of a :class:`Grads` with the ``want``ed fields present."""
    leaf: Any = 0  # any leaf: only the structure is wanted
    dummy = Grads(
        leaf,
        leaf,
        leaf,
        leaf if want.bias else None,
        leaf if want.sinks else None,
        tuple(leaf for w in want.consts if w),
    )
    return jax.tree.structure(dummy)
