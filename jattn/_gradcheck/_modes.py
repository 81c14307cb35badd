"""The checks of ``jattn.testing.check_attention_grads``, one function per autodiff mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compare as _gradcheck
from ._compare import Mismatch

FINITE_DIFFERENCES = "finite differences"
REFERENCE_GRADIENT = "reference autodiff"
REFERENCE_OUTPUT = "reference output"
SECOND_ORDER_FD = "Hessian-vector product vs finite differences"
SECOND_ORDER_REFERENCE = "Hessian-vector product vs reference"
JVP_FD = "JVP vs finite differences"
JVP_REFERENCE = "JVP vs reference"
JVP_VJP = "<J t, c> vs <t, J^T c>"
SECOND_ORDER_FWD_FD = "Hessian-vector product (forward over reverse) vs finite differences"
SECOND_ORDER_FWD_REV = "Hessian-vector product forward over reverse vs reverse over reverse"
SECOND_JVP_FD = "second directional derivative vs finite differences"
MODES = ("fwd", "rev")


@dataclasses.dataclass
class Problem:
    """What every check needs: the bound functions, the float64 primals, the cotangents and the tangent."""

    fn: Callable
    reference: Callable | None
    names: list[str]  # of the differentiated arguments
    primals: tuple
    cotangents: list  # per output leaf (None for non-floating leaves)
    tangents: tuple  # per differentiated argument
    out_leaves: list
    out_tree: Any
    eps: float
    atol: float
    rtol: float
    rng: np.random.Generator

    @staticmethod
    def make(fn, args, reference, argnums, *, eps, atol, rtol, seed) -> Problem:
        arrays = [None if a is None else jnp.asarray(a) for a in args]
        argnums = _argnums(arrays, argnums)
        names = _gradcheck.argument_names(fn, len(arrays))
        primals = tuple(arrays[i].astype(jnp.float64) for i in argnums)
        rng = np.random.default_rng(seed)

        def bind(f):
            if f is None:
                return None

            def call(*diff):
                full = list(arrays)
                for i, x in zip(argnums, diff, strict=True):
                    full[i] = x
                return f(*full)

            return call

        out_leaves, out_tree = jax.tree_util.tree_flatten(jax.jit(bind(fn))(*primals))
        cotangents = [
            jnp.asarray(rng.standard_normal(np.shape(leaf)), jnp.float64) if _gradcheck.is_floating(leaf) else None
            for leaf in out_leaves
        ]
        if all(c is None for c in cotangents):
            raise ValueError(f"fn must return at least one floating-point array; got {out_tree}")
        tangents = tuple(jnp.asarray(rng.standard_normal(p.shape), jnp.float64) for p in primals)
        return Problem(
            bind(fn), bind(reference), [names[i] for i in argnums], primals, cotangents, tangents,
            out_leaves, out_tree, eps, atol, rtol, rng,
        )  # fmt: skip

    @property
    def all_args(self) -> tuple[int, ...]:
        return tuple(range(len(self.primals)))

    def loss(self, f) -> Callable:
        """``L = sum <leaf, c>`` over the floating outputs of ``f``."""

        def loss(*diff):
            leaves = jax.tree_util.tree_leaves(f(*diff))
            terms = [
                jnp.vdot(leaf.astype(jnp.float64), c)
                for leaf, c in zip(leaves, self.cotangents, strict=True)
                if c is not None
            ]
            return sum(terms[1:], terms[0])

        return loss

    def floating_outputs(self, f, *diff) -> list:
        leaves = jax.tree_util.tree_leaves(f(*diff))
        return [leaf for leaf, c in zip(leaves, self.cotangents, strict=True) if c is not None]

    def compare(self, check, name, actual, expected) -> Mismatch:
        return _gradcheck.compare(check, name, actual, expected, atol=self.atol, rtol=self.rtol)

    def output_label(self, n: int, count: int) -> str:
        return "output" if count == 1 else f"output {n}"


def _argnums(arrays, argnums) -> tuple[int, ...]:
    floating = [a is not None and jnp.issubdtype(a.dtype, jnp.floating) for a in arrays]
    if argnums is None:
        argnums = tuple(i for i, f in enumerate(floating) if f)
        if not argnums:
            raise ValueError("check_attention_grads needs at least one floating-point argument; got none")
    argnums = tuple(argnums)
    for i in argnums:
        if not 0 <= i < len(arrays):
            raise ValueError(f"argnums must index the {len(arrays)} positional args; got {i}")
        if not floating[i]:
            raise TypeError(f"argument {i} in argnums must be floating point; got {_gradcheck.describe(arrays[i])}")
    return argnums


def _reference_outputs(p: Problem) -> list[Mismatch]:
    """The reference's outputs against fn's (and a clear error for another structure or shape)."""
    if p.reference is None:
        return []
    ref_leaves, ref_tree = jax.tree_util.tree_flatten(jax.jit(p.reference)(*p.primals))
    if ref_tree != p.out_tree:
        raise ValueError(f"reference must return the same structure as fn: {p.out_tree}; got {ref_tree}")
    worst = []
    for n, (leaf, ref_leaf) in enumerate(zip(p.out_leaves, ref_leaves, strict=True)):
        if np.shape(leaf) != np.shape(ref_leaf):
            raise ValueError(
                f"reference output {n} must have shape {np.shape(leaf)} like fn's; got {np.shape(ref_leaf)}"
            )
        worst.append(p.compare(REFERENCE_OUTPUT, p.output_label(n, len(p.out_leaves)), leaf, ref_leaf))
    return worst


def reverse_checks(p: Problem, order: int, max_elements: int | None) -> list[Mismatch]:
    loss = p.loss(p.fn)
    grad_fn = jax.grad(loss, argnums=p.all_args)
    grads = jax.jit(grad_fn)(*p.primals)
    worst = []
    # First order: every (or a sample of every) gradient element by central differences.
    samples = [_gradcheck.sample(g.size, max_elements, p.rng) for g in grads]
    differences = _gradcheck.central_differences(loss, p.primals, samples, p.eps)
    for name, g, flat_idx, fd in zip(p.names, grads, samples, differences, strict=True):
        actual = np.asarray(g).reshape(-1)[flat_idx]
        worst.append(
            _gradcheck.worst_element(
                FINITE_DIFFERENCES, name, actual, fd, at=(flat_idx, g.shape), atol=p.atol, rtol=p.rtol
            )
        )
    if p.reference is not None:
        worst += _reference_outputs(p)
        ref_grads = jax.jit(jax.grad(p.loss(p.reference), argnums=p.all_args))(*p.primals)
        worst += [p.compare(REFERENCE_GRADIENT, n, g, rg) for n, g, rg in zip(p.names, grads, ref_grads, strict=True)]
    if order == 2:
        hvp = jax.jit(_gradcheck.hessian_vector_product(grad_fn, p.all_args))(p.primals, p.tangents)
        worst += [
            p.compare(SECOND_ORDER_FD, f"d(grad {n})", h, fd)
            for n, h, fd in zip(p.names, hvp, _directional_fd(jax.jit(grad_fn), p), strict=True)
        ]
        if p.reference is not None:
            ref_grad_fn = jax.grad(p.loss(p.reference), argnums=p.all_args)
            ref_hvp = jax.jit(_gradcheck.hessian_vector_product(ref_grad_fn, p.all_args))(p.primals, p.tangents)
            worst += [
                p.compare(SECOND_ORDER_REFERENCE, f"d(grad {n})", h, rh)
                for n, h, rh in zip(p.names, hvp, ref_hvp, strict=True)
            ]
    return worst


def _directional_fd(f, p: Problem) -> list[np.ndarray]:
    """``(f(x + eps t) - f(x - eps t)) / (2 eps)`` for every leaf of ``f``'s (list-like) result."""
    plus = f(*(x + p.eps * t for x, t in zip(p.primals, p.tangents, strict=True)))
    minus = f(*(x - p.eps * t for x, t in zip(p.primals, p.tangents, strict=True)))
    return [(np.asarray(a) - np.asarray(b)) / (2 * p.eps) for a, b in zip(plus, minus, strict=True)]


