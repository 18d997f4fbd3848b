"""The router's OpenAPI document: request bodies from the pydantic request models, responses as
the handlers build them.

The POST handlers read their raw body themselves (size limit, depth bound, surrogates:
`router/protocol.parse_request`), so FastAPI cannot see what they take. `install(app)` makes
`app.openapi()` build the usual document and then add:
  - `components.schemas`: CompletionRequest and ChatCompletionRequest exactly as pydantic
    validates them (nested models under their own names), and the response shapes below;
  - per route (the two generation routes, /tokenize and /detokenize): the request body (required, application/json), the 200 answer (JSON, or
    text/event-stream when `stream` is true) and every error status the route can give,
    each in the OpenAI error shape (router/errors.py).
The response models here only describe: the handlers build plain dicts. The schemathesis test
(tests/test_openapi.py) checks every real answer against them, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.protocol import ChatCompletionRequest, CompletionRequest
from router.tokens_api import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = None          # return_token_ids (vLLM extension)
    prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


_ERRORS = {
    "400": "invalid request: body, field values, prompt too long for the context",
    "401": "missing or wrong API key (--api-key)",
    "404": "unknown model",
    "413": "body larger than --max-request-bytes",
    "499": "the client went away before its answer",
    "500": "internal error",
    "502": "a worker failed the request",
    "503": "no worker can take it now (overloaded, unreachable); see Retry-After",
    "504": "past the request timeout",
}
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "description": "one server-sent event: `data: {chunk}` (a `text_completion` or `chat.completion.chunk` "
                   "object), an optional usage chunk (stream_options.include_usage), then `data: [DONE]`; a "
                   "failure mid-stream is a final `data: {\"error\": ...}` event"}}}


def _ref(model: type[BaseModel], components: dict[str, Any], mode: str = "serialization") -> dict[str, Any]:
    s = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    components.update(s.pop("$defs", {}))
    components[model.__name__] = s
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(codes: tuple[str, ...], err: dict[str, Any]) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": {"application/json": {"schema": err}}} for c in codes}


def install(app: FastAPI, api_key: bool) -> None:
    """Replace app.openapi with the builder described in the module docstring."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        comps: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
        err = _ref(ErrorResponse, comps)
        auth = ("401",) if api_key else ()
        post_errors = ("400", *auth, "404", "413", "499", "500", "502", "503", "504")
        for path, req, resp in (("/v1/completions", CompletionRequest, Completion),
                                ("/v1/chat/completions", ChatCompletionRequest, ChatCompletion)):
            op = doc["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": _ref(req, comps, mode="validation")}}}
            op["responses"] = {"200": {"description": "the completion (JSON), or with stream=true an SSE stream",
                                       "content": {"application/json": {"schema": _ref(resp, comps)}, **_SSE}},
                               **_errors(post_errors, err)}
        for path, req, resp, what in (("/tokenize", TokenizeRequest, TokenizeResponse, "the prompt's token ids"),
                                      ("/detokenize", DetokenizeRequest, DetokenizeResponse, "the tokens' text")):
            op = doc["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": _ref(req, comps, mode="validation")}}}
            op["responses"] = {"200": {"description": what,
                                       "content": {"application/json": {"schema": _ref(resp, comps)}}},
                               **_errors(("400", *auth, "404", "413", "499", "500"), err)}
        models = doc["paths"]["/v1/models"]["get"]
        models["responses"] = {"200": {"description": "the served model names",
                                       "content": {"application/json": {"schema": _ref(ModelList, comps)}}},
                               **_errors(auth, err)}
        app.openapi_schema = doc
        return doc

    app.openapi = build
