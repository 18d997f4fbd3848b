"""OpenAI-compatible HTTP gateway (FastAPI).

Lifecycle of one request:
  1. auth (`Authorization: Bearer`, when RouterConfig.api_key is set) -> 401
  2. `protocol.parse_request`: JSON + schema + ranges + unsupported fields -> 400; unknown
     fields are ignored, warned about once per name and counted (router/ignored.py)
  3. model name -> 404 model_not_found
  4. a text prompt that cannot fit max_model_len even at its fewest possible tokens -> 400
     before any tokenizer work; tokenize (prompt text or chat template; long texts on a
     worker thread, `router/tokenize.py`) and check token ids against the vocabulary and
     prompt + max_tokens against max_model_len (the smallest the workers report) -> 400.
     Chat `tools`: router/tools.py plans them first (tool_choice; 400s), the template gets
     them, and "required" / named constrain every job to the call schema
  5. a `generation.Work` of one `Job` per prompt (a completions batch has several, each its
     own cluster request) run by router/generation.py: the JSON answer, or the SSE stream
     (the first worker message of every job is awaited before the 200, so an unreachable
     worker is a plain 5xx JSON error; a later failure is a final SSE `{"error": ...}` event).
     Whenever a request ends early (stop string, client disconnect, error, a failed sibling
     prompt) its backend iterators are closed, which aborts them on the workers.
  Metrics (router/metrics.py, GET /metrics): the ASGI middleware counts every request by
  route and status; each job feeds its own RequestTimer (time to first token, inter-token
  gaps, end-to-end latency).
  POST /tokenize and /detokenize (vLLM's shapes, same auth): router/tokens_api.py.
  Operator dashboard (router/dashboard.py): GET /dashboard and its JSON, /dashboard/state.
"""
from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import replace
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from engine.sampling_params import SamplingParams
from router.backend import DecodeClient
from router.config import RouterConfig
from router.dashboard import install as install_dashboard
from router.errors import OpenAIError, bad_request, install_error_handlers
from router.generation import Generation, Job, Work, sample_seed
from router.ignored import IgnoredFields
from router.metrics import MetricsMiddleware, RouterMetrics
from router.protocol import (ChatCompletionRequest, CompletionRequest, BaseSamplingRequest, parse_request,
                             unknown_fields)
from router.openapi import install as install_openapi
from router.tokenize import Tokenization
from router.tokens_api import make_router as tokens_router
from router.tools import plan_tools, with_tools

log = logging.getLogger(__name__)

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

    def sampling_params(self, req: BaseSamplingRequest, n_prompt: int) -> SamplingParams:
        """The prompt's sampling parameters, once its length fits the context with max_tokens."""
        limit = self.max_model_len()
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
        return req.sampling_params(max_tokens)

    def make_work(self, req: BaseSamplingRequest, prompts: list[list[int]], prefix: str, chat: bool,
                  texts: list[str | None] | None = None) -> Work:
        """texts: the prompts as sent, where they were text (what echo returns)."""
        model = self.resolve_model(req.model)
        if req.stop_token_ids:
            self.check_token_ids(list(req.stop_token_ids), "stop_token_ids")
        if req.logit_bias:
            self.check_token_ids(req.logit_bias_ids(), "logit_bias")
        rid = f"{prefix}-{uuid.uuid4().hex}"
        texts = texts or [None] * len(prompts)
        n, k = req.num_choices, req.num_samples()
        single = len(prompts) == 1 and k == 1
        jobs, show_lp = [], False
        for i, (ids, text) in enumerate(zip(prompts, texts)):
            params = self.sampling_params(req, len(ids))
            show_lp = params.logprobs >= 0
            for j in range(k):
                p = params if j == 0 else replace(params, seed=sample_seed(params.seed, j))
                if k > n and p.logprobs < 0:
                    p = replace(p, logprobs=0)      # best_of ranks samples by cumulative logprob
                jobs.append(Job(request_id=rid if single else f"{rid}-{len(jobs)}", index=i * n + j,
                                prompt_ids=ids, params=p, prompt_text=text, group=i, sample=j))
        return Work(request_id=rid, model=model, created=int(time.time()), chat=chat, jobs=tuple(jobs),
                    stop=req.stop_strings(), stream=req.is_stream, include_usage=req.include_usage,
                    return_token_ids=req.return_token_ids, echo=bool(getattr(req, "echo", False)),
                    n=n, best_of=k, show_logprobs=show_lp)

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

    async def completion_work(self, req: CompletionRequest) -> Work:
        self.resolve_model(req.model)  # 404 before any tokenizer work
        prompts = req.prompts()
        for p in prompts:
            if isinstance(p, str):
                self.check_text_fits(req, len(p), "prompt")
        ids_list = []
        for p in prompts:
            if isinstance(p, str):
                ids = await self.tokenization.encode(p)
            else:
                ids = list(p)
                self.check_token_ids(ids, "prompt")
            ids_list.append(ids)
        return self.make_work(req, ids_list, "cmpl", chat=False,
                              texts=[p if isinstance(p, str) else None for p in prompts])

    async def chat_work(self, req: ChatCompletionRequest) -> Work:
        self.resolve_model(req.model)
        messages = [m.to_template() for m in req.messages]
        self.check_text_fits(req, sum(len(m["content"]) for m in messages), "messages")
        plan = plan_tools(req.tools, req.tool_choice, self.tokenizer, self.config.tool_call_parser)
        try:
            out = await self.tokenization.chat(messages, tools=plan.template_tools if plan else None)
        except Exception as exc:  # noqa: BLE001 - template errors (bad roles, no template) are the caller's
            raise bad_request(f"could not apply the chat template: {exc}", param="messages") from None
        return with_tools(self.make_work(req, [_input_ids(out)], "chatcmpl", chat=True), plan)


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
    generation = Generation(client, tokenizer, metrics)
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
        work = await gw.completion_work(req)
        return await (generation.stream(request, work) if work.stream else generation.complete(request, work))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            raw = await _read_body(request, config.max_request_bytes)
        except ClientDisconnect:                 # gone before its body arrived: nothing to answer
            return Response(status_code=499)
        req = parse_request(ChatCompletionRequest, raw)
        if req.model_extra or req.stream_options is not None:
            ignored.note("/v1/chat/completions", unknown_fields(req))
        work = await gw.chat_work(req)
        return await (generation.stream(request, work) if work.stream else generation.complete(request, work))

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tandem",
             "root": config.model_path, "max_model_len": gw.max_model_len()}
            for name in config.model_names]}

    app.include_router(v1)
    app.include_router(tokens_router(gw, ignored, [Depends(require_api_key)],
                                     lambda request: _read_body(request, config.max_request_bytes)))
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
