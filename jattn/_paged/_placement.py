"""Ragged paged attention on arrays sharded over ``Explicit`` mesh axes (tensor parallelism).

With ``Auto`` mesh axes XLA partitions the kernel like any other computation. With ``Explicit`` axes a
value's sharding is part of its type and the kernel's loops would need every carry retyped, so the kernel
runs per shard instead: heads are independent, and when the query heads and the pools' kv heads are split
over the same mesh axes into whole GQA groups (``kv_heads`` a multiple of the shard count), each device
attends its own heads over its own slice of the pools, in a ``shard_map`` (the sinks split with the heads).
Anything else is gathered first: a split of another axis (tokens, pages, dims), heads and kv heads split
differently, and every array of a call with a ``score_mod`` or ``mask_mod`` (they see the global head).
The result has the queries' head layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from .._mesh import axes_size, explicit_mesh, spec_of
from ._validate import PagedArrays, PagedOptions, prepare

Run = Callable[[PagedArrays, PagedOptions], Array]
"""``run(arrays, options) -> (tokens, heads, v_dim)``: the unsharded call."""


def run_sharded(run: Run, arrays: PagedArrays, options: PagedOptions) -> Array:
    """``run`` directly, or per head shard when an input lies on an explicit mesh (module docstring)."""
    arrays = PagedArrays(*(jnp.asarray(x) for x in arrays))
    mesh = explicit_mesh(*arrays, options.sinks)
    if mesh is None:
        return run(arrays, options)
    prepare(arrays, options)  # the checks (concrete metadata values too) before the shards see tracers
    like_queries = spec_of(arrays.queries)[:2]
    heads = _head_axes(mesh, arrays, options)

    def put(x, spec):
        return None if x is None else jax.sharding.reshard(x, NamedSharding(mesh, spec))

    q_spec, pool_spec = P(None, heads, None), P(None, None, heads, None)
    sinks_spec = P(heads)
    arrays = PagedArrays(
        put(arrays.queries, q_spec),
        put(arrays.key_pages, pool_spec),
        put(arrays.value_pages, pool_spec),
        *(put(x, P()) for x in arrays[3:]),  # the metadata, whole on every device
    )
    options = options._replace(sinks=put(options.sinks, sinks_spec))
    if heads is None:  # gathered: the kernel runs on whole (replicated) arrays under the mesh
        out = run(arrays, options)
    else:

        def local(a: PagedArrays, sinks) -> Array:
            return run(a, options._replace(sinks=sinks))

        in_specs = (PagedArrays(q_spec, pool_spec, pool_spec, P(), P(), P(), P()), sinks_spec)
        out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
            arrays, options.sinks
        )
    return jax.sharding.reshard(out, NamedSharding(mesh, P(*like_queries, None)))


def _head_axes(mesh, arrays: PagedArrays, options: PagedOptions):
    """The mesh axes both the query heads and the pools' kv heads split over, or None (gather)."""
    q_heads, k_heads, v_heads = spec_of(arrays.queries)[1], spec_of(arrays.key_pages)[2], spec_of(arrays.value_pages)[2]
    if q_heads is None or q_heads != k_heads or k_heads != v_heads:
        return None
    if arrays.key_pages.shape[2] % axes_size(mesh, q_heads):  # a shard would hold part of a GQA group
        return None
    if options.score_mod is not None or options.mask_mod is not None:  # they index by the global head
        return None
    return q_heads
