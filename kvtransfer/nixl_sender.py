"""NIXL KV sender (prefill side): one-sided WRITEs from the given K/V tensors straight into
the receiver's pool pages, one NIXL request (+ notification) per layer.

Lifecycle of one `NixlSendHandle` (its `_run` task on the sender's event loop):
  1. connect: Hello once per receiver address (cached; loads the receiver's NIXL agent).
  2. Session: BEGIN(transfer id, token, our agent) -> PAGES(pool page ids). Layers that
     `send_layer` queued before PAGES are checked and handed to the worker thread
     (kvtransfer/nixl_xfer_worker.py), later ones go straight to it. State PENDING ->
     IN_PROGRESS at the first completed WRITE.
  3. After `finish()` and once every WRITE completed: END(writes); then DONE on a RESULT
     DONE whose counts match; FAILED on any error or a non-DONE RESULT; ABORTED after
     `abort()`. The session call is cancelled whatever the outcome.
`NixlKVSender.close()` aborts live handles, stops the worker thread and drops remote agents.
See kvtransfer/nixl_backend.py for the protocol and the threat model."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from engine import cluster_auth
from kvtransfer.base import (
    Destination,
    HandleState,
    check_send_args,
    KVSender,
    SendHandle,
    TransferError,
    TransferState,
)
from kvtransfer.nixl_common import PB_TO_STATE, PoolLayout, check_pool, dtype_name, make_agent
from kvtransfer.nixl_xfer_worker import LayerWrite, PoolWrite, XferWorker
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)
S = TransferState


@dataclass
class _Peer:
    layout: PoolLayout
    agent_name: str


class NixlSendHandle(HandleState, SendHandle):
    def __init__(self, sender: NixlKVSender, dst: Destination) -> None:
        self.dst = dst
        self.chunks_sent = 0       # completed layer writes
        self.bytes_sent = 0
        self._sender = sender
        self._loop = sender._loop
        self._lock = threading.Lock()
        self._state = S.PENDING
        self._error: str | None = None
        self._reason = ""
        self._started = time.monotonic()
        self._finished = False
        self._posted = 0           # writes handed to the worker
        self._outstanding = 0      # ... not yet completed
        self._pending: list[LayerWrite] = []   # queued before the receiver answered
        self._seen: set[tuple[int, int]] = set()
        self._layout: PoolLayout | None = None
        self._peer_name = ""
        self._pages: list[int] = []
        self._num_layers = 0
        self._wake = asyncio.Event()
        self._call = None
        self._task = self._loop.create_task(self._run())

    # -- any thread ---------------------------------------------------------
    def send_layer(self, layer: int, k_pages: torch.Tensor, v_pages: torch.Tensor,
                   page_offset: int = 0) -> None:
        if self._finished:
            raise TransferError("send_layer after finish()")
        n = check_send_args(self.dst, layer, k_pages, v_pages, page_offset)
        keys = {(layer, page_offset + i) for i in range(n)}
        with self._lock:
            if (-1, -1) in self._seen:
                raise ValueError("send_layer after send_pool")
            if self._seen & keys:
                raise ValueError(f"layer {layer} pages {page_offset}..{page_offset + n - 1} sent twice")
            self._seen |= keys
            if self._state.terminal:
                return
        k_pages, v_pages = k_pages.contiguous(), v_pages.contiguous()
        ready = None
        if k_pages.is_cuda:  # the layer may still be computing on the caller's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(k_pages.device))
        w = LayerWrite(self, layer, page_offset, k_pages, v_pages, ready)
        if self._layout is not None:   # backpressure: copies waiting to be sent are device memory
            self._sender._worker.wait_for_room(w.nbytes)
        with self._lock:
            if self._state.terminal:
                return
            err = self._enqueue_locked(w)
        if err is not None:
            self._loop.call_soon_threadsafe(self._from_worker, w, err)

    def send_pool(self, page_table: list[int], num_layers: int, ready=None, on_written=None) -> None:
        if self._finished:
            raise TransferError("send_pool after finish()")
        pool = self._sender.pool
        if pool is None:
            raise TransferError("send_pool without a bound pool (bind_pool)")
        n = len(page_table)
        if not 0 < n <= self.dst.num_pages or not 0 < num_layers <= pool.num_layers:
            raise ValueError(f"{n} pages x {num_layers} layers do not fit the destination "
                             f"({self.dst.num_pages} pages) or the pool ({pool.num_layers} layers)")
        pages = np.asarray(page_table, dtype=np.int64)
        if pages.min() < 0 or pages.max() >= pool.num_pages:
            raise ValueError(f"pool page ids outside 0..{pool.num_pages - 1}")
        w = PoolWrite(self, num_layers, pages, pool.page_bytes, ready, on_written)
        with self._lock:
            if self._seen:
                raise ValueError("send_pool after layers were sent")
            self._seen.add((-1, -1))        # everything is sent now
            if self._state.terminal:
                w.written("the transfer ended already")
                return
            err = self._enqueue_locked(w)
        if err is not None:
            self._loop.call_soon_threadsafe(self._from_worker, w, err)

    def _enqueue_locked(self, w: LayerWrite | PoolWrite) -> str | None:
        """Under self._lock: count w, then hold it until the receiver's pages are known or hand
        it to the worker; returns why it cannot be sent (None: queued)."""
        self._posted += 1
        self._outstanding += 1
        if self._layout is None:
            self._pending.append(w)
            return None
        err = self._check(w)
        if err is None:
            self._sender._worker.submit(w)
        return err

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def abort(self) -> None:
        with self._lock:
            if self._state.terminal:
                return
            self._state = S.ABORTED
            pending, self._pending = self._pending, []
        for w in pending:
            if isinstance(w, PoolWrite):
                w.written("aborted")
        self._loop.call_soon_threadsafe(self._cancel_call)

    # -- internals ----------------------------------------------------------
    def _check(self, w: LayerWrite | PoolWrite) -> str | None:
        lay = self._layout
        if isinstance(w, PoolWrite):
            pool = self._sender.pool
            if w.num_layers != self._num_layers:
                return f"sending {w.num_layers} layers, the receiver expects {self._num_layers}"
            if pool.dtype != lay.dtype or pool.page_bytes != lay.page_bytes:
                return (f"pool pages are {pool.page_bytes} B of {pool.dtype}, the receiver's "
                        f"{lay.page_bytes} B of {lay.dtype}")
            return None
        if w.layer >= self._num_layers:
            return f"layer {w.layer} outside 0..{self._num_layers - 1}"
        if dtype_name(w.k.dtype) != lay.dtype:
            return f"dtype {dtype_name(w.k.dtype)!r} != pool dtype {lay.dtype!r}"
        if w.k[0].numel() * w.k.element_size() != lay.page_bytes:
            return f"page is {w.k[0].numel() * w.k.element_size()} bytes, pool pages are {lay.page_bytes}"
        return None

    def _fail(self, error: str, reason: str) -> None:
        with self._lock:
            if self._state.terminal:
                return
            self._state, self._error, self._reason = S.FAILED, error, reason
            pending, self._pending = self._pending, []
        for w in pending:
            if isinstance(w, PoolWrite):
                w.written(error)
        log.warning("KV transfer %s to %s failed (%s): %s", self.dst.transfer_id, self.dst.address, reason, error)
        self._cancel_call()

    def _cancel_call(self) -> None:  # event loop
        if self._call is not None:
            self._call.cancel()
        self._wake.set()

    def _from_worker(self, w: LayerWrite, error: str | None) -> None:
        """A write ended (worker thread, or loop). Hops to the loop."""
        try:
            self._loop.call_soon_threadsafe(self._write_ended, w, error)
        except RuntimeError:  # the loop is gone (shutdown): nobody is waiting any more
            pass

    def _write_ended(self, w: LayerWrite | PoolWrite, error: str | None) -> None:
        if isinstance(w, PoolWrite):
            w.written(error)
        with self._lock:
            self._outstanding -= 1
        if error is not None:
            self._fail(error, "write")
        elif not self._state.terminal:
            self.chunks_sent += w.chunks
            self.bytes_sent += w.nbytes
            self._sender.chunks_streamed += w.chunks
            self._sender.bytes_streamed += w.nbytes
            if self._state is S.PENDING:
                self._state = S.IN_PROGRESS
        self._wake.set()

    async def _run(self) -> None:
        reader = None
        try:
            peer = await self._sender._connect(self.dst.address)
            self._call = pbg.NixlKVStub(self._sender._channel(self.dst.address)).Session(
                timeout=self._sender.deadline_s)
            if self._state.terminal:
                return
            await self._call.write(pb.NixlSessionRequest(begin=pb.NixlBegin(
                transfer_id=self.dst.transfer_id, token=self.dst.token, agent_name=self._sender.agent.name)))
            msg = await self._call.read()
            if msg is grpc.aio.EOF:
                raise TransferError("receiver closed the session without answering")
            if msg.WhichOneof("msg") != "pages":
                raise TransferError(f"receiver answered BEGIN with {msg.WhichOneof('msg')}, not pages")
            name, num_layers, pages = msg.pages.agent_name, msg.pages.num_layers, list(msg.pages.pages)
            if name != peer.agent_name:
                self._sender._forget(self.dst.address)
                raise TransferError("receiver agent changed (restarted?); retry")
            if not 0 < num_layers <= peer.layout.num_layers:
                raise TransferError(f"receiver expects {num_layers} layers, its pool has {peer.layout.num_layers}")
            if len(pages) != self.dst.num_pages or not all(0 <= p < peer.layout.num_pages for p in pages):
                raise TransferError("receiver's page list does not match the destination")
            with self._lock:
                self._layout, self._peer_name = peer.layout, peer.agent_name
                self._pages, self._num_layers = pages, num_layers
                pending, self._pending = self._pending, []
            for w in pending:
                err = self._check(w)
                if err is None:
                    self._sender._worker.submit(w)
                else:
                    self._write_ended(w, err)
            reader = asyncio.ensure_future(self._call.read())
            ack = None
            end_sent = False
            while not self._state.terminal:
                wake = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({reader, wake}, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                self._wake.clear()
                if self._state.terminal:
                    break
                if reader.done() and ack is None:
                    msg = reader.result()
                    if msg is grpc.aio.EOF:
                        raise TransferError("receiver ended the session without a result")
                    if msg.WhichOneof("msg") != "result" or msg.result.state not in PB_TO_STATE:
                        raise TransferError("receiver sent a bad session message (expected a result)")
                    r = msg.result
                    state, writes, nbytes, err = PB_TO_STATE[r.state], r.writes, r.bytes, r.error
                    if state is not S.DONE:
                        self._fail(f"receiver says {state.name}: {err}", f"remote_{state.value}")
                        break
                    ack = (writes, nbytes)
                    reader = asyncio.ensure_future(asyncio.Event().wait())
                if self._finished and self._outstanding == 0:
                    if not end_sent:  # always, once: after a DONE the receiver keeps the RPC open for it
                        await self._call.write(pb.NixlSessionRequest(end=pb.NixlEnd(writes=self.chunks_sent)))
                        end_sent = True
                    if ack is not None:
                        if ack != (self.chunks_sent, self.bytes_sent):
                            self._fail(f"ack for {ack[0]} writes/{ack[1]} B, sent {self.chunks_sent}/"
                                       f"{self.bytes_sent}", "ack_mismatch")
                        else:
                            with self._lock:
                                if not self._state.terminal:
                                    self._state = S.DONE
                                    self._sender.bytes_sent += self.bytes_sent
                        break
            if self._state is S.DONE:  # let the receiver end the RPC (cancelling it now is noise there)
                with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                    await asyncio.wait_for(self._call.read(), 5.0)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                self.abort()
                raise
            self._fail("session call cancelled", "cancelled")
        except grpc.aio.AioRpcError as e:
            self._fail(f"{e.code().name}: {e.details()}", f"rpc_{e.code().name.lower()}")
        except (TransferError, ValueError, RuntimeError) as e:
            self._fail(str(e), "protocol")
        finally:
            if reader is not None:
                reader.cancel()
            if self._call is not None and not self._call.done():
                self._call.cancel()
            self._sender._handles.discard(self)
            if self._state.terminal:
                self._sender._transfer_ended(self._state, time.monotonic() - self._started, self._reason)


class NixlKVSender(KVSender):
    """Writes transfers into NixlKVReceivers' pools. Bound to the event loop of its first `start()`.

    `deadline_s`: per-transfer session deadline (None: none). `on_transfer_end(state, seconds,
    reason)` as for the grpc sender."""

    def __init__(self, deadline_s: float | None = None, connect_timeout_s: float = 10.0,
                 poll_interval_s: float = 0.0002, channel_options: list | None = None,
                 max_pending_bytes: int = 2 << 30, layers_per_write: int = 0, cluster_token: str = "") -> None:
        """max_pending_bytes: layer copies held for sending before send_layer blocks its caller;
        layers_per_write: consecutive layers per WRITE (0: all; see XferWorker);
        cluster_token: sent with every Hello and Session call (engine/cluster_auth.py; "" = none)."""
        self._cluster_token = cluster_token
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.poll_interval_s = poll_interval_s
        self.bytes_sent = 0          # K+V bytes of transfers that completed
        self.bytes_streamed = 0      # K+V bytes of every completed WRITE
        self.chunks_streamed = 0     # completed layer writes (one per send_layer; a WRITE carries several)
        self.on_transfer_end: Callable[[TransferState, float, str], None] | None = None
        self._options = list(channel_options or [])
        self.agent = make_agent("tandem-kv-send")
        self._worker = XferWorker(self.agent, poll_interval_s, layers_per_write=layers_per_write,
                                  max_pending_bytes=max_pending_bytes)
        self._worker.start()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._peers: dict[str, asyncio.Future] = {}
        self._handles: set[NixlSendHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.pool = None                 # LocalPool once bind_pool succeeded
        self._pool_reg = None
        self.pool_bind_failed = False    # bind_pool was asked and could not register the pool

    def bind_pool(self, k_layers, v_layers) -> bool:
        """Register the prefill engine's KV pool once, for `send_pool` (no copies per write)."""
        if self.pool is not None:
            return True
        try:
            pool = check_pool(k_layers, v_layers)
            self._pool_reg = self.agent.register_memory(list(k_layers) + list(v_layers))
        except Exception as e:  # noqa: BLE001 - the copying path still works
            log.warning("NIXL send: the KV pool cannot be registered (%s); every layer is copied "
                        "before its WRITE instead (slower)", e)
            self.pool_bind_failed = True
            return False
        self.pool = self._worker.pool = pool
        log.info("NIXL send: writes go straight from the registered KV pool (%d layers x %d pages)",
                 pool.num_layers, pool.num_pages)
        return True

    @property
    def active_transfers(self) -> int:
        return len(self._handles)

    def _transfer_ended(self, state: TransferState, seconds: float, reason: str) -> None:
        if self.on_transfer_end is not None:
            try:
                self.on_transfer_end(state, seconds, reason)
            except Exception:
                log.exception("on_transfer_end hook failed")

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = cluster_auth.aio_channel(address, token=self._cluster_token,
                                                                    options=self._options)
        return ch

    async def _connect(self, address: str) -> _Peer:
        fut = self._peers.get(address)
        if fut is None:
            fut = self._peers[address] = self._loop.create_task(self._hello(address))
        try:
            return await asyncio.shield(fut)
        except Exception:
            if self._peers.get(address) is fut:
                del self._peers[address]
            raise

    async def _hello(self, address: str) -> _Peer:
        msg = await pbg.NixlKVStub(self._channel(address)).Hello(pb.NixlHelloRequest(),
                                                                 timeout=self.connect_timeout_s)
        layout = PoolLayout.from_proto(msg)
        name = self.agent.add_remote_agent(layout.metadata)
        name = name.decode() if isinstance(name, bytes) else name
        if name != layout.agent_name:
            raise TransferError(f"receiver metadata names agent {name!r}, expected {layout.agent_name!r}")
        try:
            self.agent.make_connection(name)
        except Exception:
            log.debug("NIXL make_connection to %s failed", name, exc_info=True)
        return _Peer(layout, name)

    def _forget(self, address: str) -> None:
        fut = self._peers.pop(address, None)
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            try:
                self.agent.remove_remote_agent(fut.result().agent_name)
            except Exception:
                log.debug("removing NIXL remote agent failed", exc_info=True)

    def start(self, dst) -> NixlSendHandle:
        dst = Destination.coerce(dst)
        if self._closed:
            raise TransferError("sender is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise TransferError("NixlKVSender is bound to another event loop")
        if dst.backend != "nixl":
            raise TransferError(f"destination wants backend {dst.backend!r}")
        handle = NixlSendHandle(self, dst)
        self._handles.add(handle)
        return handle

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in list(self._handles):
            h.abort()
        for h in list(self._handles):
            await h.wait(1.0)
        self._worker.stop()
        await asyncio.to_thread(self._worker.join, 5.0)
        for address in list(self._peers):
            self._forget(address)
        if self._pool_reg is not None:
            try:
                self.agent.deregister_memory(self._pool_reg)
            except Exception:  # noqa: BLE001
                log.exception("deregistering the KV pool from NIXL failed")
            self._pool_reg = self.pool = None
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
