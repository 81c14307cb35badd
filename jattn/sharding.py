"""Sequence parallelism: attention over a sequence split across the devices of a mesh axis.

When the query's sequence axis is sharded over an ``Explicit`` mesh axis,
``jattn.dot_product_attention`` runs sequence-parallel by itself: each device
keeps its shard of the queries, and either the K/V shards travel round the
ring of devices (``"ring"``: no device ever holds more than one K/V shard,
forward or backward) or every device gathers the whole K/V (``"all_gather"``:
one collective, cheap when K/V are small, e.g. grouped-query attention with
few K/V heads). :class:`SequenceParallel` forces a strategy, names the mesh
axis for ``Auto`` axes (where shardings are not part of the types), and
selects the zigzag layout that balances causal attention over the devices.

Example (8 CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    >>> import jax, jax.numpy as jnp, jattn
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",))  # Explicit axes
    >>> x = jax.random.normal(jax.random.key(0), (1, 64, 4, 16))  # (batch, seq, heads, dim)
    >>> x = jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
    >>> out = jax.jit(lambda x: jattn.dot_product_attention(x, x, x, is_causal=True))(x)
    >>> out.sharding.spec[:2] == (None, "seq")
    True
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

STRATEGIES = ("auto", "ring", "all_gather")
LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How ``dot_product_attention(..., sequence_parallel=)`` splits the work over a sharded sequence.

    Args:
        axis: the mesh axis name the sequence (axis 1 of query, key and value)
            is sharded over. ``None``: the query's sharding says (``Explicit``
            axes only).
        mesh: the mesh, for ``Auto`` axes; ``None``: the query's ``Explicit``
            sharding's mesh, else the one set with ``jax.set_mesh``.
        strategy: ``"ring"``, ``"all_gather"`` or ``"auto"``: all-gather K/V
            when the whole K/V is no bigger than one device's query shard
            (``kv_seq * kv_heads * (dim + v_dim) <= q_seq / P * heads * dim``:
            grouped-query or short K/V), else ring. Forward, both bring each
            device the other ``P - 1`` K/V shards; the ring holds one at a time
            and overlaps each transfer with the previous shard's compute. The
            ring's backward passes K/V round again with their dK/dV (``6 (P - 1)``
            shard transfers for fwd+bwd against all-gather's ``4 (P - 1)``:
            gathered K/V kept, dK/dV reduce-scattered) and still never holds more
            than one K/V shard.
        layout: ``"contiguous"`` (device ``i`` holds positions ``[i L, (i+1) L)``)
            or ``"zigzag"`` (the sequence in ``2 P`` chunks, device ``i`` holding
            chunks ``i`` and ``2P - 1 - i``, see :func:`zigzag`): every
            sequence-indexed input (query, key, value, segment ids, the
            sequence axes of mask and bias) is then in that order, and so is
            the output. Lengths and causal/window masks stay in positions.

    Example:
        >>> import jattn
        >>> jattn.sharding.SequenceParallel(axis="seq", strategy="ring", layout="zigzag")
        SequenceParallel(axis='seq', mesh=None, strategy='ring', layout='zigzag')
    """

    axis: str | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    strategy: Literal["auto", "ring", "all_gather"] = "auto"
    layout: Literal["contiguous", "zigzag"] = "contiguous"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        if self.axis is not None and not isinstance(self.axis, str):
            raise TypeError(f"axis must be a mesh axis name (str) or None; got {self.axis!r}")


def _zigzag_order(num_shards: int) -> np.ndarray:
    """Chunk order of the zigzag layout: shard ``i`` holds chunks ``i`` and ``2P - 1 - i``."""
    return np.array([c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)])


