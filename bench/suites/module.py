"""``module``: ``jattn.nnx.MultiHeadAttention`` against ``flax.nnx.MultiHeadAttention``.

Self-attention of ``x`` ``(batch, seq, features)``, forward only. Both modules
keep q/k/v kernels ``(features, heads, head_dim)`` and the out kernel
``(heads, head_dim, features)`` (the Keras layout). jattn's module is given the
flax module's weights when its parameter paths and shapes match flax's; if they
do not, each keeps its own initialisation and the result says so in its notes.
Until ``jattn.nnx`` imports, the jattn case is recorded as unavailable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from ..case import Case, JaxTarget, Target, Unavailable
from ..config import BenchConfig
from ..flops import module_flops
from ..inputs import normal


def flax_module(params: dict) -> Any:
    """The peer, initialised from ``Rngs(0)``."""
    from flax import nnx

    f = params["features"]
    return nnx.MultiHeadAttention(
        num_heads=params["heads"], in_features=f, qkv_features=f, decode=False, rngs=nnx.Rngs(0)
    )


def jattn_module(params: dict) -> Any:
    """jattn's module, or ``Unavailable`` while ``jattn.nnx`` does not import."""
    try:
        from flax import nnx

        from jattn import nnx as jattn_nnx
    except ImportError as e:
        where = str(e).split(" (/")[0]  # keep the reason, drop this machine's path
        raise Unavailable(f"jattn.nnx not available ({type(e).__name__}: {where})") from e
    f, h = params["features"], params["heads"]
    return jattn_nnx.MultiHeadAttention(h, f, head_dim=f // h, rngs=nnx.Rngs(0))


def param_arrays(module: Any) -> dict[tuple, jax.Array]:
    """A module's parameters as ``{path: array}``."""
    from flax import nnx

    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def copy_weights(src: Any, dst: Any) -> str:
    """Copies ``src``'s parameters into ``dst`` when paths and shapes agree; says what happened."""
    from flax import nnx

    src_params, dst_params = param_arrays(src), param_arrays(dst)
    src_shapes = {p: a.shape for p, a in src_params.items()}
    dst_shapes = {p: a.shape for p, a in dst_params.items()}
    if src_shapes != dst_shapes:
        return f"weights not copied (parameters differ: flax {sorted(src_shapes)} vs jattn {sorted(dst_shapes)})"
    nnx.update(dst, nnx.state(src, nnx.Param))
    return "weights copied from the flax module"


def module_target(module: Any, x: jax.Array, notes: dict) -> JaxTarget:
    """A pure ``f(state, x)`` around an NNX module, so ``jax.jit`` sees arrays only."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    return JaxTarget(lambda state, x: nnx.merge(graphdef, state)(x), (state, x), notes)


def build(impl: str, params: dict) -> Target:
    """The target of one module case; the jattn side also records its agreement with flax."""
    x = normal((params["batch"], params["seq"], params["features"]), params["dtype"], seed=1)
    peer = flax_module(params)
    if impl.startswith("flax.nnx:"):
        return module_target(peer, x, {})
    mine = jattn_module(params)
    notes = {"weights": copy_weights(peer, mine)}
    diff = jnp.max(jnp.abs(mine(x).astype(jnp.float32) - peer(x).astype(jnp.float32)))
    notes["max_abs_diff_vs_flax"] = float(diff)
    return module_target(mine, x, notes)


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """flax (peer) and jattn at ``cfg.module_seq``, ``cfg.module_features``, ``cfg.module_heads``."""
    params = {
        "batch": 1,
        "seq": cfg.module_seq,
        "features": cfg.module_features,
        "heads": cfg.module_heads,
        "dtype": cfg.dtype,
    }
    head_dim = cfg.module_features // cfg.module_heads
    flops = module_flops(
        batch=1, seq=cfg.module_seq, features=cfg.module_features, heads=cfg.module_heads, head_dim=head_dim
    )
    label = f"MHA fwd B=1 T={cfg.module_seq} F={cfg.module_features} H={cfg.module_heads}"
    for impl, peer in (("flax.nnx:MultiHeadAttention", True), ("jattn.nnx:MultiHeadAttention", False)):
        if cfg.wants(impl):
            yield Case(
                suite="module",
                impl=impl,
                label=label,
                params=params,
                flops=flops,
                build=lambda impl=impl: build(impl, params),
                peer=peer,
            )
