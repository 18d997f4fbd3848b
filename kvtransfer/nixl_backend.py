"""NIXL KV transfer backend: one-sided WRITEs straight into the decode worker's pool pages.

Data plane. The receiver (decode worker) registers every layer's K and V pool tensor with
its NIXL agent (UCX backend) once, at construction. The sender (prefill worker) writes each
layer's K/V pages with one NIXL WRITE request straight into the reserved pool pages: VRAM to
VRAM (UCX cuda_ipc on one host, RDMA across hosts) when both pools are on GPUs, DRAM to DRAM
(UCX shared memory / cma) on CPU. The `k_pages` / `v_pages` tensors handed to `send_layer` are
registered for the duration of their WRITE and written from in place (no staging copy, no
host bounce). A WRITE's request is always flushed, and NIXL sends the notification attached to
it only after the request completed, so a notification implies its bytes are in the pool.

Control plane (gRPC service `tandem.v1.NixlKV`, protobuf messages of proto/tandem.proto
only, no other serialisation). `NixlKVReceiver.add_to_server(server)` adds it to the
decode worker's gRPC server, so `Destination.address` is, as for the grpc backend, that
server's host:port (`receiver.address = advertise`):
  1. Hello (unary, once per receiver address per sender): returns NixlPoolLayout, the pool layout
     (agent name, memory type, device, pages, page bytes, dtype, per-layer base addresses)
     and its NIXL agent metadata, which the sender loads (`add_remote_agent`).
  2. Session (bidi stream of NixlSessionRequest / NixlSessionResponse, one per transfer):
     sender -> BEGIN(transfer id, token, sender agent name). The receiver checks the token
     (constant time) and answers PAGES(its agent name, num_layers, the reservation's pool
     page ids); a wrong token gets PERMISSION_DENIED and learns nothing. The transfer is
     now bound to that sender agent.
  3. Per layer the sender posts one WRITE carrying a NIXL notification whose payload is a
     serialized NixlLayerNotif(transfer_id, token, layer, page_offset, num_pages). The
     receiver polls notifications on its event loop (only while a session is open) and
     admits pages only for a notification that parses, with the right token, from the bound
     agent, for a live transfer, in range and not seen before; anything else (garbage
     included) is counted in `chunks_rejected` and ignored (a bad range or a duplicate
     under a valid token fails the transfer). First admitted layer -> IN_PROGRESS; every
     page of every layer -> DONE.
  4. After `finish()` and once every local WRITE completed, the sender sends END(writes),
     always, once. If the receiver has admitted that many writes and pages are still
     missing it fails the transfer ("incomplete"); notifications may trail END by up to
     `end_grace_s`.
  5. When the transfer is terminal the receiver sends RESULT(state, writes, bytes, error)
     and ends the stream; after a DONE, only once the END arrived (or the stream ended), so
     the RPC never finishes under the sender's END write. The sender's handle turns DONE
     only after finish(), all local WRITEs completed and a RESULT DONE whose counts match
     what it wrote (so its DONE implies the receiver's DONE); RESULT FAILED/ABORTED fails
     the handle and stops further WRITEs.
  Aborts and failures: `handle.abort()` (or the prefill process dying) breaks the session
  stream -> the receiver marks the transfer FAILED at once (no waiting for a timeout; the
  decode worker's `kv_transfer_timeout_s` still bounds a sender that never connects).
  `receiver.abort/close` -> RESULT ABORTED -> the sender stops posting. The sender's worker
  thread releases (cancels) every NIXL request and deregisters every buffer it registered,
  whatever the outcome; `sender.close()` drops remote agents; `receiver.shutdown()`
  deregisters the pool.

Threat model (honest version). NIXL/UCX WRITEs are one-sided: any process that obtains the
receiver's agent metadata (the Hello answer is unauthenticated, like the whole gRPC plane
here) can write bytes into *any* page of the registered pool, at any time, and the token
check cannot stop bytes from landing, because it happens after they land. What this backend
guarantees is admission control: a transfer turns DONE only from notifications carrying its
per-transfer 16-byte token, sent by the agent that proved the token on the Session; pages of
an unknown, aborted, failed or closed transfer are never admitted (the decode worker frees
or reuses them). The token itself is never sent to anyone who has not already shown it, and
page ids are only revealed after it. Not covered: a malicious peer on the fabric overwriting
pages of other (even DONE, in-use) sequences, and the window after an abort in which a WRITE
the sender had already posted may still land in the (soon freed) pages - the sender stops
posting as soon as it sees the RESULT or a broken stream, so at most the layers already in
flight land. Deployments must keep the NIXL/UCX fabric and the gRPC ports on a trusted
network, exactly as for the grpc backend's plaintext channel.
"""
from __future__ import annotations

from kvtransfer.base import Backend
from kvtransfer.nixl_receiver import NixlKVReceiver
from kvtransfer.nixl_sender import NixlKVSender, NixlSendHandle  # noqa: F401

# Modules: nixl_common (agent, PoolLayout, notification payload), nixl_receiver (decode side),
# nixl_sender (prefill side: handles, session), nixl_xfer_worker (the WRITE-posting thread).

BACKEND = Backend(name="nixl", receiver_cls=NixlKVReceiver, sender_cls=NixlKVSender)
