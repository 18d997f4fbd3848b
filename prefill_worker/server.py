"""Prefill worker gRPC server.

Prefill(request) lifecycle, one coroutine per request:
  1. start a KV sender towards request.dst (the decode worker's reservation);
  2. submit a PrefillJob to the engine thread; its per-layer callback queues
     each computed layer on the sender (from the engine thread, through the
     event loop);
  3. once the pass is done and the sender has delivered every layer, answer
     with the first token;
     (and, when the request asks, the first token's logprobs and the prompt's);
  4. if the caller cancels (decode aborted) or anything fails, drop the job
     and abort the sender so no late chunk lands in freed pages.

CacheEvents() (the router subscribes once per worker): a RESET, the radix
tree's full pages as INSERTs, then INSERT/EVICT as the tree changes. Each
subscriber has a bounded queue fed on the event loop by the engine thread's
replies; a subscriber that falls behind by more than `max_pending_events`
events has its stream ended (it reconnects and gets a fresh snapshot) rather
than growing memory without bound.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from engine.metrics import WorkerMetrics, WorkerSnapshot, gpu_turn_fields, runner_fallbacks
from engine.sampling_params import SamplingParams
from kvtransfer.base import TransferState
from prefill_worker.engine import PrefillEngine, PrefillJob
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


class PrefillServicer(pbg.PrefillServicer):
    registry = None  # membership.registry.Registry (--etcd): no new work while not registered
    max_pending_events = 10_000  # per CacheEvents subscriber (see the module docstring)
    _SNAPSHOT_CHUNK = 4096        # block hashes per CacheEvent message
    _EVENT_KINDS = {"reset": pb.CacheEvent.RESET, "insert": pb.CacheEvent.INSERT, "evict": pb.CacheEvent.EVICT}

    def __init__(self, engine: PrefillEngine, sender, kv_send_timeout_s: float = 120.0,
                 metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.sender = sender
        self.kv_send_timeout_s = kv_send_timeout_s
        self._loop = asyncio.get_event_loop()
        # Prometheus metrics: engine state read at scrape time, batches and transfers via hooks.
        self.metrics = metrics or WorkerMetrics(role="prefill")
        self.metrics.attach(self.metrics_snapshot, engine=engine, transport=sender)
        self._live: dict[str, asyncio.Future] = {}   # request id -> its result future (open Prefill calls)
        self._tasks: set[asyncio.Task] = set()
        self.dead = ""                                # why the engine loop died ("" = alive)
        engine.on_fatal = self.engine_died

    def metrics_snapshot(self) -> WorkerSnapshot:
        """Read at scrape time, off the event loop (see engine/metrics.py)."""
        e = self.engine
        return WorkerSnapshot(
            kv_pages_total=e.allocator.num_total, kv_pages_free=e.allocator.num_free,
            waiting_requests=e.num_waiting,
            prompt_tokens_cached=e.counters.cached_prompt_tokens,
            prompt_tokens_computed=e.counters.computed_prompt_tokens,
            prefix_cache_pages=e.cache.num_pages, prefix_cache_evictable_pages=e.cache.evictable_pages,
            kv_transfers_active=getattr(self.sender, "active_transfers", 0),
            kv_transfer_bytes=getattr(self.sender, "bytes_streamed", 0),
            kv_transfer_chunks=getattr(self.sender, "chunks_streamed", 0),
            fallbacks=self._fallbacks() + runner_fallbacks(self.engine.runner),
            **gpu_turn_fields(self.engine.gpu_turn),
        )

    def _fallbacks(self) -> tuple[tuple[str, int], ...]:
        worker = getattr(self.sender, "_worker", None)
        if not hasattr(self.sender, "pool_bind_failed"):
            return ()
        return (("kv_pool_not_registered", int(self.sender.pool_bind_failed)),
                ("kv_write_registered_tensors", getattr(worker, "registered_writes", 0)))

    def engine_died(self, exc: BaseException) -> None:
        """The engine loop is gone (event loop): fail every waiting Prefill call now, refuse new
        ones, answer Stats with UNAVAILABLE and leave etcd."""
        self.dead = f"prefill engine loop died: {type(exc).__name__}: {exc}"
        log.error("%s; failing %d open prefills and leaving the pool", self.dead, len(self._live))
        for done in list(self._live.values()):
            if not done.done():
                done.set_result((-1, 0, 0, self.dead))
        if self.registry is not None:
            self._tasks.add(asyncio.get_running_loop().create_task(self.registry.stop()))

    def _invalid(self, request: pb.PrefillRequest) -> str:
        """Why this request must not join a batch ("" = fine): checked before it is queued, so
        a bad request fails alone instead of failing the batch it would have joined."""
        prompt, runner = request.prompt_token_ids, self.engine.runner
        if not prompt:
            return "empty prompt"
        vocab = runner.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            return f"token id outside [0, {vocab})"
        if len(prompt) > runner.max_model_len:
            return f"prompt of {len(prompt)} tokens exceeds max_model_len {runner.max_model_len}"
        if request.request_id and request.request_id in self._live:
            return f"duplicate request id {request.request_id!r}"
        try:
            params = SamplingParams.from_proto(request.sampling)
        except ValueError as exc:
            return str(exc)
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            return f"logit_bias token id outside [0, {vocab})"
        return ""

    def _grammar_problem(self, request: pb.PrefillRequest) -> str:
        from engine.grammar import GrammarError, GrammarSpec
        try:
            self.engine.sampler.grammar_runtime().compile(GrammarSpec.from_proto(request.sampling.grammar))
        except GrammarError as exc:
            return str(exc)
        return ""

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.dead)
        if self.registry is not None and not self.registry.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not registered in etcd (lease lapsed); no new work")
        prompt = list(request.prompt_token_ids)
        runner = self.engine.runner
        problem = self._invalid(request)
        if not problem and request.sampling.grammar.kind:
            # compiled against this vocabulary (cached per grammar) off the event loop: the
            # first one also loads the tokenizer
            problem = await asyncio.get_running_loop().run_in_executor(None, self._grammar_problem, request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.dst.page_size != runner.page_size:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"page size mismatch: decode {request.dst.page_size}, prefill {runner.page_size}")
        if request.dst.num_pages * request.dst.page_size < len(prompt):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination reservation too small for prompt")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, int, int, str]] = loop.create_future()
        handle = self.sender.start(request.dst)

        def on_done(tok, cached, computed, error):  # event loop
            if not done.done():
                done.set_result((tok, cached, computed, error))

        job = PrefillJob(request_id=request.request_id, prompt_token_ids=prompt,
                         params=SamplingParams.from_proto(request.sampling),
                         send_layer=handle.send_layer, on_done=on_done,  # thread-safe
                         output_offset=max(0, request.output_offset),
                         send_pool=handle.send_pool if self.engine.pool_send else None)
        key = request.request_id or str(id(done))
        self._live[key] = done
        self.engine.submit(job)
        ok = False
        try:
            tok, cached, computed, error = await done
            if error:
                await context.abort(grpc.StatusCode.UNAVAILABLE if self.dead else grpc.StatusCode.INTERNAL, error)
            handle.finish()
            state = await handle.wait(self.kv_send_timeout_s)
            if not state.terminal:
                self.metrics.transfer_failed("timeout")
            if state != TransferState.DONE:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer ended in state {state.name}")
            ok = True
            resp = pb.PrefillResponse(request_id=request.request_id, first_token_id=tok,
                                      cached_tokens=cached, computed_tokens=computed,
                                      queued_unix_ns=job.queued_ns, start_unix_ns=job.start_ns,
                                      end_unix_ns=job.end_ns)
            if job.first_logprob is not None:
                resp.first_token_logprob.CopyFrom(job.first_logprob.to_proto())
            if job.prompt_logprobs:
                resp.prompt_logprobs.extend(e.to_proto() for e in job.prompt_logprobs)
            return resp
        finally:
            if self._live.get(key) is done:
                del self._live[key]
            if not ok:
                self.engine.abort(request.request_id)
                handle.abort()
            self.engine.transfer_ended(job)    # pages it sent from the pool may change now

    async def CacheEvents(self, request: pb.CacheEventsRequest, context):
        queue: asyncio.Queue[tuple[str, list[int]] | None] = asyncio.Queue()
        overflowed = False

        def on_event(kind: str, hashes: list[int]) -> None:  # event loop, in engine order
            nonlocal overflowed
            if overflowed:
                return
            if queue.qsize() >= self.max_pending_events:
                overflowed = True
                queue.put_nowait(None)
                return
            queue.put_nowait((kind, hashes))

        self.engine.subscribe_cache_events(on_event)
        page_size = self.engine.runner.page_size
        try:
            while True:
                item = await queue.get()
                if item is None:
                    log.warning("cache event subscriber fell behind; ending its stream")
                    return
                kind, hashes = item
                for i in range(0, max(len(hashes), 1), self._SNAPSHOT_CHUNK):
                    yield pb.CacheEvent(kind=self._EVENT_KINDS[kind], page_size=page_size,
                                        block_hashes=hashes[i:i + self._SNAPSHOT_CHUNK])
        finally:
            self.engine.unsubscribe_cache_events(on_event)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        done = self._live.get(request.request_id)
        if done is None:
            return pb.AbortResponse(found=False)
        self.engine.abort(request.request_id)
        if not done.done():
            done.set_result((-1, 0, 0, "aborted by an Abort call"))
        return pb.AbortResponse(found=True)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.dead)
        e = self.engine
        # free_pages counts unlocked prefix-cache pages too: a new prompt can have them
        return pb.StatsResponse(
            role="prefill", num_pages=e.allocator.num_total, free_pages=e.available_pages,
            page_size=e.runner.page_size, running=0, waiting=e.num_waiting,
            cached_prompt_tokens=e.counters.cached_prompt_tokens,
            computed_prompt_tokens=e.counters.computed_prompt_tokens,
            max_model_len=min(e.runner.max_model_len, e.allocator.num_total * e.runner.page_size),
        )
