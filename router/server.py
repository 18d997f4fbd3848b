"""OpenAI-compatible HTTP gateway (FastAPI).

Lifecycle of one request:
  1. auth (`Authorization: Bearer`, when RouterConfig.api_key is set) -> 401
  2. `protocol.parse_request`: JSON + schema + ranges + unsupported fields -> 400; unknown
     fields are ignored, warned about once per name and counted (router/ignored.py)
  3. model name -> 404 model_not_found
  4. a text prompt that cannot fit max_model_len even at its fewest possible tokens -> 400
     before any tokenizer work; tokenize (prompt text or chat template; long texts on a
     worker thread, `router/tokenize.py`) and check token ids against the vocabulary and
     prompt + max_tokens against max_model_len (the smallest the workers report) -> 400
  5. `DecodeClient.generate` -> GenerateResponse stream -> IncrementalDetokenizer
     -> StopStringMatcher -> text deltas (`_text_deltas`)
  6. non-streaming: one JSON object; streaming: SSE chunks, a finish chunk, an
     optional usage chunk, `data: [DONE]`. The first worker message is awaited
     before the 200 is sent, so an unreachable worker is a plain 5xx JSON error;
     a later failure is a final SSE `{"error": ...}` event.
  Whenever the request ends early (stop string, client disconnect, error) the
  backend iterator is closed, which cancels the gRPC call on the worker.
  Metrics (router/metrics.py, GET /metrics): the ASGI middleware counts every
  request by route and status; `_text_deltas` feeds the request's RequestTimer
  (time to first token, inter-token gaps, end-to-end latency).
  Operator dashboard (router/dashboard.py): GET /dashboard and its JSON, /dashboard/state.
"""
from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from router.backend import DecodeClient
from router.config import RouterConfig
from router.dashboard import install as install_dashboard
from router.detokenize import IncrementalDetokenizer, StopStringMatcher
from router.errors import OpenAIError, bad_request, install_error_handlers
from router.metrics import ARRIVAL_NS_KEY, MetricsMiddleware, RequestTimer, RouterMetrics
from router.ignored import IgnoredFields
from router.protocol import (ChatCompletionRequest, CompletionRequest, BaseSamplingRequest, parse_request,
                             unknown_fields)
from router.sse import SSEResponse, _unless_disconnected, sse_event
from router.openapi import install as install_openapi
from router.tokenize import Tokenization

log = logging.getLogger(__name__)

_FINISH = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length"}


@dataclass
class _Usage:
    """Per-request token counters (mutated while the request streams)."""
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class _Job:
    """A validated, tokenized request ready for a decode worker."""
    request_id: str
    model: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False


