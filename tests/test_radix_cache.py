"""RadixCache: pure Python, no model; unit tests and a state machine against a brute-force model."""
from __future__ import annotations

import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.page_allocator import PageAllocator
from engine.radix_cache import MatchResult, RadixCache


def make_cache(num_pages: int = 32, page_size: int = 4) -> RadixCache:
    return RadixCache(PageAllocator(num_pages), page_size)


def serve(cache: RadixCache, tokens: list[int]) -> tuple[MatchResult, list[int]]:
    """The engine's protocol: match+lock, allocate the rest (evicting), unlock, insert."""
    alloc, ps = cache.allocator, cache.page_size
    m = cache.match_prefix(tokens)
    cache.lock(m.handle)
    need = -(-len(tokens) // ps) - len(m.pages)
    if alloc.num_free < need:
        cache.evict(need - alloc.num_free)
    own = alloc.alloc(need)
    assert own is not None
    cache.unlock(m.handle)
    table = list(m.pages) + own
    cache.insert(tokens, table)
    cache.check_integrity()
    alloc.check_integrity()
    return m, table


def seqs(cache: RadixCache) -> set[tuple[int, ...]]:
    return set(cache.iter_sequences())


def test_empty_cache_matches_nothing():
    c = make_cache()
    m = c.match_prefix([1, 2, 3])
    assert (m.num_tokens, m.pages, m.partial_page, m.partial_len) == (0, (), None, 0)
    assert m.handle is c.root
    c.lock(m.handle)
    c.unlock(m.handle)
    c.check_integrity()


def test_page_aligned_match_shares_full_pages():
    c = make_cache()
    _, table = serve(c, list(range(8)))
    m = c.match_prefix(list(range(8)) + [99, 98])
    assert m.num_tokens == 8 and m.pages == tuple(table) and m.partial_page is None


def test_match_ending_mid_page_copies_a_partial_page():
    c = make_cache()
    _, table = serve(c, list(range(10)))                       # pages: [0..3] [4..7] [8,9]
    m = c.match_prefix([0, 1, 2, 3, 4, 5, 77, 78])
    assert (m.num_tokens, m.pages, m.partial_page, m.partial_len) == (6, (table[0],), table[1], 2)
    m = c.match_prefix(list(range(10)) + [5, 5])             # through the trailing partial page
    assert (m.num_tokens, m.pages, m.partial_page, m.partial_len) == (10, tuple(table[:2]), table[2], 2)
    m = c.match_prefix([0, 1, 2])                             # query shorter than a page
    assert (m.num_tokens, m.pages, m.partial_page, m.partial_len) == (3, (), table[0], 3)


def test_no_match_for_a_different_first_token():
    c = make_cache()
    serve(c, list(range(10)))
    assert c.match_prefix([5, 0, 1, 2]).num_tokens == 0


def test_branches_share_full_pages_and_diverge_mid_page():
    c = make_cache()
    a = list(range(10))
    b = list(range(6)) + [50, 51, 52]
    _, ta = serve(c, a)
    m, tb = serve(c, b)
    assert m.num_tokens == 6 and tb[0] == ta[0] and tb[1] != ta[1]   # own copy of the partial page
    assert seqs(c) == {tuple(a), tuple(b)}
    assert c.allocator.num_used == 3 + 2 and c.num_pages == 5
    assert c.match_prefix(a).num_tokens == 10 and c.match_prefix(b).num_tokens == 9
    assert c.match_prefix(list(range(6)) + [50, 9]).num_tokens == 7


def test_multi_turn_extension_replaces_the_partial_leaf():
    c = make_cache()
    turn1 = list(range(10))
    turn2 = turn1 + [20, 21, 22, 23, 24, 25]
    serve(c, turn1)
    m, table = serve(c, turn2)
    assert m.num_tokens == 10 and m.partial_len == 2
    assert seqs(c) == {tuple(turn2)}
    assert c.allocator.num_used == 4 == c.num_pages                  # the old partial page is gone
    turn3 = turn2 + [30]
    m, _ = serve(c, turn3)
    assert m.num_tokens == 16 and m.pages == tuple(table) and m.partial_page is None


def test_inserting_a_cached_prefix_frees_the_callers_pages():
    c = make_cache()
    serve(c, list(range(12)))
    used = c.allocator.num_used
    alloc = c.allocator
    pages = alloc.alloc(2)
    r = c.insert([0, 1, 2, 3, 4, 5], pages)                          # duplicate full page + covered partial
    assert r.cached_tokens == 6 and r.adopted_pages == 0 and r.freed_pages == 2
    assert alloc.num_used == used and seqs(c) == {tuple(range(12))}
    c.check_integrity()


@pytest.mark.parametrize("page_size", [1, 16])
def test_page_sizes_1_and_16(page_size):
    c = make_cache(64, page_size)
    base = list(range(40))
    serve(c, base)
    m, _ = serve(c, base[:21] + [99] * 5)
    assert m.num_tokens == 21
    assert len(m.pages) == 21 // page_size and m.partial_len == 21 % page_size
    m, _ = serve(c, base + [7])
    assert m.num_tokens == 40
    assert c.match_prefix(base[:21] + [99] * 5).num_tokens == 26
    assert c.match_prefix(base[:21] + [99] * 2 + [1]).num_tokens == 23
    c.evict(c.num_pages)
    assert c.num_pages == 0 and c.allocator.num_used == 0


def test_lock_prevents_eviction():
    c = make_cache()
    a, b = [1] * 8, [2] * 8
    serve(c, a)
    serve(c, b)
    m = c.match_prefix(a + [5])
    c.lock(m.handle)
    assert c.protected_pages == 2 and c.evictable_pages == 2
    assert c.evict(100) == 2
    assert seqs(c) == {tuple(a)} and all(c.owns(p) for p in m.pages)
    assert c.evict(100) == 0
    c.unlock(m.handle)
    assert c.evict(1) == 2 and c.num_pages == 0 and c.allocator.num_used == 0
    with pytest.raises(ValueError):
        c.unlock(m.handle)


def test_lock_survives_a_split_of_the_locked_node():
    c = make_cache()
    a = list(range(12))
    serve(c, a)
    m = c.match_prefix(a)
    c.lock(m.handle)
    serve(c, a[:4] + [40, 41, 42, 43])                               # splits a's node after page 0
    c.check_integrity()
    assert c.protected_pages == 3
    c.evict(100)
    assert all(c.owns(p) for p in m.pages)
    c.unlock(m.handle)
    c.check_integrity()
    assert c.protected_pages == 0


def test_evicts_least_recently_used_leaf_first():
    c = make_cache()
    a, b, d = [1] * 4, [2] * 4, [3] * 4
    for s in (a, b, d):
        serve(c, s)
    c.match_prefix(a)                                                # a is now the most recent
    assert c.evict(1) == 1 and seqs(c) == {tuple(a), tuple(d)}
    assert c.evict(1) == 1 and seqs(c) == {tuple(a)}


def test_eviction_walks_up_to_parents():
    c = make_cache()
    serve(c, [1] * 8)
    serve(c, [1] * 4 + [2] * 4)                                      # root -> [1]*4 -> {[1]*4, [2]*4}
    assert c.evict(3) == 3 and c.num_pages == 0


def test_insert_rejects_bad_page_lists():
    c = make_cache()
    pages = c.allocator.alloc(2)
    with pytest.raises(ValueError):
        c.insert(list(range(10)), pages)                             # needs 3 pages
    with pytest.raises(ValueError):
        c.insert(list(range(8)), [pages[0], 31])                     # 31 is not allocated
    c.insert(list(range(8)), pages)
    other = c.allocator.alloc(2)
    with pytest.raises(ValueError):
        c.insert([9] * 8, [pages[0], other[0]])                      # a cached page at another position
    c.check_integrity()


# ---------------------------------------------------------------------------------------------
# State machine: random requests (match+lock+allocate -> finish (unlock+insert) or abort),
# plain matches and evictions, against a brute-force model: the set of cached token sequences.
# Pages carry simulated contents (the token id in each slot) so a page that is shared, copied
# or overwritten wrongly shows up as a content mismatch.

def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefixes(sequences) -> set[tuple[int, ...]]:
    return {tuple(s[:i]) for s in sequences for i in range(1, len(s) + 1)}


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)


class RadixMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(3, 24))
    def setup(self, page_size, num_pages):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.cache = RadixCache(self.alloc, page_size)
        self.model: set[tuple[int, ...]] = set()          # cached sequences (up to prefix closure)
        self.content: dict[int, list] = {}                # page -> simulated slot contents
        self.pending: list[tuple[list[int], MatchResult, list[int]]] = []

    def brute(self, tokens) -> int:
        return max((lcp(tokens, s) for s in self.model), default=0)

    def locked_pages(self) -> set[int]:
        out = set()
        for _, m, _ in self.pending:
            out.update(m.pages)
            if m.partial_page is not None:
                out.add(m.partial_page)
        return out

    def evict(self, n: int) -> None:
        locked, before = self.locked_pages(), self.cache.evictable_pages
        free_before = self.alloc.num_free
        freed = self.cache.evict(n)
        assert freed >= min(n, before) and self.alloc.num_free == free_before + freed
        assert all(self.cache.owns(p) for p in locked), "eviction freed a locked page"
        now = set(self.cache.iter_sequences())
        assert prefixes(now) <= prefixes(self.model)
        for tokens, m, _ in self.pending:
            assert m.num_tokens == 0 or tuple(tokens[:m.num_tokens]) in prefixes(now)
        self.model = now

    def extend(self, base: list[int], i: int, extra: list[int]) -> list[int]:
        if not self.model:
            return base
        s = sorted(self.model)[i % len(self.model)]
        return list(s[:len(s) - i % 3]) + extra if len(s) > i % 3 else list(s) + extra

    @rule(tokens=tokens_st, i=st.integers(0, sys.maxsize), extra=st.lists(st.integers(0, 3), max_size=6),
          reuse=st.booleans())
    def begin(self, tokens, i, extra, reuse):
        if reuse:
            tokens = self.extend(tokens, i, extra) or tokens
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens == self.brute(tokens)
        assert m.num_tokens == len(m.pages) * self.ps + m.partial_len and m.partial_len < self.ps
        assert (m.partial_page is None) == (m.partial_len == 0)
        self.cache.lock(m.handle)
        need = -(-len(tokens) // self.ps) - len(m.pages)
        if self.alloc.num_free < need:
            self.evict(need - self.alloc.num_free)
        own = self.alloc.alloc(need)
        if own is None:
            self.cache.unlock(m.handle)
            return
        for p in own:
            self.content[p] = [None] * self.ps
        if m.partial_page is not None:
            self.content[own[0]][:m.partial_len] = self.content[m.partial_page][:m.partial_len]
        table = list(m.pages) + own
        for pos in range(m.num_tokens, len(tokens)):                 # the forward pass writes
            self.content[table[pos // self.ps]][pos % self.ps] = tokens[pos]
        for pos, t in enumerate(tokens):                             # reused + computed KV is right
            assert self.content[table[pos // self.ps]][pos % self.ps] == t
        self.pending.append((tokens, m, own))

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, sys.maxsize))
    def finish(self, i):
        tokens, m, own = self.pending.pop(i % len(self.pending))
        self.cache.unlock(m.handle)
        self.cache.insert(tokens, list(m.pages) + own)
        self.model.add(tuple(tokens))

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, sys.maxsize))
    def abort(self, i):
        _, m, own = self.pending.pop(i % len(self.pending))
        self.cache.unlock(m.handle)
        self.alloc.free(own)

    @rule(tokens=tokens_st)
    def match(self, tokens):
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens == self.brute(tokens)
        got = [self.content[p][k] for p in m.pages for k in range(self.ps)]
        if m.partial_page is not None:
            got += self.content[m.partial_page][:m.partial_len]
        assert got == tokens[:m.num_tokens]

    @rule(n=st.integers(0, 30))
    def evict_some(self, n):
        self.evict(n)

    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        c.check_integrity()
        self.alloc.check_integrity()
        tree = {p for p in range(self.alloc.num_total) if c.owns(p)}
        own = [p for _, _, o in self.pending for p in o]
        assert len(own) == len(set(own)) and not tree & set(own), "a page has two owners"
        assert {p for p in range(self.alloc.num_total) if self.alloc.is_allocated(p)} == tree | set(own)
        assert self.locked_pages() <= tree, "a locked page was freed"
        assert c.protected_pages <= c.num_pages
        assert prefixes(c.iter_sequences()) == prefixes(self.model)
        stack = [(c.root, 0)]
        while stack:                                                 # tree pages hold their tokens
            node, _ = stack.pop()
            for k, p in enumerate(node.pages):
                chunk = list(node.key[k * self.ps:(k + 1) * self.ps])
                assert self.content[p][:len(chunk)] == chunk
            stack.extend((ch, 0) for ch in node.children.values())

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        while self.pending:
            self.abort(0)
        self.cache.evict(self.alloc.num_total)
        self.cache.check_integrity()
        assert self.alloc.num_free == self.alloc.num_total and self.cache.num_pages == 0


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("page_size", [1, 4])
def test_trim_makes_a_lock_pin_exactly_the_match(page_size):
    ps = page_size
    c = make_cache(num_pages=64, page_size=ps)
    serve(c, list(range(4 * ps)))                              # one leaf of 4 pages
    m = c.match_prefix(list(range(ps + ps // 2)) + [999])      # page 0 full, page 1 partial (ps > 1)
    t = c.trim(m)
    assert (t.num_tokens, t.pages, t.partial_page, t.partial_len) == (
        m.num_tokens, m.pages, m.partial_page, m.partial_len)
    pinned = 1 + (m.partial_page is not None)
    assert t.handle.pages == [m.partial_page if ps > 1 else m.pages[-1]]
    c.lock(t.handle)
    c.check_integrity()
    assert c.protected_pages == pinned and c.evictable_pages == 4 - pinned
    assert c.evict(64) == 4 - pinned                           # the pages past the match go
    c.unlock(t.handle)
    c.check_integrity()
    assert seqs(c) == {tuple(range(pinned * ps))}
    # full pages only, ending inside a node; and a match of nothing
    serve(c, list(range(4 * ps)))
    t = c.trim(c.match_prefix(list(range(2 * ps))))
    c.lock(t.handle)
    assert c.protected_pages == 2 and t.partial_page is None
    c.unlock(t.handle)
    assert c.trim(c.match_prefix([999])).handle is c.root
    c.check_integrity()
