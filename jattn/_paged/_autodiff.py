"""Reverse mode for the paged kernel: a ``custom_vjp`` whose backward is the blockwise one in ``_backward``.

The forward's loops run as many steps as each sequence has cached pages, so they are ``while_loop`` s,
which JAX cannot transpose; the hand-written backward walks the same loops instead. Forward mode
(``jax.jvp``, ``jax.jacfwd``) is not defined for a ``custom_vjp`` function: JAX raises a TypeError
saying so, never a wrong tangent.
"""

from __future__ import annotations

import functools

import jax
from jaxtyping import Array

from ._backward import backward
from ._forward import forward
from ._spec import Metadata, Operands, PagedSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec: PagedSpec, meta: Metadata, ops: Operands) -> Array:
    return forward(spec, meta, ops)[0]


def _attend_fwd(spec: PagedSpec, meta: Metadata, ops: Operands):
    out, lse = forward(spec, meta, ops)
    return out, (meta, ops, out, lse)


def _attend_bwd(spec: PagedSpec, res, dout: Array):
    meta, ops, out, lse = res
    return None, backward(spec, meta, ops, (out, lse), dout)


_attend.defvjp(_attend_fwd, _attend_bwd)

attend = jax.jit(_attend, static_argnums=0)
"""``(spec, meta, ops) -> (tokens, heads, v_dim)``: compiled once per spec and shapes, differentiable in
reverse mode with respect to ``ops``."""
