"""Decode-side continuous-batching scheduler (pure Python, no torch).

Lifecycle of one request, as the decode worker drives it:

1. ``add(seq)``: the request joins the WAITING queue (FIFO). ``seq.remote_kv``
   says who computes its prompt KV: a prefill worker (disaggregated) or this
   process (colocated mode, or recompute after a preemption).
2. ``schedule()`` admits waiting seqs in FIFO order and stops at the first one
   that does not fit (no overtaking); each admitted seq gets pages for all its
   current tokens.
   - remote seq -> AWAITING_KV, listed in ``SchedulerOutput.reserved``; the
     worker hands ``seq.pages`` to the prefill worker's sender.
   - local seq -> PREFILLING, listed in ``prefill``; the worker runs
     ``seq.all_token_ids[num_computed:]`` from position ``num_computed`` this step.
     Without a prefix cache ``num_computed`` is 0. With one (``prefix_cache``, a
     ``PrefixCacheManager``; see engine/prefix_cache_manager.py) the seq's longest
     cached prefix leads its page table (shared tree pages, read only), only the
     uncached rest gets new pages (unlocked LRU cache leaves are evicted when the
     pool is short) and counts against ``max_num_batched_tokens`` (so do the
     step's decode tokens when ``decode_in_budget`` is set: the engine runs them in
     the prefill's forward); a match that
     ends inside a page is a ``PageCopy`` in ``page_copies`` that the worker does
     before the forward. A seq whose next uncached full page another seq admitted
     in this step computes waits one step (admission stops there) and then
     shares that page.
   Then every RUNNING seq is listed in ``decode``: its last token (position
   ``num_tokens - 1``) runs this step. If its pages cannot grow (after evicting
   unlocked cache pages), the most recently admitted RUNNING seq is preempted
   (``preempted``): it gives up its pages (the cache keeps their KV while it
   can) and goes back to the FRONT of WAITING as a local recompute, keeping its
   output tokens.
3. Results come back before the next ``schedule()``:
   - ``kv_ready(id, first_token)``: AWAITING_KV -> RUNNING.
   - ``on_prefilled(id, token)``: PREFILLING -> RUNNING (its full pages join
     the prefix cache now, so later seqs share them while it decodes).
   - ``on_decoded(id, token)``: RUNNING -> RUNNING.
   Each returns a ``FinishReason`` when the seq is done; the scheduler has
   then released its pages (into the prefix cache: every token whose KV is in
   them, outputs included) and forgotten it (FINISHED).
4. ``abort(id)`` from any state releases the pages once and forgets the seq.

Results for a request id the scheduler no longer knows (aborted while its
step was in flight) are ignored and return None, as vLLM does.

Rules: AWAITING_KV seqs are never preempted (a sender writes into their
pages) and never touch the prefix cache (at ``kv_ready`` their full pages join it,
PrefixCacheManager.adopt); admission leaves the pages that this
step's decodes need, so a new seq never pushes out an older running one.
Free pages (``free_pages``, what the router sees) = free list + evictable
cache pages.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.page_allocator import PageAllocator
from engine.prefix_cache_manager import PageCopy, PrefixCacheManager
from engine.sequence import PENDING, FinishReason, Sequence, SequenceStatus, pages_needed

S = SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int = 16
    num_pages: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192   # cap on prefill tokens per step (one seq always allowed),
    #                                      decode tokens included with DecodeScheduler.decode_in_budget
    max_model_len: int = 4096            # prompt + output tokens of one seq
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {self.num_pages}")
        # A lone seq must always fit, or a preempted one could never come back.
        if self.max_model_len > self.num_pages * self.page_size:
            raise ValueError(
                f"max_model_len={self.max_model_len} does not fit in the KV cache "
                f"({self.num_pages} pages x {self.page_size} tokens); lower max_model_len "
                f"to at most {self.num_pages * self.page_size} or give the cache more pages")


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs. The tuples hold the scheduler's live Sequence
    objects: read them (``pages``, ``all_token_ids``) before reporting results,
    never mutate them."""

    # Remote seqs admitted this step, now AWAITING_KV: start their KV transfer
    # into seq.pages (prompt positions [0, num_prompt_tokens)); call kv_ready().
    reserved: tuple[Sequence, ...] = ()
    # Local seqs, now PREFILLING: compute all_token_ids[num_computed:] from position
    # num_computed (> 0: served by the prefix cache) into seq.pages, sample one token
    # from the last position; call on_prefilled().
    prefill: tuple[Sequence, ...] = ()
    # RUNNING seqs: run last_token_id at position num_tokens - 1 (pages already
    # cover it), sample one token; call on_decoded().
    decode: tuple[Sequence, ...] = ()
    # Request ids that lost their pages this step and are WAITING again for a
    # local recompute; nothing to run for them.
    preempted: tuple[str, ...] = ()
    # Sum of len(all_token_ids) - num_computed over ``prefill`` (tokens to compute).
    num_prefill_tokens: int = 0
    # Before running ``prefill``: partially matched cache pages to copy into a
    # prefill seq's first own page (K and V, every layer).
    page_copies: tuple[PageCopy, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decode)

    @property
    def is_empty(self) -> bool:
        return not (self.reserved or self.prefill or self.decode)


class DecodeScheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator | None = None,
                 prefix_cache: PrefixCacheManager | None = None):
        """prefix_cache: serves local prefills from a radix tree over `allocator`'s pages
        (None: no prefix caching)."""
        if allocator is None:
            allocator = PageAllocator(config.num_pages) if prefix_cache is None else prefix_cache.allocator
        if allocator.num_total != config.num_pages:
            raise ValueError(f"allocator has {allocator.num_total} pages, config says {config.num_pages}")
        if prefix_cache is not None and (prefix_cache.allocator is not allocator
                                         or prefix_cache.page_size != config.page_size):
            raise ValueError("the prefix cache must use the scheduler's allocator and page size")
        self.config = config
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        # The step's decode tokens count against max_num_batched_tokens too: set by an engine
        # that runs them in the same forward as the prompts (DecodeEngine.mixed_batches).
        self.decode_in_budget = False
        self._eos = frozenset(config.eos_token_ids)
        self._waiting: deque[Sequence] = deque()
        # Admitted seqs (AWAITING_KV, PREFILLING, RUNNING) in admission order.
        self._admitted: dict[str, Sequence] = {}
        self._seqs: dict[str, Sequence] = {}   # every live seq, waiting or admitted
        self._zombies: list[tuple[Sequence, bool]] = []   # ended with a pass still queued: (seq, keep KV)
        self._next_arrival = 0
        self.num_preemptions = 0

    # ---- queries -------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(s.status is S.RUNNING for s in self._admitted.values())

    @property
    def num_awaiting_kv(self) -> int:
        return sum(s.status is S.AWAITING_KV for s in self._admitted.values())

    @property
    def num_prefilling(self) -> int:
        return sum(s.status is S.PREFILLING for s in self._admitted.values())

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._admitted)

    @property
    def free_pages(self) -> int:
        """Pages a new request could get: the free list plus evictable cache pages."""
        return self.allocator.num_free + self._evictable()

    def reset_prefix_cache(self) -> bool:
        """Drop every cache entry no seq holds (vLLM's reset_prefix_cache); True if the
        cache is empty now."""
        return self.prefix_cache is None or self.prefix_cache.reset()

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    # ---- requests in ---------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._seqs:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        if seq.status is not S.WAITING or seq.pages or seq.num_computed:
            raise ValueError(f"{seq.request_id!r} must be a fresh WAITING seq with no pages")
        if not seq.prompt_token_ids:
            raise ValueError(f"{seq.request_id!r} has an empty prompt")
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"{seq.request_id!r} has {seq.num_tokens} tokens, "
                             f"max_model_len is {self.config.max_model_len}")
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self._seqs[seq.request_id] = seq
        self._waiting.append(seq)

    # ---- one step ------------------------------------------------------
    def schedule(self, admit: bool = True) -> SchedulerOutput:
        """One step's work. admit=False: no waiting request is admitted (the engine's prefill
        lane is busy); held seqs (their prefill pass is still in its lane) are not decoded."""
        cfg = self.config
        running = [s for s in self._admitted.values()
                   if s.status is S.RUNNING and not s.final_pending and not s.held]

        # a) admission: FIFO, no overtaking, leave the pages decodes need now.
        decode_reserve = sum(self._growth(s) for s in running)
        reserved: list[Sequence] = []
        prefill: list[Sequence] = []
        copies: list[PageCopy] = []
        computing: set[tuple[int, ...]] = set()   # next_page keys of this step's prefills
        prefill_tokens = 0
        budget = cfg.max_num_batched_tokens - (len(running) if self.decode_in_budget else 0)
        while admit and self._waiting and len(self._admitted) < cfg.max_num_seqs:
            seq = self._waiting[0]
            n_tok = seq.num_tokens
            if seq.remote_kv or self.prefix_cache is None:
                n_new = n_tok
                if not seq.remote_kv and prefill and prefill_tokens + n_new > budget:
                    break
                need = pages_needed(n_tok, cfg.page_size)
                if self.free_pages - decode_reserve < need:
                    break
                seq.pages = self._alloc(need)
            else:
                plan = self.prefix_cache.plan(seq)
                if plan.next_page in computing:
                    break   # another prefill of this step computes its next page: share it next step
                if prefill and prefill_tokens + n_tok - plan.num_cached > budget:
                    break
                admitted = self.prefix_cache.admit(seq, plan, reserve=decode_reserve, drop_partial=not prefill)
                if admitted is None:
                    break
                n_new = n_tok - admitted.num_cached
                if admitted.copy is not None:
                    copies.append(admitted.copy)
                if plan.next_page is not None:
                    computing.add(plan.next_page)
            self._waiting.popleft()
            self._admitted[seq.request_id] = seq
            if seq.remote_kv:
                seq.status = S.AWAITING_KV
                reserved.append(seq)
            else:
                seq.status = S.PREFILLING
                prefill.append(seq)
                prefill_tokens += n_new

        # b) decode: oldest first; on a page shortage preempt the newest RUNNING.
        decode: list[Sequence] = []
        preempted: list[str] = []
        i = 0
        while i < len(running):
            seq = running[i]
            grow = self._growth(seq)
            while grow:
                pages = self._alloc(grow)
                if pages is not None:
                    seq.pages.extend(pages)
                    break
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is S.RUNNING:
                decode.append(seq)
            i += 1

        return SchedulerOutput(tuple(reserved), tuple(prefill), tuple(decode),
                               tuple(preempted), prefill_tokens, tuple(copies))

    # ---- results -------------------------------------------------------
    def kv_ready(self, request_id: str, first_token_id: int, cached_tokens: int = 0) -> FinishReason | None:
        """The prompt KV of an AWAITING_KV seq is in its pages and verified."""
        seq = self._expect(request_id, S.AWAITING_KV)
        if seq is None:
            return None
        seq.cached_tokens = cached_tokens
        seq.num_computed = seq.num_prompt_tokens
        if self.prefix_cache is not None:
            self.prefix_cache.adopt(seq)    # its full pages shared with same-prefix seqs from now on
        return self._append(seq, first_token_id)

    def on_prefilled(self, request_id: str, token_id: int) -> FinishReason | None:
        """The worker computed all tokens of a PREFILLING seq and sampled one."""
        seq = self._expect(request_id, S.PREFILLING)
        if seq is None:
            return None
        seq.num_computed = seq.num_tokens
        if self.prefix_cache is not None:
            self.prefix_cache.on_prefilled(seq)
        return self._append(seq, token_id)

    # ---- async scheduling: a pass is queued before the previous one's tokens are read ----
    def launched(self, seq: Sequence) -> None:
        """A pass that computes seq's KV up to its last token and samples the next one is queued
        on the device: count that KV as computed and hold a PENDING output for the token (the
        next decode of seq reads it on the device). A seq whose PENDING token is certainly its
        last (a length limit) is not decoded again."""
        if seq.status is S.PREFILLING:
            seq.num_computed = seq.num_tokens
            if self.prefix_cache is not None:
                self.prefix_cache.on_prefilled(seq)
            seq.status = S.RUNNING
        else:
            self._expect(seq.request_id, S.RUNNING)
            seq.num_computed += 1
        seq.output_token_ids.append(PENDING)
        seq.num_pending += 1
        seq.in_flight += 1
        if seq.length_limited(len(seq.output_token_ids), self.config.max_model_len) is not None:
            seq.final_pending = True

    def settle(self, seq: Sequence) -> None:
        """A queued pass that held seq was read: if seq ended meanwhile, its pages go now."""
        seq.in_flight -= 1
        if seq.in_flight == 0 and seq.status is S.FINISHED:
            for i, (z, keep) in enumerate(self._zombies):
                if z is seq:
                    del self._zombies[i]
                    self._release(seq, keep)
                    break

    def settle_all(self) -> None:
        """Nothing is queued on the device any more (an engine error): every ended seq's pages go."""
        zombies, self._zombies = self._zombies, []
        for seq, keep in zombies:
            seq.in_flight = 0
            self._release(seq, keep)
        for seq in self._seqs.values():
            seq.in_flight = 0

    def resolve(self, seq: Sequence, token_id: int) -> tuple[bool, FinishReason | None]:
        """The oldest PENDING output of seq was read back as token_id: (still live, finish).
        Not live: seq ended meanwhile (aborted, or a stop read from an earlier pass). On a
        finish, later PENDING outputs (a pass still in flight computes them for nothing) are
        dropped with their KV."""
        if self._seqs.get(seq.request_id) is not seq or seq.num_pending == 0:
            return False, None
        i = len(seq.output_token_ids) - seq.num_pending
        seq.output_token_ids[i] = token_id
        seq.num_pending -= 1
        reason = seq.stop_at(i, self._eos, self.config.max_model_len)
        if reason is not None:
            del seq.output_token_ids[i + 1:]
            seq.num_pending = 0
            seq.num_computed = min(seq.num_computed, seq.num_tokens)
            if seq.status is S.WAITING:          # preempted while its token was in flight
                self._waiting.remove(seq)
            self._finish(seq, reason)
        return True, reason

    def on_decoded(self, request_id: str, token_id: int) -> FinishReason | None:
        """The worker ran one decode step of a RUNNING seq and sampled a token."""
        seq = self._expect(request_id, S.RUNNING)
        if seq is None:
            return None
        seq.num_computed += 1
        return self._append(seq, token_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a seq in any state and free its pages. For an AWAITING_KV seq
        the caller must first stop the KV receiver writing into its pages."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        if seq.status is S.WAITING:
            self._waiting.remove(seq)
        self._finish(seq, reason)
        return True

    # ---- internals -----------------------------------------------------
    def _evictable(self) -> int:
        return self.prefix_cache.evictable_pages if self.prefix_cache is not None else 0

    def _alloc(self, n: int) -> list[int] | None:
        """n pages off the free list (evicting unlocked cache pages when it is short)."""
        if self.prefix_cache is not None:
            return self.prefix_cache.alloc(n)
        return self.allocator.alloc(n)

    def _release(self, seq: Sequence, keep: bool) -> None:
        """Give up seq's pages; keep: its computed KV may stay in the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.release(seq, keep)
        else:
            self.allocator.free(seq.pages)
        seq.pages = []

    def _growth(self, seq: Sequence) -> int:
        """Pages a RUNNING seq must add before its last token's KV is written."""
        return max(0, pages_needed(seq.num_tokens, self.config.page_size) - len(seq.pages))

    def _expect(self, request_id: str, status: SequenceStatus) -> Sequence | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None   # aborted while its step was in flight
        if seq.status is not status:
            raise ValueError(f"{request_id!r} is {seq.status.name}, expected {status.name}")
        return seq

    def _append(self, seq: Sequence, token_id: int) -> FinishReason | None:
        seq.output_token_ids.append(token_id)
        seq.status = S.RUNNING
        reason = seq.check_stop(self._eos, self.config.max_model_len)
        if reason is not None:
            self._finish(seq, reason)
        return reason

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq, keep=True)   # RUNNING: KV of num_computed tokens is in its pages
        seq.num_computed = 0
        seq.remote_kv = False
        seq.status = S.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        del self._admitted[seq.request_id]
        self._waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        # A PREFILLING seq's own pages hold no KV yet; after an engine error trust none.
        keep = seq.status is S.RUNNING and reason is not FinishReason.ERROR
        if seq.in_flight:
            # a queued pass may still write its pages: they go (to the cache or the free list)
            # once it has been read (settle), so that nothing else, not even a KV transfer from
            # another process, can be given them before the device is done with them
            self._zombies.append((seq, keep))
        else:
            self._release(seq, keep)
        seq.status = S.FINISHED
        seq.finish_reason = reason
        self._admitted.pop(seq.request_id, None)
        del self._seqs[seq.request_id]

    def check_integrity(self) -> None:
        """Every page is free, owned by the prefix cache, or owned by exactly one live
        seq (a seq's shared pages are locked cache pages); states agree."""
        self.allocator.check_integrity()
        cache = self.prefix_cache
        owner: dict[int, str] = {}
        for seq in self._seqs.values():
            for p in seq.pages[cache.num_shared(seq) if cache else 0:]:
                assert p not in owner, f"page {p} owned by {owner[p]!r} and {seq.request_id!r}"
                assert self.allocator.is_allocated(p), f"page {p} of {seq.request_id!r} is free"
                owner[p] = seq.request_id
        cached = 0
        if cache is not None:
            cache.check_integrity(self._seqs.values())
            cached = cache.num_pages
        for seq, _ in self._zombies:         # ended while a queued pass may still write their pages
            for p in seq.pages[cache.num_shared(seq) if cache else 0:]:
                assert p not in owner, f"page {p} owned by {owner[p]!r} and {seq.request_id!r}"
                owner[p] = seq.request_id
        assert len(owner) + cached == self.allocator.num_used, (
            f"{self.allocator.num_used} pages used, {len(owner)} owned by seqs + {cached} cached: leak")
        assert len(self._waiting) + len(self._admitted) == len(self._seqs)
        ps = self.config.page_size
        for seq in self._waiting:
            assert seq.status is S.WAITING and not seq.pages and seq.num_computed == 0, seq
        for rid, seq in self._admitted.items():
            assert seq.request_id == rid and seq.status in (S.AWAITING_KV, S.PREFILLING, S.RUNNING), seq
            assert len(seq.pages) >= pages_needed(max(seq.num_computed, seq.num_prompt_tokens), ps), seq
        assert len(self._admitted) <= self.config.max_num_seqs
