"""Value checks of concrete metadata (an eager call): the first wrong entry is named with its index.

NumPy only; never called on traced metadata (under ``jit`` the kernel clips and masks instead, see
``_geometry``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._spec import Metadata


def _first(bad: Any) -> tuple[int, ...] | None:
    hits = np.argwhere(np.asarray(bad))
    return None if hits.size == 0 else tuple(int(i) for i in hits[0])


def check_sequences(meta: Metadata, tokens: int) -> int:
    """``num_seqs`` and ``cu_q_lens``; returns the number of sequences."""
    max_seqs = meta.kv_lens.shape[0]
    n = int(meta.num_seqs.reshape(-1)[0])
    if not 0 <= n <= max_seqs:
        raise ValueError(f"num_seqs must lie in [0, max_seqs={max_seqs}]; got {n}")
    cu = meta.cu_q_lens[: n + 1].astype(np.int64)
    if cu[0] < 0:
        raise ValueError(f"cu_q_lens[0] must be >= 0; got {cu[0]}")
    s = _first(np.diff(cu) < 0)
    if s is not None:
        i = s[0]
        raise ValueError(
            f"cu_q_lens must be non-decreasing over its first num_seqs + 1 = {n + 1} entries; "
            f"got cu_q_lens[{i}]={cu[i]} > cu_q_lens[{i + 1}]={cu[i + 1]}"
        )
    if cu[n] > tokens:
        raise ValueError(f"cu_q_lens[num_seqs] must be <= tokens={tokens} (the rows of queries); got {cu[n]}")
    return n


def check_metadata_values(meta: Metadata, tokens: int, pool: tuple[int, int]) -> None:
    """Raises ValueError naming the first wrong entry; ``pool`` is ``(num_pages, page_size)``."""
    n = check_sequences(meta, tokens)
    num_pages, page_size = pool
    pages_per_seq = meta.page_indices.shape[1]
    kv = meta.kv_lens[:n].astype(np.int64)
    capacity = pages_per_seq * page_size
    s = _first((kv < 0) | (kv > capacity))
    if s is not None:
        raise ValueError(
            f"kv_lens[{s[0]}] must lie in [0, pages_per_seq * page_size = {pages_per_seq} * {page_size} = "
            f"{capacity}]; got {kv[s[0]]}"
        )
    q_lens = np.diff(meta.cu_q_lens[: n + 1].astype(np.int64))
    s = _first(q_lens > kv)
    if s is not None:
        i = s[0]
        raise ValueError(
            f"sequence {i} has q_len={q_lens[i]} new tokens but kv_lens[{i}]={kv[i]}: kv_lens counts this "
            "call's tokens too, so q_len <= kv_len"
        )
    used = np.arange(pages_per_seq)[None, :] < -(-kv[:, None] // page_size)
    pages = meta.page_indices[:n]
    s = _first(used & ((pages < 0) | (pages >= num_pages)))
    if s is not None:
        i, p = s
        raise ValueError(
            f"page_indices[{i}, {p}] must lie in [0, num_pages={num_pages}) (sequence {i} uses its first "
            f"{-(-kv[i] // page_size)} pages); got {pages[i, p]}"
        )
