"""Radix prefix cache over token ids whose nodes own KV pages (pure Python, no torch).

Layout
------
Every node starts at a page-aligned position of the sequences it covers. A node
holds ``key`` (its run of tokens) and ``pages`` (``ceil(len(key) / page_size)``
pool page ids): page ``i`` of the node holds the K/V of ``key[i*ps:(i+1)*ps]``.
A node with children ends on a page boundary; only a leaf may end with a
*partial* page (the trailing ``len(key) % ps`` tokens of a prompt). Children are
keyed by their first page of tokens (a tuple of <= ps ids): two children never
share a full first page, but siblings may share fewer than ps leading tokens
(they diverge inside that page, each with its own page). With page_size 1 this
is an ordinary radix tree split at any token.

Matching is at token granularity: walk whole pages while they are equal; where
the prompt diverges inside a page (or the cached run ends inside one), the
request reuses that page's first ``r`` valid slots by copying them into a page
of its own (``MatchResult.partial_page`` / ``partial_len``), because its own
suffix tokens go into the rest of that page. Full pages are shared as-is, so
pages in a request's page table are never written (writes start at the
request's own first page). Partial pages are therefore only copy sources.

Insert adopts the caller's pages for what the tree lacks and frees the
caller's duplicates (pages for chunks the tree already holds). A leaf whose
single partial page is a strict prefix of a newly inserted page (multi-turn:
the next turn extends the last one) is dropped if unlocked.

Request lifecycle and locking rules
-----------------------------------
1. ``m = cache.match_prefix(tokens)``; ``cache.lock(m.handle)`` at once (before
   anything can evict). A lock pins every page of the handle's node and of all
   its ancestors: ``m.pages`` and ``m.partial_page`` (and the rest of that node;
   ``m = cache.trim(m)`` first splits it so that the lock pins no more).
2. Allocate pages for positions ``len(m.pages) * ps`` on (``evict()`` when the
   allocator is short: it never frees a locked page), copy slots
   ``[0, m.partial_len)`` of ``m.partial_page`` into the first new page.
3. Run the model over ``tokens[m.num_tokens:]``; ``m.pages`` are read only.
4. ``cache.unlock(m.handle)``, then ``cache.insert(tokens, m.pages + own)``
   with no eviction in between (insert checks that pages it already owns are
   at the positions given); or, on failure, unlock and free the own pages.
Locks are counted (a path may be locked by many requests); ``evict`` only
removes unlocked leaves, least recently matched first, whole nodes at a time.

Cache events
------------
When ``listener`` is set, every change to the set of cached *full* pages is
reported as ``listener(kind, hashes)`` with kind ``"insert"`` (a new leaf's
full pages) or ``"evict"`` (a removed leaf's full pages), hashes being
``engine.prefix_hash.block_hashes`` of the page-aligned token path from the
root. Splits change no page and report nothing; partial pages are never
reported. ``full_page_hashes()`` is the matching snapshot. Both run on the
thread that owns the cache.
"""
from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from engine.page_allocator import PageAllocator
from engine.prefix_hash import block_hashes

CacheListener = Callable[[str, list[int]], None]  # (kind "insert" | "evict", block hashes)


class RadixNode:
    """A run of tokens starting on a page boundary and the pages holding its K/V."""
    __slots__ = ("children", "key", "last_access", "pages", "parent", "pins", "ref")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.ref = 0          # locks held on this node or any descendant
        self.pins = 0         # locks held on this node itself (handles point here)
        self.last_access = 0  # logical clock of the last match/insert through here

    def __repr__(self) -> str:
        return f"RadixNode(len={len(self.key)}, pages={self.pages}, ref={self.ref})"


@dataclass(frozen=True)
class MatchResult:
    num_tokens: int               # cached prefix length = len(pages) * page_size + partial_len
    pages: tuple[int, ...]        # full pages to put first in the page table, shared as-is
    partial_page: int | None      # tree page whose slots [0, partial_len) must be copied
    partial_len: int              # 0 <= partial_len < page_size; 0 iff partial_page is None
    handle: RadixNode             # lock()/unlock() this; covers pages and partial_page


