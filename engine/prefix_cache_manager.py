"""The decode scheduler's prefix cache: a RadixCache behind local prefills (pure Python, no torch).

`DecodeScheduler(config, allocator, prefix_cache=PrefixCacheManager(allocator, page_size))`
drives it; nothing else calls it. Lifecycle of one local sequence (``seq.remote_kv``
False: colocated mode, or a recompute after preemption):

1. ``plan(seq)``: match ``all_token_ids[:-1]`` (the last token is always computed:
   its logits give the next token). No lock is taken. The ``PrefixPlan`` names the
   match, the tokens it supplies, and ``next_page``: the tokens up to the end of the
   seq's first uncached *full* page, the key the scheduler uses for in-batch reuse (a
   seq whose next page another seq computes in the same step waits one step and then
   finds that page in the tree).
2. ``admit(seq, plan, reserve)``: lock the match (``RadixCache.trim`` first, so the lock
   pins no page beyond it), allocate pages for the uncached rest
   (evicting unlocked LRU leaves when the allocator is short, leaving ``reserve``
   pages for this step's decodes), set ``seq.pages`` = matched tree pages (shared,
   read only) + own pages and ``seq.num_computed`` = matched tokens. Returns an
   ``Admission`` whose ``copy`` (a ``PageCopy``) the worker performs before the
   forward when the match ends inside a page; None if pages are short (nothing held).
3. ``on_prefilled(seq)``: the KV of all the seq's tokens is in its pages. Its full
   pages go into the tree (unlock, insert, re-match, lock again), so seqs admitted from
   the next step on share them while this one decodes; a page another seq of the same
   step computed too is freed and the tree's copy takes its place in ``seq.pages``.
4. ``release(seq, keep)`` on finish, abort or preemption: unlock; with ``keep`` insert
   ``all_token_ids[:num_computed]`` (prompt and output tokens whose KV is in the pages:
   multi-turn reuse), the tree adopting the pages or freeing duplicates, and free the
   pages past them; without ``keep`` (its prefill never ran, or the engine failed) free
   the seq's own pages. A remote seq released before its KV landed just has its pages
   freed.

A remote seq (``seq.remote_kv``: a prefill worker sends its prompt KV into pages the
scheduler reserved off the free list) joins at ``adopt(seq)``, once every layer has landed:
its full prompt pages go into the tree as a local seq's do in ``on_prefilled``, and where the
tree already holds the same prefix (another request's landed KV) the seq's copy is freed and
the tree's page takes its place. So requests that share a prefix share its pages on the decode
worker too (the pool holds one copy; decode attention reads one copy), and its release is a
local seq's from then on. ``adopted_shared_pages`` counts the pages freed that way.

Rules: a seq writes KV only at positions >= ``num_computed``, which lie in its own
pages; tree pages in its page table are the leading ``num_shared`` ones, held locked.
Every pool page is free, owned by the tree, or owned by exactly one seq
(``check_integrity``). Free pages as the router sees them = free + evictable.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.page_allocator import PageAllocator
from engine.radix_cache import MatchResult, RadixCache, RadixNode
from engine.sequence import Sequence, pages_needed


@dataclass(frozen=True)
class PageCopy:
    """Copy slots [0, num_slots) of src_page into dst_page, K and V of every layer."""
    src_page: int
    dst_page: int
    num_slots: int


@dataclass(frozen=True)
class PrefixPlan:
    match: MatchResult               # longest cached prefix of all_token_ids[:-1] (not locked)
    num_pages: int                   # pages the seq needs beyond match.pages
    next_page: tuple[int, ...] | None  # tokens through its first uncached full page; None: none

    @property
    def num_cached(self) -> int:
        return self.match.num_tokens


@dataclass(frozen=True)
class Admission:
    num_cached: int                  # tokens served from the cache (= seq.num_computed now)
    copy: PageCopy | None            # partial page to copy before the forward


@dataclass
class _Hold:
    handle: RadixNode                # locked: pins the seq's shared pages (and a partial source)
    num_shared: int                  # leading entries of seq.pages owned by the tree


class PrefixCacheManager:
    def __init__(self, allocator: PageAllocator, page_size: int, evict_batch: int | None = None) -> None:
        """evict_batch: a short free list gets at least this many pages back per eviction
        (an eviction scans every leaf; default 1/128 of the pool amortises that)."""
        self.allocator = allocator
        self.page_size = page_size
        self.evict_batch = evict_batch if evict_batch is not None else max(1, allocator.num_total // 128)
        self.cache = RadixCache(allocator, page_size)
        self._held: dict[str, _Hold] = {}    # request id -> lock of an admitted local seq (or adopted remote one)
        self.adopted_shared_pages = 0        # remote seqs' landed pages freed for the tree's copy (adopt)

    # -- accounting (plain ints) ---------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Pages owned by the tree (shared ones included)."""
        return self.cache.num_pages

    @property
    def evictable_pages(self) -> int:
        return self.cache.evictable_pages

    def num_shared(self, seq: Sequence) -> int:
        hold = self._held.get(seq.request_id)
        return hold.num_shared if hold else 0

    # -- pages ----------------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """n pages off the free list, evicting unlocked cache leaves first if it is short."""
        if self.allocator.num_free < n:
            self.cache.evict(max(n - self.allocator.num_free, self.evict_batch))
        return self.allocator.alloc(n)

    def reset(self) -> bool:
        """Evict everything unlocked; True when the tree is empty afterwards."""
        self.cache.evict(self.cache.num_pages)
        return self.cache.num_pages == 0

    # -- lifecycle (see the module docstring) ------------------------------------------
    def plan(self, seq: Sequence) -> PrefixPlan:
        tokens, ps = seq.all_token_ids, self.page_size
        # prompt logprobs (echo) need every prompt position computed: its first prefill matches nothing
        echo = seq.params.prompt_logprobs >= 0 and not seq.output_token_ids
        m = self.cache.match_prefix(() if echo else tokens[:-1])
        k = len(m.pages)
        # a seq left with only its last token to compute (the match stops before it by rule)
        # shares nothing it computes: no key, so that its siblings do not wait for it
        nxt = tuple(tokens[:(k + 1) * ps]) if (k + 1) * ps <= len(tokens) and m.num_tokens < len(tokens) - 1 \
            else None
        return PrefixPlan(m, pages_needed(len(tokens), ps) - k, nxt)

    def admit(self, seq: Sequence, plan: PrefixPlan, reserve: int = 0,
              drop_partial: bool = False) -> Admission | None:
        """drop_partial: when pinning the partial page's source leaves too few pages, take
        the full pages only (the scheduler asks for it when nothing else of this step can
        free pages: a lone seq must always fit)."""
        m = self.cache.trim(plan.match)   # the lock pins exactly what is matched
        self.cache.lock(m.handle)
        if not self._fits(plan.num_pages, reserve) and m.partial_page is not None and drop_partial:
            self.cache.unlock(m.handle)
            m = MatchResult(len(m.pages) * self.page_size, m.pages, None, 0, m.handle.parent)
            self.cache.lock(m.handle)
        if not self._fits(plan.num_pages, reserve):
            self.cache.unlock(m.handle)
            return None
        own = self.alloc(plan.num_pages)
        assert own is not None, "free + evictable pages did not cover the admission"
        self._held[seq.request_id] = _Hold(m.handle, len(m.pages))
        seq.pages = list(m.pages) + own
        seq.num_computed = m.num_tokens
        if not seq.output_token_ids:   # a recompute keeps the count of the first prefill
            seq.cached_tokens = m.num_tokens
        copy = None
        if m.partial_page is not None:
            copy = PageCopy(m.partial_page, own[0], m.partial_len)
        return Admission(m.num_tokens, copy)

    def _fits(self, n: int, reserve: int) -> bool:
        return self.allocator.num_free + self.cache.evictable_pages - reserve >= n

    def on_prefilled(self, seq: Sequence) -> None:
        hold = self._held.get(seq.request_id)
        if hold is None:
            return
        self.cache.unlock(hold.handle)
        self._share_full_pages(seq, hold)

    def adopt(self, seq: Sequence) -> None:
        """A remote seq's KV of its first ``num_computed`` tokens has landed in its own pages
        (no write to them is pending): share its full pages through the tree (module docstring)."""
        if seq.request_id in self._held:
            return
        hold = self._held[seq.request_id] = _Hold(self.cache.root, 0)
        before = list(seq.pages)
        self._share_full_pages(seq, hold)
        self.adopted_shared_pages += sum(a != b for a, b in zip(before, seq.pages))

    def _share_full_pages(self, seq: Sequence, hold: _Hold) -> None:
        """Insert seq's full computed pages (its lock is off), lock them again and use the tree's
        pages in seq.pages (insert freed the duplicates)."""
        ps = self.page_size
        full = seq.num_computed // ps
        tokens = seq.all_token_ids[:full * ps]
        self.cache.insert(tokens, seq.pages[:full])
        m = self.cache.match_prefix(tokens)
        assert len(m.pages) == full, (len(m.pages), full)
        self.cache.lock(m.handle)
        seq.pages[:full] = m.pages       # duplicates were freed by insert: use the tree's pages
        hold.handle, hold.num_shared = m.handle, full

    def release(self, seq: Sequence, keep: bool) -> None:
        """Give up seq's pages (seq.pages is emptied). See the module docstring."""
        hold = self._held.pop(seq.request_id, None)
        pages, seq.pages = seq.pages, []
        if hold is None:
            self.allocator.free(pages)
            return
        self.cache.unlock(hold.handle)
        if keep:
            n = pages_needed(seq.num_computed, self.page_size)
            self.cache.insert(seq.all_token_ids[:seq.num_computed], pages[:n])
            self.allocator.free(pages[n:])
        else:
            self.allocator.free(pages[hold.num_shared:])

    # -- checks -----------------------------------------------------------------------
    def check_integrity(self, seqs: Iterable[Sequence]) -> None:
        """Tree consistent; every live seq's shared pages are locked tree pages in front
        of pages the tree does not own; no lock belongs to a seq that is gone."""
        self.cache.check_integrity()
        ps = self.page_size
        live = set()
        for seq in seqs:
            live.add(seq.request_id)
            hold = self._held.get(seq.request_id)
            shared = hold.num_shared if hold else 0
            for i, p in enumerate(seq.pages):
                assert self.cache.owns(p) == (i < shared), f"page {p} (#{i}) of {seq.request_id!r}"
            assert shared * ps <= seq.num_computed, f"{seq.request_id!r} would write a shared page"
            if hold is not None:
                assert hold.handle.pins > 0, f"{seq.request_id!r} holds an unlocked path"
                pinned = set()
                node = hold.handle
                while node is not None:
                    pinned.update(node.pages)
                    node = node.parent
                assert pinned.issuperset(seq.pages[:shared]), f"{seq.request_id!r}: shared page not locked"
        assert set(self._held) <= live, f"locks held for finished seqs {set(self._held) - live}"
