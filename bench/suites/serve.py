"""``serve``: one step of paged serving against the padded contiguous KV cache it replaces.

Every case is a batch of 16 sequences. Peers hold the same keys and values in a padded cache
``(16, max_kv, kv_heads, dim)`` (what a contiguous cache per sequence reserves) and are told each
sequence's filled length (``key_value_seq_lengths``): ``jax.nn:xla`` is ``jax.nn.dot_product_attention``,
``jattn:padded`` is ``jattn.dot_product_attention`` with its default implementation (the notes say which
one auto picked) and ``jattn:padded-blockwise`` the same with ``implementation="blockwise"``, which skips
key blocks past the filled length. ``jattn:paged`` is ``jattn.paged.ragged_paged_attention`` over a
pool holding each sequence's pages in shuffled order (page_size 64), queries concatenated.

Cases (``cfg.serve_kv_lens = (long, short)``, ``cfg.serve_scaling``, heads ``cfg.heads``, dim ``cfg.dim``):

- ``decode``: one new token per sequence; kv_lens one ``long`` and fifteen ``short``; heads 8/8 and the
  grouped-query variant 8/2.
- ``scaling``: one new token per sequence, all sequences at each of ``serve_scaling``: paged time should
  follow the cached tokens.
- ``mixed``: two prefill chunks of 64 new tokens (at ``long`` and ``short`` cached) and fourteen decode
  tokens (at ``short``). The padded peers get queries padded to 64 rows per sequence with
  ``query_seq_lengths`` and a bottom-right causal mask.

Notes record ``gather_all_bytes`` (K and V of every page-table entry: what gathering every sequence's
pages would hold; compare with the compiled ``temp_bytes``) and, for paged, the largest difference from
``jattn:padded-blockwise``. FLOPs count ``4 * heads * dim`` per visible (query, key) pair, the same for every side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..case import Case, JaxTarget, Target
from ..config import BenchConfig
from ..inputs import normal

PAGED, XLA, PADDED, BLOCKWISE = "jattn:paged", "jax.nn:xla", "jattn:padded", "jattn:padded-blockwise"
IMPLS = (PAGED, XLA, PADDED, BLOCKWISE)
PAGE_SIZE, SEQS, PREFILL_CHUNK = 64, 16, 64


def batch_lengths(params: dict) -> tuple[list[int], list[int]]:
    """``(q_lens, kv_lens)`` of the case's 16 sequences."""
    long, short = params["kv_lens"]
    match params["kind"]:
        case "decode":
            return [1] * SEQS, [long] + [short] * (SEQS - 1)
        case "scaling":
            return [1] * SEQS, [long] * SEQS
        case "mixed":
            return [PREFILL_CHUNK] * 2 + [1] * (SEQS - 2), [long, short] + [short] * (SEQS - 2)
    raise ValueError(f"unknown serve case kind {params['kind']!r}")


