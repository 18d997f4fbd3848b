"""gRPC KV receiver (decode side): validates KVChunks and writes them into reserved pages.

See kvtransfer/grpc_backend.py for the lifecycle."""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch

from kvtransfer.base import Destination, KVReceiver, TransferState, TransferTable
from proto import tandem_pb2 as pb, tandem_pb2_grpc as pbg

from kvtransfer.grpc_common import _INLINE_CRC_BYTES, _LIVE, _Code, dtype_name, _chunk_crc

log = logging.getLogger(__name__)

class _Reject(Exception):
    """A chunk is refused with `code`; `fail` (a verified transfer) is marked FAILED too,
    with `reason` (a short metrics label)."""

    def __init__(self, code: grpc.StatusCode, msg: str, fail: "_Transfer | None" = None,
                 reason: str = "invalid_chunk") -> None:
        super().__init__(msg)
        self.code, self.msg, self.fail, self.reason = code, msg, fail, reason


@dataclass
class _Transfer:
    transfer_id: str
    token: bytes
    pages: list[int]
    num_layers: int
    page_index: torch.Tensor                 # pool page ids (CPU, int64)
    received: list[bytearray]                # [layer][reservation page] -> 0/1
    state: TransferState = TransferState.PENDING
    pages_left: int = 0
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_write: object | None = None         # CUDA event after the latest pool write
    opened_at: float = field(default_factory=time.monotonic)
    first_write_ns: int = 0                  # wall clock of the first accepted write (timeline)
    done_ns: int = 0                         # wall clock of DONE