class _Gateway:
    """Everything the route handlers share: config, tokenizer, backend client."""

    def __init__(self, config: RouterConfig, tokenizer: Any, client: DecodeClient,
                 metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.client = client
        self.metrics = metrics or RouterMetrics()
        self.tokenization = Tokenization(tokenizer)
        self.vocab_size = len(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ---- validation that needs the tokenizer / config ---------------------------

    def resolve_model(self, name: str | None) -> str:
        names = self.config.model_names
        if name is None:
            return names[0]
        if name not in names:
            raise OpenAIError(404, f"The model `{name}` does not exist. Served models: {', '.join(names)}",
                              param="model", code="model_not_found")
        return name

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids or (min(ids) >= 0 and max(ids) < self.vocab_size):
            return                       # C-speed bounds; the loop below only names the culprit
        for pos, tok in enumerate(ids):
            if not 0 <= tok < self.vocab_size:
                raise bad_request(f"{param}: token id {tok} at position {pos} is out of range "
                                  f"for the vocabulary (valid ids are 0..{self.vocab_size - 1})", param=param)

    def max_model_len(self) -> int:
        """The limit requests must fit: the router's own (--max-model-len or config.json), lowered
        to the smallest one the workers report (their KV pools can hold less)."""
        reported = self.client.max_model_len()
        return self.config.max_model_len if reported is None else min(self.config.max_model_len, reported)

    def make_job(self, req: BaseSamplingRequest, prompt_ids: list[int], prefix: str) -> _Job:
        model = self.resolve_model(req.model)
        limit = self.max_model_len()
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("prompt must not be empty", param="prompt")
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = limit - n_prompt
        if n_prompt + max_tokens > limit or max_tokens < 1:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, {max(max_tokens, 1)} "
                f"in the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded")
        if req.stop_token_ids:
            self.check_token_ids(list(req.stop_token_ids), "stop_token_ids")
        return _Job(request_id=f"{prefix}-{uuid.uuid4().hex}", model=model, created=int(time.time()),
                    prompt_ids=prompt_ids, params=req.sampling_params(max_tokens), stop=req.stop_strings(),
                    stream=req.is_stream, include_usage=req.include_usage,
                    return_token_ids=req.return_token_ids)

    def check_text_fits(self, req: BaseSamplingRequest, num_chars: int, param: str) -> None:
        """Before tokenizing: a text of num_chars characters has at least min_tokens(num_chars)
        tokens; when even that cannot fit, the 400 comes now, at no tokenizer cost."""
        at_least = self.tokenization.min_tokens(num_chars)
        limit = self.max_model_len()
        max_tokens = req.requested_max_tokens() or 1
        if at_least and at_least + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your {param} of "
                f"{num_chars} characters has at least {at_least} tokens, and {max_tokens} more were "
                f"requested for the completion. Please reduce the {param} or max_tokens.",
                param=param, code="context_length_exceeded")

    async def completion_job(self, req: CompletionRequest) -> _Job:
        self.resolve_model(req.model)  # 404 before any tokenizer work
        if isinstance(req.prompt, str):
            self.check_text_fits(req, len(req.prompt), "prompt")
            ids = await self.tokenization.encode(req.prompt)
        else:
            ids = list(req.prompt)
            self.check_token_ids(ids, "prompt")
        return self.make_job(req, ids, "cmpl")

    async def chat_job(self, req: ChatCompletionRequest) -> _Job:
        self.resolve_model(req.model)
        messages = [m.to_template() for m in req.messages]
        self.check_text_fits(req, sum(len(m["content"]) for m in messages), "messages")
        try:
            out = await self.tokenization.chat(messages)
        except Exception as exc:  # noqa: BLE001 - template errors (bad roles, no template) are the caller's
            raise bad_request(f"could not apply the chat template: {exc}", param="messages") from None
        return self.make_job(req, _input_ids(out), "chatcmpl")

    # ---- generation -------------------------------------------------------------

    async def _text_deltas(self, job: _Job, responses: AsyncIterator[pb.GenerateResponse],
                           usage: _Usage, all_ids: list[int] | None = None,
                           timer: RequestTimer | None = None) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish_reason or None); the last item has a finish reason.
        Closes `responses` (cancelling the gRPC call) before reporting a stop-string hit."""
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        matcher = StopStringMatcher(job.stop)
        hidden = self.eos_ids | set(job.params.stop_token_ids)
        async with aclosing(responses):
            async for resp in responses:
                ids = list(resp.token_ids)
                if timer is not None:
                    timer.on_tokens(len(ids))
                if all_ids is not None:
                    all_ids.extend(ids)
                usage.completion_tokens += len(ids)
                usage.cached_tokens = max(usage.cached_tokens, resp.cached_tokens)
                finished = resp.finish_reason != pb.FINISH_NONE
                if resp.finish_reason == pb.FINISH_STOP and ids and ids[-1] in hidden:
                    ids = ids[:-1]  # the EOS / stop token itself is not part of the text
                text = detok.push(ids)
                if finished:
                    text += detok.flush()
                safe, stopped = matcher.feed(text)
                if (stopped or finished) and timer is not None:
                    timer.on_finish(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
                if stopped:
                    await responses.aclose()  # frees the pages on the worker now
                    yield safe, "stop"
                    return
                if finished:
                    yield safe + matcher.flush(), _FINISH.get(resp.finish_reason, "stop")
                    return
                if safe:
                    yield safe, None
        raise OpenAIError(502, "decode worker stream ended without a finish reason", code="worker_error")

    async def complete(self, request: Request, job: _Job, chat: bool) -> Response:
        usage = _Usage(prompt_tokens=len(job.prompt_ids))
        token_ids: list[int] = []
        timer = self.metrics.timer(request.scope)

        async def collect() -> tuple[str, str]:
            parts: list[str] = []
            finish = "stop"
            responses = self.client.generate(job.request_id, job.prompt_ids, job.params,
                                             request.scope.get(ARRIVAL_NS_KEY, 0))
            async for delta, reason in self._text_deltas(job, responses, usage, token_ids, timer):
                parts.append(delta)
                finish = reason or finish
            return "".join(parts), finish

        result = await _unless_disconnected(request, collect)
        if result is None:
            return Response(status_code=499)
        text, finish = result
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if job.return_token_ids:
            choice["token_ids"] = token_ids
            choice["prompt_token_ids"] = job.prompt_ids
        return JSONResponse({"id": job.request_id, "object": "chat.completion" if chat else "text_completion",
                             "created": job.created, "model": job.model, "choices": [choice],
                             "usage": usage.to_dict()})

    async def stream(self, request: Request, job: _Job, chat: bool) -> Response:
        usage = _Usage(prompt_tokens=len(job.prompt_ids))
        timer = self.metrics.timer(request.scope)
        responses = self.client.generate(job.request_id, job.prompt_ids, job.params,
                                             request.scope.get(ARRIVAL_NS_KEY, 0))

        async def first() -> pb.GenerateResponse:
            try:
                return await anext(responses)
            except BaseException:
                await responses.aclose()
                raise

        head = await _unless_disconnected(request, first)  # worker errors here are plain HTTP errors
        if head is None:
            await responses.aclose()
            return Response(status_code=499)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant"} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return sse_event({"id": job.request_id, "object": obj, "created": job.created,
                              "model": job.model, "choices": [choice]})

        async def replay() -> AsyncIterator[pb.GenerateResponse]:
            async with aclosing(responses):
                yield head
                async for resp in responses:
                    yield resp

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for delta, reason in self._text_deltas(job, replay(), usage, timer=timer):
                    if delta or reason:
                        yield chunk(delta, reason)
                if job.include_usage:
                    yield sse_event({"id": job.request_id, "object": obj, "created": job.created,
                                     "model": job.model, "choices": [], "usage": usage.to_dict()})
            except OpenAIError as exc:
                log.warning("request %s: stream ended with an error (HTTP %d, %s): %s", job.request_id,
                            exc.status, exc.code or exc.type, exc.message)
                self.metrics.stream_errors.labels(exc.code or exc.type).inc()
                yield sse_event(exc.to_dict())
            except Exception as exc:  # noqa: BLE001 - the stream must end with an event, not a reset
                log.exception("request %s: internal error during the stream", job.request_id)
                self.metrics.stream_errors.labels("internal_error").inc()
                yield sse_event(OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}").to_dict())
            finally:
                await responses.aclose()
            yield "data: [DONE]\n\n"

        return SSEResponse(body(), on_close=responses.aclose)


def _input_ids(out: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list, a nested list, or (transformers 5)
    a BatchEncoding / dict with input_ids."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    return [int(t) for t in out]


def create_app(config: RouterConfig, tokenizer: Any, client: DecodeClient,
               metrics: RouterMetrics | None = None) -> FastAPI:
    """The gateway app. `tokenizer` is a HF (fast) tokenizer with a chat template;
    `client` is closed on app shutdown. `metrics` (default: a fresh registry) is
    served at GET /metrics and kept in `app.state.metrics`."""
    config = config.resolved()
    metrics = metrics or RouterMetrics()
    gw = _Gateway(config, tokenizer, client, metrics)
    ignored = IgnoredFields(metrics)
    client.set_event_hook(metrics.on_backend_event)
    if not config.etcd_endpoints:  # static members; an etcd view sets them on every change (router/members.py)
        metrics.set_members("decode", "static", len(config.decode_addresses))
        metrics.set_members("prefill", "static", len(config.prefill_addresses))

    membership = None
    if config.etcd_endpoints:  # etcd membership view feeds client.set_members (router/members.py)
        from router.members import RouterMembership

        membership = RouterMembership.from_config(config, client, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if membership is not None:
            await membership.start()
        await client.start(first_poll_s=2.0)   # workers' limits and load known before the first request
        yield
        if membership is not None:
            await membership.stop()
        await client.close()
        gw.tokenization.close()

    app = FastAPI(title="Tandem router", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        try:
            raw = await _read_body(request, config.max_request_bytes)
        except ClientDisconnect:                 # gone before its body arrived: nothing to answer
            return Response(status_code=499)
        req = parse_request(CompletionRequest, raw)
        if req.model_extra or req.stream_options is not None:
            ignored.note("/v1/completions", unknown_fields(req))
        job = await gw.completion_job(req)
        return await (gw.stream(request, job, chat=False) if job.stream else gw.complete(request, job, chat=False))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            raw = await _read_body(request, config.max_request_bytes)
        except ClientDisconnect:                 # gone before its body arrived: nothing to answer
            return Response(status_code=499)
        req = parse_request(ChatCompletionRequest, raw)
        if req.model_extra or req.stream_options is not None:
            ignored.note("/v1/chat/completions", unknown_fields(req))
        job = await gw.chat_job(req)
        return await (gw.stream(request, job, chat=True) if job.stream else gw.complete(request, job, chat=True))

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tandem",
             "root": config.model_path, "max_model_len": gw.max_model_len()}
            for name in config.model_names]}

    app.include_router(v1)
    install_openapi(app, api_key=config.api_key is not None)   # bodies and answers documented

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "ejected": client.ejections.snapshot()}
        if membership is not None:
            out["membership"] = membership.snapshot()
        return out

    install_dashboard(app, config, client, metrics, membership)   # GET /dashboard, /dashboard/state
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes (from
    Content-Length, or while it streams in): a huge body is never held or parsed whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body of {declared} bytes exceeds the limit of {limit} "
                               "(--max-request-bytes)", code="request_too_large")
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes (--max-request-bytes)",
                              code="request_too_large")
        parts.append(chunk)
    return b"".join(parts)
