"""``parallel``: sequence-parallel attention over every device against the single-device blockwise call.

On a mesh ``jax.make_mesh((P,), ("seq",))`` of all ``P = jax.device_count()``
devices (Explicit axes), q, k, v ``(batch, seq, heads, dim)`` sharded
``P(None, "seq")``, for every mode (``fwd``, ``fwd+bwd``: gradients of a sum),
causal flag and sequence length (self-attention):

* the peer, ``jattn:blockwise``: the same call on one device, unsharded;
* ``jattn:ring`` and ``jattn:all_gather``, each with the contiguous layout and
  with ``+zigzag`` (``jattn.sharding.SequenceParallel(strategy=, layout=)``).

The inputs are random, so the zigzag cases take them in the order they come
(in a model the activations stay in the zigzag order from layer to layer); no
reordering is timed.

Each record's ``metrics``, per device:

* ``memory_bytes``: argument + temp bytes of XLA's ``memory_analysis()`` of the
  compiled call (``argument_bytes`` and ``temp_bytes`` apart);
* ``visited_max``, ``visited_mean``, ``visited_imbalance`` (max / mean): block
  pairs each device visits, ``jattn.sharding.visited_blocks_per_device`` at the
  kernel's default block sizes (the peer: every pair, on its one device);
* ``bytes_moved``, ``collective_count``, ``collectives``: bytes each device
  receives per call and collective executions, from ``bench.hlo.summary`` of
  the compiled program.

Cases longer than ``cfg.parallel_timed_seq`` are compiled only, from
``jax.ShapeDtypeStruct`` s: every metric, no time. On simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) all devices share the
host's cores, so the time there is no scaling figure; on real multi-accelerator
machines it is. With one device the suite has a single case, recorded as
unavailable, that says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import hlo
from ..case import Case, JaxTarget, Target, Unavailable
from ..config import BenchConfig
from ..flops import attention_flops
from ..measure import argument_bytes, temp_bytes
from .attention import make_inputs, target_fn

SINGLE_DEVICE = "jattn:blockwise"
VARIANTS = (("ring", "contiguous"), ("ring", "zigzag"), ("all_gather", "contiguous"), ("all_gather", "zigzag"))
MODES = ("fwd", "fwd+bwd")
AXIS = "seq"


def variant_label(strategy: str, layout: str) -> str:
    """E.g. ``"jattn:ring+zigzag"``."""
    return f"jattn:{strategy}" + ("+zigzag" if layout == "zigzag" else "")


def visited(params: dict, shards: int, layout: str) -> dict[str, Any]:
    """Block pairs per device: max, mean and max / mean."""
    import jattn

    seq = params["seq"]
    work = jattn.sharding.visited_blocks_per_device(seq, seq, shards, is_causal=params["causal"], layout=layout)
    return {
        "visited_max": int(work.max()),
        "visited_mean": float(work.mean()),
        "visited_imbalance": float(work.max() / work.mean()),
    }


def program_metrics(compiled: Any) -> dict[str, Any]:
    """Per-device memory and collectives of a compiled call."""
    args, temp = argument_bytes(compiled), temp_bytes(compiled)
    moved = hlo.summary(compiled.as_text())
    return {
        "memory_bytes": None if args is None or temp is None else args + temp,
        "argument_bytes": args,
        "temp_bytes": temp,
        "bytes_moved": sum(c["bytes"] for c in moved.values()),
        "collective_count": sum(c["count"] for c in moved.values()),
        "collectives": moved,
    }


def inputs(params: dict, sharding: NamedSharding | None, *, timed: bool) -> tuple[Any, ...]:
    """q, k, v: arrays (placed by ``sharding``, else on the default device), or their shapes when not timed."""
    if timed:
        q, k, v = make_inputs(params)
        return (q, k, v) if sharding is None else tuple(jax.device_put(x, sharding) for x in (q, k, v))
    b, t, h, kvh, d = (params[n] for n in ("batch", "seq", "heads", "kv_heads", "dim"))
    dtype = jnp.dtype(params["dtype"])
    shapes = ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d))
    return tuple(jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes)


def build(impl: str, params: dict, *, timed: bool) -> Target:
    """The target of one case: the single-device call, or one strategy and layout over every device."""
    import jattn

    if impl == SINGLE_DEVICE:
        sp, sharding, shards, layout = None, None, 1, "contiguous"
    else:
        strategy, layout = next(v for v in VARIANTS if variant_label(*v) == impl)
        mesh = jax.make_mesh((params["devices"],), (AXIS,))
        sp = jattn.sharding.SequenceParallel(axis=AXIS, strategy=strategy, layout=layout)
        sharding, shards = NamedSharding(mesh, P(None, AXIS)), params["devices"]

    def f(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=params["causal"], implementation="blockwise", sequence_parallel=sp
        )

    def metrics(compiled: Any) -> dict[str, Any]:
        return {**program_metrics(compiled), **visited(params, shards, layout)}

    args = inputs(params, sharding, timed=timed)
    return JaxTarget(target_fn(f, params["mode"]), args, compiled_metrics=metrics, timed=timed)


def too_few_devices(devices: int) -> Callable[[], Target]:
    def build() -> Target:
        raise Unavailable(
            f"sequence parallelism needs 2 or more devices; jax.device_count() is {devices} "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)"
        )

    return build


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """Single device (peer) and every strategy and layout, per mode, causal flag and sequence length."""
    devices = jax.device_count()
    labels = [(SINGLE_DEVICE, True), *((variant_label(*v), False) for v in VARIANTS)]
    labels = [(impl, peer) for impl, peer in labels if cfg.wants(impl)]
    if devices < 2:
        if labels:
            yield Case("parallel", "jattn:sequence_parallel", "needs 2 or more devices", {"devices": devices},
                       None, too_few_devices(devices))  # fmt: skip
        return
    for mode in (m for m in cfg.modes if m in MODES):
        for causal in cfg.causal:
            for seq in cfg.seq_lengths:
                params = {"mode": mode, "causal": causal, "batch": cfg.batch, "seq": seq, "kv_seq": seq,
                          "heads": cfg.heads, "kv_heads": cfg.kv_heads or cfg.heads, "dim": cfg.dim,
                          "dtype": cfg.dtype, "devices": devices}  # fmt: skip
                flops = attention_flops(batch=cfg.batch, heads=cfg.heads, kv_heads=params["kv_heads"], q_seq=seq,
                                        kv_seq=seq, dim=cfg.dim, causal=causal, mode=mode,
                                        backward_factor=cfg.backward_factor)  # fmt: skip
                label = f"{mode} {'causal' if causal else 'full'} T={seq} P={devices}"
                timed = seq <= cfg.parallel_timed_seq
                for impl, peer in labels:
                    make = functools.partial(build, impl, params, timed=timed)
                    yield Case("parallel", impl, label, params, flops, make, peer)
