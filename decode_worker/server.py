"""Decode worker gRPC server: Decode service + KVReceiver on one port.

Two RPC shapes feed one per-request lifecycle (`Request`):
  - `Stream` (what the router uses): one call per router process carries many
    requests (StreamRequest.generate / .abort_request_id in) and, out, at most
    one StreamBatch per engine step holding every one of its requests' new
    tokens. Ending the call aborts the requests still live on it.
  - `Generate`: one call per request, its tokens streamed as GenerateResponses
    (direct clients, tests).

Each request's own lifecycle (validate here, then submit, remote prefill, stream, close)
is `decode_worker/requests.py`; the servicer holds the live requests, the prefill channels,
the draining transfers and the engine-death handling.

Metrics (`engine.metrics.WorkerMetrics`, served on the worker's metrics port):
engine state is read at scrape time (`metrics_snapshot`); steps and transfers
are observed through the engine's and receiver's hooks.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from decode_worker.engine import DecodeEngine
from decode_worker.requests import (ERROR_KIND_TO_PB, RequestError, Request, response_message, StreamCall)
from decode_worker.timeline import TimelineRecorder
from engine import cluster_auth
from engine.logprobs import TokenLogprob
from engine.metrics import WorkerMetrics, WorkerSnapshot, gpu_turn_fields, runner_fallbacks
from engine.sampling_params import SamplingParams
from engine.sequence import ErrorKind, FinishReason
from kvtransfer.base import TransferState
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeServerConfig:
    address: str                 # host:port this worker's gRPC server is reachable at
    kv_transfer_timeout_s: float = 120.0
    prefill_timeout_s: float = 300.0
    trace_file: str = ""         # append one JSON line per request timeline here ("" = off)
    cluster_token: str = field(default="", repr=False)  # sent on every call to a prefill worker
                                                         # (engine/cluster_auth.py)


class DecodeServicer(pbg.DecodeServicer):
    registry = None  # membership.registry.Registry (--etcd): no new work while not registered

    def __init__(self, engine: DecodeEngine, receiver, config: DecodeServerConfig,
                 metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.receiver = receiver
        self.config = config
        self._prefill_channels: dict[str, grpc.aio.Channel] = {}
        self.draining: set[asyncio.Task] = set()   # aborted requests whose pages wait for the KV writes to drain
        self.live: dict[str, Request] = {}        # requests live on this worker (either RPC)
        self.cached_prompt_tokens = 0
        self.computed_prompt_tokens = 0
        self.metrics = metrics or WorkerMetrics(role="decode", address=config.address)
        self.metrics.attach(self.metrics_snapshot, engine=engine, transport=receiver)
        self.timelines = TimelineRecorder(self.metrics.registry, config.trace_file)
        self.dead: str = ""                        # why the engine loop died ("" = alive)
        engine.on_fatal = self.engine_died

    def metrics_snapshot(self) -> WorkerSnapshot:
        """Read at scrape time, off the event loop (see engine/metrics.py)."""
        st, c = self.engine.stats(), self.engine.counters
        return WorkerSnapshot(
            kv_pages_total=st["num_pages"], waiting_requests=st["waiting"],
            running_requests=st["running"],
            kv_pages_free=st["free_list_pages"],
            prefix_cache_pages=st["prefix_cache_pages"],
            prefix_cache_evictable_pages=st["prefix_cache_evictable_pages"],
            prefix_cache_adopted_pages=st["prefix_cache_adopted_pages"],
            **{k: st[k] for k in ("grammar_mask_rows", "grammar_mask_seconds", "grammar_compiles",
                                  "grammar_compile_seconds", "grammar_rejected_tokens",
                                  "grammar_empty_masks", "prefill_lane_sm_fraction",
                                  "decode_passes_beside_prefill", "prefill_lane_moves", "prefill_lane_passes",
                                  "prefill_lane_handover_seconds") if k in st},
            # local prefills only (colocated, recompute after preemption): a prefill worker
            # exports its own, so that a sum over workers counts each token once
            prompt_tokens_cached=c.prefill_cached_tokens,
            prompt_tokens_computed=c.prefilled_tokens,
            generated_tokens=c.decoded_tokens, preemptions=c.preemptions,
            kv_transfers_active=self.receiver.active_transfers,
            kv_transfer_bytes=getattr(self.receiver, "bytes_received", 0),
            kv_transfer_chunks=getattr(self.receiver, "chunks_received", 0),
            **gpu_turn_fields(self.engine.gpu_turn),
            fallbacks=runner_fallbacks(self.engine.runner),
        )

    def _prefill_stub(self, address: str) -> pbg.PrefillStub:
        ch = self._prefill_channels.get(address)
        if ch is None:
            ch = cluster_auth.aio_channel(address, token=self.config.cluster_token)
            self._prefill_channels[address] = ch
        return pbg.PrefillStub(ch)

    def engine_died(self, exc: BaseException) -> None:
        """The engine loop is gone (event loop): fail every open request now, refuse new ones,
        answer Stats with UNAVAILABLE (the router stops placing here) and leave etcd."""
        self.dead = f"decode engine loop died: {type(exc).__name__}: {exc}"
        log.error("%s; failing %d open requests and leaving the pool", self.dead, len(self.live))
        for req in list(self.live.values()):
            req.fail(self.dead, ErrorKind.UNAVAILABLE)
            self._end(req)
        if self.registry is not None:
            task = asyncio.get_running_loop().create_task(self.registry.stop())
            self.draining.add(task)
            task.add_done_callback(self.draining.discard)

    def _check(self, request: pb.GenerateRequest) -> tuple[ErrorKind, str] | None:
        """Why this request cannot start here, or None."""
        if self.dead:
            return ErrorKind.UNAVAILABLE, self.dead
        if self.registry is not None and not self.registry.serving:
            return ErrorKind.UNAVAILABLE, "not registered in etcd (lease lapsed); no new work"
        prompt = request.prompt_token_ids
        if not prompt:
            return ErrorKind.INVALID_ARGUMENT, "empty prompt"
        if request.request_id and request.request_id in self.live:
            return ErrorKind.INVALID_ARGUMENT, f"duplicate request id {request.request_id!r}"
        max_len = self.engine.scheduler.config.max_model_len
        try:
            params = SamplingParams.from_proto(request.sampling)
        except ValueError as exc:
            return ErrorKind.INVALID_ARGUMENT, str(exc)
        max_tokens = params.max_tokens
        if len(prompt) + max(max_tokens, 1) > max_len:
            return ErrorKind.INVALID_ARGUMENT, (f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds "
                                                f"this worker's max_model_len {max_len}")
        vocab = self.engine.runner.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            return ErrorKind.INVALID_ARGUMENT, f"token id outside [0, {vocab})"
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            return ErrorKind.INVALID_ARGUMENT, f"logit_bias token id outside [0, {vocab})"
        return None

    def _begin(self, request: pb.GenerateRequest, deliver) -> Request:
        req = Request(self, request, deliver)
        self.live[req.rid] = req
        return req

    def _end(self, req: Request) -> None:
        req.close()
        if self.live.get(req.rid) is req:
            del self.live[req.rid]

    # ---- Stream: many requests per call, one batch per engine step ------------

    async def Stream(self, request_iterator, context):
        call = StreamCall()
        reader = asyncio.get_running_loop().create_task(self._read_stream(request_iterator, call))
        try:
            while True:
                batch = await call.outbox.get()
                if batch is None:
                    return
                yield batch
        finally:
            reader.cancel()
            for req in list(call.requests.values()):
                self._end(req)
            call.requests.clear()

    async def _read_stream(self, request_iterator, call: StreamCall) -> None:
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                if kind == "generate":
                    self._stream_start(msg.generate, call)
                elif kind == "abort_request_id":
                    req = call.requests.pop(msg.abort_request_id, None)
                    if req is not None:
                        self._end(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the router went away: the writer side ends too
            log.debug("stream reader ended: %s", exc)
        # The router closed its side: finish what is live, then end the call.
        while call.requests:
            await asyncio.sleep(0.05)
        call.outbox.put_nowait(None)

    def _stream_start(self, request: pb.GenerateRequest, call: StreamCall) -> None:
        problem = self._check(request)
        if problem is not None:
            kind, message = problem
            call.deliver(request.request_id, [], pb.FINISH_ERROR, len(request.prompt_token_ids), 0, message,
                         ERROR_KIND_TO_PB[kind])
            return
        req = self._begin(request, call.deliver)

        def finished() -> None:
            if call.requests.pop(req.rid, None) is not None:
                self._end(req)

        req.on_finish = finished
        call.requests[req.rid] = req
        req.start()

    # ---- Generate: one request per call ----------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context):
        problem = self._check(request)
        if problem is not None:
            kind, message = problem
            code = {ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
                    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE}.get(kind, grpc.StatusCode.INTERNAL)
            await context.abort(code, message)
        queue: asyncio.Queue[pb.GenerateResponse] = asyncio.Queue()
        req = self._begin(request, lambda *fields: queue.put_nowait(response_message(*fields)))
        try:
            req.start()
            while True:
                resp = await queue.get()
                # Coalesce whatever else is already queued into one message.
                while resp.finish_reason == pb.FINISH_NONE and not queue.empty():
                    more = queue.get_nowait()
                    more.token_ids[:0] = resp.token_ids
                    if resp.logprobs or resp.prompt_logprobs:    # keep them aligned with token_ids
                        lps = list(resp.logprobs) + list(more.logprobs)
                        del more.logprobs[:]
                        more.logprobs.extend(lps)
                        more.prompt_logprobs.extend(resp.prompt_logprobs)
                    resp = more
                yield resp
                if resp.finish_reason != pb.FINISH_NONE:
                    return
        finally:
            self._end(req)

    # ---- remote prefill ---------------------------------------------------------

    async def free_after_drain(self, rid: str, transfers: list[str]) -> None:
        try:
            for tid in transfers:
                await self.receiver.drained(tid)
        finally:
            for tid in transfers:
                self.receiver.close(tid)
            self.engine.abort(rid)

    async def remote_prefill(self, req: Request) -> None:
        """Reserve, open a transfer, run the remote prefill, wait for all KV, admit."""
        try:
            pages = await req.reserved
        except RuntimeError as exc:
            raise RequestError(str(exc), ErrorKind.INTERNAL) from exc
        request = req.request
        transfer_id = uuid.uuid4().hex
        dst = self.receiver.open(transfer_id, pages, self.engine.runner.model_config.num_layers)
        req.transfers.append(transfer_id)
        try:
            resp = await self._prefill_stub(request.prefill_address).Prefill(
                pb.PrefillRequest(request_id=req.rid, prompt_token_ids=request.prompt_token_ids,
                                  sampling=request.sampling, dst=dst.to_proto(),
                                  output_offset=request.output_offset),
                timeout=self.config.prefill_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise RequestError(f"prefill worker {request.prefill_address} failed: "
                                f"{exc.code().name}: {exc.details()}", ErrorKind.PREFILL_FAILED) from exc
        state = await self.receiver.wait(transfer_id, self.config.kv_transfer_timeout_s)
        if not state.terminal:
            self.metrics.transfer_failed("timeout")
        if state != TransferState.DONE:
            raise RequestError(f"KV transfer {transfer_id} ended in state {state.name}: "
                                f"{self.receiver.error(transfer_id)}", ErrorKind.PREFILL_FAILED)
        self.cached_prompt_tokens += resp.cached_tokens
        self.computed_prompt_tokens += resp.computed_tokens
        req.cached = resp.cached_tokens
        tl = req.timeline
        tl.set("prefill_queued", resp.queued_unix_ns)
        tl.set("prefill_start", resp.start_unix_ns)
        tl.set("prefill_end", resp.end_unix_ns)
        first_write, done = self.receiver.timing(transfer_id)
        tl.set("kv_first_layer", first_write)
        tl.set("kv_last_layer", done)
        tl.mark("admitted")
        first = resp.first_token_id
        logprob = TokenLogprob.from_proto(resp.first_token_logprob) if resp.HasField("first_token_logprob") else None
        prompt_lp = tuple(map(TokenLogprob.from_proto, resp.prompt_logprobs)) or None
        ahead = not req.first_token_ends(first)
        if ahead:
            req.cached = resp.cached_tokens
            req.send_first_token(first, logprob, prompt_lp)
        self.engine.kv_ready(req.rid, first, resp.cached_tokens, sent=ahead, logprob=logprob, prompt_lp=prompt_lp)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        req = self.live.get(request.request_id)
        if req is None:
            return pb.AbortResponse(found=False)
        if not req.finished:
            req._send([], FinishReason.ABORT, "aborted by an Abort call", ErrorKind.INTERNAL)
        self._end(req)
        return pb.AbortResponse(found=True)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.dead)
        # prompt tokens of this worker's requests: remote prefills' counts + local prefills
        st = self.engine.stats()
        return pb.StatsResponse(
            role="decode", num_pages=st["num_pages"], free_pages=st["free_pages"],
            page_size=st["page_size"], running=st["running"], waiting=st["waiting"],
            cached_prompt_tokens=self.cached_prompt_tokens + self.engine.counters.prefill_cached_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens + self.engine.counters.prefilled_tokens,
            active_transfers=self.receiver.active_transfers,
            max_running=self.engine.scheduler.config.max_num_seqs,
            max_model_len=self.engine.scheduler.config.max_model_len,
        )
