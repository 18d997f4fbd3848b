"""gRPC KV sender (prefill side): stages, serialises and streams one layer at a time.

See kvtransfer/grpc_backend.py for the lifecycle."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Callable

import grpc
import torch

from engine import cluster_auth
from kvtransfer.base import (Destination, HandleState, KVSender, SendHandle, TransferError, TransferState,
                             check_send_args)
from proto import tandem_pb2 as pb, tandem_pb2_grpc as pbg

from kvtransfer.grpc_common import GRPC_OPTIONS, DEFAULT_MAX_CHUNK_BYTES, dtype_name, tensor_bytes, _chunk_crc

log = logging.getLogger(__name__)

def _serialise(dst: Destination, layer: int, page_offset: int, k: torch.Tensor, v: torch.Tensor,
               ready: object | None, max_chunk_bytes: int) -> list[pb.KVChunk]:
    """Runs on the sender's thread pool: K/V (CPU, or pinned staging + CUDA event) -> chunks."""
    if ready is not None:
        ready.synchronize()
    n = k.shape[0]
    per_page = 2 * k[0].numel() * k.element_size()
    step = max(1, max_chunk_bytes // per_page)
    out = []
    for s in range(0, n, step):
        e = min(n, s + step)
        kb, vb = tensor_bytes(k[s:e]), tensor_bytes(v[s:e])
        out.append(pb.KVChunk(transfer_id=dst.transfer_id, token=dst.token, layer=layer,
                              page_offset=page_offset + s, num_pages=e - s,
                              dtype=dtype_name(k.dtype), k=kb, v=vb, crc32=_chunk_crc(kb, vb)))
    return out


def _stage_to_host(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Async D2H copy on the caller's current CUDA stream into pinned memory, plus an event."""
    hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
    hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
    hk.copy_(k, non_blocking=True)
    hv.copy_(v, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(k.device))
    return hk, hv, ev


class GrpcSendHandle(HandleState, SendHandle):
    def __init__(self, sender: "GrpcKVSender", dst: Destination, channel: grpc.aio.Channel) -> None:
        self.dst = dst
        self.chunks_sent = 0
        self.bytes_sent = 0
        self._sender = sender
        self._loop = sender._loop
        self._queue: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        self._state = TransferState.PENDING
        self._error: str | None = None
        self._reason = ""                    # short label of a failure (metrics)
        self._started = time.monotonic()
        self._finished = False
        self._call = pbg.KVReceiverStub(channel).Push(self._requests(), timeout=sender.deadline_s)
        self._task = self._loop.create_task(self._run())

    # -- any thread ---------------------------------------------------------
    def send_layer(self, layer: int, k_pages: torch.Tensor, v_pages: torch.Tensor,
                   page_offset: int = 0) -> None:
        if self._finished:
            raise TransferError("send_layer after finish()")
        check_send_args(self.dst, layer, k_pages, v_pages, page_offset)
        if self._state.terminal:
            return
        ready = None
        if k_pages.is_cuda:
            k_pages, v_pages, ready = _stage_to_host(k_pages, v_pages)
        self._loop.call_soon_threadsafe(self._enqueue, layer, page_offset, k_pages, v_pages, ready)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def abort(self) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._abort()
        else:
            self._loop.call_soon_threadsafe(self._abort)

    # -- event loop ---------------------------------------------------------
    def _enqueue(self, layer: int, page_offset: int, k: torch.Tensor, v: torch.Tensor, ready) -> None:
        if self._state.terminal:
            return
        fut = self._loop.run_in_executor(self._sender._executor, _serialise, self.dst, layer,
                                         page_offset, k, v, ready, self._sender.max_chunk_bytes)
        self._queue.put_nowait(fut)

    def _abort(self) -> None:
        if not self._state.terminal:
            self._state = TransferState.ABORTED
            self._call.cancel()

    def _fail(self, error: str, reason: str) -> None:
        if not self._state.terminal:
            self._state, self._error, self._reason = TransferState.FAILED, error, reason

    async def _requests(self):
        while True:
            fut = await self._queue.get()
            if fut is None or self._state.terminal:
                return
            try:
                chunks = await fut
            except Exception as e:  # noqa: BLE001 - reported through the handle
                self._fail(f"serialising KV failed: {e!r}", "serialise")
                self._call.cancel()
                return
            for c in chunks:
                if self._state is TransferState.PENDING:
                    self._state = TransferState.IN_PROGRESS
                self.chunks_sent += 1
                self.bytes_sent += len(c.k) + len(c.v)
                self._sender.chunks_streamed += 1
                self._sender.bytes_streamed += len(c.k) + len(c.v)
                yield c

    async def _run(self) -> None:
        try:
            ack = await self._call
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                self._abort()
                raise
            self._fail("Push call cancelled", "cancelled")
        except grpc.aio.AioRpcError as e:
            self._fail(f"{e.code().name}: {e.details()}", f"rpc_{e.code().name.lower()}")
        else:
            if ack.chunks != self.chunks_sent or ack.bytes != self.bytes_sent:
                self._fail(f"ack for {ack.chunks} chunks/{ack.bytes} B, sent {self.chunks_sent}/{self.bytes_sent}",
                           "ack_mismatch")
            elif not self._state.terminal:
                self._state = TransferState.DONE
                self._sender.bytes_sent += self.bytes_sent
        finally:
            self._sender._handles.discard(self)
            if self._state.terminal:
                self._sender._transfer_ended(self._state, time.monotonic() - self._started, self._reason)
            # release any queued serialisations
            while not self._queue.empty():
                fut = self._queue.get_nowait()
                if fut is not None:
                    fut.cancel()


class GrpcKVSender(KVSender):
    """Streams transfers to GrpcKVReceivers. Bound to the event loop of its first `start()`.

    `on_transfer_end(state, seconds, reason)`, when set, is called on the event loop as each
    transfer ends (DONE / FAILED / ABORTED; seconds since `start`; reason: a short label for FAILED).
    `cluster_token` goes with every Push (engine/cluster_auth.py; "" = none)."""

    def __init__(self, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, deadline_s: float | None = None,
                 serialise_threads: int = 4, channel_options: list | None = None,
                 cluster_token: str = "") -> None:
        self._cluster_token = cluster_token
        self.max_chunk_bytes = max_chunk_bytes
        self.deadline_s = deadline_s          # per-transfer RPC deadline (None: none)
        self.bytes_sent = 0        # K+V bytes of transfers that completed
        self.bytes_streamed = 0    # K+V bytes of every chunk handed to gRPC
        self.chunks_streamed = 0
        self.on_transfer_end: Callable[[TransferState, float, str], None] | None = None
        self._options = list(GRPC_OPTIONS if channel_options is None else channel_options)
        self._executor = concurrent.futures.ThreadPoolExecutor(serialise_threads, thread_name_prefix="kv-ser")
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handles: set[GrpcSendHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active_transfers(self) -> int:
        return len(self._handles)

    def _transfer_ended(self, state: TransferState, seconds: float, reason: str) -> None:
        if self.on_transfer_end is not None:
            try:
                self.on_transfer_end(state, seconds, reason)
            except Exception:  # noqa: BLE001 - an observer must not break the transfer
                log.exception("on_transfer_end hook failed")

    def start(self, dst) -> GrpcSendHandle:
        dst = Destination.coerce(dst)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise TransferError("GrpcKVSender is bound to another event loop")
        if dst.backend not in ("", "grpc"):
            raise TransferError(f"destination wants backend {dst.backend!r}")
        channel = self._channels.get(dst.address)
        if channel is None:
            channel = self._channels[dst.address] = cluster_auth.aio_channel(
                dst.address, token=self._cluster_token, options=self._options)
        handle = GrpcSendHandle(self, dst, channel)
        self._handles.add(handle)
        return handle

    async def close(self) -> None:
        for h in list(self._handles):
            h.abort()
        for h in list(self._handles):
            await h.wait(1.0)
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

