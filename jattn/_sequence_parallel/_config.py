"""How a call asks for sequence parallelism: :class:`SequenceParallel` (re-exported by ``jattn.sharding``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

STRATEGIES = ("auto", "ring", "all_gather")
LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How ``dot_product_attention(..., sequence_parallel=)`` splits the work over a sharded sequence.

    Args:
        axis: the mesh axis name the sequence (axis 1 of query, key and value)
            is sharded over, or a tuple of names (e.g. ``("data", "context")``:
            one ring over all their devices, in the mesh's order). ``None``: the
            query's sharding says (``Explicit`` axes only).
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

    axis: str | tuple[str, ...] | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    strategy: Literal["auto", "ring", "all_gather"] = "auto"
    layout: Literal["contiguous", "zigzag"] = "contiguous"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        names = self.axis if isinstance(self.axis, tuple) and self.axis else (self.axis,)
        if self.axis is not None and not all(isinstance(a, str) for a in names):
            raise TypeError(f"axis must be a mesh axis name (str), a tuple of them, or None; got {self.axis!r}")
