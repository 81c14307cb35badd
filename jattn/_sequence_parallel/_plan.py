"""Sequence-parallel attention: a ``shard_map`` over the mesh axis the sequence is split along.

:func:`plan_sequence_parallel` decides whether a blockwise call runs sequence-parallel (the
query's sequence axis sharded over an ``Explicit`` mesh axis, or a
``jattn.sharding.SequenceParallel`` given) and how; :func:`run_sequence_parallel` runs it. The
query keeps its shard; K/V either travel round the ring (``_blockwise._ring``)
or are gathered whole on every device. Batch and head axes sharded over other
mesh axes stay split as in ``_placement.per_shard``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from .. import _capabilities
from .._blockwise import Ring, blockwise_attention, chunk_start, ring_attention, splits_for
from .._mesh import axes_size, explicit_mesh, spec_of
from .._options import AttentionInputs
from ._config import SequenceParallel
from ._zigzag import unzigzag


class SequencePlan(NamedTuple):
    """A resolved sequence-parallel call (static)."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    axis: str | tuple[str, ...]  # one mesh axis, or several making one ring
    shards: int
    strategy: str  # "ring" or "all_gather"
    chunks: int  # 1 contiguous, 2 zigzag
    batch_axes: object  # the query's batch/head mesh axes kept split (explicit meshes), or None
    head_axes: object
    explicit: bool


def choose_strategy(inputs: AttentionInputs, shards: int) -> str:
    """All-gather K/V when the whole K/V is no bigger than one device's query shard, else ring."""
    query, key, value = inputs.query, inputs.key, inputs.value
    kv_size = key.shape[1] * key.shape[2] * (key.shape[3] + value.shape[3])
    q_shard = query.shape[1] // shards * query.shape[2] * query.shape[3]
    return "all_gather" if kv_size <= q_shard else "ring"


def plan_sequence_parallel(inputs: AttentionInputs, sp: SequenceParallel | None) -> SequencePlan | None:
    """How a blockwise call runs sequence-parallel, or None (it runs as before).

    Without ``sp`` only a query whose sequence axis is sharded over an explicit
    mesh axis qualifies, and a call it cannot split (a prebuilt block_mask;
    lengths that do not divide) is left to ``_placement`` (gathered). With
    ``sp`` those raise ValueError. A call with a score_mod or mask_mod runs with
    the batch and head axes gathered: the mods see the global example, head and
    positions.
    """
    query, key = inputs.query, inputs.key
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = explicit_mesh(query)
    seq_axes = spec_of(query)[1] if mesh is not None else None
    if sp is None and seq_axes is None:
        return None
    asked = sp is not None  # asked for: what cannot be split raises; found on the query: it is gathered
    sp = sp or SequenceParallel()
    features = _capabilities.features_of(inputs)
    if _capabilities.lacking("sequence_parallel", features):
        if asked:
            _capabilities.check_supported("sequence_parallel", features)
        return None
    axis = sp.axis or seq_axes
    if isinstance(axis, tuple) and len(axis) == 1:
        axis = axis[0]  # a tuple of several mesh axes (e.g. data x context) is one ring over all their devices
    if mesh is None:
        mesh = sp.mesh if sp.mesh is not None else jax.sharding.get_abstract_mesh()
    if axis is None:
        return _decline(
            True,
            "sequence_parallel: name the mesh axis (SequenceParallel(axis=...)); the query's sharding does "
            "not say it (Auto axes, or an unsharded sequence)",
        )
    if mesh is None or mesh.empty or any(a not in mesh.axis_names for a in _names(axis)):
        names = () if mesh is None or mesh.empty else mesh.axis_names
        return _decline(
            True,
            f"sequence_parallel: no mesh axis {axis!r} (mesh axes {names}); pass SequenceParallel(mesh=...) "
            "or set one with jax.set_mesh",
        )
    shards = axes_size(mesh, axis)
    chunks = 2 if sp.layout == "zigzag" else 1
    for name, n in (("query", query.shape[1]), ("key/value", key.shape[1])):
        if n % (shards * chunks):
            return _decline(
                asked,
                f"sequence_parallel: the {name} sequence ({n}) must divide into {shards * chunks} equal parts "
                f"({shards} devices on {axis!r}, layout {sp.layout!r})",
            )
    static = inputs.opts.static
    mods = static.score_mod is not None or static.mask_mod is not None
    strategy = sp.strategy if sp.strategy != "auto" else choose_strategy(inputs, shards)
    explicit = explicit_mesh(query) is not None
    batch_axes = head_axes = None
    if explicit and not mods:  # a mod sees the global example and head: those axes are gathered for it
        batch_axes, head_axes = spec_of(query)[0], spec_of(query)[2]
        if batch_axes is not None and query.shape[0] % axes_size(mesh, batch_axes):
            batch_axes = None
        if head_axes is not None and key.shape[2] % axes_size(mesh, head_axes):
            head_axes = None
    return SequencePlan(mesh, axis, shards, strategy, chunks, batch_axes, head_axes, explicit)


