"""One request's placements on the workers: retries, prefill retries and migrations.

`run(client, ...)` is `DecodeClient.generate`'s body: place the request (decode worker,
prefill worker), open it on that worker's Decode.Stream, yield its responses; then

  - a decode worker that refused it before anything was streamed (stream UNAVAILABLE, not
    registered, dead engine): place it again elsewhere, at most MAX_ATTEMPTS placements;
  - a failed remote prefill (ERROR_PREFILL_FAILED): eject that prefill worker and place it
    again (another prefill worker, or the decode worker prefills itself);
  - a decode worker that died after tokens were streamed: migrate, i.e. place prompt +
    tokens so far on another decode worker with `output_offset`, at most
    `client.migration_limit` times, the caller seeing one unbroken stream;
  - anything else: a BackendError in the OpenAI error shape.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc

from engine.errors import RESOURCE_EXHAUSTED, is_resource_exhausted
from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from router.errors import BackendError
from router.streams import StreamBroken

if TYPE_CHECKING:  # pragma: no cover
    from router.backend import DecodeClient

log = logging.getLogger(__name__)

_STATUS_BY_KIND = {
    pb.ERROR_INTERNAL: (500, "worker_error"),
    pb.ERROR_INVALID_ARGUMENT: (400, "invalid_request"),
    pb.ERROR_RESOURCE_EXHAUSTED: (503, "worker_overloaded"),
    pb.ERROR_UNAVAILABLE: (503, "worker_unavailable"),
    pb.ERROR_PREFILL_FAILED: (503, "prefill_failed"),
}
MAX_ATTEMPTS = 3   # placements of one request (a refused decode worker or a failed prefill: the next)

_STATUS_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: (503, "worker_unavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "worker_overloaded"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (503, "worker_cancelled"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request"),
}


async def run(client: "DecodeClient", request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
              received_unix_ns: int = 0) -> AsyncIterator[pb.GenerateResponse]:
    client._bind_loop()
    deadline = time.monotonic() + client.request_timeout_s
    tried: set[str] = set()           # decode workers that refused or lost this request
    prefill_failed: set[str] = set()  # prefill workers that failed it
    generated: list[int] = []         # tokens already yielded (a migration re-prefills them)
    attempt = migrations = 0
    first_cached: int | None = None
    while True:
        if attempt:
            client._on_event("retried", "")
        ids = list(prompt_ids) + generated
        n = len(ids)
        address = await client._choose_decode(n, tried, deadline)
        client._track(address, request_id, n)
        prefill = client._choose_prefill(request_id, ids, prefill_failed)
        sampling = params if not generated else replace(   # a migration: its prompt logprobs went out already
            params, max_tokens=params.max_tokens - len(generated), prompt_logprobs=-1)
        request = pb.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=sampling.to_proto(),
            prefill_address=prefill,
            received_unix_ns=received_unix_ns,
            output_offset=len(generated),
        )
        if prefill:
            client.cache_index.note_routed(prefill, ids)
        last = attempt + 1 >= MAX_ATTEMPTS
        can_migrate = migrations < client.migration_limit
        rs = client._stream(address).open(request, deadline)
        retry = migrate = settled = False
        decode_lost = True    # the retry below is the decode worker's fault (not a failed prefill)
        try:
            while True:
                try:
                    response = await rs.get()
                except StreamBroken as exc:
                    if exc.code == grpc.StatusCode.UNAVAILABLE:
                        client.ejections.eject(address, f"Decode.Stream: {exc.details}")
                        if not rs.received and not last:
                            retry = True  # nothing reached that worker: try the next one
                            break
                        if (rs.received_tokens or generated) and can_migrate:
                            migrate = True  # it died mid-stream: continue elsewhere
                            break
                    raise _stream_error(exc, address, request_id) from None
                if prefill and not settled:
                    settled = True  # the first message means the prefill is done
                    client._untrack(prefill, request_id)
                    client.cache_index.settle(prefill, ids)
                reason = response.finish_reason
                if reason == pb.FINISH_ERROR:
                    kind = response.error_kind
                    if kind == pb.ERROR_PREFILL_FAILED and prefill and not last:
                        client.ejections.eject(prefill, f"failed a prefill: {response.error[:200]}")
                        prefill_failed.add(prefill)
                        retry, decode_lost = True, False  # another prefill worker (or decode itself)
                        break
                    if kind == pb.ERROR_UNAVAILABLE and not response.token_ids:
                        if not rs.received_tokens and not last:
                            retry = True  # refused before starting (not registered, dead engine)
                            break
                        if (rs.received_tokens or generated) and can_migrate:
                            migrate = True  # its engine died mid-stream: continue elsewhere
                            break
                    status, code = _STATUS_BY_KIND.get(kind, (500, "worker_error"))
                    if is_resource_exhausted(response.error):  # out of GPU memory: 503
                        status, code = 503, RESOURCE_EXHAUSTED
                    raise BackendError(status, f"decode worker {address} failed request {request_id}: "
                                               f"{response.error or 'unknown error'}", code=code)
                if reason == pb.FINISH_ABORT:
                    raise BackendError(503, f"decode worker {address} aborted request {request_id}"
                                            + (f": {response.error}" if response.error else ""),
                                       code="worker_aborted")
                if first_cached is None:
                    first_cached = response.cached_tokens
                response.cached_tokens = first_cached  # a migration's re-prefill is not the prompt's cache
                generated.extend(response.token_ids)
                yield response
                if reason != pb.FINISH_NONE:
                    return
        finally:
            rs.close()  # sends an abort unless the request finished
            client._untrack(address, request_id)
            if prefill:
                if not settled:
                    client.cache_index.settle(prefill, ids)
                client._untrack(prefill, request_id)
        if decode_lost:
            tried.add(address)
        if migrate:
            migrations += 1
            attempt = 0
            client._on_event("migrated", address)
            log.warning("decode worker %s lost request %s after %d tokens: continuing it elsewhere "
                        "(migration %d of at most %d)", address, request_id, len(generated), migrations,
                        client.migration_limit)
            continue
        if not retry:
            return
        attempt += 1


def _stream_error(exc: StreamBroken, address: str, request_id: str) -> BackendError:
    status, code = _STATUS_BY_CODE.get(exc.code, (500, "worker_error"))
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"request {request_id} timed out on decode worker {address}"
    else:
        message = f"decode worker {address} failed request {request_id}: {exc.code.name}: {exc.details}"
    return BackendError(status, message, code=code)
