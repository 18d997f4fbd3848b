"""KV transfer roles: a pollable state machine with one class per role.

The decode worker owns a `KVReceiver`; the prefill worker owns a `KVSender`.
One request's KV moves as one *transfer*:

  1. Receiver.open(transfer_id, pages, num_layers): the decode worker has
     reserved pool `pages`; the receiver remembers them, draws a random token
     and returns a `Destination` (address, transfer id, page count, page size,
     backend, token). State PENDING.
  2. The destination travels to the prefill worker inside `PrefillRequest.dst`
     (`Destination.to_proto()` / `from_proto()`).
  3. Sender.start(dst) -> SendHandle. As each layer finishes on the prefill
     side, `handle.send_layer(layer, k_pages, v_pages)` queues it (returns at
     once); `handle.finish()` says no more layers follow.
  4. Chunks arrive at the receiver, are validated and copied into the reserved
     pages (addressed by index 0..n-1 into the reservation, never by pool
     page id). First chunk -> IN_PROGRESS; every page of every layer exactly
     once -> DONE. A bad chunk -> FAILED.
  5. The sender's handle turns DONE when the receiver acknowledged everything
     (its DONE implies the receiver's DONE), FAILED on any error, ABORTED
     after `handle.abort()`.
  6. Either side may give up: `receiver.abort(id)` (later chunks are rejected
     and never written) or `handle.abort()`. The decode worker calls
     `receiver.close(id)` once it no longer cares, then frees the pages.

State machine (both roles):

    PENDING -> IN_PROGRESS -> DONE
        \\           \\
         +-----------+-> FAILED | ABORTED

DONE, FAILED and ABORTED are terminal. `poll()` never blocks; `wait()` is the
asyncio way to block until terminal (or a timeout).

Backends are picked by name via `get_backend(name)` and imported lazily, so
importing this package never imports gRPC, UCX or CUDA-only code.
"""
from __future__ import annotations

import abc
import asyncio
import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TransferState(enum.Enum):
    PENDING = "pending"          # opened / started, nothing moved yet
    IN_PROGRESS = "in_progress"  # some chunks moved ("receiving" / "sending")
    DONE = "done"                # every page of every layer arrived (and, for the sender, was acked)
    FAILED = "failed"            # a bad chunk, a broken stream, a timeout
    ABORTED = "aborted"          # the local side gave up on purpose

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.ABORTED)


class TransferError(Exception):
    """Misuse of a transfer (unknown id, duplicate open, bad arguments)."""


@dataclass(frozen=True)
class Destination:
    """Where a sender must write one transfer's KV (mirror of `pb.KVDestination`)."""

    address: str        # receiver address, e.g. "10.0.0.7:50061"
    transfer_id: str
    num_pages: int      # pages in the reservation; chunks address 0..num_pages-1
    page_size: int      # tokens per page
    backend: str        # "grpc", ...
    token: bytes        # per-transfer secret; every chunk must carry it

    def to_proto(self) -> Any:
        from proto import tandem_pb2 as pb
        return pb.KVDestination(address=self.address, transfer_id=self.transfer_id,
                                num_pages=self.num_pages, page_size=self.page_size,
                                backend=self.backend, token=self.token)

    @classmethod
    def from_proto(cls, msg: Any) -> "Destination":
        return cls(address=msg.address, transfer_id=msg.transfer_id, num_pages=msg.num_pages,
                   page_size=msg.page_size, backend=msg.backend or "grpc", token=bytes(msg.token))

    @classmethod
    def coerce(cls, dst: "Destination | Any") -> "Destination":
        return dst if isinstance(dst, Destination) else cls.from_proto(dst)


class KVReceiver(abc.ABC):
    """Decode-side role: owns the pool tensors and the open transfers.

    Not thread-safe: call every method from the event loop that serves the
    backend (the same loop as the gRPC server for the grpc backend).
    """

    bytes_received: int  # K+V payload bytes written into the pool, all transfers

    @abc.abstractmethod
    def open(self, transfer_id: str, pages: list[int], num_layers: int | None = None) -> Destination:
        """Start accepting KV for `pages` (pool page ids, in reservation order)."""

    @abc.abstractmethod
    def poll(self, transfer_id: str) -> TransferState:
        """Current state; raises TransferError for an unknown/closed id."""

    @abc.abstractmethod
    async def wait(self, transfer_id: str, timeout: float | None = None) -> TransferState:
        """Wait until terminal or `timeout` seconds; returns the state then (no side effects on timeout)."""

    @abc.abstractmethod
    def abort(self, transfer_id: str) -> None:
        """Reject every later chunk of this transfer; no-op if terminal or unknown."""

    @abc.abstractmethod
    def close(self, transfer_id: str) -> None:
        """Forget the transfer (aborting it first if still live); pages may then be freed."""

    @abc.abstractmethod
    def error(self, transfer_id: str) -> str | None:
        """Why the transfer FAILED (None otherwise)."""

    async def drained(self, transfer_id: str) -> None:
        """Return once no write of this (aborted or failed) transfer can still land in its
        pages; call it after `abort` and before `close`, then free the pages. Backends
        whose receiver does every write itself (grpc) are drained as soon as they abort."""

    @property
    @abc.abstractmethod
    def active_transfers(self) -> int:
        """Open transfers not yet terminal."""


LIVE_STATES = (TransferState.PENDING, TransferState.IN_PROGRESS)


