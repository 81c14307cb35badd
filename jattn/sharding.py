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

from typing import Literal

import numpy as np
from jaxtyping import Array

from ._sequence_parallel import LAYOUTS as LAYOUTS
from ._sequence_parallel import STRATEGIES as STRATEGIES
from ._sequence_parallel import SequenceParallel as SequenceParallel
from ._sequence_parallel import _zigzag

__all__ = ["LAYOUTS", "STRATEGIES", "SequenceParallel", "unzigzag", "visited_blocks_per_device", "zigzag"]


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
    return _zigzag.zigzag(x, num_shards, axis)


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
    return _zigzag.unzigzag(x, num_shards, axis)


def visited_blocks_per_device(
    q_seq: int,
    kv_seq: int,
    num_shards: int,
    *,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    layout: Literal["contiguous", "zigzag"] = "contiguous",
    block_q: int | None = None,
    block_kv: int | None = None,
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
        block_q, block_kv: the kernel's block sizes (None: the backend's default,
            ``jattn.DEFAULT_BLOCK_SIZES``).

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
    return _zigzag.visited_blocks_per_device(
        q_seq,
        kv_seq,
        num_shards,
        is_causal=is_causal,
        local_window_size=local_window_size,
        layout=layout,
        block_q=block_q,
        block_kv=block_kv,
    )
