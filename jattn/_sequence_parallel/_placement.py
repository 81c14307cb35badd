"""Running a kernel on sharded inputs.

With ``Auto`` mesh axes XLA partitions the kernel like any other computation.
On a mesh with ``Explicit`` axes a value's sharding is part of its type, and
the blockwise kernel's loops and switches would need every carry and branch
retyped. The examples and heads are independent, so the kernel runs per shard
instead, in a ``shard_map`` over the query's batch and head axes. A query
sequence sharded over a mesh axis runs sequence-parallel (``_sequence_parallel``)
where it can; anything else (a sharded dim, heads that do not split into whole
GQA groups, a sharded sequence with a prebuilt ``block_mask``) is gathered
first, and so is everything for a call with a ``score_mod``, ``mask_mod`` or
``sinks`` that does not run sequence-parallel (they index by the global example
and head).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from .._mesh import axes_size, explicit_mesh, spec_of
from .._options import AttentionInputs

Kernel = Callable[[AttentionInputs], tuple[Array, Array]]
"""``kernel(inputs) -> (out, lse)`` on normalized 4-D inputs."""


def run_per_shard(kernel: Kernel, inputs: AttentionInputs) -> tuple[Array, Array]:
    """``kernel`` on the inputs: directly, or per shard when an input is sharded over explicit axes
    (a sequence-parallel call does not come here: see ``_plan``)."""
    mesh = explicit_mesh(*jax.tree.leaves(inputs))
    if mesh is None:
        return kernel(inputs)
    return per_shard(kernel, mesh, inputs)


def per_shard(kernel: Kernel, mesh, inputs: AttentionInputs) -> tuple[Array, Array]:
    """``kernel`` in a shard_map over the query's batch and head axes (see the module docstring)."""
    query, key, _, bias, mask, opts = inputs
    batch, kv_heads = query.shape[0], key.shape[2]
    batch_axes, head_axes = spec_of(query)[0], spec_of(query)[2]
    if batch_axes is not None and batch % axes_size(mesh, batch_axes):
        batch_axes = None
    # Query heads split like kv heads only when every shard holds whole GQA groups.
    if head_axes is not None and kv_heads % axes_size(mesh, head_axes):
        head_axes = None
    # A score_mod, mask_mod or sinks index by the global example and head: a shard would see its own
    # indices and the arrays they capture whole, so those calls run unsplit (correct, not parallel).
    static = opts.static
    if static.score_mod is not None or static.mask_mod is not None or opts.shared.sinks is not None:
        return _replicated(kernel, mesh, inputs)

    def logits_spec(x):  # (batch|1, heads|1, q|1, kv|1)
        return P(batch_axes if x.shape[0] > 1 else None, head_axes if x.shape[1] > 1 else None, None, None)

    specs = AttentionInputs._make(  # the inputs' tree with a PartitionSpec per array
        [
            *(P(batch_axes, None, head_axes, None),) * 3,
            None if bias is None else logits_spec(bias),
            None if mask is None else logits_spec(mask),
            jax.tree.map(lambda x: P(batch_axes, *(None,) * (x.ndim - 1)), opts),
        ]
    )
    inputs = jax.tree.map(lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s)), inputs, specs)
    out_specs = (P(batch_axes, None, head_axes, None), P(batch_axes, None, head_axes))
    out, lse = jax.shard_map(kernel, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(inputs)
    # Back to the query's batch, sequence and head layout (v_dim need not split like dim).
    like_query = spec_of(query)[:3]
    out = jax.sharding.reshard(out, NamedSharding(mesh, P(*like_query, None)))
    lse = jax.sharding.reshard(lse, NamedSharding(mesh, P(*like_query)))
    return out, lse


def _replicated(kernel: Kernel, mesh, inputs: AttentionInputs) -> tuple[Array, Array]:
    """``kernel`` on inputs gathered whole on every device (no ``shard_map``: a user mod's jaxpr is then
    traced and lowered under the same explicit mesh), back in the query's layout."""
    query = inputs.query
    inputs = jax.tree.map(lambda x: jax.sharding.reshard(x, NamedSharding(mesh, P())), inputs)
    out, lse = kernel(inputs)
    like_query = spec_of(query)[:3]
    out = jax.sharding.reshard(out, NamedSharding(mesh, P(*like_query, None)))
    lse = jax.sharding.reshard(lse, NamedSharding(mesh, P(*like_query)))
    return out, lse
