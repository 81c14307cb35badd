"""``decode``: time per generated token against KV-cache fill, jattn against flax.

For each fill ``f`` in ``cfg.decode_fills`` (a cache of ``cfg.decode_max_length``
positions, batch 1, ``cfg.module_features`` features, ``cfg.module_heads``
heads), both modules get the same weights (flax's, copied into jattn's as in
the ``module`` suite) and the same prompt of ``f`` tokens, written into their
caches before any timing: jattn by its own prefill call, flax (which decodes
one token per call) by writing its own key/value projections of the prompt
into its cache, which is what ``f`` single-token calls would leave there.

**What is timed**: one decode step of one token, ``step(params, cache, token)
-> (out, cache)``, compiled with ``jax.jit(..., donate_argnums=1)`` — the cache
(``cached_key``, ``cached_value``, ``cache_index``) is donated and updated in
place, so neither side copies the whole cache to return it; params are not
donated. The step is the module's own call (jattn:
``jattn.nnx.MultiHeadAttention(implementation=None)(token, is_causal=True)``;
flax: ``flax.nnx.MultiHeadAttention(decode=True)(token)``): project the token,
write its key/value at position ``f``, attend, project out. It then puts
``cache_index`` back to ``f``, so every call does the same work (it rewrites
position ``f`` with the same token) and the fill never drifts. Each call is
dispatched from Python with the previous call's cache and blocks on the result
(a ``PythonTarget``: the compile time and XLA's temp memory are in the notes).

What each side attends: jattn tells its kernel the filled length (``f + 1``
keys), so the blockwise kernel skips key blocks past it; flax attends over all
``max_length`` positions with a mask. On CPU ``implementation=None`` picks the
one-query form of ``"reference"`` (dense over ``max_length``, reading the cache as
it lies, see ``jattn.auto_implementation(kv_cache=True)``) up to 4 MiB of cached
keys, else ``"blockwise"``;
the notes say which was picked.

FLOPs: ``bench.flops.decode_flops``: the four projections of one token plus
attention of one query over the ``f + 1`` visible keys (the same count for both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from ..case import Case, PythonTarget, Target, Unavailable
from ..config import BenchConfig
from ..flops import decode_flops
from ..inputs import normal
from ..measure import temp_bytes
from .module import copy_weights

PEER, MINE = "flax.nnx:MultiHeadAttention", "jattn.nnx:MultiHeadAttention"


def flax_decoder(params: dict) -> Any:
    """The peer, ``decode=True``, initialised from ``Rngs(0)``, computing and storing in ``params["dtype"]``."""
    from flax import nnx

    f, dtype = params["features"], jnp.dtype(params["dtype"])
    return nnx.MultiHeadAttention(
        num_heads=params["heads"],
        in_features=f,
        qkv_features=f,
        decode=True,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )


def jattn_decoder(params: dict) -> Any:
    """jattn's module in ``params["dtype"]``, or ``Unavailable`` while ``jattn.nnx`` does not import."""
    from flax import nnx

    try:
        from jattn import nnx as jattn_nnx
    except ImportError as e:
        where = str(e).split(" (/")[0]  # keep the reason, drop this machine's path
        raise Unavailable(f"jattn.nnx not available ({type(e).__name__}: {where})") from e

    f, h, dtype = params["features"], params["heads"], jnp.dtype(params["dtype"])
    return jattn_nnx.MultiHeadAttention(h, f, head_dim=f // h, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))


def prefill_flax(module: Any, prompt: jax.Array, max_length: int) -> None:
    """Writes flax's own key/value projections of ``prompt`` into a fresh cache of ``max_length``."""
    batch, fill, features = prompt.shape
    module.init_cache((batch, max_length, features), dtype=prompt.dtype)
    module.cached_key[...] = module.cached_key[...].at[:, :fill].set(module.key(prompt))
    module.cached_value[...] = module.cached_value[...].at[:, :fill].set(module.value(prompt))
    module.cache_index[...] = jnp.asarray(fill, jnp.int32)


def prefill_jattn(module: Any, prompt: jax.Array, max_length: int) -> None:
    """jattn's own prefill: ``init_cache`` then one causal call on the whole prompt."""
    from flax import nnx

    module.init_cache(prompt.shape[0], max_length, dtype=prompt.dtype)
    nnx.jit(lambda m, x: m(x, is_causal=True))(module, prompt)


def call_flax(module: Any, token: jax.Array) -> jax.Array:
    # flax compares an int64 ``arange`` with its int32 cache index, which strict
    # promotion (the tests' setting, with x64) rejects; the default allows it.
    with jax.numpy_dtype_promotion("standard"):
        return module(token)


def call_jattn(module: Any, token: jax.Array) -> jax.Array:
    return module(token, is_causal=True)


def decode_target(module: Any, token: jax.Array, call: Callable, notes: dict) -> PythonTarget:
    """A compiled, cache-donating decode step ``call(module, token)``, wrapped for timing.

    The target's ``fn()`` runs one step on the cache the previous call returned
    and returns the output once it is ready.
    """
    from flax import nnx

    graphdef, params, cache, rest = nnx.split(module, nnx.Param, nnx.Cache, ...)

    def step(params, cache, token):
        m = nnx.merge(graphdef, params, cache, rest)
        fill = m.cache_index[...]
        out = call(m, token)
        m.cache_index[...] = fill  # every call decodes at the same fill
        return out, nnx.state(m, nnx.Cache)

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=1).lower(params, cache, token).compile()
    compile_s = time.perf_counter() - start
    holder = [cache]

    def run() -> jax.Array:
        out, holder[0] = compiled(params, holder[0], token)
        return jax.block_until_ready(out)

    notes = {**notes, "compile_s": round(compile_s, 4), "temp_bytes": temp_bytes(compiled)}
    return PythonTarget(run, (), notes)


