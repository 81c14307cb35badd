"""Gradient checks for attention-like functions, for people who write their own variants.

``check_attention_grads`` differentiates a function in float64, in reverse mode
and (``modes=("fwd", "rev")``) forward mode, and compares every gradient
element with central finite differences and, if given, with the autodiff
derivatives of a reference (e.g. ``jattn.dot_product_attention``). It returns
a :class:`GradCheckReport` naming the worst element of every check — which
argument, which index, the two values — and raises :class:`GradCheckError`
with that report when a tolerance is exceeded.

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

from ._gradcheck import GradCheckError as GradCheckError
from ._gradcheck import GradCheckReport as GradCheckReport
from ._gradcheck import check_attention_grads as check_attention_grads

__all__ = ["GradCheckError", "GradCheckReport", "check_attention_grads"]
