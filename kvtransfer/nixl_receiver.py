"""NIXL KV receiver (decode side): registers the pool once, hands out page addresses to
senders that prove the transfer token, and admits pages only on token-carrying notifications.

Lifecycle: construction registers every layer's K/V pool with a NIXL agent; `add_to_server`
exposes Hello / Session; per transfer `open` (PENDING, fresh token) -> a Session proves the
token and binds the sender's agent -> admitted layer notifications (IN_PROGRESS) -> every
page of every layer (DONE), or FAILED / ABORTED -> RESULT to the sender -> `close`.
Notifications are polled on the event loop only while a session is open. `shutdown()`
aborts what is live and deregisters the pool.
See kvtransfer/nixl_backend.py for the protocol and the threat model."""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from kvtransfer.base import Destination, KVReceiver, TransferError, TransferState, TransferTable
from kvtransfer.nixl_common import (
    _LIVE,
    STATE_TO_PB,
    PoolLayout,
    check_pool,
    make_agent,
    parse_layer_notif,
)
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)
_Code = grpc.StatusCode


@dataclass
class _Transfer:
    transfer_id: str
    token: bytes
    pages: list[int]
    num_layers: int
    received: list[bytearray]            # [layer][reservation page] -> 0/1
    state: TransferState = TransferState.PENDING
    pages_left: int = 0
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    opened_at: float = field(default_factory=time.monotonic)
    first_write_ns: int = 0                  # wall clock of the first accepted write (timeline)
    done_ns: int = 0                         # wall clock of DONE
    peer: str | None = None              # NIXL agent name of the sender that proved the token
    writes: int = 0                      # accepted layer notifications
    nbytes: int = 0
    expected_writes: int | None = None   # from the sender's END
    session_closed: asyncio.Event = field(default_factory=asyncio.Event)  # the sender's Session ended