def _permute_chunks(x: Array, num_shards: int, axis: int, order: np.ndarray, name: str) -> Array:
    x = jnp.asarray(x)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int; got {num_shards!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {x.ndim}")
    axis %= x.ndim
    n = x.shape[axis]
    if n % (2 * num_shards):
        raise ValueError(
            f"{name}: the sequence axis ({n}) must divide into 2 * num_shards = {2 * num_shards} equal chunks"
        )
    chunks = x.reshape(*x.shape[:axis], 2 * num_shards, n // (2 * num_shards), *x.shape[axis + 1 :])
    index = (slice(None),) * axis + (jnp.asarray(order),)
    sharding = getattr(jax.typeof(chunks), "sharding", None)
    if getattr(sharding, "mesh", None) is not None and any(a is not None for a in sharding.spec):
        # Sharded over explicit mesh axes: say where the result lives (XLA moves the chunks between devices).
        return chunks.at[index].get(out_sharding=sharding).reshape(x.shape, out_sharding=jax.typeof(x).sharding)
    return chunks[index].reshape(x.shape)


def zigzag(x: Array, num_shards: int, axis: int = 1) -> Array:
    """Reorders a sequence axis into the zigzag layout: cut in ``2 * num_shards`` chunks, shard ``i`` gets
    chunks ``i`` and ``2 * num_shards - 1 - i`` (Llama 3's context parallelism), so that with a causal
    mask every shard does the same work.

    Args:
        x: any array, e.g. ``(batch, seq, heads, dim)`` activations, ``(batch, seq)``
            segment ids or a ``(batch, heads, q_seq, kv_seq)`` mask (apply once per
            sequence axis).
        num_shards: the number of devices the sequence axis is split over.
        axis: the sequence axis (default 1).

    Returns:
        ``x`` with ``axis`` permuted; :func:`unzigzag` undoes it.

    Raises:
        ValueError: ``x.shape[axis]`` not divisible by ``2 * num_shards``, a bad
            ``num_shards`` or ``axis``.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> jattn.sharding.zigzag(jnp.arange(8), 2, axis=0).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    return _permute_chunks(x, num_shards, axis, _zigzag_order(num_shards), "zigzag")


def unzigzag(x: Array, num_shards: int, axis: int = 1) -> Array:
    """Undoes :func:`zigzag`: the sequence axis back in position order.

    Args:
        x: an array whose ``axis`` is in the zigzag layout (e.g. an output of
            attention on zigzagged inputs).
        num_shards: as given to :func:`zigzag`.
        axis: the sequence axis (default 1).

    Returns:
        ``x`` with ``axis`` in position order.

    Raises:
        ValueError: as :func:`zigzag`.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> x = jnp.arange(12)
        >>> bool((jattn.sharding.unzigzag(jattn.sharding.zigzag(x, 3, axis=0), 3, axis=0) == x).all())
        True
    """
    return _permute_chunks(x, num_shards, axis, np.argsort(_zigzag_order(num_shards)), "unzigzag")


def visited_blocks_per_device(
    q_seq: int,
    kv_seq: int,
    num_shards: int,
    *,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    layout: Literal["contiguous", "zigzag"] = "contiguous",
    block_q: int = 512,
    block_kv: int = 512,
) -> np.ndarray:
    """The work of each device in a ring pass: the (query block, key block) pairs its kernels visit.

    Counted with the kernel's own block geometry, so it is what a sequence-parallel
    call computes (forward and backward alike); with a causal mask the contiguous
    layout gives device ``i`` about ``2i + 1`` units and zigzag gives every device
    the same (below: 8 chunks of one block each, the 36 causal block pairs split 9 a device).

    Args:
        q_seq, kv_seq: the whole sequences' lengths.
        num_shards: the number of devices on the sequence axis.
        is_causal, local_window_size: the masks, as for ``dot_product_attention``.
        layout: ``"contiguous"`` or ``"zigzag"`` (see :class:`SequenceParallel`).
        block_q, block_kv: the kernel's block sizes.

    Returns:
        int ``(num_shards,)``: visited block pairs per device.

    Raises:
        ValueError: sequences that do not split into ``num_shards`` (zigzag: ``2 * num_shards``)
            equal parts, an unknown layout, a bad window or block size.

    Example:
        >>> import jattn
        >>> work = jattn.sharding.visited_blocks_per_device(4096, 4096, 4, is_causal=True, layout="zigzag")
        >>> work.tolist(), float(work.max() / work.mean())
        ([9, 9, 9, 9], 1.0)
    """
    from ._blockwise import Ring, visited_blocks
    from ._options import StaticOptions
    from ._prepare import window_pair

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    for name, value in (("num_shards", num_shards), ("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    chunks = 2 if layout == "zigzag" else 1
    for name, n in (("q_seq", q_seq), ("kv_seq", kv_seq)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % (num_shards * chunks):
            raise ValueError(f"{name} must be a positive multiple of {num_shards * chunks}; got {n!r}")
    static = StaticOptions(scale=1.0, is_causal=bool(is_causal), local_window_size=window_pair(local_window_size))
    return visited_blocks(static, Ring("sequence", num_shards, chunks), q_seq, kv_seq, block_q, block_kv)