@dataclass(frozen=True)
class InsertResult:
    cached_tokens: int            # tokens of the inserted sequence the tree held already
    adopted_pages: int            # caller pages now owned by the tree
    freed_pages: int              # caller pages that duplicate tree pages (freed, or handed back)
    duplicates: tuple[int, ...] = ()  # those pages, when insert(..., free_duplicates=False)


class PrefixCache(ABC):
    """Contract of a prefix cache (see the module docstring for the locking rules)."""

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """Longest cached prefix of token_ids; marks the path recently used. Takes no lock."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], pages: Sequence[int],
               free_duplicates: bool = True) -> InsertResult:
        """Cache token_ids whose K/V is in pages (one per page_size tokens). Takes ownership
        of every page it is given: each ends up in the tree or back in the allocator (or, with
        free_duplicates=False, in InsertResult.duplicates for the caller to free)."""

    @abstractmethod
    def lock(self, handle: RadixNode) -> None:
        """Pin the handle's path: none of its pages is freed until the matching unlock."""

    @abstractmethod
    def unlock(self, handle: RadixNode) -> None: ...

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free at least num_pages pages of unlocked leaves (LRU first) if there are that
        many; returns how many were freed."""

    @abstractmethod
    def check_integrity(self) -> None: ...


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache(PrefixCache):
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.root = RadixNode((), [], None)
        self._owner: dict[int, RadixNode] = {}  # page -> the node holding it
        self._protected = 0                      # pages of nodes with ref > 0
        self._clock = itertools.count(1)
        self.listener: CacheListener | None = None  # see "Cache events" in the module docstring
        self._free_dups = True                   # the current insert's free_duplicates

    # -- accounting (plain ints: safe to read from another thread) --------------
    @property
    def num_pages(self) -> int:
        """Pages owned by the tree."""
        return len(self._owner)

    @property
    def protected_pages(self) -> int:
        return self._protected

    @property
    def evictable_pages(self) -> int:
        return len(self._owner) - self._protected

    def owns(self, page: int) -> bool:
        return page in self._owner

    # -- match ------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        ps, n = self.page_size, len(token_ids)
        node, deepest, pos = self.root, self.root, 0
        pages: list[int] = []
        partial_page, partial_len = None, 0
        while pos < n:
            q = tuple(token_ids[pos:pos + ps])
            child = node.children.get(q)
            if child is None:  # diverges inside this page: best partial among the children
                for c in node.children.values():
                    r = _lcp(c.key[:ps], q)
                    if r > partial_len:
                        deepest, partial_page, partial_len = c, c.pages[0], r
                break
            deepest = child
            i = 0
            while i < len(child.pages) and pos < n:
                ck, q = child.key[i * ps:(i + 1) * ps], tuple(token_ids[pos:pos + ps])
                if len(ck) == ps and ck == q:
                    pages.append(child.pages[i])
                    pos += ps
                    i += 1
                    continue
                r = _lcp(ck, q)
                if r:
                    partial_page, partial_len = child.pages[i], r
                break
            if partial_len or i < len(child.pages) or pos >= n:
                break
            node = child
        self._touch(deepest)
        return MatchResult(len(pages) * ps + partial_len, tuple(pages), partial_page, partial_len, deepest)

    def _touch(self, node: RadixNode) -> None:
        t = next(self._clock)
        while node is not None:
            node.last_access = t
            node = node.parent

    # -- insert -----------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], pages: Sequence[int],
               free_duplicates: bool = True) -> InsertResult:
        """free_duplicates=False: the caller's duplicate pages stay allocated and are returned
        (InsertResult.duplicates) for the caller to free later (a transfer still reads them)."""
        self._free_dups = free_duplicates
        ps, n = self.page_size, len(token_ids)
        pages = list(pages)
        if len(pages) != -(-n // ps):
            raise ValueError(f"{n} tokens need {-(-n // ps)} pages, got {len(pages)}")
        if len(set(pages)) != len(pages):
            raise ValueError("a page appears twice")
        for p in pages:
            if not self.allocator.is_allocated(p):
                raise ValueError(f"page {p} is not allocated")
        to_free: list[int] = []

        def duplicate(k: int, tree_page: int) -> None:  # the tree holds page k's tokens in tree_page
            if pages[k] == tree_page:
                return
            if pages[k] in self._owner:
                raise ValueError(f"page {pages[k]} is cached at another position")
            to_free.append(pages[k])

        node, pos = self.root, 0
        while pos < n:
            q = tuple(token_ids[pos:pos + ps])
            child = node.children.get(q)
            if child is None:
                return self._add_leaf(node, token_ids, pages, pos, to_free)
            i = 0
            while i < len(child.pages) and pos < n:
                ck, q = child.key[i * ps:(i + 1) * ps], tuple(token_ids[pos:pos + ps])
                if ck == q or (len(q) < len(ck) and ck[:len(q)] == q):  # equal, or covered
                    duplicate(pos // ps, child.pages[i])
                    pos += len(q)
                    i += 1
                    continue
                break
            if pos >= n:
                return self._finish(n, 0, to_free)
            if i < len(child.pages):
                child = self._split(child, i)  # diverges at page i: branch below the first i pages
            node = child
        return self._finish(n, 0, to_free)

    def _add_leaf(self, node: RadixNode, token_ids: Sequence[int], pages: list[int], pos: int,
                  to_free: list[int]) -> InsertResult:
        ps = self.page_size
        q = tuple(token_ids[pos:pos + ps])
        k = pos // ps
        if len(q) < ps and any(c.key[:len(q)] == q for c in node.children.values()):
            if pages[k] in self._owner:
                raise ValueError(f"page {pages[k]} is cached at another position")
            return self._finish(len(token_ids), 0, to_free + [pages[k]])  # covered already
        new = pages[k:]
        if any(p in self._owner for p in new):
            raise ValueError("a page the tree owns was given for an uncached position")
        for c in list(node.children.values()):  # dominated partial leaves (multi-turn)
            if not c.children and c.ref == 0 and len(c.key) < len(q) and q[:len(c.key)] == c.key:
                self._remove_leaf(c)
        leaf = RadixNode(tuple(token_ids[pos:]), new, node)
        node.children[q] = leaf
        for p in new:
            self._owner[p] = leaf
        self._touch(leaf)
        if self.listener is not None and len(leaf.key) >= ps:
            full = len(leaf.key) // ps
            self.listener("insert", block_hashes(token_ids[:pos + full * ps], ps)[k:])
        return self._finish(pos, len(new), to_free)

    def _finish(self, cached: int, adopted: int, to_free: list[int]) -> InsertResult:
        if not self._free_dups:
            return InsertResult(cached, adopted, len(to_free), tuple(to_free))
        if to_free:
            self.allocator.free(to_free)
        return InsertResult(cached, adopted, len(to_free))

    def _split(self, node: RadixNode, i: int) -> RadixNode:
        """Cut node after its first i pages; the new upper node is returned and the
        original object keeps the lower part (so lock handles keep covering their path)."""
        ps = self.page_size
        parent = node.parent
        upper = RadixNode(node.key[:i * ps], node.pages[:i], parent)
        upper.ref, upper.last_access = node.ref, node.last_access
        parent.children[node.key[:ps]] = upper
        node.key, node.pages, node.parent = node.key[i * ps:], node.pages[i:], upper
        upper.children[node.key[:ps]] = node
        for p in upper.pages:
            self._owner[p] = upper
        return upper

    def trim(self, m: MatchResult) -> MatchResult:
        """The same match with its handle's node split where the match ends, so that a
        lock pins exactly m.pages and m.partial_page (which is then the handle's only
        page, below a node ending at the last full page). Changes no page."""
        node = m.handle
        last = m.partial_page if m.partial_page is not None else (m.pages[-1] if m.pages else None)
        if last is None or node is self.root:
            return m
        j = node.pages.index(last)
        if j + 1 < len(node.pages):
            node = self._split(node, j + 1)
        if m.partial_page is not None and j > 0:
            self._split(node, j)  # node keeps the partial page alone
        return MatchResult(m.num_tokens, m.pages, m.partial_page, m.partial_len, node)

    # -- locks ------------------------------------------------------------------
    def lock(self, handle: RadixNode) -> None:
        handle.pins += 1
        node = handle
        while node is not None:
            if node.ref == 0:
                self._protected += len(node.pages)
            node.ref += 1
            node = node.parent

    def unlock(self, handle: RadixNode) -> None:
        if handle.pins <= 0:
            raise ValueError("unlock without a matching lock")
        handle.pins -= 1
        node = handle
        while node is not None:
            node.ref -= 1
            if node.ref == 0:
                self._protected -= len(node.pages)
            node = node.parent

    # -- evict ------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        tie = itertools.count()
        heap = [(n.last_access, next(tie), n) for n in self._nodes()
                if not n.children and n.ref == 0 and n is not self.root]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            freed += self._remove_leaf(leaf)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return freed

    def _remove_leaf(self, leaf: RadixNode) -> int:
        assert not leaf.children and leaf.ref == 0
        ps = self.page_size
        if self.listener is not None and len(leaf.key) >= ps:
            prefix = self._path_tokens(leaf.parent)
            full = len(leaf.key) // ps
            self.listener("evict", block_hashes(prefix + leaf.key[:full * ps], ps)[len(prefix) // ps:])
        del leaf.parent.children[leaf.key[:self.page_size]]
        for p in leaf.pages:
            del self._owner[p]
        self.allocator.free(leaf.pages)
        leaf.parent = None
        return len(leaf.pages)

    # -- inspection ---------------------------------------------------------------
    @staticmethod
    def _path_tokens(node: RadixNode) -> tuple[int, ...]:
        """Tokens from the root down to the end of node."""
        keys: list[tuple[int, ...]] = []
        while node is not None:
            keys.append(node.key)
            node = node.parent
        return tuple(t for key in reversed(keys) for t in key)

    def full_page_hashes(self) -> list[int]:
        """Block hashes of every full page in the tree, parents before children (snapshot)."""
        ps, out = self.page_size, []
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            path = prefix + node.key
            if node is not self.root and len(node.key) >= ps:
                full = len(node.key) // ps
                out.extend(block_hashes(path[:len(prefix) + full * ps], ps)[len(prefix) // ps:])
            stack.extend((c, path) for c in node.children.values())
        return out

    def _nodes(self) -> Iterator[RadixNode]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def iter_sequences(self) -> Iterator[tuple[int, ...]]:
        """Token sequence of every root-to-leaf path (tests and debugging)."""
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            seq = prefix + node.key
            if not node.children and node is not self.root:
                yield seq
            stack.extend((c, seq) for c in node.children.values())

    def check_integrity(self) -> None:
        ps = self.page_size
        owned: dict[int, RadixNode] = {}
        protected = 0
        for node in self._nodes():
            if node is self.root:
                assert not node.key and not node.pages and node.parent is None
            else:
                assert node.key, "empty non-root node"
                assert len(node.pages) == -(-len(node.key) // ps), "pages do not cover the key"
                assert not node.children or len(node.key) % ps == 0, "inner node ends mid-page"
                assert node.parent.children.get(node.key[:ps]) is node, "bad child key"
            for k, c in node.children.items():
                assert c.parent is node and c.key[:ps] == k
            assert node.pins >= 0
            assert node.ref == node.pins + sum(c.ref for c in node.children.values()), "ref count"
            if node.ref:
                protected += len(node.pages)
            for p in node.pages:
                assert p not in owned, f"page {p} owned by two nodes"
                assert self.allocator.is_allocated(p), f"cached page {p} is free"
                owned[p] = node
        assert owned == self._owner, "page owner map out of date"
        assert protected == self._protected, "protected page count out of date"

    def __repr__(self) -> str:
        return f"RadixCache(pages={self.num_pages}, protected={self._protected}, page_size={self.page_size})"
