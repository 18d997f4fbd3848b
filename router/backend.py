"""gRPC client pool from the router to the decode workers (proto.Decode).

Lifecycle:
  1. `DecodeClient(decode_addresses, prefill_addresses, request_timeout_s)`:
     no I/O; safe to build outside an event loop.
  2. The first `generate()` inside an event loop opens one grpc.aio channel
     per decode worker, bound to that loop (a different loop, e.g. a second
     TestClient, gets fresh channels).
  3. `generate()` places the request (round robin over decode workers and,
     when disaggregated, over prefill workers -> GenerateRequest.prefill_address)
     and yields the worker's GenerateResponse messages until one carries a
     finish reason. Closing or cancelling the iterator cancels the Generate
     call in a `finally`; that cancellation is how the decode worker learns to
     abort the request and free its KV pages.
  4. `await close()` on app shutdown.

Failures never hang and never leak as raw gRPC errors: they raise
`BackendError` (503 unreachable/overloaded, 504 past request_timeout_s, 500
worker error). A worker that is UNAVAILABLE before sending anything is
skipped and the next decode worker tried (each at most once per request).
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

import grpc

from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from router.errors import BackendError

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
)

_STATUS_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: (503, "worker_unavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "worker_overloaded"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (503, "worker_cancelled"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request"),
}


class DecodeClient:
    """Round-robin pool of channels to decode workers; see the module docstring."""

    def __init__(self, decode_addresses: Sequence[str], prefill_addresses: Sequence[str] = (),
                 request_timeout_s: float = 600.0) -> None:
        if not decode_addresses:
            raise ValueError("DecodeClient needs at least one decode address")
        self.decode_addresses = tuple(decode_addresses)
        self.prefill_addresses = tuple(prefill_addresses)
        self.request_timeout_s = request_timeout_s
        self._decode_rr = itertools.cycle(range(len(self.decode_addresses)))
        self._prefill_rr = itertools.cycle(range(len(self.prefill_addresses))) if self.prefill_addresses else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pbg.DecodeStub] = {}

    @classmethod
    def from_config(cls, config) -> "DecodeClient":
        """Build from a `router.config.RouterConfig`."""
        return cls(config.decode_addresses, config.prefill_addresses, config.request_timeout_s)

    # ---- placement ----------------------------------------------------------

    def next_decode(self) -> str:
        return self.decode_addresses[next(self._decode_rr)]

    def next_prefill(self) -> str:
        """A prefill worker address, or "" in colocated mode (decode prefills itself)."""
        if self._prefill_rr is None:
            return ""
        return self.prefill_addresses[next(self._prefill_rr)]

    # ---- channels -------------------------------------------------------------

    def _stub(self, address: str) -> pbg.DecodeStub:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Channels are bound to the loop that created them; old ones die with their loop.
            self._loop, self._channels, self._stubs = loop, {}, {}
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = pbg.DecodeStub(channel)
        return stub

    async def close(self) -> None:
        channels, self._channels, self._stubs, self._loop = self._channels, {}, {}, None
        for channel in channels.values():
            try:
                await channel.close(grace=None)
            except Exception:  # noqa: BLE001 - closing a channel of a dead loop/worker
                pass

    # ---- RPCs -----------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[pb.GenerateResponse]:
        """Yield the decode worker's responses; the last one has a finish reason
        (FINISH_STOP or FINISH_LENGTH). FINISH_ERROR / FINISH_ABORT and gRPC
        failures raise BackendError. Close the iterator (e.g. with
        `contextlib.aclosing`) to cancel the request on the worker."""
        attempts = 0
        while True:
            address = self.next_decode()
            request = pb.GenerateRequest(
                request_id=request_id,
                prompt_token_ids=list(prompt_ids),
                sampling=params.to_proto(),
                prefill_address=self.next_prefill(),
            )
            call = self._stub(address).Generate(request, timeout=self.request_timeout_s)
            received = False
            try:
                async for response in call:
                    received = True
                    reason = response.finish_reason
                    if reason == pb.FINISH_ERROR:
                        raise BackendError(500, f"decode worker {address} failed request {request_id}: "
                                                f"{response.error or 'unknown error'}", code="worker_error")
                    if reason == pb.FINISH_ABORT:
                        raise BackendError(503, f"decode worker {address} aborted request {request_id}"
                                                + (f": {response.error}" if response.error else ""),
                                           code="worker_aborted")
                    yield response
                    if reason != pb.FINISH_NONE:
                        return
                raise BackendError(502, f"decode worker {address} ended request {request_id} "
                                        "without a finish reason", code="worker_error")
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                if (exc.code() == grpc.StatusCode.UNAVAILABLE and not received
                        and attempts < len(self.decode_addresses)):
                    continue  # nothing reached that worker: try the next one
                raise _backend_error(exc, address, request_id) from None
            finally:
                call.cancel()  # no-op once finished; otherwise tells the worker to abort

    async def stats(self, timeout_s: float = 2.0) -> dict[str, pb.StatsResponse | str]:
        """Stats of every decode worker by address (an error string where it failed)."""

        async def one(address: str) -> pb.StatsResponse | str:
            try:
                return await self._stub(address).Stats(pb.StatsRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        results = await asyncio.gather(*(one(a) for a in self.decode_addresses))
        return dict(zip(self.decode_addresses, results))


def _backend_error(exc: grpc.aio.AioRpcError, address: str, request_id: str) -> BackendError:
    status, code = _STATUS_BY_CODE.get(exc.code(), (500, "worker_error"))
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"request {request_id} timed out on decode worker {address}"
    else:
        message = f"decode worker {address} failed request {request_id}: {exc.code().name}: {exc.details()}"
    return BackendError(status, message, code=code)
