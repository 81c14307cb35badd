"""Partial evaluation of the fused forward-mode pass: how reverse mode takes it apart.

``fused_p`` (``_fused``) computes ``(out, lse)`` and their tangents in one
sweep, which suits ``jax.jvp``. Reverse mode linearizes: JAX evaluates what
depends only on the primals (known) and stages what depends on the tangents
(unknown) into the linear part it then transposes. Left alone, a fused call
with known primals and unknown tangents would be staged whole, the primal
output unknown, and nothing left to transpose it with. These rules split it
instead into the two passes it fuses:

* known: ``Forward`` on the primals, giving ``(out, lse)``;
* staged: ``Tangent`` on the primals, ``out``, ``lse`` and the tangents,
  which transposes into the hand-written backward.

So ``jax.grad``, ``jax.vjp`` and ``jax.linearize`` run exactly the passes and
residuals they ran before forward mode was fused, through ``scan``, ``cond``,
``jax.checkpoint`` and ``shard_map`` too (they trace the JVP of their body and
partially evaluate it with these rules).

Two entry points, one per JAX partial evaluator:

* :func:`split_traced` (``custom_partial_eval_rules``): tracing with known
  values (``jax.linearize``, the transpose of a checkpointed function);
* :func:`split_equation` (``partial_eval_jaxpr_custom_rules``): an equation of
  a jaxpr under a remat policy (``jax.checkpoint``). Where the policy
  recomputes the forward, the staged side keeps the whole fused equation (its
  primal inputs are the residuals); the checkpoint's transpose splits it again
  with :func:`split_traced` when it recomputes.
"""

from __future__ import annotations

from .._jax_compat import RecomputeType, Var, ensure_enum
from .._jax_compat import partial_eval as pe
from ._primitive import fused_p, kernel_p


def split_traced(trace, *tracers, kernel):
    """``custom_partial_eval_rules[fused_p]``: known primals and unknown tangents become a known forward
    and a staged tangent pass; anything else is JAX's default (all known: evaluated; else staged)."""
    n = kernel.num_ops
    known = [t.pval.is_known() for t in tracers]
    if not all(known[:n]) or all(known[n:]):
        return trace.default_process_primitive(fused_p, tracers, dict(kernel=kernel))
    primals = [t.pval.get_known() for t in tracers[:n]]
    out, lse = kernel_p.bind(*primals, kernel=kernel.forward_pass())
    staged = [*tracers[:n], out, lse, *tracers[n:]]
    return [out, lse, *trace.default_process_primitive(kernel_p, staged, dict(kernel=kernel.tangent_pass()))]


def split_equation(saveable, unks_in, inst_in, eqn):
    """``partial_eval_jaxpr_custom_rules[fused_p]``: the known and staged equations of a fused call,
    the unknown and instantiated flags of its results, and the residuals."""
    kernel = eqn.params["kernel"]
    n = kernel.num_ops
    outs = eqn.outvars
    num_outs = len(outs)

    def residuals(invars, inst):
        return [x for x, i in zip(invars, inst, strict=True) if isinstance(x, Var) and not i]

    if any(unks_in[:n]) or not any(unks_in[n:]):  # not a known-primal, unknown-tangent call: JAX's default
        if any(unks_in):
            return None, eqn, [True] * num_outs, [True] * num_outs, residuals(eqn.invars, inst_in)
        if _recomputed(saveable, fused_p, eqn.invars, eqn.params):
            return eqn, eqn, [False] * num_outs, [True] * num_outs, residuals(eqn.invars, inst_in)
        return eqn, None, [False] * num_outs, [False] * num_outs, []
    forward = kernel.forward_pass()
    known = eqn.replace(primitive=kernel_p, params=dict(kernel=forward), invars=eqn.invars[:n], outvars=outs[:2])
    unknown = [False, False, True, True]
    if _recomputed(saveable, kernel_p, eqn.invars[:n], dict(kernel=forward)):
        return known, eqn, unknown, [True] * num_outs, residuals(eqn.invars, inst_in)
    tangent_invars = [*eqn.invars[:n], *outs[:2], *eqn.invars[n:]]
    staged = eqn.replace(
        primitive=kernel_p, params=dict(kernel=kernel.tangent_pass()), invars=tangent_invars, outvars=outs[2:]
    )
    return known, staged, unknown, unknown, [*residuals(eqn.invars, inst_in), *outs[:2]]


def _recomputed(saveable, primitive, invars, params) -> bool:
    """Whether the remat policy recomputes this equation's results rather than saving them (an
    offloading policy counts as saving: its results are kept, wherever)."""
    return isinstance(ensure_enum(saveable(primitive, *[x.aval for x in invars], **params)), RecomputeType)


pe.custom_partial_eval_rules[fused_p] = split_traced
pe.partial_eval_jaxpr_custom_rules[fused_p] = split_equation
