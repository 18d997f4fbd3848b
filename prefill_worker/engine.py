"""The prefill worker's engine thread: reuse cached prefixes, batch prompts, compute KV, ship it.

Per request (driven by prefill_worker/server.py):
  1. `submit(job)`: queued until local pages for its uncached suffix are free.
  2. `step()` takes every queued job that fits (pages, token budget, at most
     max_num_seqs prompts, the batch the runner's memory profile covers), in order; a job
     whose next uncached full page another job of the batch computes (n samples of one
     request, prompts sharing a prefix) ends the batch and runs in the next one, from the
     cache (`counters.deferred_shared`). For each:
     match the prompt (minus its last token, which is always recomputed for
     logits) in the radix cache and lock the path; allocate pages for the rest,
     evicting unlocked LRU cache leaves when the pool is short; copy the valid
     slots of a partially matched page into the job's own page. One batched
     forward pass computes only the uncached suffixes; after each layer every
     page of each prompt (cached and new) goes to the job's KV sender
     (layer-by-layer streaming while later layers compute).
  3. The first token is sampled here. Right after the pass (the sender got
     copies of the page contents) each job unlocks its path and inserts its
     prompt pages into the cache, which adopts them or frees duplicates; a
     failed pass frees the job's own pages instead.
  4. `abort(request_id)` drops a queued job; a job already computed has its
     sender aborted by the server.
Logprobs: with params.logprobs >= 0 the first token's TokenLogprob is left in
`job.first_logprob`, with params.prompt_logprobs >= 0 the prompt's in `job.prompt_logprobs`
(computed from the pass's hidden states; such a job never takes a cache match, so every
position is computed), both set before `on_done` is called.
Structured output (params.grammar): the first token is sampled under the grammar (the
server compiled it against the vocabulary before queueing; INVALID_ARGUMENT otherwise); a
migrated request's earlier outputs (the end of its prompt) are replayed first. The matcher
lives for that one token (released with the penalty state).
Sending straight from the pool (`pool_send`, when the KV sender registered this pool): no
per-layer copies; after the pass each job's sender gets one `send_pool(page_table)` with an
event marking the end of the pass, and the job keeps its pages until the server says the
transfer ended (`transfer_ended(job)`): its prompt is inserted into the cache at once (so
later prompts match it) with the path locked, and duplicate pages the cache did not adopt
are freed only then.

Cache events (for the router's cache-aware placement): `subscribe_cache_events(cb)`
runs on the engine thread, so the snapshot and the live changes after it neither
overlap nor leave a gap: cb gets ("reset", []), ("insert", <every cached full
page>), then each ("insert" | "evict", hashes) as the radix tree changes, always
on the event loop and in order. `unsubscribe_cache_events(cb)` stops them.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.errors import classify_step_error
from engine.logprobs import TokenLogprob, prompt_logprobs, unpack
from engine.page_allocator import PageAllocator
from engine.runner import ForwardSeq, ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.worker_thread import EngineThread
from engine.radix_cache import MatchResult, RadixCache

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # called on the engine thread after each layer: (layer, k_pages, v_pages)
    send_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None

    # called on the event loop: (first_token, cached_tokens, computed_tokens, error)
    on_done: Callable[[int, int, int, str], None]
    output_offset: int = 0                               # the first token's output index (migrated requests)
    # with pool_send: (page_table, num_layers, ready event, on_written) once the pass is done
    send_pool: Callable[[list[int], int, object, Callable], None] | None = None
    # set while the job is in a batch (engine thread only):
    match: MatchResult | None = None                     # locked cache match
    own_pages: list[int] = field(default_factory=list)   # allocated for the uncached part
    held: tuple | None = None                            # (lock handle, pages to free): until transfer_ended
    # timeline (wall clock ns): set on submit, and on the engine thread around its batch's pass
    queued_ns: int = 0
    start_ns: int = 0
    end_ns: int = 0
    # set on the engine thread before on_done, when the params ask for them (engine/logprobs.py)
    first_logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        """No outputs yet (the sampler's TokenSource: a migrated request's are in its prompt)."""
        return ()

    @property
    def cached_tokens(self) -> int:
        return self.match.num_tokens if self.match else 0

    @property
    def page_table(self) -> list[int]:
        return list(self.match.pages if self.match else ()) + self.own_pages


@dataclass
class PrefillCounters:
    cached_prompt_tokens: int = 0    # prompt tokens whose KV came from the prefix cache
    computed_prompt_tokens: int = 0  # prompt tokens run through the model
    batches: int = 0
    deferred_shared: int = 0         # prompts left for the next batch: one in the batch computes their next page


class _Countdown:
    """Wait (one thread) until `down()` was called n times (from any thread), or a timeout."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._cond = threading.Condition()

    def down(self, _error=None) -> None:
        with self._cond:
            self.n -= 1
            self._cond.notify()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.n <= 0, timeout)