def visible_pairs(q_lens: list[int], kv_lens: list[int]) -> int:
    """Bottom-right causal (query, key) pairs: row i of q sees kv - q + i + 1 keys."""
    return sum(q * kv - q * (q - 1) // 2 for q, kv in zip(q_lens, kv_lens, strict=True))


class Inputs:
    """The case's queries, page pool and page table, and the same data as a padded contiguous cache."""

    def __init__(self, params: dict):
        q_lens, kv_lens = batch_lengths(params)
        heads, kv_heads, dim, dtype = params["heads"], params["kv_heads"], params["dim"], params["dtype"]
        pages_per_seq = -(-max(kv_lens) // PAGE_SIZE)
        needed = [-(-kv // PAGE_SIZE) for kv in kv_lens]
        num_pages = sum(needed)
        order = np.random.default_rng(0).permutation(num_pages)
        table = np.zeros((SEQS, pages_per_seq), np.int32)
        starts = np.cumsum([0, *needed])
        for s, n in enumerate(needed):
            table[s, :n] = order[starts[s] : starts[s] + n]
        self.q_lens, self.kv_lens, self.table = q_lens, np.asarray(kv_lens, np.int32), table
        self.cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        self.queries = normal((sum(q_lens), heads, dim), dtype, seed=1)
        self.key_pages = normal((num_pages, PAGE_SIZE, kv_heads, dim), dtype, seed=2)
        self.value_pages = normal((num_pages, PAGE_SIZE, kv_heads, dim), dtype, seed=3)
        self.gather_all_bytes = 2 * table.size * PAGE_SIZE * kv_heads * dim * self.queries.dtype.itemsize

    def paged_args(self) -> tuple:
        meta = (self.kv_lens, self.table, self.cu, np.asarray(len(self.q_lens), np.int32))
        return (self.queries, self.key_pages, self.value_pages, *map(jnp.asarray, meta))

    def padded_args(self) -> tuple:
        """q ``(16, max_q, heads, dim)``, padded K/V ``(16, pages_per_seq * 64, kv_heads, dim)``, lengths and
        (for prefill) the bottom-right causal mask."""
        max_q = max(self.q_lens)
        rows = np.zeros((SEQS, max_q), np.int32)
        for s, q in enumerate(self.q_lens):
            rows[s, :q] = self.cu[s] + np.arange(q)
        q = self.queries[rows]

        def contiguous(pool):
            return pool[self.table].reshape(SEQS, -1, *pool.shape[2:])

        k, v = contiguous(self.key_pages), contiguous(self.value_pages)
        mask = None
        if max_q > 1:
            pos = (self.kv_lens - np.asarray(self.q_lens))[:, None, None] + np.arange(max_q)[None, :, None]
            mask = jnp.asarray(np.arange(k.shape[1])[None, None, :] <= pos)[:, None]  # (16, 1, max_q, max_kv)
        lengths = (jnp.asarray(self.q_lens, jnp.int32), jnp.asarray(self.kv_lens))  # jax.nn wants int32
        return q, jax.block_until_ready(k), jax.block_until_ready(v), lengths, mask


def padded_fn(impl: str) -> Callable:
    """``f(q, k, v, lengths, mask)`` over the padded cache, as ``impl`` computes it."""
    import jattn

    def f(q, k, v, lengths, mask):
        q_lens, kv_lens = lengths
        q_lens = None if mask is None else q_lens  # decode: the filled lengths only, as a decode step passes
        lengths = dict(query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens)
        if impl == XLA:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, **lengths, implementation="xla")
        implementation = "blockwise" if impl == BLOCKWISE else None
        return jattn.dot_product_attention(q, k, v, mask=mask, **lengths, implementation=implementation)

    return f


def build(impl: str, params: dict) -> Target:
    """The target of one serve case; paged also records its distance to ``jattn:padded``."""
    from jattn import paged

    inputs = Inputs(params)
    notes = {"gather_all_bytes": inputs.gather_all_bytes, "sum_kv_lens": int(inputs.kv_lens.sum())}
    if impl != PAGED:
        q, k, v, lengths, mask = inputs.padded_args()
        notes["padded_cache_bytes"] = 2 * k.size * k.dtype.itemsize
        if impl == PADDED:
            import jattn

            q_lens = None if mask is None else lengths[0]
            lens = dict(query_seq_lengths=q_lens, key_value_seq_lengths=lengths[1])
            notes["implementation"] = jattn.auto_implementation(q, k, v, mask=mask, **lens)
        return JaxTarget(padded_fn(impl), (q, k, v, lengths, mask), notes)

    def f(*args):
        return paged.ragged_paged_attention(*args, pages_per_chunk=params["pages_per_chunk"])

    args = inputs.paged_args()
    ours = jax.jit(f)(*args)
    q, k, v, lengths, mask = inputs.padded_args()
    theirs = jax.jit(padded_fn(BLOCKWISE))(q, k, v, lengths, mask)
    rows = [theirs[s, :n] for s, n in enumerate(inputs.q_lens)]
    notes["max_abs_diff_vs_padded"] = float(jnp.max(jnp.abs(ours - jnp.concatenate(rows))))
    return JaxTarget(f, args, notes)


def serve_params(cfg: BenchConfig) -> Iterator[tuple[dict, tuple[str, ...]]]:
    """Each case's params and the implementations it runs."""
    long, short = cfg.serve_kv_lens
    base = {"heads": cfg.heads, "dim": cfg.dim, "dtype": cfg.dtype, "page_size": PAGE_SIZE}
    base["pages_per_chunk"] = cfg.serve_pages_per_chunk
    for kv_heads in (cfg.heads, max(cfg.heads // 4, 1)):
        yield {**base, "kind": "decode", "kv_lens": (long, short), "kv_heads": kv_heads}, IMPLS
    for length in cfg.serve_scaling:
        yield {**base, "kind": "scaling", "kv_lens": (length, length), "kv_heads": cfg.heads}, IMPLS
    yield {**base, "kind": "mixed", "kv_lens": (long, short), "kv_heads": cfg.heads}, IMPLS


def case_label(params: dict) -> str:
    long, short = params["kv_lens"]
    heads = f"H={params['heads']}/{params['kv_heads']}"
    match params["kind"]:
        case "decode":
            return f"decode 16 seqs kv=1x{long}+15x{short} {heads}"
        case "scaling":
            return f"decode 16 seqs kv=16x{long} {heads}"
    return f"mixed 2 prefill x{PREFILL_CHUNK} (kv {long},{short}) + 14 decode (kv {short}) {heads}"


def cases(cfg: BenchConfig) -> Iterator[Case]:
    for params, impls in serve_params(cfg):
        q_lens, kv_lens = batch_lengths(params)
        flops = 4 * params["heads"] * params["dim"] * visible_pairs(q_lens, kv_lens)
        for impl in impls:
            if cfg.wants(impl):
                yield Case(
                    suite="serve",
                    impl=impl,
                    label=case_label(params),
                    params=params,
                    flops=flops,
                    build=lambda impl=impl, params=params: build(impl, params),
                    peer=impl != PAGED,
                )
