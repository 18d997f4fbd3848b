"""Free-list allocator of KV-cache page ids (pure Python, no torch).

A page id is an int in ``[0, num_pages)`` that indexes the first dimension of
the KV pool tensors. The allocator knows nothing about tensors or sequences:
it hands out ids and takes them back.

Page lifecycle::

    FREE --alloc(n)--> ALLOCATED --free(pages)--> FREE

Rules:
- ``alloc(n)`` is all or nothing: it returns ``n`` ids or ``None`` and then
  changes nothing. ``alloc(0)`` returns ``[]``.
- ``free(pages)`` validates the whole list before changing anything: a page
  that is not allocated (double free) or not in range (foreign id) raises
  ``ValueError`` and leaves the allocator as it was.
- Order is deterministic: a fresh allocator hands out 0, 1, 2, ...; freed
  pages are reused first, most recently freed first (LIFO keeps the working
  set of pages small and reproducible across runs).
- Each call costs O(n) in the number of pages it moves.
"""
from __future__ import annotations

from collections.abc import Iterable


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_total = num_pages
        # Stack of free ids; the end of the list is handed out next.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated = bytearray(num_pages)  # 1 = handed out

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_total - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def is_allocated(self, page: int) -> bool:
        return 0 <= page < self._num_total and bool(self._allocated[page])

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` distinct free page ids, or ``None`` (and allocate nothing)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for p in pages:
            self._allocated[p] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool. Validates all of them before freeing any."""
        pages = list(pages)
        seen: set[int] = set()
        for p in pages:
            if not isinstance(p, int) or not 0 <= p < self._num_total:
                raise ValueError(f"page {p!r} does not belong to this allocator")
            if not self._allocated[p] or p in seen:
                raise ValueError(f"page {p} freed twice")
            seen.add(p)
        for p in reversed(pages):
            self._allocated[p] = 0
            self._free.append(p)

    def check_integrity(self) -> None:
        """Every id is exactly once either in the free stack or marked allocated."""
        assert len(set(self._free)) == len(self._free), "duplicate id in free list"
        for p in self._free:
            assert 0 <= p < self._num_total, f"foreign id {p} in free list"
            assert not self._allocated[p], f"page {p} both free and allocated"
        assert sum(self._allocated) + len(self._free) == self._num_total, "lost pages"

    def __repr__(self) -> str:
        return f"PageAllocator(free={self.num_free}/{self.num_total})"