def build(impl: str, params: dict) -> Target:
    """The target of one decode case; jattn's also records its output's distance to flax's."""
    max_length, fill = params["max_length"], params["fill"]
    if not 1 <= fill < max_length:
        raise ValueError(f"fill must lie in [1, max_length) to leave room for one token; got {fill}, {max_length}")
    tokens = normal((params["batch"], fill + 1, params["features"]), params["dtype"], seed=1)
    prompt, token = tokens[:, :fill], tokens[:, fill:]
    peer = flax_decoder(params)
    prefill_flax(peer, prompt, max_length)
    if impl == PEER:
        return decode_target(peer, token, call_flax, {})
    mine = jattn_decoder(params)
    notes: dict = {"weights": copy_weights(peer, mine)}
    if mine.implementation is None:
        notes["implementation"] = decode_implementation(params)
    prefill_jattn(mine, prompt, max_length)
    theirs = decode_target(peer, token, call_flax, {}).fn()
    target = decode_target(mine, token, call_jattn, notes)
    ours = target.fn()  # the first call of the timed step itself
    diff = jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32)))
    return PythonTarget(target.fn, (), {**target.notes, "max_abs_diff_vs_flax": float(diff)})


def decode_implementation(params: dict) -> str:
    """What ``implementation=None`` picks for one decode step of ``params``: the attention call of jattn's
    module over its own KV cache (``kv_cache=True``: on CPU ``"reference"`` is its one-query form)."""
    import jattn

    batch, heads, dtype = params["batch"], params["heads"], jnp.dtype(params["dtype"])
    head_dim = params["features"] // heads
    query = jax.ShapeDtypeStruct((batch, 1, heads, head_dim), dtype)
    cache = jax.ShapeDtypeStruct((batch, params["max_length"], heads, head_dim), dtype)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jattn.auto_implementation(query, cache, cache, is_causal=True, key_value_seq_lengths=lengths, kv_cache=True)


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """flax (peer) and jattn, one decode step at each of ``cfg.decode_fills``."""
    features, heads, max_length = cfg.module_features, cfg.module_heads, cfg.decode_max_length
    for fill in cfg.decode_fills:
        params = {
            "batch": 1,
            "max_length": max_length,
            "fill": fill,
            "features": features,
            "heads": heads,
            "dtype": cfg.dtype,
        }
        flops = decode_flops(batch=1, fill=fill, features=features, heads=heads, head_dim=features // heads)
        label = f"1 token at fill {fill}/{max_length} F={features} H={heads}"
        for impl, peer in ((PEER, True), (MINE, False)):
            if cfg.wants(impl):
                yield Case(
                    suite="decode",
                    impl=impl,
                    label=label,
                    params=params,
                    flops=flops,
                    build=lambda impl=impl, params=params: build(impl, params),
                    peer=peer,
                )
