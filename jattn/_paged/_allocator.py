"""A host-side page allocator for continuous batching, and the batch metadata it builds.

Why on the host: a serving loop decides on the host every step which requests to admit, which have
finished and which to preempt when pages run out; the allocator is part of that bookkeeping. In NumPy it
costs microseconds, keeps the compiled step free of allocation state (it only ever receives new metadata
values, which never recompile), and fails as a Python exception at the request that did not fit, where
the scheduler can react, rather than as a flag inside device arrays.

Invariants: a page is free or has a reference count; pages come only from the free list, so a new or
growing sequence never receives a live page; a sequence shares pages only through :meth:`fork`, whole
pages only, and :meth:`slots` refuses to map a write into a shared page.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from .. import _checks


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than a request needs; nothing was allocated."""


class BatchMetadata(NamedTuple):
    """One step's metadata for ``ragged_paged_attention`` and ``write`` (NumPy int32, fixed shapes)."""

    kv_lens: np.ndarray  # (max_seqs,)
    page_indices: np.ndarray  # (max_seqs, pages_per_seq), 0 where unused
    cu_q_lens: np.ndarray  # (max_seqs + 1,)
    num_seqs: np.ndarray  # (1,)
    slot_mapping: np.ndarray  # (max_tokens,), -1 on padding rows


class PageAllocator:
    """Pages of one pool handed to sequences (any hashable ids) as they grow, and back when they finish.

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page.
        pages_per_seq: the page table's width (longest sequence: ``pages_per_seq * page_size`` tokens).
    """

    def __init__(self, num_pages: int, page_size: int, pages_per_seq: int):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("pages_per_seq", pages_per_seq)):
            _checks.check_positive_int(name, value)
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest free page comes first
        self._refs = np.zeros(num_pages, np.int32)
        self._pages: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, seq: Hashable) -> tuple[int, ...]:
        return tuple(self._known(seq))

    def capacity(self, seq: Hashable) -> int:
        """Tokens ``seq`` can hold without new pages (0 for an unknown sequence)."""
        return len(self._pages.get(seq, ())) * self.page_size

    def reserve(self, seq: Hashable, num_tokens: int) -> None:
        """Gives ``seq`` (new or growing) pages for ``num_tokens`` tokens in all; all or nothing.

        Raises:
            OutOfPagesError: the pool has too few free pages (nothing changes; free or preempt, then retry).
            ValueError: ``num_tokens`` exceeds ``pages_per_seq * page_size``.
        """
        needed = -(-num_tokens // self.page_size)
        if num_tokens < 0 or needed > self.pages_per_seq:
            limit = self.pages_per_seq * self.page_size
            raise ValueError(f"num_tokens must lie in [0, pages_per_seq * page_size = {limit}]; got {num_tokens}")
        pages = self._pages.get(seq, [])
        extra = needed - len(pages)
        if extra > len(self._free):
            raise OutOfPagesError(
                f"sequence {seq!r} needs {extra} more pages for {num_tokens} tokens; {len(self._free)} of "
                f"{self.num_pages} are free"
            )
        for _ in range(max(extra, 0)):
            page = self._free.pop()
            self._refs[page] = 1
            pages.append(page)
        self._pages[seq] = pages

    def fork(self, parent: Hashable, child: Hashable, num_tokens: int) -> None:
        """``child`` (new) shares ``parent``'s first ``num_tokens`` tokens (a common prefix, already written):
        whole pages only, so neither ever writes into a shared page."""
        if num_tokens % self.page_size or not 0 <= num_tokens <= self.capacity(parent):
            raise ValueError(
                f"fork shares whole pages: num_tokens must be a multiple of page_size={self.page_size} within "
                f"parent {parent!r}'s {self.capacity(parent)} tokens; got {num_tokens}"
            )
        if child in self._pages:
            raise ValueError(f"fork needs a new child sequence; {child!r} already has pages")
        shared = self._known(parent)[: num_tokens // self.page_size]
        self._refs[shared] += 1
        self._pages[child] = list(shared)

    def free(self, seq: Hashable) -> None:
        """Returns ``seq``'s pages; a shared page goes back to the pool when its last sequence frees it."""
        for page in reversed(self._known(seq)):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        del self._pages[seq]

    def slots(self, seq: Hashable, start: int, stop: int) -> np.ndarray:
        """Slots ``page * page_size + offset`` of positions ``[start, stop)`` of ``seq``, to write them."""
        pages = np.asarray(self._known(seq), np.int64)
        if not 0 <= start <= stop <= len(pages) * self.page_size:
            raise ValueError(
                f"positions [{start}, {stop}) must lie within sequence {seq!r}'s {self.capacity(seq)} reserved "
                "tokens (reserve first)"
            )
        positions = np.arange(start, stop)
        physical = pages[positions // self.page_size]
        shared = physical[self._refs[physical] > 1]
        if shared.size:
            raise ValueError(f"writing sequence {seq!r} at [{start}, {stop}) would overwrite shared page {shared[0]}")
        return (physical * self.page_size + positions % self.page_size).astype(np.int32)

    def metadata(self, batch: Sequence[tuple[Hashable, int, int]], max_seqs: int, max_tokens: int) -> BatchMetadata:
        """The metadata of one step: ``batch`` lists ``(seq, num_cached, num_new)``, in the queries' order.

        Every sequence must have reserved ``num_cached + num_new`` tokens. Shapes depend only on
        ``max_seqs`` and ``max_tokens``, so one compiled step serves every batch.
        """
        if len(batch) > max_seqs or sum(n for _, _, n in batch) > max_tokens:
            raise ValueError(
                f"a batch of {len(batch)} sequences and {sum(n for _, _, n in batch)} new tokens does not fit "
                f"max_seqs={max_seqs}, max_tokens={max_tokens}"
            )
        kv_lens = np.zeros(max_seqs, np.int32)
        table = np.zeros((max_seqs, self.pages_per_seq), np.int32)
        cu = np.zeros(max_seqs + 1, np.int32)
        slots = np.full(max_tokens, -1, np.int32)
        for i, (seq, cached, new) in enumerate(batch):
            slots[cu[i] : cu[i] + new] = self.slots(seq, cached, cached + new)
            pages = self._known(seq)
            table[i, : len(pages)] = pages
            kv_lens[i], cu[i + 1] = cached + new, cu[i] + new
        cu[len(batch) + 1 :] = cu[len(batch)]
        return BatchMetadata(kv_lens, table, cu, np.asarray([len(batch)], np.int32), slots)

    def _known(self, seq: Hashable) -> list[int]:
        if seq not in self._pages:
            raise KeyError(f"sequence {seq!r} has no pages (reserve first)")
        return self._pages[seq]