def _names(axis) -> tuple:
    """The mesh axis names of a sequence axis: one name, or a tuple of them."""
    return axis if isinstance(axis, tuple) else (axis,)


def _decline(strict: bool, message: str) -> SequencePlan | None:
    """Not sequence-parallel: raise ValueError(message) if it was asked for, else None."""
    if strict:
        raise ValueError(message)
    return None


def run_sequence_parallel(
    plan: SequencePlan, inputs: AttentionInputs, *, block_q: int, block_kv: int
) -> tuple[Array, Array]:
    """``(out, lse)`` of a planned call, laid out like the query (sequence shards in place)."""
    sinks = inputs.opts.shared.sinks
    if sinks is not None:  # joined after the merge (with_sinks): the ring and all-gather passes run without
        shared = inputs.opts.shared._replace(sinks=None)
        inputs = inputs._replace(opts=dataclasses.replace(inputs.opts, shared=shared))
        out, lse = run_sequence_parallel(plan, inputs, block_q=block_q, block_kv=block_kv)
        return with_sinks(out, lse, sinks[0])
    batch_axes, head_axes, seq = plan.batch_axes, plan.head_axes, plan.axis

    def logits_spec(x):  # (batch|1, heads|1, q|1, kv|1): local rows, every column
        return P(
            batch_axes if x.shape[0] > 1 else None,
            head_axes if x.shape[1] > 1 else None,
            seq if x.shape[2] > 1 else None,
            None,
        )

    query, bias, mask, opts = inputs.query, inputs.bias, inputs.mask, inputs.opts
    specs = AttentionInputs._make(  # the inputs' tree with a PartitionSpec per array
        [
            *(P(batch_axes, seq, head_axes, None),) * 3,
            None if bias is None else logits_spec(bias),
            None if mask is None else logits_spec(mask),
            dataclasses.replace(  # per-example arrays split like the batch (and ids like the sequence)
                jax.tree.map(lambda x: P(batch_axes, seq) if x.ndim == 2 else P(batch_axes), opts),
                shared=jax.tree.map(lambda x: P(), opts.shared),  # what mods captured: whole on every device
            ),
        ]
    )
    if plan.explicit:
        inputs = jax.tree.map(lambda x, s: jax.sharding.reshard(x, NamedSharding(plan.mesh, s)), inputs, specs)
    ring = Ring(seq, plan.shards, plan.chunks)
    if plan.strategy == "ring":  # each ring step's kernel calls on block-sized pieces (see splits_for)
        local_q, local_kv = query.shape[1] // plan.shards, inputs.key.shape[1] // plan.shards
        ring = dataclasses.replace(ring, splits=splits_for(local_q, local_kv, plan.chunks, block_q))
    body = ring_attention if plan.strategy == "ring" else _all_gather_attention
    kernel = functools.partial(body, ring=ring, block_q=block_q, block_kv=block_kv)
    out_specs = (P(batch_axes, seq, head_axes, None), P(batch_axes, seq, head_axes))
    out, lse = jax.shard_map(kernel, mesh=plan.mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(inputs)
    if plan.explicit:  # back to the query's layout (v_dim need not split like dim)
        like_query = spec_of(query)[:3]
        out = jax.sharding.reshard(out, NamedSharding(plan.mesh, P(*like_query, None)))
        lse = jax.sharding.reshard(lse, NamedSharding(plan.mesh, P(*like_query)))
    return out, lse


def with_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
    """``(out, lse)`` of attention without sinks ``(batch, q_seq, heads, v_dim)`` / ``(.., heads)`` turned into
    those with ``sinks`` ``(heads,)``: a sink is one more logit in every row's softmax denominator (its value
    is zero), so ``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``, in the softmax dtype.
    A row that saw no key (``lse`` the masked value) stays zeros. Differentiable like any ``jnp`` code."""
    total = jnp.logaddexp(lse, sinks.astype(lse.dtype)[None, None, :])
    return (out * jnp.exp(lse - total)[..., None]).astype(out.dtype), total


def _all_gather_attention(inputs: AttentionInputs, *, ring: Ring, block_q: int, block_kv: int):
    """One device's queries over the whole K/V, gathered (inside the ``shard_map``).

    With the zigzag layout the two local chunks run one after the other (``lax.map``) over the same
    gathered K/V, each at its own position.
    """
    query, key, value, bias, mask, opts = inputs
    arrays, static = opts.arrays, opts.static
    n = ring.chunks
    q_chunk = query.shape[1] // n

    def gather(x):  # (batch, kv_local, ...) -> (batch, kv_seq, ...) in position order
        if x is None:
            return None
        x = lax.all_gather(x, ring.axis, axis=1, tiled=True)
        return x if n == 1 else unzigzag(x, ring.shards, axis=1)

    def columns(x):  # a dense bias or mask: its columns in position order
        return x if x is None or n == 1 or x.shape[3] == 1 else unzigzag(x, ring.shards, axis=3)

    def rows(x, c, axis):  # chunk c of the local query rows (a broadcast axis stays whole)
        if x is None or n == 1 or x.shape[axis] == 1:
            return x
        return lax.dynamic_slice_in_dim(x, c * q_chunk, q_chunk, axis)

    k, v, kv_ids = gather(key), gather(value), gather(arrays.kv_segment_ids)
    bias, mask = columns(bias), columns(mask)
    me = lax.axis_index(ring.axis)

    def one(c):
        q0 = jnp.asarray(chunk_start(ring, me, c, q_chunk), jnp.int32)
        offset = None
        positional = static.score_mod is not None or static.mask_mod is not None  # mods see absolute positions
        if static.is_causal or static.local_window_size is not None or positional:
            offset = q0 + (0 if arrays.q_offset is None else arrays.q_offset) + jnp.zeros(query.shape[:1], jnp.int32)
        chunk = opts.with_arrays(
            arrays._replace(
                q_length=None if arrays.q_length is None else jnp.clip(arrays.q_length - q0, 0, q_chunk),
                q_segment_ids=rows(arrays.q_segment_ids, c, 1),
                kv_segment_ids=kv_ids,
                q_offset=offset,
            )
        )
        local = AttentionInputs(rows(query, c, 1), k, v, rows(bias, c, 2), rows(mask, c, 2), chunk)
        return blockwise_attention(local, block_q=block_q, block_kv=block_kv)

    if n == 1:
        return one(0)
    out, lse = lax.map(one, jnp.arange(n, dtype=jnp.int32))  # (n, batch, q_chunk, ...)
    return tuple(jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n * q_chunk, *x.shape[3:]) for x in (out, lse))