class NixlKVReceiver(TransferTable, KVReceiver, pbg.NixlKVServicer):
    """Receives KV into `k_layers[l]` / `v_layers[l]` ([num_pages, page_size, kvh, hd], contiguous).

    `add_to_server(server)` adds the `tandem.v1.NixlKV` control service (Hello, Session) to the
    decode worker's gRPC server; `.address` is that server's advertised host:port (as for grpc).
    `end_grace_s`: after the sender's END, how long notifications may still trail in.
    `drain_grace_s` / `quarantine_s`: `drained()` of a transfer that ended without DONE, after
    its sender learnt the page ids, waits for the sender's Session to end and then
    `drain_grace_s` more (WRITEs it had already posted may still land: one-sided writes
    cannot be recalled), `quarantine_s` at most in all. Only then may the pages be reused.
    `shutdown()` deregisters the pool and drops the NIXL agent (idempotent)."""

    def __init__(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                 page_size: int, address: str = "", *, end_grace_s: float = 10.0,
                 poll_interval_s: float = 0.0005, drain_grace_s: float = 0.5,
                 quarantine_s: float = 5.0) -> None:
        pool = check_pool(k_layers, v_layers, page_size)
        self.k_layers, self.v_layers = k_layers, v_layers
        self.page_size = page_size
        self.num_pool_pages = pool.num_pages
        self.page_bytes = pool.page_bytes
        self.address = address
        self.end_grace_s = end_grace_s
        self.drain_grace_s, self.quarantine_s = drain_grace_s, quarantine_s
        self.poll_interval_s = poll_interval_s
        self.bytes_received = 0
        self.chunks_received = 0          # accepted layer writes
        self.chunks_rejected = 0          # notifications / sessions refused
        self.on_transfer_end: Callable[[TransferState, float, str], None] | None = None
        self._transfers: dict[str, _Transfer] = {}
        self._sessions = 0
        self._poller: asyncio.Task | None = None
        self.agent = make_agent("tandem-kv-recv")
        self._reg = self.agent.register_memory(list(k_layers) + list(v_layers))
        layout = PoolLayout(agent_name=self.agent.name, mem_type=pool.mem_type, dev_id=pool.dev_id,
                            num_pages=pool.num_pages, page_bytes=pool.page_bytes, dtype=pool.dtype,
                            k_addrs=pool.k_addrs, v_addrs=pool.v_addrs,
                            metadata=self.agent.get_agent_metadata())
        self._hello = layout.to_proto()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pbg.add_NixlKVServicer_to_server(self, server)

    def shutdown(self) -> None:
        for t in list(self._transfers.values()):
            self._finish(t, TransferState.ABORTED)
        if self._reg is not None:
            try:
                self.agent.deregister_memory(self._reg)
            finally:
                self._reg = None

    # -- KVReceiver role ----------------------------------------------------
    def open(self, transfer_id: str, pages: list[int], num_layers: int | None = None) -> Destination:
        if self._reg is None:
            raise TransferError("receiver is shut down")
        pages, num_layers = self._check_open(transfer_id, pages, num_layers, len(self.k_layers),
                                             self.num_pool_pages)
        t = _Transfer(transfer_id=transfer_id, token=secrets.token_bytes(16), pages=pages,
                      num_layers=num_layers, received=[bytearray(len(pages)) for _ in range(num_layers)],
                      pages_left=num_layers * len(pages))
        self._transfers[transfer_id] = t
        return Destination(address=self.address, transfer_id=transfer_id, num_pages=len(pages),
                           page_size=self.page_size, backend="nixl", token=t.token)

    async def drained(self, transfer_id: str) -> None:
        t = self._transfers.get(transfer_id)
        if t is None or t.state is TransferState.DONE or t.peer is None:
            return   # complete, or the page ids never left this process: nothing can land
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(t.session_closed.wait(), self.quarantine_s)
        except TimeoutError:
            return
        await asyncio.sleep(max(0.0, min(self.drain_grace_s, self.quarantine_s - (loop.time() - start))))

    def poll(self, transfer_id: str) -> TransferState:
        t = self._get(transfer_id)
        if t.state in _LIVE and t.peer is not None:
            self._drain()  # cheap; lets a caller polling in a loop see progress at once
        return t.state

    def _finish(self, t: _Transfer, state: TransferState, error: str | None = None, reason: str = "") -> None:
        if t.state in _LIVE:
            t.state, t.error = state, error
            if state is TransferState.DONE:
                t.done_ns = time.time_ns()
            t.done.set()
            if state is TransferState.FAILED:
                log.warning("KV transfer %s failed (%s): %s", t.transfer_id, reason, error)
            if self.on_transfer_end is not None:
                try:
                    self.on_transfer_end(state, time.monotonic() - t.opened_at, reason)
                except Exception:
                    log.exception("on_transfer_end hook failed")

    # -- notifications (data plane completions) -------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifs())

    async def _poll_notifs(self) -> None:
        while self._sessions > 0:
            self._drain()
            await asyncio.sleep(self.poll_interval_s)
        self._drain()

    def _drain(self) -> None:
        if self._reg is None:
            return
        for agent_name, msgs in self.agent.get_new_notifs().items():
            for msg in msgs:
                self._on_notif(agent_name, msg)

    def _on_notif(self, agent_name: str, msg: bytes) -> None:
        try:  # NIXL notifications are bytes from anyone who can reach the agent: parse defensively
            notif = parse_layer_notif(msg)
        except ValueError:
            self.chunks_rejected += 1
            return
        tid, token, layer, off, n = (notif.transfer_id, notif.token, notif.layer, notif.page_offset,
                                     notif.num_pages)
        t = self._transfers.get(tid)
        # Nothing about a transfer changes unless the notification proves the token and comes
        # from the agent that opened the session with it.
        if (t is None or not hmac.compare_digest(token, t.token) or t.peer != agent_name
                or t.state not in _LIVE):
            self.chunks_rejected += 1
            return
        nl = max(1, notif.num_layers)   # one WRITE may carry a run of consecutive layers
        bad = None
        if not (0 <= layer and layer + nl <= t.num_layers):
            bad = f"layers {layer}..{layer + nl - 1} outside 0..{t.num_layers - 1}"
        elif n < 1 or off < 0 or off + n > len(t.pages):
            bad = f"pages {off}..{off + n - 1} outside the reservation 0..{len(t.pages) - 1}"
        elif any(any(t.received[lay][off:off + n]) for lay in range(layer, layer + nl)):
            bad = f"layers {layer}..{layer + nl - 1} pages {off}..{off + n - 1} written twice"
        if bad is not None:
            self.chunks_rejected += 1
            self._finish(t, TransferState.FAILED, bad, "invalid_chunk")
            return
        for lay in range(layer, layer + nl):
            t.received[lay][off:off + n] = b"\x01" * n
        t.pages_left -= n * nl
        t.writes += nl                  # counted in layer-writes, as the sender's END counts them
        payload = 2 * n * self.page_bytes * nl
        t.nbytes += payload
        self.bytes_received += payload
        self.chunks_received += nl
        if t.state is TransferState.PENDING:
            t.state = TransferState.IN_PROGRESS
            t.first_write_ns = time.time_ns()
        if t.pages_left == 0:
            self._finish(t, TransferState.DONE)
        elif t.expected_writes is not None and t.writes >= t.expected_writes:
            self._finish(t, TransferState.FAILED, f"sender finished with {t.pages_left} layer-pages missing",
                         "incomplete")

    # -- gRPC control service -------------------------------------------------
    async def Hello(self, request: pb.NixlHelloRequest, context) -> pb.NixlPoolLayout:
        if self._reg is None:
            await context.abort(_Code.UNAVAILABLE, "receiver is shut down")
        return self._hello

    async def Session(self, request_iterator, context) -> None:
        msg = await context.read()
        if msg is grpc.aio.EOF:
            return
        if msg.WhichOneof("msg") != "begin" or not msg.begin.transfer_id or not msg.begin.agent_name:
            await context.abort(_Code.INVALID_ARGUMENT, "bad BEGIN: expected begin(transfer_id, token, agent)")
        tid, token, peer = msg.begin.transfer_id, msg.begin.token, msg.begin.agent_name
        t = self._transfers.get(tid)
        if t is None:
            self.chunks_rejected += 1
            await context.abort(_Code.NOT_FOUND, f"unknown transfer {tid!r}")
        if not hmac.compare_digest(token, t.token):
            self.chunks_rejected += 1   # a forger learns nothing and changes nothing
            await context.abort(_Code.PERMISSION_DENIED, "bad transfer token")
        if t.state not in _LIVE:
            await context.abort(_Code.FAILED_PRECONDITION, f"transfer is {t.state.value}")
        if t.peer is not None:
            await context.abort(_Code.FAILED_PRECONDITION, "transfer already has a sender")
        t.peer = peer
        self._sessions += 1
        counted = True
        self._ensure_poller()
        reader: asyncio.Future | None = None
        grace: asyncio.TimerHandle | None = None
        try:
            await context.write(pb.NixlSessionResponse(pages=pb.NixlPages(
                agent_name=self.agent.name, num_layers=t.num_layers, pages=t.pages)))
            reader = asyncio.ensure_future(context.read())
            done = asyncio.ensure_future(t.done.wait())
            while t.state in _LIVE:
                await asyncio.wait({reader, done}, return_when=asyncio.FIRST_COMPLETED)
                if t.state not in _LIVE or not reader.done():
                    continue
                msg = reader.result()
                if msg is grpc.aio.EOF:
                    self._drain()
                    self._finish(t, TransferState.FAILED, "sender closed the session before all pages arrived",
                                 "stream_broken")
                    break
                if msg.WhichOneof("msg") != "end":
                    self._finish(t, TransferState.FAILED, f"bad session message: expected end, got "
                                 f"{msg.WhichOneof('msg')}", "invalid_chunk")
                    break
                t.expected_writes = msg.end.writes
                self._drain()
                if t.state in _LIVE and t.writes >= t.expected_writes:
                    self._finish(t, TransferState.FAILED,
                                 f"sender finished with {t.pages_left} layer-pages missing", "incomplete")
                elif t.state in _LIVE:  # notifications may trail the END a little
                    grace = asyncio.get_running_loop().call_later(
                        self.end_grace_s, lambda: self._finish(
                            t, TransferState.FAILED, "layer notifications missing after the sender's END",
                            "incomplete"))
                reader = asyncio.ensure_future(asyncio.Event().wait())  # nothing more to read
            done.cancel()
            await context.write(pb.NixlSessionResponse(result=pb.NixlResult(
                state=STATE_TO_PB[t.state], writes=t.writes, bytes=t.nbytes, error=(t.error or "")[:4096])))
            if t.state is TransferState.DONE and t.expected_writes is None and not reader.done():
                # DONE before the sender's END, which it may be writing right now: ending the RPC
                # under that write would fail the sender's call. Wait for the END (or the stream's
                # end): the sender always sends it after finish(), or cancels the call, or dies.
                self._sessions -= 1
                counted = False
                await asyncio.wait({reader})
        except BaseException:  # the sender went away (process died, cancelled), or the stream broke
            self._finish(t, TransferState.FAILED, "session broken before the transfer completed",
                         "stream_broken")
            raise
        finally:
            t.session_closed.set()
            if grace is not None:
                grace.cancel()
            if reader is not None:
                reader.cancel()
            if counted:
                self._sessions -= 1
