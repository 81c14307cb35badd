"""The public gradient checker's report, error and entry point (``jattn.testing`` re-exports them)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jaxtyping import ArrayLike, Float

from ._compare import Mismatch
from ._modes import MODES, Problem, forward_checks, reverse_checks

__all__ = ["GradCheckError", "GradCheckReport", "Mismatch", "check_attention_grads"]


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Result of :func:`check_attention_grads`.

    Attributes:
        order: highest derivative order checked (1 or 2).
        modes: the autodiff modes checked (``"fwd"``, ``"rev"``).
        worst: the worst element of every (check, argument) pair, worst first
            (ranked by error relative to tolerance).
    """

    order: int
    worst: tuple[Mismatch, ...]
    modes: tuple[str, ...] = ("rev",)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.worst)

    @property
    def failures(self) -> tuple[Mismatch, ...]:
        return tuple(m for m in self.worst if not m.passed)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        head = f"gradient check (order {self.order}, modes {'+'.join(self.modes)}) {verdict}; worst elements:"
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
    modes: Sequence[str] = ("rev",),
    argnums: Sequence[int] | None = None,
    eps: float = 1e-5,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    max_elements: int | None = 512,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GradCheckReport:
    r"""Checks the derivatives of an attention-like function in float64, in reverse and forward mode.

    The function is reduced to the scalar ``L = sum(fn(*args) * c)`` with a
    fixed random cotangent ``c`` (one per floating output leaf), and a fixed
    random tangent ``t`` is drawn for the differentiated arguments. Then, with
    every differentiated argument cast to float64:

    * ``"rev"``, order 1: each element of ``jax.grad(L)`` against the central
      difference ``(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)``, and against
      the gradient of ``reference`` (whose outputs are compared too);
    * ``"fwd"``, order 1: every element of the JVP ``J t`` (``jax.jvp`` of
      ``fn``) against ``(fn(x + eps t) - fn(x - eps t)) / (2 eps)`` and against
      the reference's ``J t``; with both modes, also the dot-product identity
      ``<J t, c> = <t, J^T c>`` between forward and reverse mode;
    * order 2, ``"rev"``: the Hessian-vector product ``H t`` reverse over
      reverse (so ``jax.custom_vjp`` kernels work) against
      ``(grad L(x + eps t) - grad L(x - eps t)) / (2 eps)`` and against the
      reference's ``H t``;
    * order 2, ``"fwd"``: with both modes, ``H t`` forward over reverse
      (``jax.jvp`` of ``jax.grad``) against finite differences and against
      reverse over reverse; forward mode alone, the second directional
      derivative ``t^T H t`` (``jvp`` of ``jvp``) against finite differences.

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
        modes: ``("rev",)`` (default: reverse mode only, which ``custom_vjp``
            kernels support), ``("fwd",)`` or ``("fwd", "rev")``.
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
        ValueError: on a bad ``order``, ``modes``, ``argnums`` or ``eps``, or
            when the reference's outputs have another structure or shape.
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

        Forward and reverse mode, to second order:

        >>> check_attention_grads(my_attention, q, kv, kv, order=2, modes=("fwd", "rev")).passed
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
    if isinstance(modes, str) or not modes or not set(modes) <= set(MODES):
        raise ValueError(f"modes must be a non-empty sequence of {MODES}; got {modes!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float; got {eps!r}")
    modes = tuple(m for m in MODES if m in modes)
    with jax.enable_x64(True):
        problem = Problem.make(
            fn, args, reference, argnums, eps=float(eps), atol=float(atol), rtol=float(rtol), seed=seed
        )
        worst = []
        if "rev" in modes:
            worst += reverse_checks(problem, order, max_elements)
        if "fwd" in modes:
            worst += forward_checks(problem, order, with_reverse="rev" in modes)
    worst.sort(key=lambda m: -(m.error / m.tolerance if m.tolerance > 0 else (0.0 if m.error == 0 else math.inf)))
    report = GradCheckReport(order=order, worst=tuple(worst), modes=modes)
    if raise_on_failure and not report.passed:
        raise GradCheckError(report)
    return report