class PrefillEngine(EngineThread):
    def __init__(self, runner: ModelRunner, sampler: Sampler, loop, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256) -> None:
        super().__init__(loop, name="prefill-engine")
        self.enable_prefix_caching = enable_prefix_caching  # False: nothing is matched or inserted
        self.runner = runner
        self.sampler = sampler
        if getattr(sampler, "grammar", False) is None:   # structured output: the first token obeys it
            from engine.grammar import lazy_grammar_for
            sampler.grammar = lazy_grammar_for(runner)
        self.allocator = PageAllocator(runner.num_pages)
        self.cache = RadixCache(self.allocator, runner.page_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs      # prompts per batch: bounds the logits (memory profile)
        self.counters = PrefillCounters()
        self.pool_send = False          # set once the KV sender bound this pool (send_pool)
        self._held = 0                  # jobs whose pages wait for their transfer to end
        self.gpu_turn = None            # engine/gpu_turn.GpuTurn when a decode worker shares the GPU
        self.write_wait_s = 1.0         # with gpu_turn: longest the turn waits for a batch's WRITEs
        self._queue: deque[PrefillJob] = deque()
        self._cache_subscribers: list[Callable[[str, list[int]], None]] = []  # engine thread only

    # -- cache events (see the module docstring) ------------------------------
    def subscribe_cache_events(self, callback: Callable[[str, list[int]], None]) -> None:
        self.post(self._subscribe, callback)

    def unsubscribe_cache_events(self, callback: Callable[[str, list[int]], None]) -> None:
        self.post(self._unsubscribe, callback)

    def _subscribe(self, callback: Callable[[str, list[int]], None]) -> None:
        self.reply(callback, "reset", [])
        snapshot = self.cache.full_page_hashes()
        if snapshot:
            self.reply(callback, "insert", snapshot)
        self._cache_subscribers.append(callback)
        self.cache.listener = self._on_cache_event  # hashes are computed only while someone listens

    def _unsubscribe(self, callback: Callable[[str, list[int]], None]) -> None:
        self._cache_subscribers = [c for c in self._cache_subscribers if c is not callback]
        if not self._cache_subscribers:
            self.cache.listener = None

    def _on_cache_event(self, kind: str, hashes: list[int]) -> None:
        for callback in self._cache_subscribers:
            self.reply(callback, kind, hashes)

    def submit(self, job: PrefillJob) -> None:
        job.queued_ns = time.time_ns()
        self.post(self._enqueue, job)   # self._queue is read when the command runs, never bound early

    def abort(self, request_id: str) -> None:
        self.post(self._abort, request_id)

    def _enqueue(self, job: PrefillJob) -> None:
        self._queue.append(job)

    def _abort(self, request_id: str) -> None:
        # in place: the queue object is never replaced (a job submitted while an abort waited
        # in the inbox once landed in a discarded deque and never ran)
        kept = [j for j in self._queue if j.request_id != request_id]
        if len(kept) != len(self._queue):
            self._queue.clear()
            self._queue.extend(kept)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def available_pages(self) -> int:
        """Pages a new prompt could get: free ones plus unlocked cache pages."""
        return self.allocator.num_free + self.cache.evictable_pages

    def has_work(self) -> bool:
        return bool(self._queue)

    def _admit(self, job: PrefillJob, use_cache: bool = True) -> bool:
        """Match and lock the job's cached prefix, allocate pages for the rest (evicting
        if short) and copy a partially matched page. False (nothing held) if no pages."""
        prompt = job.prompt_token_ids
        page_size = self.runner.page_size
        # the last prompt token is always computed: its logits give the first token
        # prompt logprobs need every position computed: no match
        m = self.cache.match_prefix(prompt[:-1] if use_cache and job.params.prompt_logprobs < 0 else ())
        self.cache.lock(m.handle)
        need = -(-len(prompt) // page_size) - len(m.pages)
        if self.allocator.num_free < need:
            self.cache.evict(need - self.allocator.num_free)
        pages = self.allocator.alloc(need)
        if pages is None:
            self.cache.unlock(m.handle)
            return False
        job.match, job.own_pages = m, pages
        if m.partial_page is not None:
            kv, r = self.runner.kv, m.partial_len
            for layer in range(kv.num_layers):
                kv.k[layer][pages[0], :r] = kv.k[layer][m.partial_page, :r]
                kv.v[layer][pages[0], :r] = kv.v[layer][m.partial_page, :r]
        return True

    def _release(self, job: PrefillJob, insert: bool) -> None:
        """Unlock the job's path; hand its pages to the cache (or free them on failure)."""
        if job.match is None:
            return
        self.cache.unlock(job.match.handle)
        if insert:
            self.cache.insert(job.prompt_token_ids, job.page_table)
        else:
            self.allocator.free(job.own_pages)
        job.match, job.own_pages = None, []

    def _hold(self, job: PrefillJob) -> None:
        """After a pass whose KV is sent from the pool: cache the prompt now, but keep every page
        of its page table (the locked path, and duplicates the cache did not adopt) until
        `transfer_ended`."""
        if job.match is None:
            return
        self.cache.unlock(job.match.handle)
        if self.enable_prefix_caching:
            dups = self.cache.insert(job.prompt_token_ids, job.page_table, free_duplicates=False).duplicates
            m = self.cache.match_prefix(job.prompt_token_ids)
            self.cache.lock(m.handle)
            job.held = (m.handle, list(dups))
        else:
            job.held = (None, job.own_pages)
        self._held += 1
        job.match, job.own_pages = None, []

    def transfer_ended(self, job: PrefillJob) -> None:
        """The job's KV transfer is over (whatever the outcome): its pages may change again."""
        self.post(self._unhold, job)

    def _unhold(self, job: PrefillJob) -> None:
        if job.held is None:
            return
        handle, pages = job.held
        job.held = None
        self._held -= 1
        if handle is not None:
            self.cache.unlock(handle)
        if pages:
            self.allocator.free(pages)

    def _take_batch(self) -> list[PrefillJob]:
        batch: list[PrefillJob] = []
        tokens = 0
        computing: set[tuple[int, ...]] = set()    # next uncached full page of each batched prompt
        while self._queue and len(batch) < self.max_num_seqs:
            job = self._queue[0]
            n = len(job.prompt_token_ids)
            if not self._admit(job, use_cache=self.enable_prefix_caching):
                if batch or self._held:
                    break   # pages come back as batches / transfers end (each one wakes us)
                # nothing else holds pages now: empty the cache and try without reuse
                self.cache.evict(self.cache.num_pages)
                if not self._admit(job, use_cache=False):
                    self._queue.popleft()
                    self.reply(job.on_done, -1, 0, 0, f"prompt of {n} tokens exceeds the prefill KV pool")
                    continue
            key = self._next_page(job)
            if batch and key in computing and job.params.prompt_logprobs < 0:
                # a prompt of this batch computes the page this one would compute next (the
                # samples of one request, a burst of prompts sharing a prefix): it waits for the
                # next step and takes that page from the cache, as the decode scheduler does
                self._release(job, insert=False)
                self.counters.deferred_shared += 1
                break
            if batch and tokens + n - job.cached_tokens > self.max_num_batched_tokens:
                self._release(job, insert=False)  # over the token budget: next step
                break
            batch.append(self._queue.popleft())
            tokens += n - job.cached_tokens
            if key is not None:
                computing.add(key)
        return batch

    def _next_page(self, job: PrefillJob) -> tuple[int, ...] | None:
        """The prompt through the first full page it computes itself (None: it computes no full
        page, or nothing it computes can be shared: caching is off)."""
        if not self.enable_prefix_caching or job.match is None:
            return None
        if job.match.num_tokens >= len(job.prompt_token_ids) - 1:
            return None     # it computes its last token only (the match stops there by rule)
        end = (len(job.match.pages) + 1) * self.runner.page_size
        return tuple(job.prompt_token_ids[:end]) if end <= len(job.prompt_token_ids) else None

    def _logprobs(self, batch: list[PrefillJob], tokens: list[int], sampled, hidden) -> None:
        """Leave each job's first-token and prompt logprobs on it (see the module docstring)."""
        if sampled.lp_rows:
            for job, e in zip(batch, sampled.entries(tokens, sampled.logprobs.tolist())):
                job.first_logprob = e
        for i, h in (hidden or {}).items():
            job, k = batch[i], batch[i].params.prompt_logprobs
            packed = prompt_logprobs(self.runner.model.compute_logits, h, job.prompt_token_ids, k)
            ids = job.prompt_token_ids[1:]
            job.prompt_logprobs = tuple(unpack(packed.tolist(), ids, [k] * len(ids)))

    def step(self) -> bool:
        batch = self._take_batch()
        if not batch:
            return False  # nothing fits now; sleep until the next command
        ok = False
        start_ns = time.time_ns()
        for job in batch:
            job.start_ns = start_ns
        from_pool = self.pool_send and all(j.send_pool is not None for j in batch)
        try:
            seqs = [ForwardSeq(token_ids=j.prompt_token_ids[j.cached_tokens:], start_pos=j.cached_tokens,
                               page_table=j.page_table) for j in batch]
            kv = self.runner.kv
            layer_done = None
            if not from_pool:
                index = [torch.tensor(s.page_table, dtype=torch.long, device=kv.k[0].device) for s in seqs]

                def copy_layer(layer: int) -> None:
                    for job, idx in zip(batch, index):
                        job.send_layer(layer, kv.k[layer].index_select(0, idx), kv.v[layer].index_select(0, idx))
                layer_done = copy_layer

            # On a GPU shared with a decode worker the turn covers the pass, its sampling sync and
            # (pool sends) the batch's WRITEs: copies left to run under the decode worker's turn
            # crawl through the device's time slices (H200 trace: KV landed 0.4-1.6 s after the pass).
            written = _Countdown(len(batch) if from_pool and self.gpu_turn is not None else 0)
            hidden = {i: None for i, j in enumerate(batch) if j.params.prompt_logprobs >= 0} or None
            with self.gpu_turn or contextlib.nullcontext():
                logits = self.runner.forward(seqs, on_layer_done=layer_done, hidden_out=hidden)
                if from_pool:   # one WRITE per job, posted once the device finished the pass
                    ready = None
                    if kv.k[0].is_cuda:
                        ready = torch.cuda.Event()
                        ready.record(torch.cuda.current_stream(kv.k[0].device))
                    for job in batch:
                        job.send_pool(job.page_table, kv.num_layers, ready, written.down if written.n else None)
                sampled = self.sampler.run(logits, [j.params for j in batch], [j.output_offset for j in batch], batch)
                for job in batch:
                    self.sampler.release(job.request_id)     # penalty state lives for one token here
                tokens = sampled.tokens.tolist()
                self._logprobs(batch, tokens, sampled, hidden)
                written.wait(self.write_wait_s)
            end_ns = time.time_ns()
            for job in batch:
                job.end_ns = end_ns
            ok = True
            self.counters.batches += 1
            for job, tok in zip(batch, tokens):
                n, cached = len(job.prompt_token_ids), job.cached_tokens
                self.counters.cached_prompt_tokens += cached
                self.counters.computed_prompt_tokens += n - cached
                self.reply(job.on_done, tok, cached, n - cached, "")
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the worker
            log.exception("prefill batch failed")
            err = classify_step_error(exc, "prefill", len(batch),
                                      sum(len(j.prompt_token_ids) - j.cached_tokens for j in batch))
            for job in batch:
                self.reply(job.on_done, -1, 0, 0, f"prefill failed: {err.message}")
        finally:
            for job in batch:
                if ok and from_pool:
                    self._hold(job)
                else:
                    self._release(job, insert=ok and self.enable_prefix_caching)
        return True
