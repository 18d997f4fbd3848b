"""In-process colocated engine for the benchmark: DecodeScheduler + ModelRunner + Sampler.

Same path as decode_worker/engine.py (local prefill, then decode steps; one
prefill forward and one decode forward per step, prefill first), driven
synchronously with every request submitted at t=0 (offline, as DESIGN.md's
vLLM numbers). Adds a page-granular prefix cache (`PrefixCache`): full prompt
pages are keyed by a hash chain of their tokens; a new prompt whose leading
pages are cached gets their K/V copied (device to device, all layers, one
index_copy per layer) into its own pages and computes only the suffix. Cached
pages live in pages taken from the scheduler's allocator, within a budget, LRU.
A prompt whose next uncached page is being computed by another prompt in the
same step waits one step so that it can reuse it.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from benchmarks.metrics import ModelCost, RequestTrace, RunResult
from benchmarks.workloads import Workload
from engine.page_allocator import PageAllocator
from engine.runner import ForwardSeq, ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import DecodeScheduler, SchedulerConfig
from engine.sequence import Sequence


class PrefixCache:
    def __init__(self, runner: ModelRunner, allocator: PageAllocator, max_pages: int, reserve: int):
        self.runner, self.alloc, self.max_pages = runner, allocator, max_pages
        self.reserve = reserve          # free pages left to the scheduler's decode growth
        self.ps = runner.page_size
        self.pages: OrderedDict[int, int] = OrderedDict()   # chain key -> cache page (LRU first)

    def keys(self, tokens: list[int]) -> list[int]:
        out, h = [], 0
        for i in range(len(tokens) // self.ps):
            h = hash((h, tuple(tokens[i * self.ps:(i + 1) * self.ps])))
            out.append(h)
        return out

    def match(self, keys: list[int], limit: int) -> list[int]:
        """Cache pages of the longest cached leading run of `keys` (at most `limit`)."""
        hit = []
        for k in keys[:limit]:
            p = self.pages.get(k)
            if p is None:
                break
            hit.append(k)
        for k in reversed(hit):          # parents end up most recent: children evicted first
            self.pages.move_to_end(k)
        return [self.pages[k] for k in hit]

    def peek(self, tokens: list[int]) -> int:
        """Tokens of `tokens` a prefill would take from the cache (no LRU update)."""
        n = 0
        for k in self.keys(tokens)[:(len(tokens) - 1) // self.ps]:
            if k not in self.pages:
                break
            n += 1
        return n * self.ps

    def insert(self, keys: list[int], seq_pages: list[int]) -> tuple[list[int], list[int]]:
        """Adopt copies of the given pages; returns (src, dst) page lists to copy."""
        src, dst = [], []
        for k, sp in zip(keys, seq_pages):
            if k in self.pages:
                continue
            while len(self.pages) >= self.max_pages or self.alloc.num_free <= self.reserve:
                if not self.pages:
                    return src, dst
                _, old = self.pages.popitem(last=False)
                self.alloc.free([old])
            p = self.alloc.alloc(1)
            if p is None:
                break
            self.pages[k] = p[0]
            src.append(sp)
            dst.append(p[0])
        return src, dst

    def copy(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        dev = self.runner.kv.k[0].device
        s = torch.tensor(src, dtype=torch.long).to(dev, non_blocking=True)
        d = torch.tensor(dst, dtype=torch.long).to(dev, non_blocking=True)
        for k, v in zip(self.runner.kv.k, self.runner.kv.v):
            k.index_copy_(0, d, k.index_select(0, s))
            v.index_copy_(0, d, v.index_select(0, s))


class ColocatedBench:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_cache_pages: int, max_model_len: int):
        self.runner = runner
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache_pages = prefix_cache_pages
        self.max_model_len = max_model_len
        self.cost = ModelCost.of(runner.model_config, runner.kv.k[0].element_size())
        self.sync = (torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None))

    def run(self, wl: Workload, num_requests: int | None = None) -> RunResult:
        r = self.runner
        alloc = PageAllocator(r.num_pages)
        cache = PrefixCache(r, alloc, self.prefix_cache_pages, self.max_num_seqs) if self.prefix_cache_pages else None
        sched = DecodeScheduler(SchedulerConfig(
            page_size=r.page_size, num_pages=r.num_pages, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            eos_token_ids=tuple(r.model_config.eos_token_ids)), alloc,
            cached_prefix=(lambda seq: cache.peek(seq.prompt_token_ids)) if cache is not None else None)
        sampler = Sampler(0)
        params = SamplingParams(temperature=0.0, max_tokens=wl.output_len, ignore_eos=True)
        prompts = wl.prompts(num_requests)
        traces: dict[str, RequestTrace] = {}
        self.sync()
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            sched.add(Sequence(request_id=str(i), prompt_token_ids=p, params=params))
            traces[str(i)] = RequestTrace(prompt_len=len(p), t_submit=t0)
        res = RunResult("colocated", wl.name, len(prompts), 0.0, list(traces.values()))
        pending: list[Sequence] = []    # admitted (PREFILLING), waiting for a cached prefix
        while sched.has_work:
            out = sched.schedule()
            pending.extend(out.prefill)
            if pending:
                pending = self._prefill(pending, sched, cache, sampler, traces, res)
            if out.decode:
                self._decode(list(out.decode), sched, sampler, traces, res)
        res.wall_s = time.perf_counter() - t0
        res.extra["preemptions"] = sched.num_preemptions
        if cache is not None:
            alloc.free(list(cache.pages.values()))
        return res

    def _prefill(self, seqs, sched, cache, sampler, traces, res) -> list[Sequence]:
        t = time.perf_counter()
        run, defer, batch, starts = [], [], [], []
        inflight: set[int] = set()
        src, dst, ins = [], [], []
        ps = self.runner.page_size
        for s in seqs:
            start, keys = 0, []
            if cache is not None:
                keys = cache.keys(s.prompt_token_ids)
                limit = (s.num_prompt_tokens - 1) // ps      # keep >= 1 token to compute
                hit = cache.match(keys, limit)
                if len(hit) < limit and keys[len(hit)] in inflight:
                    defer.append(s)
                    continue
                start = len(hit) * ps
                src += hit
                dst += s.pages[:len(hit)]
                inflight.update(keys[len(hit):])
                ins.append((keys, s))
            run.append(s)
            starts.append(start)
            batch.append(ForwardSeq(token_ids=s.all_token_ids[start:], start_pos=start, page_table=s.pages))
        if not run:
            return defer
        if cache is not None:
            cache.copy(src, dst)
        logits = self.runner.forward(batch)
        toks = sampler.sample(logits, [s.params for s in run], [len(s.output_token_ids) for s in run])
        if cache is not None:     # after the pass: the pages now hold the prompt KV
            s2, d2 = [], []
            for keys, s in ins:
                a, b = cache.insert(keys, s.pages)
                s2 += a
                d2 += b
            cache.copy(s2, d2)
        self.sync()
        now = time.perf_counter()
        res.prefill_time_s += now - t
        for s, fs, start, tok in zip(run, batch, starts, toks):
            res.prefill_flops += self.cost.prefill_flops(start, len(fs.token_ids))
            tr = traces[s.request_id]
            tr.cached_tokens = start
            tr.token(now)
            sched.on_prefilled(s.request_id, tok)
        return defer

    def _decode(self, seqs, sched, sampler, traces, res) -> None:
        t = time.perf_counter()
        batch = [ForwardSeq(token_ids=(s.last_token_id,), start_pos=s.num_tokens - 1, page_table=s.pages)
                 for s in seqs]
        logits = self.runner.forward(batch)
        toks = sampler.sample(logits, [s.params for s in seqs], [len(s.output_token_ids) for s in seqs])
        now = time.perf_counter()    # sample() ends in the step's one device->host copy
        res.decode_time_s += now - t
        res.decode_bytes += self.cost.decode_step_bytes(sum(s.num_tokens for s in seqs))
        for s, tok in zip(seqs, toks):
            traces[s.request_id].token(now)
            sched.on_decoded(s.request_id, tok)