def forward_checks(p: Problem, order: int, *, with_reverse: bool) -> list[Mismatch]:
    def outputs(*diff):
        return p.floating_outputs(p.fn, *diff)

    jvp = jax.jit(lambda *xs: jax.jvp(outputs, xs, p.tangents)[1])(*p.primals)
    fd = _directional_fd(jax.jit(outputs), p)
    count = len(jvp)
    worst = [p.compare(JVP_FD, p.output_label(n, count), j, f) for n, (j, f) in enumerate(zip(jvp, fd, strict=True))]
    if p.reference is not None:

        def ref_outputs(*diff):
            return p.floating_outputs(p.reference, *diff)

        ref_jvp = jax.jit(lambda *xs: jax.jvp(ref_outputs, xs, p.tangents)[1])(*p.primals)
        worst += [
            p.compare(JVP_REFERENCE, p.output_label(n, count), j, r)
            for n, (j, r) in enumerate(zip(jvp, ref_jvp, strict=True))
        ]
    loss = p.loss(p.fn)
    grad_fn = jax.grad(loss, argnums=p.all_args)
    if with_reverse:  # <J t, c> == <t, J^T c>: forward and reverse mode describe the same linear map
        forward = sum(
            float(jnp.vdot(j, c)) for j, c in zip(jvp, (c for c in p.cotangents if c is not None), strict=True)
        )
        grads = jax.jit(grad_fn)(*p.primals)
        reverse = sum(float(jnp.vdot(t, g)) for t, g in zip(p.tangents, grads, strict=True))
        worst.append(p.compare(JVP_VJP, "<J t, c>", np.array(forward), np.array(reverse)))
    if order == 2:
        worst += _forward_second_order(p, loss, grad_fn, with_reverse)
    return worst


def _forward_second_order(p: Problem, loss, grad_fn, with_reverse: bool) -> list[Mismatch]:
    if with_reverse:  # H t forward over reverse, against finite differences and reverse over reverse
        hvp = jax.jit(lambda *xs: jax.jvp(grad_fn, xs, p.tangents)[1])(*p.primals)
        fd = _directional_fd(jax.jit(grad_fn), p)
        rev = jax.jit(_gradcheck.hessian_vector_product(grad_fn, p.all_args))(p.primals, p.tangents)
        worst = [p.compare(SECOND_ORDER_FWD_FD, f"d(grad {n})", h, f) for n, h, f in zip(p.names, hvp, fd, strict=True)]
        worst += [
            p.compare(SECOND_ORDER_FWD_REV, f"d(grad {n})", h, r) for n, h, r in zip(p.names, hvp, rev, strict=True)
        ]
        return worst

    def directional(*xs):  # t^T H t by forward over forward
        return [jax.jvp(loss, xs, p.tangents)[1]]

    second = jax.jit(lambda *xs: jax.jvp(directional, xs, p.tangents)[1])(*p.primals)
    fd = _directional_fd(jax.jit(directional), p)
    return [p.compare(SECOND_JVP_FD, "t^T H t", second[0], fd[0])]
