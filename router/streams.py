"""One multiplexed `Decode.Stream` call per decode worker, per router process.

Tokens come back in one `StreamBatch` per engine step holding every request
of this router process on that worker, instead of one gRPC message per
request per token.

Lifecycle of a `DecodeStream` (one per worker address, bound to one loop):
  1. built on first use; the bidi call starts at once, its request side fed
     from a queue (`StreamRequest.generate` / `.abort_request_id`);
  2. `open(request, deadline) -> RequestStream` registers the request id and
     sends the request; a timer fails the request at its deadline;
  3. a reader task hands each batch's responses to their `RequestStream`s;
  4. `RequestStream.get()` returns the next response, with every response
     already queued behind it coalesced into it (tokens concatenated): a
     consumer that falls behind catches up in fewer, larger SSE chunks, as
     vLLM's output collector does (logprobs, one per token, coalesce alike);
  5. `RequestStream.close()` unregisters it and, unless it finished, sends an
     abort so that the worker frees its pages;
  6. when the call ends (worker gone, shutdown) every open request fails with
     `StreamBroken` (the gRPC code, and whether the request got anything);
     the stream is then dead and the next `open` for that address builds a
     new one.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """The request's stream failed before it finished."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RequestStream:
    """One request's responses on a DecodeStream (consumed by one coroutine)."""

    __slots__ = ("request_id", "received", "received_tokens", "finished", "_items", "_event", "_error",
                 "_owner", "_timer")

    def __init__(self, request_id: str, owner: "DecodeStream") -> None:
        self.request_id = request_id
        self.received = False       # got at least one response
        self.received_tokens = False  # ... one with tokens (then it must not be retried elsewhere)
        self.finished = False       # got the response with a finish reason
        self._items: deque[pb.GenerateResponse] = deque()
        self._event = asyncio.Event()
        self._error: StreamBroken | None = None
        self._owner = owner
        self._timer: asyncio.TimerHandle | None = None

    def _push(self, resp: pb.GenerateResponse) -> None:
        self._items.append(resp)
        self._event.set()

    def _fail(self, error: StreamBroken) -> None:
        if self._error is None:
            self._error = error
            self._event.set()

    async def get(self) -> pb.GenerateResponse:
        while not self._items:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        resp = self._items.popleft()
        while resp.finish_reason == pb.FINISH_NONE and self._items:
            nxt = self._items.popleft()
            nxt.token_ids[:0] = resp.token_ids
            if resp.logprobs:             # one entry per token: they coalesce the same way
                merged = [*resp.logprobs, *nxt.logprobs]
                del nxt.logprobs[:]
                nxt.logprobs.extend(merged)
            if resp.prompt_logprobs and not nxt.prompt_logprobs:
                nxt.prompt_logprobs.extend(resp.prompt_logprobs)
            resp = nxt
        self.received = True
        if resp.token_ids:
            self.received_tokens = True
        if resp.finish_reason != pb.FINISH_NONE:
            self.finished = True
        return resp

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._owner._close(self)


class DecodeStream:
    """The multiplexed call to one decode worker (see the module docstring)."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.dead = False
        self._open: dict[str, RequestStream] = {}
        self._out: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._call = pbg.DecodeStub(channel).Stream(self._requests())
        self._reader = self.loop.create_task(self._read(), name=f"decode stream {address}")

    @property
    def num_open(self) -> int:
        return len(self._open)

    async def _requests(self):
        while True:
            msg = await self._out.get()
            if msg is None:
                return
            yield msg

    def open(self, request: pb.GenerateRequest, deadline: float) -> RequestStream:
        """`deadline` on the loop's clock (time.monotonic())."""
        rid = request.request_id
        if rid in self._open:
            raise ValueError(f"request id {rid!r} is already open on {self.address}")
        rs = RequestStream(rid, self)
        self._open[rid] = rs
        rs._timer = self.loop.call_at(deadline, rs._fail, StreamBroken(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid} timed out"))
        self._out.put_nowait(pb.StreamRequest(generate=request))
        return rs

    def _close(self, rs: RequestStream) -> None:
        if self._open.get(rs.request_id) is rs:
            del self._open[rs.request_id]
            if not rs.finished and not self.dead:
                self._out.put_nowait(pb.StreamRequest(abort_request_id=rs.request_id))

    async def _read(self) -> None:
        error = StreamBroken(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.address} ended the stream")
        try:
            async for batch in self._call:
                for resp in batch.responses:
                    rs = self._open.get(resp.request_id)
                    if rs is not None:
                        rs._push(resp)
        except asyncio.CancelledError:
            error = StreamBroken(grpc.StatusCode.CANCELLED, "router shutting down")
            raise
        except grpc.aio.AioRpcError as exc:
            error = StreamBroken(exc.code(), exc.details() or "")
        except Exception as exc:  # noqa: BLE001 - any failure ends this stream, not the router
            log.exception("decode stream %s failed", self.address)
            error = StreamBroken(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self.dead = True
            for rs in list(self._open.values()):
                rs._fail(error)
            if error.code != grpc.StatusCode.CANCELLED:
                log.warning("decode stream to %s ended: %s (%d open requests)", self.address, error,
                            len(self._open))

    async def close(self) -> None:
        self.dead = True
        self._out.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        try:
            await self._reader
        except BaseException:  # noqa: BLE001 - cancelled, or bound to a dead loop
            pass
