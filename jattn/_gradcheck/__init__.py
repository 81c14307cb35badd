"""Gradient checks: float64 finite differences and reference comparisons (``jattn.testing`` is the public face).

* ``_compare``: the worst element of a comparison (:class:`Mismatch`), sampling, argument names;
* ``_modes``: the checks of each mode (reverse, forward, second order) on one bound problem;
* ``_report``: :func:`check_attention_grads`, its report and its error.
"""

from ._report import GradCheckError, GradCheckReport, check_attention_grads

__all__ = ["GradCheckError", "GradCheckReport", "check_attention_grads"]
