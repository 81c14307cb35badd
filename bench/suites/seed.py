"""``seed``: the tutorial notebook's NumPy code against jattn, at its sizes and a little larger.

Two kinds of case: ``single`` (one query, unscaled, keys as values, against
``jattn.attention``) and ``self`` (scaled self-attention of a ``(1, seq, dim)``
batch, against ``jattn.dot_product_attention`` with one head). Both sides use
the benchmark dtype. At the notebook's sizes the work is a few dozen FLOPs, so
this measures call overhead: jit dispatch against a NumPy call.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from .. import seed_numpy
from ..case import Case, JaxTarget, PythonTarget, Target
from ..config import BenchConfig
from ..flops import attention_flops
from ..inputs import normal


def _inputs(kind: str, seq: int, dim: int, dtype: str) -> tuple[jax.Array, ...]:
    if kind == "single":
        return normal((dim,), dtype, seed=0), normal((seq, dim), dtype, seed=1)
    return (normal((1, seq, dim), dtype, seed=0),)


def _jattn_self_attention(x):
    import jattn

    heads = x[:, :, None, :]  # (batch, seq, 1 head, dim)
    return jattn.dot_product_attention(heads, heads, heads)[:, :, 0, :]


def _jattn_single_query(q, k):
    import jattn

    return jattn.attention(q, k, k, scale=1.0)


def build(impl: str, kind: str, seq: int, dim: int, dtype: str) -> Target:
    """The target of one seed case; ``impl`` is ``numpy:notebook`` or ``jattn:attention``."""
    args = _inputs(kind, seq, dim, dtype)
    if impl == "numpy:notebook":
        args = tuple(np.asarray(a) for a in args)
        if kind == "single":
            q, k = args
            return PythonTarget(seed_numpy.single_query_attention, (q, k, k))
        return PythonTarget(seed_numpy.self_attention, args)
    return JaxTarget(_jattn_single_query if kind == "single" else _jattn_self_attention, args)


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """For each ``cfg.seed_sizes``: the notebook's NumPy (peer) and jattn."""
    for kind, seq, dim in cfg.seed_sizes:
        params = {"kind": kind, "seq": seq, "dim": dim, "dtype": cfg.dtype}
        q_seq = 1 if kind == "single" else seq
        flops = attention_flops(batch=1, heads=1, q_seq=q_seq, kv_seq=seq, dim=dim)
        label = f"1 query x {seq} keys, dim {dim}" if kind == "single" else f"self-attn (1, {seq}, {dim})"
        for impl, peer in (("numpy:notebook", True), ("jattn:attention", False)):
            if cfg.wants(impl):
                yield Case(
                    suite="seed",
                    impl=impl,
                    label=label,
                    params=params,
                    flops=flops,
                    build=lambda impl=impl, kind=kind, seq=seq, dim=dim: build(impl, kind, seq, dim, cfg.dtype),
                    peer=peer,
                )
