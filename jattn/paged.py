"""Serving: ragged paged attention over one shared pool of K/V pages, cache writes and page allocation.

A serving step attends one *ragged batch*: the new tokens of many sequences (prefill chunks and decode
tokens alike) concatenated into ``queries``, against keys and values kept in fixed-size pages of one
pool and addressed through a page table, as in JAX's TPU ``ragged_paged_attention``, vLLM and FlashInfer.
Work and memory follow the tokens actually cached, not ``max_seqs x max_length``.

Axes: ``tokens`` rows of the batch, ``heads`` / ``kv_heads`` query and key/value heads (grouped-query
attention), ``dim`` / ``v_dim`` features, ``num_pages`` pages of ``page_size`` tokens in the pool,
``max_seqs`` rows of the page table, ``pages_per_seq`` pages per row.

- :func:`ragged_paged_attention`: the attention of one step.
- :func:`write`: new tokens' keys and values into the pools (in place when the pools are donated).
- :class:`PageAllocator`: pages for new and growing sequences, back when they finish; builds each step's
  :class:`BatchMetadata`. Raises :class:`OutOfPagesError` instead of ever reusing a live page.

Example: the first step of two sequences (prompts of 1 and 2 tokens), padded to 4 rows:

>>> import jax, jax.numpy as jnp
>>> from jattn import paged
>>> alloc = paged.PageAllocator(num_pages=8, page_size=2, pages_per_seq=4)
>>> alloc.reserve("a", 1); alloc.reserve("b", 2)
>>> meta = alloc.metadata([("a", 0, 1), ("b", 0, 2)], max_seqs=4, max_tokens=4)  # (seq, cached, new)
>>> k_pages, v_pages = jnp.zeros((8, 2, 1, 4)), jnp.zeros((8, 2, 1, 4))
>>> new_k, new_v = jnp.ones((4, 1, 4)), jnp.ones((4, 1, 4))  # rows past the batch are padding
>>> k_pages, v_pages = jax.jit(paged.write, donate_argnums=(0, 1))(k_pages, v_pages, new_k, new_v, meta.slot_mapping)
>>> out = jax.jit(paged.ragged_paged_attention)(
...     jnp.ones((4, 2, 4)), k_pages, v_pages, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs)
>>> out.shape, out[:, 0, 0].tolist()  # (tokens, heads, v_dim); the padding row is zeros
((4, 2, 4), [1.0, 1.0, 1.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Array, Float, Int

from . import _paged
from ._paged import DEFAULT_BLOCK_Q, DEFAULT_PAGES_PER_CHUNK
from ._paged import BatchMetadata as BatchMetadata
from ._paged import OutOfPagesError as OutOfPagesError
from ._paged import PageAllocator as PageAllocator

__all__ = ["BatchMetadata", "OutOfPagesError", "PageAllocator", "ragged_paged_attention", "write"]


def ragged_paged_attention(
    queries: Float[Array, "tokens heads dim"],
    key_pages: Array,
    value_pages: Array,
    kv_lens: Int[Array, " max_seqs"],
    page_indices: Int[Array, "max_seqs pages_per_seq"],
    cu_q_lens: Int[Array, " max_seqs_plus_1"],
    num_seqs: Int[Array, ""],
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " heads"] | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    pages_per_chunk: int = DEFAULT_PAGES_PER_CHUNK,
    block_q: int = DEFAULT_BLOCK_Q,
) -> Float[Array, "tokens heads v_dim"]:
    """Attention of a ragged batch of sequences over a paged KV cache.

    Sequence ``s < num_seqs`` owns query rows ``cu_q_lens[s] : cu_q_lens[s+1]`` (``q_len`` new tokens) and
    ``kv_lens[s]`` cached tokens, its new ones included; logical page ``p`` of it is physical page
    ``page_indices[s, p]``. Its new token ``i`` sits at absolute position ``kv_lens[s] - q_len + i``
    (bottom-right causal) and sees cached position ``j`` iff ``j <= position`` (and, with
    ``sliding_window=w``, ``j > position - w``) and ``mask_mod`` allows it. Logits are
    ``scale * q.k`` -> soft cap -> ``score_mod`` -> mask -> softmax with ``sinks`` in the denominator,
    in float32 (float64 for float64 queries).

    The result never depends on which physical pages hold the data, and sequences may share pages (a
    common prefix). New metadata values never recompile. Only the pages holding a sequence's visible
    tokens are read, ``pages_per_chunk`` at a time, so time and memory follow ``sum(kv_lens)``; the pool
    is never gathered whole. It equals JAX's ``ref_ragged_paged_attention`` where the options overlap,
    except for its defaults: ``scale=None`` is ``1 / sqrt(dim)`` (JAX's ``sm_scale`` is 1), a row that
    sees no key gives zeros, and quantized pages are used in float32.

    Wrong metadata raises ValueError when it is concrete (num_seqs outside ``[0, max_seqs]``, decreasing
    ``cu_q_lens``, ``kv_lens`` beyond a sequence's pages, ``q_len > kv_len``, a used page index outside
    the pool). Under ``jit`` nothing is checked, and nothing reads another sequence's tokens: lengths and
    offsets are clipped, a decreasing ``cu_q_lens`` entry gives an empty sequence, rows placed before
    position 0 see nothing (zeros), and a page index outside the pool hides that page's tokens.

    Reverse-mode autodiff (``jax.grad``, ``jax.vjp``) gives gradients to ``queries``, float pools
    (quantized float pools: through the scale), ``sinks`` and floating arrays a ``score_mod`` captured,
    by a blockwise backward over the same pages. Forward mode (``jax.jvp``, ``jax.jacfwd``) raises
    JAX's TypeError for ``custom_vjp`` functions, and a second derivative (grad of grad) JAX's ValueError
    for ``while_loop`` s (the backward's loops follow the tokens too); metadata and integer pools get no
    gradient. ``jax.vmap`` works (e.g. over several query sets on one cache).

    Tensor parallel: with the query heads and both pools' kv heads split over the same ``Explicit`` mesh
    axes into whole GQA groups, each device attends its own heads over its own slice of the pools, with no
    collective; the result is split like the queries. Other layouts (and calls with a ``score_mod`` or
    ``mask_mod``, which see the global head) are gathered first. ``Auto`` mesh axes are left to XLA.

    Args:
        queries: ``(tokens, heads, dim)``; rows at or past ``cu_q_lens[num_seqs]`` are padding.
        key_pages: ``(num_pages, page_size, kv_heads, dim)`` in the query dtype, or quantized (any integer
            or float dtype) with ``k_scale``.
        value_pages: ``(num_pages, page_size, kv_heads, v_dim)``, likewise with ``v_scale``.
        kv_lens: int ``(max_seqs,)``, tokens cached per sequence (this call's included).
        page_indices: int ``(max_seqs, pages_per_seq)``; entries past a sequence's pages are never read.
        cu_q_lens: int ``(max_seqs + 1,)``, the sequences' first query rows and the end of the last.
        num_seqs: int scalar or ``(1,)``: sequences in this batch.
        scale: logit scale; None is ``1 / sqrt(dim)``.
        sliding_window: each token sees the last ``sliding_window`` positions, itself included.
        logits_soft_cap: ``cap * tanh(logit / cap)`` before the score_mod.
        sinks: ``(heads,)`` logits that join each row's softmax denominator (with a zero value).
        score_mod: ``score_mod(score, batch, head, q_idx, kv_idx) -> score``; ``batch`` is the sequence
            index, ``q_idx`` / ``kv_idx`` absolute positions. Captured arrays are differentiated.
        mask_mod: ``mask_mod(batch, head, q_idx, kv_idx) -> bool`` (True = attend), or ``(q_idx, kv_idx)``.
        k_scale: quantized keys are read as ``page.astype(float32) * k_scale`` (a Python float).
        v_scale: the same for values.
        pages_per_chunk: pages folded into the online softmax per loop step (tuning).
        block_q: query rows per block of a sequence with several new tokens (tuning); a sequence with one
            new token (decode) is a block of one row.

    Returns:
        ``(tokens, heads, v_dim)`` in the query dtype; padding rows and rows that see no key are zeros.

    Example: one decoding sequence (3 cached tokens on pages 2 and 0) and one prefilling (2 tokens):

    >>> import jax.numpy as jnp
    >>> from jattn import paged
    >>> keys = jnp.ones((4, 2, 1, 3))  # 4 pages of 2 tokens, 1 kv head, dim 3: every logit equal
    >>> values = jnp.arange(8.0).reshape(4, 2, 1, 1)  # the value of slot page * 2 + offset is the slot
    >>> out = paged.ragged_paged_attention(
    ...     jnp.zeros((3, 1, 3)), keys, values, kv_lens=jnp.array([3, 2]),
    ...     page_indices=jnp.array([[2, 0], [1, 3]]), cu_q_lens=jnp.array([0, 1, 3]), num_seqs=jnp.array(2))
    >>> out[:, 0, 0].tolist()  # mean of [4, 5, 0]; then [2], [2, 3] (bottom-right causal)
    [3.0, 2.0, 2.5]
    """
    arrays = _paged.PagedArrays(queries, key_pages, value_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = _paged.PagedOptions(
        scale, sliding_window, logits_soft_cap, sinks, score_mod, mask_mod, k_scale, v_scale, pages_per_chunk, block_q
    )
    return _paged.ragged_paged_attention(arrays, options)


def write(
    key_pages: Array,
    value_pages: Array,
    keys: Float[Array, "tokens kv_heads dim"],
    values: Float[Array, "tokens kv_heads v_dim"],
    slot_mapping: Int[Array, " tokens"],
    *,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> tuple[Array, Array]:
    """Writes new tokens' keys and values into the page pools.

    Token ``t`` goes to slot ``slot_mapping[t] = physical_page * page_size + offset``; a negative slot is
    padding and writes nothing. Jitted with the pools donated (``jax.jit(write, donate_argnums=(0, 1))``)
    the pools are updated in place. Concrete slots are checked (inside the pool, each written once); under
    ``jit`` a slot past the pool is dropped and two tokens on one slot leave either of them.

    Args:
        key_pages: ``(num_pages, page_size, kv_heads, dim)``.
        value_pages: ``(num_pages, page_size, kv_heads, v_dim)``.
        keys: ``(tokens, kv_heads, dim)`` in the pool's dtype, or any float dtype with ``k_scale``.
        values: ``(tokens, kv_heads, v_dim)``, likewise.
        slot_mapping: int ``(tokens,)``.
        k_scale: quantize keys into the pool's dtype: ``keys / k_scale``, rounded for integers, saturated.
        v_scale: the same for values.

    Returns:
        The updated ``(key_pages, value_pages)``.

    Example:

    >>> import jax.numpy as jnp
    >>> from jattn import paged
    >>> k, v = paged.write(jnp.zeros((2, 2, 1, 1)), jnp.zeros((2, 2, 1, 1)), jnp.ones((2, 1, 1)),
    ...                    jnp.ones((2, 1, 1)), jnp.array([3, -1]))
    >>> k[:, :, 0, 0].tolist()  # slot 3 is page 1, offset 1; slot -1 writes nothing
    [[0.0, 0.0], [0.0, 1.0]]
    """
    return _paged.write(key_pages, value_pages, keys, values, slot_mapping, k_scale=k_scale, v_scale=v_scale)
