"""Decode worker gRPC server: Decode service + KVReceiver on one port.

Two RPC shapes feed one per-request lifecycle (`_Request`):
  - `Stream` (what the router uses): one call per router process carries many
    requests (StreamRequest.generate / .abort_request_id in) and, out, at most
    one StreamBatch per engine step holding every one of its requests' new
    tokens. Ending the call aborts the requests still live on it.
  - `Generate`: one call per request, its tokens streamed as GenerateResponses
    (direct clients, tests).

One request's lifecycle:
  1. validate (`_check`), build a Sequence and submit it to the engine thread
     with a sink that receives its `EngineOutput`s;
  2. remote prefill (prefill_address set), in a task of its own: wait for the
     scheduler to reserve pages, open a KV transfer into them, call Prefill
     on the prefill worker, wait until every layer has arrived, then hand the
     first token to the engine (`kv_ready`); a failure ends the request with
     FINISH_ERROR (error_kind PREFILL_FAILED: the router retries elsewhere);
  3. tokens flow from the engine's one-reply-per-step batches (`on_output`)
     to the call: Generate coalesces what queued up into one message, Stream
     appends to its call's pending batch, flushed once per engine reply;
  4. `close()`: if the request did not finish (client cancelled, prefill or
     transfer failed, timeout) abort it everywhere: engine pages, the KV
     transfer (pages freed only once its writes drained) and the Prefill call.

Metrics (`engine.metrics.WorkerMetrics`, served on the worker's metrics port):
engine state is read at scrape time (`metrics_snapshot`); steps and transfers
are observed through the engine's and receiver's hooks.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc

from decode_worker.engine import DecodeEngine, EngineOutput
from decode_worker.timeline import Timeline, TimelineRecorder
from engine.metrics import WorkerMetrics, WorkerSnapshot
from engine.sampling_params import SamplingParams
from engine.sequence import ErrorKind, FinishReason, Sequence
from kvtransfer.base import TransferState
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)

FINISH_TO_PB = {
    None: pb.FINISH_NONE,
    FinishReason.STOP: pb.FINISH_STOP,
    FinishReason.LENGTH: pb.FINISH_LENGTH,
    FinishReason.ABORT: pb.FINISH_ABORT,
    FinishReason.ERROR: pb.FINISH_ERROR,
}
ERROR_KIND_TO_PB = {
    ErrorKind.INTERNAL: pb.ERROR_INTERNAL,
    ErrorKind.INVALID_ARGUMENT: pb.ERROR_INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: pb.ERROR_RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: pb.ERROR_UNAVAILABLE,
    ErrorKind.PREFILL_FAILED: pb.ERROR_PREFILL_FAILED,
}


@dataclass(frozen=True)
class DecodeServerConfig:
    address: str                 # host:port this worker's gRPC server is reachable at
    kv_transfer_timeout_s: float = 120.0
    prefill_timeout_s: float = 300.0
    trace_file: str = ""         # append one JSON line per request timeline here ("" = off)


class _RequestError(Exception):
    def __init__(self, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.kind = kind


class _Request:
    """One request on this worker, whichever RPC carries it (see the module docstring)."""

    def __init__(self, servicer: "DecodeServicer", request: pb.GenerateRequest, deliver: "Deliver") -> None:
        self.servicer = servicer
        self.rid = request.request_id or uuid.uuid4().hex
        self.request = request
        self.prompt_len = len(request.prompt_token_ids)
        self.remote = bool(request.prefill_address)
        self.deliver = deliver            # gets every response of this request (as fields), on the loop
        self.finished = False             # the last message was sent
        self.sent_tokens = False          # a message with tokens was sent
        self.engine_done = False          # the engine finished it (and freed its pages)
        self.cached = 0
        self.transfers: list[str] = []    # the open KV transfer id, if any (closed in close())
        self.reserved: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.prefill_task: asyncio.Task | None = None
        self.on_finish: Callable[[], None] | None = None
        self.timeline = Timeline(request.received_unix_ns)

    # -- engine sink (called on the loop) -----------------------------------
    def on_reserved(self, pages: list[int]) -> None:
        self.timeline.mark("reserved")
        if not self.reserved.done():
            self.reserved.set_result(pages)

    def on_output(self, out: EngineOutput) -> None:
        if out.finish is not None:
            self.engine_done = True
        if self.finished:
            return
        if out.finish is not None and not self.reserved.done():
            self.reserved.set_exception(RuntimeError(out.error or f"finished before KV: {out.finish.name}"))
            self.reserved.exception()  # mark retrieved: colocated requests never await it
        self.cached = max(self.cached, out.cached_tokens)
        self._send(out.tokens, out.finish, out.error, out.error_kind)

    def fail(self, message: str, kind: ErrorKind) -> None:
        """End the request here with an error (the engine is told by close())."""
        if not self.finished:
            self._send([], FinishReason.ERROR, message, kind)

    def _send(self, tokens: list[int], finish: FinishReason | None, error: str, kind: ErrorKind) -> None:
        if tokens and not self.sent_tokens:
            self.sent_tokens = True
            self.timeline.mark("first_token")
        if finish is None:
            self.deliver(self.rid, tokens, pb.FINISH_NONE, self.prompt_len, self.cached)
            return
        self.finished = True
        if tokens:
            self.timeline.mark("last_token")
        self.servicer.timelines.finish(self.rid, self.timeline, finish.value)
        self.deliver(self.rid, tokens, FINISH_TO_PB[finish], self.prompt_len, self.cached, error,
                     ERROR_KIND_TO_PB[kind] if finish is FinishReason.ERROR else pb.ERROR_INTERNAL)
        if self.on_finish is not None:
            self.on_finish()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        s = self.servicer
        seq = Sequence(request_id=self.rid, prompt_token_ids=list(self.request.prompt_token_ids),
                       params=SamplingParams.from_proto(self.request.sampling), remote_kv=self.remote,
                       output_offset=max(0, self.request.output_offset))
        s.engine.submit(seq, self)
        if self.remote:
            self.prefill_task = asyncio.get_running_loop().create_task(self._remote_prefill())

    async def _remote_prefill(self) -> None:
        try:
            await self.servicer.remote_prefill(self)
        except _RequestError as exc:
            self.fail(str(exc), exc.kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the request fails, the worker goes on
            log.exception("remote prefill of %s failed", self.rid)
            self.fail(f"remote prefill failed: {type(exc).__name__}: {exc}", ErrorKind.INTERNAL)

    def close(self) -> None:
        """Release everything the request holds (idempotent). Order matters: stop the
        receiver admitting KV and wait until no write of an unfinished transfer can
        still land (one-sided backends) before the engine frees the pages."""
        s = self.servicer
        if not self.finished:
            s.timelines.finish(self.rid, self.timeline, "cancelled")
        task = self.prefill_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        transfers, self.transfers = self.transfers, []
        undone = [tid for tid in transfers if s.receiver.poll(tid) is not TransferState.DONE]
        for tid in transfers:
            s.receiver.abort(tid)
        if undone and not self.engine_done:
            task = asyncio.get_running_loop().create_task(s.free_after_drain(self.rid, transfers))
            s.draining.add(task)
            task.add_done_callback(s.draining.discard)
        else:
            for tid in transfers:
                s.receiver.close(tid)
            if not self.engine_done:
                s.engine.abort(self.rid)
        self.finished = self.engine_done = True


# deliver(request_id, tokens, finish_reason, prompt_tokens, cached_tokens, error="", error_kind=0)
Deliver = Callable[..., None]


def _response(rid: str, tokens: list[int], finish: int, prompt_tokens: int, cached: int, error: str = "",
              error_kind: int = pb.ERROR_INTERNAL) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=rid, token_ids=tokens, finish_reason=finish, prompt_tokens=prompt_tokens,
                               cached_tokens=cached, error=error, error_kind=error_kind)


class _StreamCall:
    """One Decode.Stream call: its live requests and the batch being filled."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests: dict[str, _Request] = {}
        self.outbox: asyncio.Queue[pb.StreamBatch | None] = asyncio.Queue()
        self._batch: pb.StreamBatch | None = None

    def deliver(self, rid: str, tokens: list[int], finish: int, prompt_tokens: int, cached: int,
                error: str = "", error_kind: int = pb.ERROR_INTERNAL) -> None:
        if self._batch is None:
            self._batch = pb.StreamBatch()
            # runs after the current callback: one engine reply (every request of the step) -> one batch
            self.loop.call_soon(self._flush)
        # built in place: no per-response message to copy into the batch
        self._batch.responses.add(request_id=rid, token_ids=tokens, finish_reason=finish,
                                  prompt_tokens=prompt_tokens, cached_tokens=cached, error=error,
                                  error_kind=error_kind)

    def _flush(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self.outbox.put_nowait(batch)


class DecodeServicer(pbg.DecodeServicer):
    registry = None  # membership.registry.Registry (--etcd): no new work while not registered

    def __init__(self, engine: DecodeEngine, receiver, config: DecodeServerConfig,
                 metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.receiver = receiver
        self.config = config
        self._prefill_channels: dict[str, grpc.aio.Channel] = {}
        self.draining: set[asyncio.Task] = set()   # aborted requests whose pages wait for the KV writes to drain
        self.live: dict[str, _Request] = {}        # requests live on this worker (either RPC)
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
            # local prefills only (colocated, recompute after preemption): a prefill worker
            # exports its own, so that a sum over workers counts each token once
            prompt_tokens_cached=c.prefill_cached_tokens,
            prompt_tokens_computed=c.prefilled_tokens,
            generated_tokens=c.decoded_tokens, preemptions=c.preemptions,
            kv_transfers_active=self.receiver.active_transfers,
            kv_transfer_bytes=getattr(self.receiver, "bytes_received", 0),
            kv_transfer_chunks=getattr(self.receiver, "chunks_received", 0),
        )

    def _prefill_stub(self, address: str) -> pbg.PrefillStub:
        ch = self._prefill_channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address)
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
            max_tokens = SamplingParams.from_proto(request.sampling).max_tokens
        except ValueError as exc:
            return ErrorKind.INVALID_ARGUMENT, str(exc)
        if len(prompt) + max(max_tokens, 1) > max_len:
            return ErrorKind.INVALID_ARGUMENT, (f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds "
                                                f"this worker's max_model_len {max_len}")
        vocab = self.engine.runner.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            return ErrorKind.INVALID_ARGUMENT, f"token id outside [0, {vocab})"
        return None

    def _begin(self, request: pb.GenerateRequest, deliver) -> _Request:
        req = _Request(self, request, deliver)
        self.live[req.rid] = req
        return req

    def _end(self, req: _Request) -> None:
        req.close()
        if self.live.get(req.rid) is req:
            del self.live[req.rid]

    # ---- Stream: many requests per call, one batch per engine step ------------

    async def Stream(self, request_iterator, context):
        call = _StreamCall()
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

    async def _read_stream(self, request_iterator, call: _StreamCall) -> None:
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

    def _stream_start(self, request: pb.GenerateRequest, call: _StreamCall) -> None:
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
        req = self._begin(request, lambda *fields: queue.put_nowait(_response(*fields)))
        try:
            req.start()
            while True:
                resp = await queue.get()
                # Coalesce whatever else is already queued into one message.
                while resp.finish_reason == pb.FINISH_NONE and not queue.empty():
                    more = queue.get_nowait()
                    more.token_ids[:0] = resp.token_ids
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

    async def remote_prefill(self, req: _Request) -> None:
        """Reserve, open a transfer, run the remote prefill, wait for all KV, admit."""
        try:
            pages = await req.reserved
        except RuntimeError as exc:
            raise _RequestError(str(exc), ErrorKind.INTERNAL) from exc
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
            raise _RequestError(f"prefill worker {request.prefill_address} failed: "
                                f"{exc.code().name}: {exc.details()}", ErrorKind.PREFILL_FAILED) from exc
        state = await self.receiver.wait(transfer_id, self.config.kv_transfer_timeout_s)
        if not state.terminal:
            self.metrics.transfer_failed("timeout")
        if state != TransferState.DONE:
            raise _RequestError(f"KV transfer {transfer_id} ended in state {state.name}: "
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
        self.engine.kv_ready(req.rid, resp.first_token_id, resp.cached_tokens)

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
        )
