"""gRPC KV transfer backend: `KVReceiver.Push` client-streaming, one stream per transfer.

Receiver (decode worker), on the gRPC server's event loop:
  1. `GrpcKVReceiver(k_layers, v_layers, page_size)`; `add_to_server(server)` before
     `server.start()`; set `.address` to the advertised host:port once bound.
  2. `open(transfer_id, pages)` -> Destination (PENDING).
  3. `Push` streams arrive: each KVChunk is checked (transfer known -> NOT_FOUND,
     token -> PERMISSION_DENIED, transfer still live -> FAILED_PRECONDITION, layer /
     page range / dtype / byte length / no page twice / crc32 -> INVALID_ARGUMENT),
     then copied into the reservation's pool pages (IN_PROGRESS). Every page of every
     layer once -> DONE; the stream is acked with PushAck. A stream that ends (or
     breaks) before DONE fails the transfer. Chunks with a wrong token never change
     the transfer's state (whoever sent them cannot prove they own it).
  4. `wait()` / `poll()`, then `close()` and free the pages.

Sender (prefill worker), on its event loop (`start` must be called on it):
  1. `GrpcKVSender()`; `start(dst)` opens a Push stream on a cached channel -> handle.
  2. `handle.send_layer(layer, k, v)` from any thread: CUDA tensors are staged into
     pinned host memory on the caller's current stream; serialisation (uint8 view ->
     bytes, crc32) runs on the sender's thread pool; chunks are streamed in order,
     split so each message stays under gRPC's default 4 MiB limit.
  3. `handle.finish()` closes the stream; DONE when the PushAck matches what was sent.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import secrets
import warnings
import zlib
from dataclasses import dataclass, field

import grpc
import torch

from kvtransfer.base import (Backend, Destination, KVReceiver, KVSender, SendHandle,
                             TransferError, TransferState)
from proto import tandem_pb2 as pb, tandem_pb2_grpc as pbg

MAX_MESSAGE_BYTES = 64 << 20
# Channel/server options; the chunk budget below keeps messages under the 4 MiB default anyway.
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
DEFAULT_MAX_CHUNK_BYTES = (4 << 20) - (64 << 10)  # K+V payload per KVChunk
_INLINE_CRC_BYTES = 256 << 10                     # smaller payloads are checked on the loop

_LIVE = (TransferState.PENDING, TransferState.IN_PROGRESS)
_Code = grpc.StatusCode


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor, any dtype (bf16 included; no numpy dtypes)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _chunk_crc(k: bytes, v: bytes) -> int:
    return zlib.crc32(v, zlib.crc32(k))


class _Reject(Exception):
    """A chunk is refused with `code`; `fail` (a verified transfer) is marked FAILED too."""

    def __init__(self, code: grpc.StatusCode, msg: str, fail: "_Transfer | None" = None) -> None:
        super().__init__(msg)
        self.code, self.msg, self.fail = code, msg, fail


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


class GrpcKVReceiver(KVReceiver, pbg.KVReceiverServicer):
    """Receives KV chunks into `k_layers[l]` / `v_layers[l]` ([num_pages, page_size, kvh, hd])."""

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
        self._transfers: dict[str, _Transfer] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pbg.add_KVReceiverServicer_to_server(self, server)

    # -- KVReceiver role ----------------------------------------------------
    def open(self, transfer_id: str, pages: list[int], num_layers: int | None = None) -> Destination:
        num_layers = len(self.k_layers) if num_layers is None else num_layers
        if transfer_id in self._transfers:
            raise TransferError(f"transfer {transfer_id!r} is already open")
        if not 0 < num_layers <= len(self.k_layers):
            raise TransferError(f"num_layers {num_layers} outside 1..{len(self.k_layers)}")
        pages = [int(p) for p in pages]
        if not pages or len(set(pages)) != len(pages) or not all(0 <= p < self.num_pool_pages for p in pages):
            raise TransferError("pages must be distinct pool page ids and not empty")
        t = _Transfer(transfer_id=transfer_id, token=secrets.token_bytes(16), pages=pages,
                      num_layers=num_layers,
                      page_index=torch.tensor(pages, dtype=torch.long),
                      received=[bytearray(len(pages)) for _ in range(num_layers)],
                      pages_left=num_layers * len(pages))
        self._transfers[transfer_id] = t
        return Destination(address=self.address, transfer_id=transfer_id, num_pages=len(pages),
                           page_size=self.page_size, backend="grpc", token=t.token)

    def _get(self, transfer_id: str) -> _Transfer:
        try:
            return self._transfers[transfer_id]
        except KeyError:
            raise TransferError(f"unknown transfer {transfer_id!r}") from None

    def poll(self, transfer_id: str) -> TransferState:
        return self._get(transfer_id).state

    def error(self, transfer_id: str) -> str | None:
        return self._get(transfer_id).error

    async def wait(self, transfer_id: str, timeout: float | None = None) -> TransferState:
        t = self._get(transfer_id)
        try:
            await asyncio.wait_for(t.done.wait(), timeout)
        except TimeoutError:
            pass
        return t.state

    def abort(self, transfer_id: str) -> None:
        t = self._transfers.get(transfer_id)
        if t is not None:
            self._finish(t, TransferState.ABORTED)

    def close(self, transfer_id: str) -> None:
        self.abort(transfer_id)
        self._transfers.pop(transfer_id, None)

    @property
    def active_transfers(self) -> int:
        return sum(t.state in _LIVE for t in self._transfers.values())

    def _finish(self, t: _Transfer, state: TransferState, error: str | None = None) -> None:
        if t.state in _LIVE:
            t.state, t.error = state, error
            t.done.set()

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
                        self._finish(r.fail, TransferState.FAILED, r.msg)
                    await context.abort(r.code, r.msg)
                tid = t.transfer_id
                chunks += 1
                nbytes += len(chunk.k) + len(chunk.v)
        except asyncio.CancelledError:  # the sender went away or cancelled
            t = self._transfers.get(tid or "")
            if t is not None:
                self._finish(t, TransferState.FAILED, "Push stream broken before the transfer completed")
            raise
        if tid is None:
            await context.abort(_Code.INVALID_ARGUMENT, "empty Push stream")
        t = self._transfers.get(tid)
        if t is None:
            await context.abort(_Code.NOT_FOUND, f"transfer {tid!r} was closed")
        if t.state is not TransferState.DONE:
            left = t.pages_left
            self._finish(t, TransferState.FAILED, f"Push stream ended with {left} layer-pages missing")
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
            raise _Reject(_Code.INVALID_ARGUMENT, "crc32 mismatch", t)
        self._check(chunk)                                # state may have moved while hashing
        self._write(t, chunk)                             # no await between check and write
        self.bytes_received += payload
        self.chunks_received += 1
        if t.state is TransferState.PENDING:
            t.state = TransferState.IN_PROGRESS
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


class GrpcSendHandle(SendHandle):
    def __init__(self, sender: "GrpcKVSender", dst: Destination, channel: grpc.aio.Channel) -> None:
        self.dst = dst
        self.chunks_sent = 0
        self.bytes_sent = 0
        self._sender = sender
        self._loop = sender._loop
        self._queue: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        self._state = TransferState.PENDING
        self._error: str | None = None
        self._finished = False
        self._call = pbg.KVReceiverStub(channel).Push(self._requests(), timeout=sender.deadline_s)
        self._task = self._loop.create_task(self._run())

    # -- any thread ---------------------------------------------------------
    def send_layer(self, layer: int, k_pages: torch.Tensor, v_pages: torch.Tensor,
                   page_offset: int = 0) -> None:
        if self._finished:
            raise TransferError("send_layer after finish()")
        if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype or k_pages.dim() != 4:
            raise ValueError("k_pages and v_pages must have equal 4-D shapes and dtypes")
        n = k_pages.shape[0]
        if k_pages.shape[1] != self.dst.page_size:
            raise ValueError(f"page size {k_pages.shape[1]} != destination's {self.dst.page_size}")
        if n < 1 or page_offset < 0 or page_offset + n > self.dst.num_pages:
            raise ValueError(f"pages {page_offset}..{page_offset + n - 1} outside 0..{self.dst.num_pages - 1}")
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

    def poll(self) -> TransferState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    # -- event loop ---------------------------------------------------------
    async def wait(self, timeout: float | None = None) -> TransferState:
        await asyncio.wait({self._task}, timeout=timeout)
        return self._state

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

    def _fail(self, error: str) -> None:
        if not self._state.terminal:
            self._state, self._error = TransferState.FAILED, error

    async def _requests(self):
        while True:
            fut = await self._queue.get()
            if fut is None or self._state.terminal:
                return
            try:
                chunks = await fut
            except Exception as e:  # noqa: BLE001 - reported through the handle
                self._fail(f"serialising KV failed: {e!r}")
                self._call.cancel()
                return
            for c in chunks:
                if self._state is TransferState.PENDING:
                    self._state = TransferState.IN_PROGRESS
                self.chunks_sent += 1
                self.bytes_sent += len(c.k) + len(c.v)
                yield c

    async def _run(self) -> None:
        try:
            ack = await self._call
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                self._abort()
                raise
            self._fail("Push call cancelled")
        except grpc.aio.AioRpcError as e:
            self._fail(f"{e.code().name}: {e.details()}")
        else:
            if ack.chunks != self.chunks_sent or ack.bytes != self.bytes_sent:
                self._fail(f"ack for {ack.chunks} chunks/{ack.bytes} B, sent {self.chunks_sent}/{self.bytes_sent}")
            elif not self._state.terminal:
                self._state = TransferState.DONE
                self._sender.bytes_sent += self.bytes_sent
        finally:
            self._sender._handles.discard(self)
            # release any queued serialisations
            while not self._queue.empty():
                fut = self._queue.get_nowait()
                if fut is not None:
                    fut.cancel()


class GrpcKVSender(KVSender):
    """Streams transfers to GrpcKVReceivers. Bound to the event loop of its first `start()`."""

    def __init__(self, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, deadline_s: float | None = None,
                 serialise_threads: int = 4, channel_options: list | None = None) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.deadline_s = deadline_s          # per-transfer RPC deadline (None: none)
        self.bytes_sent = 0
        self._options = list(GRPC_OPTIONS if channel_options is None else channel_options)
        self._executor = concurrent.futures.ThreadPoolExecutor(serialise_threads, thread_name_prefix="kv-ser")
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handles: set[GrpcSendHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

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
            channel = self._channels[dst.address] = grpc.aio.insecure_channel(dst.address, options=self._options)
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


BACKEND = Backend(name="grpc", receiver_cls=GrpcKVReceiver, sender_cls=GrpcKVSender)
