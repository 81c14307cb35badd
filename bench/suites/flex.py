"""``flex``: score_mod and mask_mod (FlexAttention-style) against the plain kernel and dense masks.

Two comparisons, in the attention suite's layout ``(batch, seq, heads, dim)``:

* ``alibi``: ALiBi as a ``score_mod`` (``jattn.score_mods.alibi``) against the
  plain blockwise kernel on the same inputs (the peer): what a score_mod costs.
* ``documents``: ``flex_docs`` packed documents as a ``mask_mod``
  (``jattn.masks.document``) with a block mask built once, outside the timed
  call, against ``jax.nn`` (the peer) and jattn's blockwise kernel, both given
  the equivalent dense boolean mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp

from ..case import Case, JaxTarget, Target
from ..config import BenchConfig
from ..flops import attention_flops
from .attention import forward_backward, make_inputs

PLAIN, ALIBI = "jattn:blockwise", "jattn:blockwise+score_mod"
DENSE_JAX_NN, DENSE_JATTN, MASK_MOD = "jax.nn:xla+dense_mask", "jattn:blockwise+dense_mask", "jattn:blockwise+mask_mod"


def alibi_target(impl: str, params: dict) -> Target:
    import jattn
    from jattn import score_mods

    q, k, v = make_inputs(params)
    slopes = score_mods.alibi_slopes(params["heads"])

    def f(q, k, v):
        mod = score_mods.alibi(slopes) if impl == ALIBI else None
        return jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=mod, implementation="blockwise")

    return JaxTarget(f if params["mode"] == "fwd" else forward_backward(f), (q, k, v))


def document_target(impl: str, params: dict) -> Target:
    import jattn
    from jattn import masks

    q, k, v = make_inputs(params)
    seq, docs = params["seq"], params["docs"]
    ids = jnp.repeat(jnp.arange(docs, dtype=jnp.int32), seq // docs)[None]  # (1, seq): docs equal documents
    # Ids, block summary and dense mask are arguments, as in a model: closed over, they would be constants
    # that XLA constant-folds at compile time (seconds, and an error-level "slow operation" log line).
    if impl == MASK_MOD:
        summary = masks.block_mask(masks.document(ids), 1, 1, seq, seq)  # built once, reused by every call (and layer)

        def f(q, k, v, ids, summary):
            mod = masks.document(ids)
            return jattn.dot_product_attention(q, k, v, mask_mod=mod, block_mask=summary, implementation="blockwise")

        return JaxTarget(forward_backward(f), (q, k, v, ids, summary), {"visited_blocks": int(summary.visited[0])})
    dense = (ids[:, :, None] == ids[:, None, :])[:, None]  # (1, 1, seq, seq)

    def g(q, k, v, dense):
        if impl == DENSE_JAX_NN:
            return jax.nn.dot_product_attention(q, k, v, mask=dense)
        return jattn.dot_product_attention(q, k, v, mask=dense, implementation="blockwise")

    return JaxTarget(forward_backward(g), (q, k, v, dense))


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """ALiBi at ``cfg.flex_seq`` (fwd, fwd+bwd) and ``cfg.flex_docs`` documents at ``cfg.flex_doc_seq`` (fwd+bwd)."""
    shape = {"batch": cfg.batch, "heads": cfg.heads, "kv_heads": cfg.heads, "dim": cfg.dim, "dtype": cfg.dtype}
    for mode in ("fwd", "fwd+bwd"):
        params = {**shape, "mode": mode, "seq": cfg.flex_seq, "kv_seq": cfg.flex_seq}
        flops = attention_flops(batch=cfg.batch, heads=cfg.heads, q_seq=cfg.flex_seq, kv_seq=cfg.flex_seq,
                                dim=cfg.dim, causal=True, mode=mode)  # fmt: skip
        for impl, peer in ((PLAIN, True), (ALIBI, False)):
            if cfg.wants(impl):
                yield Case("flex", impl, f"{mode} alibi causal T={cfg.flex_seq}", params, flops,
                           lambda impl=impl, params=params: alibi_target(impl, params), peer)  # fmt: skip
    seq, docs = cfg.flex_doc_seq, cfg.flex_docs
    params = {**shape, "mode": "fwd+bwd", "seq": seq, "kv_seq": seq, "docs": docs}
    per_doc = attention_flops(batch=cfg.batch, heads=cfg.heads, q_seq=seq // docs, kv_seq=seq // docs, dim=cfg.dim,
                              mode="fwd+bwd")  # fmt: skip
    for impl, peer in ((DENSE_JAX_NN, True), (DENSE_JATTN, False), (MASK_MOD, False)):
        if cfg.wants(impl):
            yield Case("flex", impl, f"fwd+bwd {docs} documents T={seq}", params, docs * per_doc,
                       lambda impl=impl: document_target(impl, params), peer)  # fmt: skip
