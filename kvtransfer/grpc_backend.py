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

from kvtransfer.base import Backend
from kvtransfer.grpc_common import (DEFAULT_MAX_CHUNK_BYTES, GRPC_OPTIONS, MAX_MESSAGE_BYTES,  # noqa: F401
                                    dtype_name, tensor_bytes)
from kvtransfer.grpc_receiver import GrpcKVReceiver
from kvtransfer.grpc_sender import GrpcKVSender, GrpcSendHandle  # noqa: F401

BACKEND = Backend(name="grpc", receiver_cls=GrpcKVReceiver, sender_cls=GrpcKVSender)
