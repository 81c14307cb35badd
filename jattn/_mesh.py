"""What a value's sharding type says (its explicit mesh, its spec), and batch-aligned inputs.

On a mesh with ``Explicit`` axes a value's sharding is part of its type, and
``jax.vmap`` over examples needs every mapped operand's batch axis sharded the
same. The per-example arrays of a call (lengths, segment ids, a batched mask or
bias) may come replicated while the query is split over the batch:
:func:`align_batch` gives them the query's batch sharding, so every path
(reference, the NNX weights path, the jax.nn delegate) maps them together.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def explicit_mesh(*arrays) -> jax.sharding.Mesh | None:
    """The mesh of the first array sharded over an explicit mesh axis, or None."""
    for x in arrays:
        sharding = None if x is None else getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
        if explicit and sharding is not None and any(a is not None for a in sharding.spec):
            return mesh
    return None


def spec_of(x) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def axes_size(mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return functools.reduce(lambda n, name: n * mesh.shape[name], names, 1)


def align_batch(x, like, batch: int):
    """``x`` (an array with a leading axis of ``batch`` examples, or None) resharded so that axis is split
    like axis 0 of ``like`` on ``like``'s explicit mesh; unchanged without an explicit mesh, when the axis
    is a broadcast one (size 1) or already split that way."""
    mesh = explicit_mesh(like)
    if x is None or mesh is None or x.ndim == 0 or x.shape[0] != batch or batch == 1:
        return x
    want = spec_of(like)[0]
    current = getattr(jax.typeof(x), "sharding", None)
    on_a_mesh = current is not None and getattr(current, "mesh", None) is not None and not current.mesh.empty
    spec = spec_of(x) if on_a_mesh else (None,) * x.ndim
    if spec[0] == want:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(want, *spec[1:])))


def whole_sequences(inputs):
    """``AttentionInputs`` whose sequence and feature axes are gathered on every device of an explicit mesh
    (batch and head axes stay split), for paths that contract over them with plain ``jnp`` ops (the reference,
    jax.nn): q and k both split along their sequences would make ``q @ k.T`` split twice over one axis."""
    mesh = explicit_mesh(*jax.tree.leaves(inputs))
    if mesh is None:
        return inputs
    batch_axes, head_axes = spec_of(inputs.query)[0], spec_of(inputs.query)[2]
    kv_heads = inputs.key.shape[2]
    if head_axes is not None and kv_heads % axes_size(mesh, head_axes):
        head_axes = None  # query heads split like kv heads only in whole GQA groups
    if inputs.opts.shared.sinks is not None:
        head_axes = None  # the reference indexes the (whole) sinks by head: its heads are gathered

    def keep(x, axes):  # the batch (and head) axes of x as the query has them, everything else whole
        if x is None or (explicit_mesh(x) is None and all(a is None for a in axes)):
            return x
        wanted = tuple(a if n > 1 else None for a, n in zip(axes, x.shape, strict=True))
        return jax.sharding.reshard(x, NamedSharding(mesh, P(*wanted)))

    qkv_axes = (batch_axes, None, head_axes, None)
    logits_axes = (batch_axes, head_axes, None, None)
    opts = jax.tree.map(lambda x: keep(x, (batch_axes,) + (None,) * (x.ndim - 1)), inputs.opts)
    query, key, value = (keep(x, qkv_axes) for x in inputs[:3])
    return type(inputs)(query, key, value, keep(inputs.bias, logits_axes), keep(inputs.mask, logits_axes), opts)


def like_query(x, query):
    """``x`` (``(batch, q_seq, heads, ...)``, e.g. an output or log-sum-exp) laid out like the query's first
    three axes on its explicit mesh; unchanged without one."""
    mesh = explicit_mesh(query)
    if mesh is None:
        return x
    spec = spec_of(query)[:3] + (None,) * (x.ndim - 3)
    return jax.sharding.reshard(x, NamedSharding(mesh, P(*spec)))
