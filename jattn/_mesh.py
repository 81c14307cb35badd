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
        if explicit and any(a is not None for a in sharding.spec):
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
    spec = spec_of(x) if getattr(current, "mesh", None) is not None and not current.mesh.empty else (None,) * x.ndim
    if spec[0] == want:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(want, *spec[1:])))
