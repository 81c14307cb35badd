"""``decode``: time per generated token against KV-cache fill — a stub for now.

Decoding (a KV cache in ``jattn.nnx``) does not exist yet; rather than guess its
API this suite records one ``unavailable`` case. When it lands, yield one case
per cache fill level here: ``params`` with the fill, ``flops`` from
``bench.flops.attention_flops(q_seq=1, kv_seq=fill, ...)``, peer
``flax.nnx.MultiHeadAttention(decode=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..case import Case, Unavailable
from ..config import BenchConfig


def _unavailable():
    raise Unavailable("not available until jattn.nnx decoding lands")


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """One placeholder case, recorded as unavailable."""
    yield Case(
        suite="decode",
        impl="jattn.nnx:decode",
        label="time per token vs cache fill",
        params={"dtype": cfg.dtype},
        flops=None,
        build=_unavailable,
    )
