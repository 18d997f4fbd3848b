"""One request's life on the decode worker, whichever RPC carries it (`Request`), and the
batch a `Decode.Stream` call is filling (`StreamCall`); decode_worker/server.py drives them.

One request's lifecycle:
  1. validated by the servicer, built into a Sequence and submitted to the engine
     thread with this object as its sink (`on_reserved`, `on_output`);
  2. remote prefill (prefill_address set), in a task of its own (`servicer.remote_prefill`):
     reserve -> open a KV transfer -> Prefill on the prefill worker -> wait for every layer
     -> `kv_ready`; a failure ends the request with FINISH_ERROR (PREFILL_FAILED). The first
     token (sampled on the prefill worker) is sent from here at once when it does not end
     the request (`first_token_ends`), not with the engine's next step: that step may wait
     behind a prefill batch for the GPU (engine/gpu_turn.py), and the token is known;
  3. every EngineOutput becomes one response handed to `deliver` (Generate: its queue;
     Stream: the call's pending batch, flushed once per engine reply), its TokenLogprobs
     (when the request asked) as GenerateResponse.logprobs / prompt_logprobs;
  4. `close()`: if it did not finish, abort it everywhere (engine pages, the KV transfer,
     freed only once its writes drained, and the Prefill call). Idempotent.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Callable

from decode_worker.engine import EngineOutput
from decode_worker.timeline import Timeline
from engine.sampling_params import SamplingParams
from engine.sequence import ErrorKind, FinishReason, Sequence
from kvtransfer.base import TransferState
from proto import tandem_pb2 as pb

if TYPE_CHECKING:  # pragma: no cover
    from decode_worker.server import DecodeServicer

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


class RequestError(Exception):
    def __init__(self, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.kind = kind


class Request:
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
        self.seq: Sequence | None = None   # handed to the engine thread in start(); read here only
        #                                    for what never changes (prompt, params)

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
        self._send(out.tokens, out.finish, out.error, out.error_kind, out.logprobs, out.prompt_logprobs)

    def first_token_ends(self, token: int) -> bool:
        """Whether `token` as the first output would finish this request (EOS, a stop token, a
        length limit): the engine decides that case itself, with the same check
        (Sequence.check_stop), and sends the token with its finish."""
        cfg = self.servicer.engine.scheduler.config     # frozen
        seq = self.seq
        probe = Sequence(request_id=self.rid, prompt_token_ids=seq.prompt_token_ids, params=seq.params,
                         output_token_ids=[token])
        return probe.check_stop(frozenset(cfg.eos_token_ids), cfg.max_model_len) is not None

    def send_first_token(self, token: int, logprob=None, prompt_logprobs=None) -> None:
        """The first token, sent ahead of the engine (it does not end the request), with its
        TokenLogprob and the prompt's when the request asked for them."""
        if not self.finished:
            self._send([token], None, "", ErrorKind.INTERNAL, None if logprob is None else (logprob,),
                       prompt_logprobs)

    def fail(self, message: str, kind: ErrorKind) -> None:
        """End the request here with an error (the engine is told by close())."""
        if not self.finished:
            self._send([], FinishReason.ERROR, message, kind)

    def _send(self, tokens: list[int], finish: FinishReason | None, error: str, kind: ErrorKind,
              logprobs=None, prompt_logprobs=None) -> None:
        if tokens and not self.sent_tokens:
            self.sent_tokens = True
            self.timeline.mark("first_token")
        if finish is None:
            self.deliver(self.rid, tokens, pb.FINISH_NONE, self.prompt_len, self.cached, "", pb.ERROR_INTERNAL,
                         logprobs, prompt_logprobs)
            return
        self.finished = True
        if tokens:
            self.timeline.mark("last_token")
        self.servicer.timelines.finish(self.rid, self.timeline, finish.value)
        self.deliver(self.rid, tokens, FINISH_TO_PB[finish], self.prompt_len, self.cached, error,
                     ERROR_KIND_TO_PB[kind] if finish is FinishReason.ERROR else pb.ERROR_INTERNAL,
                     logprobs, prompt_logprobs)
        if self.on_finish is not None:
            self.on_finish()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        s = self.servicer
        seq = Sequence(request_id=self.rid, prompt_token_ids=list(self.request.prompt_token_ids),
                       params=SamplingParams.from_proto(self.request.sampling), remote_kv=self.remote,
                       output_offset=max(0, self.request.output_offset))
        self.seq = seq
        s.engine.submit(seq, self)
        if self.remote:
            self.prefill_task = asyncio.get_running_loop().create_task(self._remote_prefill())

    async def _remote_prefill(self) -> None:
        try:
            await self.servicer.remote_prefill(self)
        except RequestError as exc:
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


# deliver(request_id, tokens, finish_reason, prompt_tokens, cached_tokens, error="", error_kind=0,
#         logprobs=None, prompt_logprobs=None): the last two are TokenLogprob tuples (engine/logprobs.py)
Deliver = Callable[..., None]


def _add_logprobs(msg: pb.GenerateResponse, logprobs, prompt_logprobs) -> None:
    for field, entries in ((msg.logprobs, logprobs), (msg.prompt_logprobs, prompt_logprobs)):
        for e in entries or ():
            field.add(token_id=e.token_id, logprob=e.logprob, top_token_ids=[t for t, _ in e.top],
                      top_logprobs=[lp for _, lp in e.top])


def response_message(rid: str, tokens: list[int], finish: int, prompt_tokens: int, cached: int, error: str = "",
                     error_kind: int = pb.ERROR_INTERNAL, logprobs=None, prompt_logprobs=None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=tokens, finish_reason=finish, prompt_tokens=prompt_tokens,
                              cached_tokens=cached, error=error, error_kind=error_kind)
    if logprobs or prompt_logprobs:
        _add_logprobs(msg, logprobs, prompt_logprobs)
    return msg


class StreamCall:
    """One Decode.Stream call: its live requests and the batch being filled."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests: dict[str, Request] = {}
        self.outbox: asyncio.Queue[pb.StreamBatch | None] = asyncio.Queue()
        self._batch: pb.StreamBatch | None = None

    def deliver(self, rid: str, tokens: list[int], finish: int, prompt_tokens: int, cached: int,
                error: str = "", error_kind: int = pb.ERROR_INTERNAL, logprobs=None, prompt_logprobs=None) -> None:
        if self._batch is None:
            self._batch = pb.StreamBatch()
            # runs after the current callback: one engine reply (every request of the step) -> one batch
            self.loop.call_soon(self._flush)
        # built in place: no per-response message to copy into the batch
        msg = self._batch.responses.add(request_id=rid, token_ids=tokens, finish_reason=finish,
                                        prompt_tokens=prompt_tokens, cached_tokens=cached, error=error,
                                        error_kind=error_kind)
        if logprobs or prompt_logprobs:
            _add_logprobs(msg, logprobs, prompt_logprobs)

    def _flush(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self.outbox.put_nowait(batch)
