"""Prefill worker gRPC server.

Prefill(request) lifecycle, one coroutine per request:
  1. start a KV sender towards request.dst (the decode worker's reservation);
  2. submit a PrefillJob to the engine thread; its per-layer callback queues
     each computed layer on the sender (from the engine thread, through the
     event loop);
  3. once the pass is done and the sender has delivered every layer, answer
     with the first token;
  4. if the caller cancels (decode aborted) or anything fails, drop the job
     and abort the sender so no late chunk lands in freed pages.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from engine.sampling_params import SamplingParams
from kvtransfer.base import TransferState
from prefill_worker.engine import PrefillEngine, PrefillJob
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


class PrefillServicer(pbg.PrefillServicer):
    def __init__(self, engine: PrefillEngine, sender, kv_send_timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.sender = sender
        self.kv_send_timeout_s = kv_send_timeout_s
        self._loop = asyncio.get_event_loop()

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        runner = self.engine.runner
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
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
                         send_layer=handle.send_layer, on_done=on_done)  # thread-safe
        self.engine.submit(job)
        ok = False
        try:
            tok, cached, computed, error = await done
            if error:
                await context.abort(grpc.StatusCode.INTERNAL, error)
            handle.finish()
            state = await handle.wait(self.kv_send_timeout_s)
            if state != TransferState.DONE:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer ended in state {state.name}")
            ok = True
            return pb.PrefillResponse(request_id=request.request_id, first_token_id=tok,
                                      cached_tokens=cached, computed_tokens=computed)
        finally:
            if not ok:
                self.engine.abort(request.request_id)
                handle.abort()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.engine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        e = self.engine
        # free_pages counts unlocked prefix-cache pages too: a new prompt can have them
        return pb.StatsResponse(
            role="prefill", num_pages=e.allocator.num_total, free_pages=e.available_pages,
            page_size=e.runner.page_size, running=0, waiting=e.num_waiting,
            cached_prompt_tokens=e.counters.cached_prompt_tokens,
            computed_prompt_tokens=e.counters.computed_prompt_tokens,
        )
