"""Gradient checks for attention-like functions, for people who write their own variants.

``check_attention_grads`` differentiates a function in float64 and compares
every gradient element with central finite differences and, if given, with the
autodiff gradients of a reference (e.g. ``jattn.dot_product_attention``). It
returns a :class:`GradCheckReport` naming the worst element of every check —
which argument, which index, the two values — and raises
:class:`GradCheckError` with that report when a tolerance is exceeded.

This module imports only JAX and NumPy (``import jattn.testing``).

Example:
    >>> import jax, jattn
    >>> from jattn.testing import check_attention_grads
    >>> q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
    >>> report = check_attention_grads(jattn.dot_product_attention, q, q, q, reference=jattn.dot_product_attention)
    >>> report.passed
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from . import _gradcheck
from ._gradcheck import Mismatch

__all__ = ["GradCheckError", "GradCheckReport", "Mismatch", "check_attention_grads"]

FINITE_DIFFERENCES = "finite differences"
REFERENCE_GRADIENT = "reference autodiff"
REFERENCE_OUTPUT = "reference output"
SECOND_ORDER_FD = "Hessian-vector product vs finite differences"
SECOND_ORDER_REFERENCE = "Hessian-vector product vs reference"


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Result of :func:`check_attention_grads`.

    Attributes:
        order: highest derivative order checked (1 or 2).
        worst: the worst element of every (check, argument) pair, worst first
            (ranked by error relative to tolerance).
    """

    order: int
    worst: tuple[Mismatch, ...]

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.worst)

    @property
    def failures(self) -> tuple[Mismatch, ...]:
        return tuple(m for m in self.worst if not m.passed)

    def __str__(self) -> str:
        head = f"gradient check (order {self.order}) {'passed' if self.passed else 'FAILED'}; worst elements:"
        return "\n".join([head, *(f"  {m}" for m in self.worst)])


class GradCheckError(AssertionError):
    """Raised by :func:`check_attention_grads` when a tolerance is exceeded; ``.report`` has the details."""

    def __init__(self, report: GradCheckReport):
        super().__init__(str(report))
        self.report = report