class GrpcKVReceiver(TransferTable, KVReceiver, pbg.KVReceiverServicer):
    """Receives KV chunks into `k_layers[l]` / `v_layers[l]` ([num_pages, page_size, kvh, hd]).

    `on_transfer_end(state, seconds, reason)`, when set, is called on the event loop as each
    transfer ends (DONE / FAILED / ABORTED; seconds since `open`; reason: a short label for FAILED)."""

    def __init__(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                 page_size: int, address: str = "") -> None:
        if len(k_layers) != len(v_layers) or not k_layers:
            raise ValueError("need the same non-zero number of K and V layers")
        for k, v in zip(k_layers, v_layers):
            if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.shape[1] != page_size:
                raise ValueError(f"pool layer shapes must be equal [pages, {page_size}, kvh, hd]")
        self.k_layers, self.v_layers = k_layers, v_layers
        self.page_size = page_size
        self.num_pool_pages = k_layers[0].shape[0]
        self.address = address
        self._device = k_layers[0].device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self.bytes_received = 0
        self.chunks_received = 0
        self.chunks_rejected = 0
        self.on_transfer_end: Callable[[TransferState, float, str], None] | None = None
        self._transfers: dict[str, _Transfer] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pbg.add_KVReceiverServicer_to_server(self, server)

    # -- KVReceiver role ----------------------------------------------------
    def open(self, transfer_id: str, pages: list[int], num_layers: int | None = None) -> Destination:
        pages, num_layers = self._check_open(transfer_id, pages, num_layers, len(self.k_layers),
                                             self.num_pool_pages)
        t = _Transfer(transfer_id=transfer_id, token=secrets.token_bytes(16), pages=pages,
                      num_layers=num_layers,
                      page_index=torch.tensor(pages, dtype=torch.long),
                      received=[bytearray(len(pages)) for _ in range(num_layers)],
                      pages_left=num_layers * len(pages))
        self._transfers[transfer_id] = t
        return Destination(address=self.address, transfer_id=transfer_id, num_pages=len(pages),
                           page_size=self.page_size, backend="grpc", token=t.token)

    def _finish(self, t: _Transfer, state: TransferState, error: str | None = None, reason: str = "") -> None:
        if t.state in _LIVE:
            t.state, t.error = state, error
            if state is TransferState.DONE:
                t.done_ns = time.time_ns()
            t.done.set()
            if self.on_transfer_end is not None:
                try:
                    self.on_transfer_end(state, time.monotonic() - t.opened_at, reason)
                except Exception:  # noqa: BLE001 - an observer must not break the transfer
                    log.exception("on_transfer_end hook failed")

    # -- gRPC servicer ------------------------------------------------------
    async def Push(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PushAck:
        tid: str | None = None      # the transfer this stream proved it owns
        chunks = nbytes = 0
        try:
            async for chunk in request_iterator:
                try:
                    if tid is not None and chunk.transfer_id != tid:
                        raise _Reject(_Code.INVALID_ARGUMENT, "one transfer per Push stream",
                                      self._transfers.get(tid))
                    t = await self._accept(chunk)
                except _Reject as r:
                    self.chunks_rejected += 1
                    if r.fail is not None:
                        self._finish(r.fail, TransferState.FAILED, r.msg, r.reason)
                    await context.abort(r.code, r.msg)
                tid = t.transfer_id
                chunks += 1
                nbytes += len(chunk.k) + len(chunk.v)
        except asyncio.CancelledError:  # the sender went away or cancelled
            t = self._transfers.get(tid or "")
            if t is not None:
                self._finish(t, TransferState.FAILED, "Push stream broken before the transfer completed",
                             "stream_broken")
            raise
        if tid is None:
            await context.abort(_Code.INVALID_ARGUMENT, "empty Push stream")
        t = self._transfers.get(tid)
        if t is None:
            await context.abort(_Code.NOT_FOUND, f"transfer {tid!r} was closed")
        if t.state is not TransferState.DONE:
            left = t.pages_left
            self._finish(t, TransferState.FAILED, f"Push stream ended with {left} layer-pages missing",
                         "incomplete")
            await context.abort(_Code.FAILED_PRECONDITION, f"transfer is {t.state.value}; {left} layer-pages missing")
        return pb.PushAck(transfer_id=tid, chunks=chunks, bytes=nbytes)

    def _check(self, chunk: pb.KVChunk) -> _Transfer:
        """Cheap checks; raises _Reject. Bad content under a valid token fails the transfer."""
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            raise _Reject(_Code.NOT_FOUND, f"unknown transfer {chunk.transfer_id!r}")
        if not hmac.compare_digest(bytes(chunk.token), t.token):
            raise _Reject(_Code.PERMISSION_DENIED, "bad transfer token")
        if t.state not in _LIVE:
            raise _Reject(_Code.FAILED_PRECONDITION, f"transfer is {t.state.value}")

        def bad(msg: str) -> _Reject:
            return _Reject(_Code.INVALID_ARGUMENT, msg, t)
        n, off, layer = chunk.num_pages, chunk.page_offset, chunk.layer
        if not 0 <= layer < t.num_layers:
            raise bad(f"layer {layer} outside 0..{t.num_layers - 1}")
        if n < 1 or off < 0 or off + n > len(t.pages):
            raise bad(f"pages {off}..{off + n - 1} outside the reservation 0..{len(t.pages) - 1}")
        pool = self.k_layers[layer]
        if chunk.dtype != dtype_name(pool.dtype):
            raise bad(f"dtype {chunk.dtype!r} != pool dtype {dtype_name(pool.dtype)!r}")
        want = n * pool[0].numel() * pool.element_size()
        if len(chunk.k) != want or len(chunk.v) != want:
            raise bad(f"k/v are {len(chunk.k)}/{len(chunk.v)} bytes, expected {want} each")
        if any(t.received[layer][off:off + n]):
            raise bad(f"layer {layer} pages {off}..{off + n - 1} sent twice")
        return t

    async def _accept(self, chunk: pb.KVChunk) -> _Transfer:
        t = self._check(chunk)
        payload = len(chunk.k) + len(chunk.v)
        if payload > _INLINE_CRC_BYTES:
            crc = await asyncio.to_thread(_chunk_crc, chunk.k, chunk.v)
        else:
            crc = _chunk_crc(chunk.k, chunk.v)
        if crc != chunk.crc32:
            raise _Reject(_Code.INVALID_ARGUMENT, "crc32 mismatch", t, reason="crc_mismatch")
        self._check(chunk)                                # state may have moved while hashing
        self._write(t, chunk)                             # no await between check and write
        self.bytes_received += payload
        self.chunks_received += 1
        if t.state is TransferState.PENDING:
            t.state = TransferState.IN_PROGRESS
            t.first_write_ns = time.time_ns()
        if t.pages_left == 0:
            if t.last_write is not None:                  # CUDA pool: the data must be in place
                await asyncio.to_thread(t.last_write.synchronize)
            self._finish(t, TransferState.DONE)
        return t

    def _write(self, t: _Transfer, chunk: pb.KVChunk) -> None:
        """Copy a validated chunk into the pool. CUDA pools are written on a side stream from
        pinned memory (never blocking the loop behind the engine's kernels); DONE waits for it."""
        layer, off, n = chunk.layer, chunk.page_offset, chunk.num_pages
        pools = (self.k_layers[layer], self.v_layers[layer])
        srcs = []
        for pool, data in zip(pools, (chunk.k, chunk.v)):
            with warnings.catch_warnings():  # protobuf bytes are read-only; we only read them
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(data, dtype=torch.uint8)
            srcs.append(src.view(pool.dtype).view(n, *pool.shape[1:]))
        idx = t.page_index[off:off + n]
        if self._stream is None:
            for pool, src in zip(pools, srcs):
                pool.index_copy_(0, idx, src)
        else:
            with torch.cuda.stream(self._stream):
                idx = idx.to(self._device, non_blocking=True)
                for pool, src in zip(pools, srcs):
                    pool.index_copy_(0, idx, src.pin_memory().to(self._device, non_blocking=True))
                t.last_write = torch.cuda.Event()
                t.last_write.record(self._stream)
        t.received[layer][off:off + n] = b"\x01" * n
        t.pages_left -= n

# ---------------------------------------------------------------------------- sender

