"""Decode worker gRPC server: Decode service + KVReceiver on one port.

Generate(request) lifecycle, one coroutine per request:
  1. build a Sequence and submit it to the engine thread;
  2. remote prefill (prefill_address set): wait for the scheduler to reserve
     pages, open a KV transfer into them, call Prefill on the prefill worker,
     wait until every layer has arrived, then hand the first token to the
     engine (`kv_ready`);
  3. stream tokens as the engine produces them;
  4. `finally`: if the request did not finish (client cancelled, prefill or
     transfer failed, timeout) abort it everywhere: engine pages, the KV
     transfer and the Prefill call.

Metrics (`engine.metrics.WorkerMetrics`, served on the worker's metrics port):
engine state is read at scrape time (`metrics_snapshot`); steps and transfers
are observed through the engine's and receiver's hooks.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc

from decode_worker.engine import DecodeEngine
from engine.metrics import WorkerMetrics, WorkerSnapshot
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence
from kvtransfer.base import TransferState
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)

FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_STOP,
    FinishReason.LENGTH: pb.FINISH_LENGTH,
    FinishReason.ABORT: pb.FINISH_ABORT,
    FinishReason.ERROR: pb.FINISH_ERROR,
}


@dataclass(frozen=True)
class DecodeServerConfig:
    address: str                 # host:port this worker's gRPC server is reachable at
    kv_transfer_timeout_s: float = 120.0
    prefill_timeout_s: float = 300.0


class _Sink:
    """Receives one request's engine events on the event loop."""

    def __init__(self) -> None:
        self.reserved: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.events: asyncio.Queue[tuple[list[int], FinishReason | None, str]] = asyncio.Queue()

    def on_reserved(self, pages: list[int]) -> None:
        if not self.reserved.done():
            self.reserved.set_result(pages)

    def on_tokens(self, tokens: list[int], finish: FinishReason | None, error: str = "") -> None:
        self.events.put_nowait((tokens, finish, error))
        if finish is not None and not self.reserved.done():
            self.reserved.set_exception(RuntimeError(error or f"finished before KV: {finish.name}"))
            self.reserved.exception()  # mark retrieved: colocated requests never await it


class DecodeServicer(pbg.DecodeServicer):
    registry = None  # membership.registry.Registry (--etcd): no new work while not registered
    def __init__(self, engine: DecodeEngine, receiver, config: DecodeServerConfig,
                 metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.receiver = receiver
        self.config = config
        self._prefill_channels: dict[str, grpc.aio.Channel] = {}
        self._draining: set[asyncio.Task] = set()   # aborted requests whose pages wait for the KV writes to drain
        self.cached_prompt_tokens = 0
        self.computed_prompt_tokens = 0
        self.metrics = metrics or WorkerMetrics(role="decode", address=config.address)
        self.metrics.attach(self.metrics_snapshot, engine=engine, transport=receiver)

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

    async def Generate(self, request: pb.GenerateRequest, context):
        if self.registry is not None and not self.registry.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not registered in etcd (lease lapsed); no new work")
        rid = request.request_id or uuid.uuid4().hex
        params = SamplingParams.from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        remote = bool(request.prefill_address)
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        max_len = self.engine.scheduler.config.max_model_len
        if len(prompt) + max(params.max_tokens, 1) > max_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds "
                                f"this worker's max_model_len {max_len}")
        vocab = self.engine.runner.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token id outside [0, {vocab})")
        seq = Sequence(request_id=rid, prompt_token_ids=prompt, params=params, remote_kv=remote)
        sink = _Sink()
        self.engine.submit(seq, sink)
        finished = False
        transfer: list[str] = []  # the open KV transfer id, if any (closed in finally)
        cached = 0
        try:
            if remote:
                cached = await self._remote_prefill(rid, request, sink, transfer)
            while True:
                tokens, finish, error = await sink.events.get()
                # Coalesce whatever else is already queued into one message.
                while finish is None and not sink.events.empty():
                    more, finish, error = sink.events.get_nowait()
                    tokens = tokens + more
                if finish is not None:
                    finished = True
                yield pb.GenerateResponse(
                    request_id=rid, token_ids=tokens,
                    finish_reason=FINISH_TO_PB[finish] if finish is not None else pb.FINISH_NONE,
                    prompt_tokens=len(prompt), cached_tokens=cached if remote else seq.cached_tokens, error=error,
                )
                if finished:
                    return
        except _PrefillFailed as exc:
            yield pb.GenerateResponse(request_id=rid, finish_reason=pb.FINISH_ERROR,
                                      prompt_tokens=len(prompt), error=str(exc))
        finally:
            # Order matters: stop the receiver admitting KV, and wait until no write of an
            # unfinished transfer can still land (one-sided backends), before freeing the pages.
            undone = [tid for tid in transfer if self.receiver.poll(tid) is not TransferState.DONE]
            for tid in transfer:
                self.receiver.abort(tid)
            if undone and not finished:
                task = asyncio.get_running_loop().create_task(self._free_after_drain(rid, transfer))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                for tid in transfer:
                    self.receiver.close(tid)
                if not finished:
                    self.engine.abort(rid)

    async def _free_after_drain(self, rid: str, transfers: list[str]) -> None:
        try:
            for tid in transfers:
                await self.receiver.drained(tid)
        finally:
            for tid in transfers:
                self.receiver.close(tid)
            self.engine.abort(rid)

    async def _remote_prefill(self, rid: str, request: pb.GenerateRequest, sink: _Sink,
                              transfer: list[str]) -> int:
        """Reserve, open a transfer, run the remote prefill, wait for all KV; returns cached tokens."""
        try:
            pages = await sink.reserved
        except RuntimeError as exc:
            raise _PrefillFailed(str(exc)) from exc
        transfer_id = uuid.uuid4().hex
        dst = self.receiver.open(transfer_id, pages, self.engine.runner.model_config.num_layers)
        transfer.append(transfer_id)
        try:
            resp = await self._prefill_stub(request.prefill_address).Prefill(
                pb.PrefillRequest(request_id=rid, prompt_token_ids=request.prompt_token_ids,
                                  sampling=request.sampling, dst=dst.to_proto()),
                timeout=self.config.prefill_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _PrefillFailed(f"prefill worker {request.prefill_address} failed: "
                                 f"{exc.code().name}: {exc.details()}") from exc
        state = await self.receiver.wait(transfer_id, self.config.kv_transfer_timeout_s)
        if not state.terminal:
            self.metrics.transfer_failed("timeout")
        if state != TransferState.DONE:
            raise _PrefillFailed(f"KV transfer {transfer_id} ended in state {state.name}: "
                                 f"{self.receiver.error(transfer_id)}")
        self.cached_prompt_tokens += resp.cached_tokens
        self.computed_prompt_tokens += resp.computed_tokens
        self.engine.kv_ready(rid, resp.first_token_id, resp.cached_tokens)
        return resp.cached_tokens

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.engine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        # prompt tokens of this worker's requests: remote prefills' counts + local prefills
        st = self.engine.stats()
        return pb.StatsResponse(
            role="decode", num_pages=st["num_pages"], free_pages=st["free_pages"],
            page_size=st["page_size"], running=st["running"], waiting=st["waiting"],
            cached_prompt_tokens=self.cached_prompt_tokens + self.engine.counters.prefill_cached_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens + self.engine.counters.prefilled_tokens,
            active_transfers=self.receiver.active_transfers,
        )


class _PrefillFailed(Exception):
    pass