class TransferTable:
    """The bookkeeping every receiver shares: open transfers by id, each an object with
    `state`, `error` and an asyncio `done` event; the backend supplies `_finish(t, state)`."""

    _transfers: dict

    def _get(self, transfer_id: str):
        try:
            return self._transfers[transfer_id]
        except KeyError:
            raise TransferError(f"unknown transfer {transfer_id!r}") from None

    def _check_open(self, transfer_id: str, pages: list[int], num_layers: int | None,
                    pool_layers: int, pool_pages: int) -> tuple[list[int], int]:
        """Validate an `open` call; returns (pages as ints, num_layers)."""
        num_layers = pool_layers if num_layers is None else num_layers
        if transfer_id in self._transfers:
            raise TransferError(f"transfer {transfer_id!r} is already open")
        if not 0 < num_layers <= pool_layers:
            raise TransferError(f"num_layers {num_layers} outside 1..{pool_layers}")
        pages = [int(p) for p in pages]
        if not pages or len(set(pages)) != len(pages) or not all(0 <= p < pool_pages for p in pages):
            raise TransferError("pages must be distinct pool page ids and not empty")
        return pages, num_layers

    def poll(self, transfer_id: str) -> TransferState:
        return self._get(transfer_id).state

    def error(self, transfer_id: str) -> str | None:
        return self._get(transfer_id).error

    def timing(self, transfer_id: str) -> tuple[int, int]:
        """(first accepted write, DONE) as wall-clock ns; 0 where it has not happened."""
        t = self._get(transfer_id)
        return t.first_write_ns, t.done_ns

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
        return sum(t.state in LIVE_STATES for t in self._transfers.values())


class HandleState:
    """`poll`, `error` and `wait` of a SendHandle whose state lives in `_state` / `_error`
    and whose driving task `_task` ends when the handle is terminal."""

    _state: TransferState
    _error: str | None
    _task: "asyncio.Task"

    def poll(self) -> TransferState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    async def wait(self, timeout: float | None = None) -> TransferState:
        await asyncio.wait({self._task}, timeout=timeout)
        return self._state


def check_send_args(dst: Destination, layer: int, k_pages: "torch.Tensor", v_pages: "torch.Tensor",
                    page_offset: int) -> int:
    """Validate one `send_layer` call against its destination; returns the page count."""
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype or k_pages.dim() != 4:
        raise ValueError("k_pages and v_pages must have equal 4-D shapes and dtypes")
    n = k_pages.shape[0]
    if k_pages.shape[1] != dst.page_size:
        raise ValueError(f"page size {k_pages.shape[1]} != destination's {dst.page_size}")
    if n < 1 or page_offset < 0 or page_offset + n > dst.num_pages or layer < 0:
        raise ValueError(f"pages {page_offset}..{page_offset + n - 1} outside 0..{dst.num_pages - 1}")
    return n


class SendHandle(abc.ABC):
    """Prefill-side view of one transfer. `send_layer`, `finish` and `abort`
    are thread-safe (they may be called from the engine thread)."""

    @abc.abstractmethod
    def send_layer(self, layer: int, k_pages: "torch.Tensor", v_pages: "torch.Tensor",
                   page_offset: int = 0) -> None:
        """Queue one layer's K and V, [n, page_size, kv_heads, head_dim], for reservation
        pages page_offset..page_offset+n-1. Returns at once. The tensors must not be
        modified until the handle is terminal (indexing a pool with a page list,
        `k[layer][page_ids]`, already yields a private copy). Dropped if terminal."""

    def send_pool(self, page_table: list[int], num_layers: int, ready=None, on_written=None) -> None:
        """Queue every one of `num_layers` layers of reservation pages 0..len(page_table)-1
        straight from the sender's bound pool (`KVSender.bind_pool`): reservation page i is
        pool page page_table[i]. `ready` (a CUDA event, or None) is when the pool holds them.
        Nothing is copied, so the caller must keep those pool pages unchanged until the
        handle is terminal. `on_written(error_or_None)`, if given, runs (on any thread) once
        the data has left the pool (or will not). Only for senders whose `bind_pool` returned True."""
        raise NotImplementedError(f"{type(self).__name__} cannot send from a pool")

    @abc.abstractmethod
    def finish(self) -> None:
        """No more layers follow; the handle turns DONE once the receiver acked all."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop sending; state ABORTED. The receiver sees a broken stream (FAILED)."""

    @abc.abstractmethod
    def poll(self) -> TransferState: ...

    @abc.abstractmethod
    async def wait(self, timeout: float | None = None) -> TransferState:
        """Wait until terminal or `timeout` seconds; returns the state then."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the handle FAILED (None otherwise)."""


class KVSender(abc.ABC):
    """Prefill-side role: starts transfers and owns connections to receivers."""

    bytes_sent: int

    def bind_pool(self, k_layers: list, v_layers: list) -> bool:
        """Offer the prefill engine's KV pool (one [num_pages, page_size, kv_heads, head_dim]
        tensor per layer for K and for V) for `SendHandle.send_pool`. True if this sender can
        send from it without copies; False (the default) means use `send_layer`."""
        return False

    @abc.abstractmethod
    def start(self, dst: "Destination | Any") -> SendHandle:
        """Begin a transfer to `dst` (a Destination or a pb.KVDestination)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Abort live handles and release connections."""


@dataclass(frozen=True)
class Backend:
    name: str
    receiver_cls: type[KVReceiver]
    sender_cls: type[KVSender]


# name -> module defining a module-level `BACKEND: Backend`. Imported on demand only.
_BACKEND_MODULES: dict[str, str] = {
    "grpc": "kvtransfer.grpc_backend",
    "nixl": "kvtransfer.nixl_backend",
}


def available_backends() -> list[str]:
    return sorted(_BACKEND_MODULES)


def get_backend(name: str) -> Backend:
    """Import and return the backend called `name` ("grpc", "nixl")."""
    try:
        module_name = _BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown KV transfer backend {name!r}; known: {available_backends()}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TransferError(f"KV transfer backend {name!r} is not available: {e}") from e
    return module.BACKEND