def check_attention_grads(
    fn: Callable[..., Any],
    *args: Float[ArrayLike, "*dims"] | ArrayLike | None,
    reference: Callable[..., Any] | None = None,
    order: int = 1,
    argnums: Sequence[int] | None = None,
    eps: float = 1e-5,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    max_elements: int | None = 512,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GradCheckReport:
    r"""Checks the gradients of an attention-like function in float64.

    The function is reduced to the scalar ``L = sum(fn(*args) * w)`` with a
    fixed random cotangent ``w`` (one per floating output leaf). Then, with
    every differentiated argument cast to float64:

    * order 1: each element of ``jax.grad(L)`` against the central difference
      ``(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)``, and against the gradient
      of ``reference`` (whose outputs are compared too);
    * order 2 (additionally): the Hessian-vector product ``H t`` for a random
      tangent ``t`` (reverse over reverse, so ``jax.custom_vjp`` kernels work)
      against ``(grad L(x + eps t) - grad L(x - eps t)) / (2 eps)`` and
      against the reference's ``H t``.

    An element passes when ``|actual - expected| <= atol + rtol * |expected|``;
    NaN or Inf always fails. The checks run under ``jax.enable_x64(True)``.

    Args:
        fn: the function under test, called as ``fn(*args)``; bind options
            such as ``is_causal`` with ``functools.partial`` or a lambda. Its
            outputs may be any pytree of arrays.
        *args: positional arguments, e.g. ``query (batch, q_seq, heads, dim)``,
            ``key``, ``value``, ``bias``; ``None``, boolean masks and integer
            arrays are passed through unchanged.
        reference: optional function with the same signature and outputs, e.g.
            ``jattn.dot_product_attention``.
        order: 1 or 2.
        argnums: positions of the arguments to differentiate; default every
            floating-point argument.
        eps: finite-difference step (absolute; inputs of order 1 are assumed).
        atol: absolute tolerance.
        rtol: relative tolerance.
        max_elements: check at most this many (randomly chosen) elements per
            argument with finite differences; ``None`` checks all.
        seed: seed of the cotangent, the tangent and the element sample.
        raise_on_failure: raise :class:`GradCheckError` on failure (default);
            otherwise return the failing report.

    Returns:
        A :class:`GradCheckReport`; ``str(report)`` lists the worst element of
        every check.

    Raises:
        GradCheckError: if a tolerance is exceeded and ``raise_on_failure``.
        ValueError: on a bad ``order``, ``argnums`` or ``eps``, or when the
            reference's outputs have another structure or shape.
        TypeError: if ``fn`` is not callable or an ``argnums`` argument is not
            floating point.

    Example:
        A hand-written variant checked against ``jattn.dot_product_attention``:

        >>> import jax, jax.numpy as jnp, jattn
        >>> from jattn.testing import check_attention_grads
        >>> q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))  # (batch, q_seq, heads, dim)
        >>> kv = jax.random.normal(jax.random.key(1), (1, 5, 2, 4))  # (batch, kv_seq, heads, dim)
        >>> def my_attention(q, k, v):
        ...     s = jnp.einsum("btnd,bsnd->bnts", q, k) / 2.0  # 1/sqrt(dim)
        ...     return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, axis=-1), v)
        >>> report = check_attention_grads(my_attention, q, kv, kv, reference=jattn.dot_product_attention)
        >>> report.passed
        True

        A variant that forgets a gradient path fails, and the report says where:

        >>> def broken(q, k, v):
        ...     return my_attention(q, jax.lax.stop_gradient(k), v)
        >>> report = check_attention_grads(broken, q, kv, kv, raise_on_failure=False)
        >>> [m.argument for m in report.failures]
        ['k']
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference must be callable or None; got {type(reference).__name__}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float; got {eps!r}")
    with jax.enable_x64(True):
        report = _check(fn, args, reference, order, argnums, float(eps), float(atol), float(rtol), max_elements, seed)
    if raise_on_failure and not report.passed:
        raise GradCheckError(report)
    return report


def _check(fn, args, reference, order, argnums, eps, atol, rtol, max_elements, seed) -> GradCheckReport:
    arrays = [None if a is None else jnp.asarray(a) for a in args]
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
    names = _gradcheck.argument_names(fn, len(arrays))
    diff_names = [names[i] for i in argnums]
    primals = tuple(arrays[i].astype(jnp.float64) for i in argnums)
    rng = np.random.default_rng(seed)

    def bind(f):
        def call(*diff):
            full = list(arrays)
            for i, x in zip(argnums, diff, strict=True):
                full[i] = x
            return f(*full)

        return call

    out = jax.jit(bind(fn))(*primals)
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    cotangents = [
        jnp.asarray(rng.standard_normal(np.shape(leaf)), jnp.float64) if _gradcheck.is_floating(leaf) else None
        for leaf in out_leaves
    ]
    if all(w is None for w in cotangents):
        raise ValueError(f"fn must return at least one floating-point array; got {out_tree}")

    def scalar_loss(f):
        call = bind(f)

        def loss(*diff):
            leaves = jax.tree_util.tree_leaves(call(*diff))
            terms = [
                jnp.vdot(leaf.astype(jnp.float64), w)
                for leaf, w in zip(leaves, cotangents, strict=True)
                if w is not None
            ]
            return sum(terms[1:], terms[0])

        return loss

    all_args = tuple(range(len(primals)))
    loss = scalar_loss(fn)
    grad_fn = jax.grad(loss, argnums=all_args)
    grads = jax.jit(grad_fn)(*primals)
    worst: list[Mismatch] = []

    # First order: every (or a sample of every) gradient element by central differences.
    samples = [_gradcheck.sample(g.size, max_elements, rng) for g in grads]
    differences = _gradcheck.central_differences(loss, primals, samples, eps)
    for name, g, flat_idx, fd in zip(diff_names, grads, samples, differences, strict=True):
        actual = np.asarray(g).reshape(-1)[flat_idx]
        worst.append(_gradcheck.worst_element(FINITE_DIFFERENCES, name, actual, fd, flat_idx, g.shape, atol, rtol))

    ref_grads = None
    if reference is not None:
        ref_out = jax.jit(bind(reference))(*primals)
        ref_leaves, ref_tree = jax.tree_util.tree_flatten(ref_out)
        if ref_tree != out_tree:
            raise ValueError(f"reference must return the same structure as fn: {out_tree}; got {ref_tree}")
        for n, (leaf, ref_leaf) in enumerate(zip(out_leaves, ref_leaves, strict=True)):
            if np.shape(leaf) != np.shape(ref_leaf):
                raise ValueError(
                    f"reference output {n} must have shape {np.shape(leaf)} like fn's; got {np.shape(ref_leaf)}"
                )
            label = "output" if len(out_leaves) == 1 else f"output {n}"
            worst.append(_gradcheck.compare(REFERENCE_OUTPUT, label, leaf, ref_leaf, atol, rtol))
        ref_loss = scalar_loss(reference)
        ref_grads = jax.jit(jax.grad(ref_loss, argnums=all_args))(*primals)
        for name, g, rg in zip(diff_names, grads, ref_grads, strict=True):
            worst.append(_gradcheck.compare(REFERENCE_GRADIENT, name, g, rg, atol, rtol))

    if order == 2:
        tangents = tuple(jnp.asarray(rng.standard_normal(p.shape), jnp.float64) for p in primals)
        hvp = jax.jit(_gradcheck.hessian_vector_product(grad_fn, all_args))(primals, tangents)
        plus = jax.jit(grad_fn)(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
        minus = jax.jit(grad_fn)(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
        for name, h, gp, gm in zip(diff_names, hvp, plus, minus, strict=True):
            fd = (np.asarray(gp) - np.asarray(gm)) / (2 * eps)
            worst.append(_gradcheck.compare(SECOND_ORDER_FD, f"d(grad {name})", h, fd, atol, rtol))
        if reference is not None:
            ref_grad_fn = jax.grad(scalar_loss(reference), argnums=all_args)
            ref_hvp = jax.jit(_gradcheck.hessian_vector_product(ref_grad_fn, all_args))(primals, tangents)
            for name, h, rh in zip(diff_names, hvp, ref_hvp, strict=True):
                worst.append(_gradcheck.compare(SECOND_ORDER_REFERENCE, f"d(grad {name})", h, rh, atol, rtol))

    worst.sort(key=lambda m: -(m.error / m.tolerance if m.tolerance > 0 else (0.0 if m.error == 0 else math.inf)))
    return GradCheckReport(order=order, worst=tuple(worst))
