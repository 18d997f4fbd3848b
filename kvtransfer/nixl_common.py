"""Shared pieces of the NIXL KV backend: agent creation and the control-plane messages.

Every control message is a protobuf message of proto/tandem.proto (`NixlPoolLayout`,
`NixlSessionRequest` / `NixlSessionResponse`, and `NixlLayerNotif` as the payload of each
WRITE's NIXL notification): protobuf only. See
kvtransfer/nixl_backend.py for the protocol. Converters raise ValueError on anything
malformed or out of range.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import nixl  # noqa: F401  (ImportError here -> get_backend("nixl") raises TransferError)
from google.protobuf.message import DecodeError
from nixl import nixl_agent, nixl_agent_config, nixl_thread_sync_t

from kvtransfer.base import TransferState
from proto import tandem_pb2 as pb

WIRE_VERSION = 1
MAX_NOTIF_BYTES = 1024             # a layer notification is ~60 bytes; larger ones are not parsed
MEM_TYPES = ("DRAM", "VRAM")

_LIVE = (TransferState.PENDING, TransferState.IN_PROGRESS)
STATE_TO_PB = {TransferState.DONE: pb.NixlResult.DONE, TransferState.FAILED: pb.NixlResult.FAILED,
               TransferState.ABORTED: pb.NixlResult.ABORTED}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def make_agent(prefix: str) -> nixl_agent:
    """A NIXL agent with the UCX backend, a progress thread and thread-safe (STRICT) calls."""
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    cfg = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"],
                            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    agent = nixl_agent(name, cfg)
    if "UCX" not in agent.backends:
        raise RuntimeError("NIXL UCX backend plugin is not available")
    return agent


def mem_type(t) -> str:
    return "VRAM" if t.is_cuda else "DRAM"


def dev_id(t) -> int:
    return t.get_device() if t.is_cuda else 0


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LocalPool:
    """A KV pool as NIXL sees it: one contiguous [num_pages, page_size, kv_heads, head_dim]
    tensor per layer for K and for V, all of one shape, dtype and device."""
    mem_type: str
    dev_id: int
    num_pages: int
    page_size: int
    page_bytes: int             # bytes of one page of K (== of V) in one layer
    dtype: str
    k_addrs: tuple[int, ...]
    v_addrs: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.k_addrs)


def check_pool(k_layers, v_layers, page_size: int | None = None) -> LocalPool:
    """The pool's layout; ValueError unless its layers can be registered and addressed by page."""
    if len(k_layers) != len(v_layers) or not k_layers:
        raise ValueError("need the same non-zero number of K and V layers")
    k0 = k_layers[0]
    ps = k0.shape[1] if page_size is None and k0.dim() == 4 else page_size
    for k, v in zip(k_layers, v_layers):
        if (k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.shape[1] != ps
                or k.shape != k0.shape or k.dtype != k0.dtype or k.device != v.device):
            raise ValueError(f"pool layer shapes must be equal [pages, {ps}, kvh, hd]")
        if not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("pool layers must be contiguous to be registered with NIXL")
    return LocalPool(mem_type=mem_type(k0), dev_id=dev_id(k0), num_pages=k0.shape[0], page_size=ps,
                     page_bytes=k0[0].numel() * k0.element_size(), dtype=dtype_name(k0.dtype),
                     k_addrs=tuple(k.data_ptr() for k in k_layers),
                     v_addrs=tuple(v.data_ptr() for v in v_layers))


# ---------------------------------------------------------------------------- Hello (pool layout)
@dataclass(frozen=True)
class PoolLayout:
    """What a sender needs to write into a receiver's pool: its agent and where each page is."""
    agent_name: str
    mem_type: str               # "DRAM" | "VRAM"
    dev_id: int
    num_pages: int              # pool pages per layer
    page_bytes: int             # bytes of one page of K (== of V) in one layer
    dtype: str
    k_addrs: tuple[int, ...]    # base address of each layer's K pool
    v_addrs: tuple[int, ...]
    metadata: bytes             # the receiver agent's NIXL metadata (connection info, rkeys)

    @property
    def num_layers(self) -> int:
        return len(self.k_addrs)

    def to_proto(self) -> pb.NixlPoolLayout:
        return pb.NixlPoolLayout(wire_version=WIRE_VERSION, agent_name=self.agent_name, mem_type=self.mem_type,
                                 dev_id=self.dev_id, num_pages=self.num_pages, page_bytes=self.page_bytes,
                                 dtype=self.dtype, k_addrs=self.k_addrs, v_addrs=self.v_addrs,
                                 agent_metadata=self.metadata)

    @classmethod
    def from_proto(cls, msg: pb.NixlPoolLayout) -> PoolLayout:
        if msg.wire_version != WIRE_VERSION:
            raise ValueError(f"wire version {msg.wire_version} != {WIRE_VERSION}")
        if msg.mem_type not in MEM_TYPES or not msg.agent_name or not msg.agent_metadata:
            raise ValueError("bad pool layout (memory type, agent name or metadata)")
        if not msg.k_addrs or len(msg.k_addrs) != len(msg.v_addrs):
            raise ValueError("pool layout needs the same non-zero number of K and V layers")
        if msg.num_pages < 1 or msg.page_bytes < 1 or msg.dev_id < 0:
            raise ValueError("bad pool layout (pages, page bytes or device)")
        return cls(msg.agent_name, msg.mem_type, msg.dev_id, msg.num_pages, msg.page_bytes, msg.dtype,
                   tuple(msg.k_addrs), tuple(msg.v_addrs), bytes(msg.agent_metadata))


# ---------------------------------------------------------------------------- NIXL notification
# Attached to each layer's WRITE; NIXL delivers it only after that WRITE (flushed) completed.
def layer_notif(transfer_id: str, token: bytes, layer: int, page_offset: int, num_pages: int,
                num_layers: int = 1) -> bytes:
    return pb.NixlLayerNotif(transfer_id=transfer_id, token=token, layer=layer, page_offset=page_offset,
                             num_pages=num_pages, num_layers=num_layers if num_layers > 1 else 0
                             ).SerializeToString()


def parse_layer_notif(data) -> pb.NixlLayerNotif:
    """The notification a peer sent, parsed; ValueError for anything that is not one."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_NOTIF_BYTES:
        raise ValueError("not a Tandem layer notification (type or size)")
    try:
        msg = pb.NixlLayerNotif.FromString(bytes(data))
    except (DecodeError, ValueError, TypeError) as e:
        raise ValueError(f"not a Tandem layer notification: {e}") from None
    if not msg.transfer_id or not msg.token or msg.num_pages < 1:
        raise ValueError("not a Tandem layer notification (empty fields)")
    return msg
