"""``matmul``: this run's matmul GFLOP/s in the benchmark dtype, the roofline.

Square ``(N, N) @ (N, N)`` products, plus the attention's own ``Q K^T`` shape
``(batch * heads, T, dim) @ (batch * heads, dim, T)`` at the longest sequence.
The roofline is the best GFLOP/s of these cases.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp

from ..case import Case, JaxTarget
from ..config import BenchConfig
from ..flops import matmul_flops
from ..inputs import normal


def _target(batch: int, m: int, k: int, n: int, dtype: str) -> JaxTarget:
    shape_a, shape_b = ((batch, m, k), (batch, k, n)) if batch > 1 else ((m, k), (k, n))
    return JaxTarget(jnp.matmul, (normal(shape_a, dtype, seed=0), normal(shape_b, dtype, seed=1)))


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """Square products for each ``cfg.matmul_sizes`` and the attention's QK^T shape."""
    shapes = [(1, n, n, n) for n in cfg.matmul_sizes]
    if "attention" in cfg.suites and cfg.seq_lengths:
        t = max(cfg.seq_lengths)
        shapes.append((cfg.batch * cfg.heads, t, cfg.dim, cfg.kv_seq or t))
    for batch, m, k, n in shapes:
        params = {"batch": batch, "m": m, "k": k, "n": n, "dtype": cfg.dtype}
        label = f"{batch}x({m}x{k} @ {k}x{n})" if batch > 1 else f"{m}x{k} @ {k}x{n}"
        yield Case(
            suite="matmul",
            impl="jax:matmul",
            label=label,
            params=params,
            flops=matmul_flops(m, k, n, batch=batch),
            build=lambda b=batch, m=m, k=k, n=n: _target(b, m, k, n, cfg.dtype),
        )
