"""The prefill worker's engine thread: batch prompts, compute KV, ship it.

Per request (driven by prefill_worker/server.py):
  1. `submit(job)`: queued until local pages for its prompt are free.
  2. `step()` takes every queued job that fits (pages, token budget), runs one
     batched forward pass, and after each layer hands that layer's pages to
     the job's KV sender (layer-by-layer streaming while later layers compute).
  3. The first token is sampled here; local pages are freed right after the
     pass (the sender got copies of the page contents).
  4. `abort(request_id)` drops a queued job; a job already computed has its
     sender aborted by the server.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.page_allocator import PageAllocator
from engine.runner import ForwardSeq, ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.worker_thread import EngineThread

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # called on the engine thread after each layer: (layer, k_pages, v_pages)
    send_layer: Callable[[int, torch.Tensor, torch.Tensor], None]
    # called on the event loop: (first_token, cached_tokens, computed_tokens, error)
    on_done: Callable[[int, int, int, str], None]
    pages: list[int] = field(default_factory=list)


@dataclass
class PrefillCounters:
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    batches: int = 0


class PrefillEngine(EngineThread):
    def __init__(self, runner: ModelRunner, sampler: Sampler, loop, max_num_batched_tokens: int = 8192) -> None:
        super().__init__(loop, name="prefill-engine")
        self.runner = runner
        self.sampler = sampler
        self.allocator = PageAllocator(runner.num_pages)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.counters = PrefillCounters()
        self._queue: deque[PrefillJob] = deque()

    def submit(self, job: PrefillJob) -> None:
        self.post(self._queue.append, job)

    def abort(self, request_id: str) -> None:
        self.post(self._abort, request_id)

    def _abort(self, request_id: str) -> None:
        self._queue = deque(j for j in self._queue if j.request_id != request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue)

    def _take_batch(self) -> list[PrefillJob]:
        batch: list[PrefillJob] = []
        tokens = 0
        page_size = self.runner.page_size
        while self._queue:
            job = self._queue[0]
            n = len(job.prompt_token_ids)
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            pages = self.allocator.alloc(-(-n // page_size))
            if pages is None:
                if not batch and self.allocator.num_used == 0:
                    # can never fit: fail it rather than wait forever
                    self._queue.popleft()
                    self.reply(job.on_done, -1, 0, 0, f"prompt of {n} tokens exceeds the prefill KV pool")
                    continue
                break
            job.pages = pages
            batch.append(self._queue.popleft())
            tokens += n
        return batch

    def step(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        try:
            seqs = [ForwardSeq(token_ids=j.prompt_token_ids, start_pos=0, page_table=j.pages) for j in batch]
            kv = self.runner.kv
            index = [torch.tensor(j.pages, dtype=torch.long, device=kv.k[0].device) for j in batch]

            def layer_done(layer: int) -> None:
                for job, idx in zip(batch, index):
                    job.send_layer(layer, kv.k[layer].index_select(0, idx), kv.v[layer].index_select(0, idx))

            logits = self.runner.forward(seqs, on_layer_done=layer_done)
            tokens = self.sampler.sample(logits, [j.params for j in batch], [0] * len(batch))
            self.counters.batches += 1
            for job, tok in zip(batch, tokens):
                n = len(job.prompt_token_ids)
                self.counters.computed_prompt_tokens += n
                self.reply(job.on_done, tok, 0, n, "")
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the worker
            log.exception("prefill batch failed")
            for job in batch:
                self.reply(job.on_done, -1, 0, 0, f"prefill failed: {exc}")
        finally:
            for job in batch:
                self.allocator.free(job.pages)
                job.pages = []
