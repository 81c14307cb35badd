"""The blockwise kernel's JAX primitives and their rules: evaluation, lowering, JVP, transpose and batching.

``kernel_p``'s ``kernel`` parameter is the pass it runs (``_passes``, ``_autodiff``): every rule asks that
pass, so the rules are the same for the forward, its tangent, its backward and their derivatives.
``fused_p`` runs forward mode's fused pass the same way; its partial-evaluation rules are in
``_partial_eval``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._jax_compat import Primitive, ad, batching, mlir

kernel_p = Primitive("jattn_blockwise_attention")
kernel_p.multiple_results = True

# Forward mode's fused pass (``_fused``): the output and its tangent in one sweep. A primitive of its own, so
# that partial evaluation can split it into the forward and the tangent pass (``_partial_eval``).
fused_p = Primitive("jattn_blockwise_attention_jvp")
fused_p.multiple_results = True


def is_zero(tangent) -> bool:
    """A symbolic zero, or the float0 tangent of an integer or boolean operand."""
    return type(tangent) is ad.Zero or jnp.result_type(tangent) == jax.dtypes.float0


def zero_like(x) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


@functools.partial(jax.jit, static_argnames="kernel")
def _compiled(*args, kernel):
    return kernel.blockwise(*args)


def _abstract_eval(*avals, kernel):
    return kernel.out_avals(*avals)


def _lowering(*args, kernel):
    return kernel.blockwise(*args)


def _jvp(primals, tangents, *, kernel):
    return kernel.jvp(primals, tangents)


def _transpose(cotangents, *args, kernel):
    return kernel.transpose(cotangents, *args)


def _batch(prim, args, dims, *, kernel):
    """Folds the vmapped axis into the kernel's batch axis when every operand has it (or is a bias or mask
    shared by every example), else runs the kernel once per vmapped slice (:func:`_per_slice`); every
    result has a full batch axis."""
    shared = [d is None and not (b and x.shape[0] == 1) for x, d, b in zip(args, dims, kernel.broadcast(), strict=True)]
    if any(shared):
        return _per_slice(prim, args, dims, kernel)
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
    outs = prim.bind(*folded, kernel=kernel)
    return [o.reshape(n, batch, *o.shape[1:]) for o in outs], [0] * len(outs)


def _per_slice(prim, args, dims, kernel):
    """The kernel on one vmapped slice at a time (``lax.map``), the unbatched operands closed over.

    Folding the vmapped axis into the batch axis would copy an unbatched operand once per slice: ``vmap``
    over queries with K/V shared would hold ``n`` copies of K/V. Closed over, K/V stay one array, and
    autodiff of the map sums their cotangents over the slices in its carry. The kernel already runs its
    examples one after another (``_layout.over_batch``), so the loop costs no parallelism on its own.
    """
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(slices):
        full = list(args)
        for i, x in zip(mapped, slices, strict=True):
            full[i] = x
        return tuple(prim.bind(*full, kernel=kernel))

    outs = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
    return list(outs), [0] * len(outs)


def _batch_fused(args, dims, *, kernel):
    """``vmap`` of the fused pass. Over its tangents alone (``jacfwd``'s basis) the primal results must stay
    unbatched: the forward then runs once and the tangent pass batched, as unfused."""
    n = kernel.num_ops
    if any(d is not None for d in dims[:n]):
        return _batch(fused_p, args, dims, kernel=kernel)
    out, lse = kernel_p.bind(*args[:n], kernel=kernel.forward_pass())
    tangent_args, tangent_dims = [*args[:n], out, lse, *args[n:]], [*dims[:n], None, None, *dims[n:]]
    douts, out_dims = _batch(kernel_p, tangent_args, tangent_dims, kernel=kernel.tangent_pass())
    return [out, lse, *douts], [None, None, *out_dims]


for _prim in (kernel_p, fused_p):
    _prim.def_impl(lambda *args, kernel: _compiled(*args, kernel=kernel))
    _prim.def_abstract_eval(_abstract_eval)
    mlir.register_lowering(_prim, mlir.lower_fun(_lowering, multiple_results=True))
    ad.primitive_jvps[_prim] = _jvp
ad.primitive_transposes[kernel_p] = _transpose
batching.primitive_batchers[kernel_p] = functools.partial(_batch, kernel_p)
batching.primitive_batchers[fused_p] = _batch_fused
