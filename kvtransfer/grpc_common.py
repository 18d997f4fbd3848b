"""Shared pieces of the gRPC KV transfer backend (limits, byte helpers)."""
from __future__ import annotations

import zlib

import grpc
import torch

from kvtransfer.base import (TransferState)

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


