"""`POST /tokenize` and `POST /detokenize`, in vLLM's request and response shapes.

  /tokenize   {model?, prompt, add_special_tokens=true, return_token_strs=false}
              or {model?, messages, add_generation_prompt=true, add_special_tokens=false,
              return_token_strs=false} (the chat template, as /v1/chat/completions renders it)
              -> {count, max_model_len, tokens, token_strs}
  /detokenize {model?, tokens} -> {prompt}

Each request: auth like /v1 (the caller's dependency), body read with the size limit,
`protocol.parse_request` (400s in the OpenAI error shape; unknown fields ignored and noted
like the completions endpoints'), model name -> 404, then the router's tokenizer (long texts
on its worker threads, router/tokenize.py). No worker is involved.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import ClientDisconnect

from router.errors import bad_request
from router.ignored import IgnoredFields
from router.protocol import ChatMessage, StrictBool, StrictInt, StrictStr, parse_request, unknown_fields


class TokenizeRequest(BaseModel):
    """POST /tokenize: exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1)] = None
    add_special_tokens: StrictBool | None = None      # None: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True          # messages only
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool | None = False

    @field_validator("continue_final_message")
    @classmethod
    def _no_continue(cls, v: bool) -> bool:
        if v:
            raise ValueError("continue_final_message is not supported")
        return v

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


def make_router(gw: Any, ignored: IgnoredFields, dependencies: list[Any],
                read_body: Callable[[Request], Awaitable[bytes]]) -> APIRouter:
    """The two routes; `gw` is the server's gateway (tokenizer, tokenization, resolve_model,
    check_token_ids, max_model_len)."""
    api = APIRouter(dependencies=dependencies)

    async def parse(request: Request, model: type, route: str):
        """The validated body (its model resolved), or None when the client went away."""
        try:
            raw = await read_body(request)
        except ClientDisconnect:
            return None
        req = parse_request(model, raw)
        if req.model_extra:
            ignored.note(route, unknown_fields(req))
        gw.resolve_model(req.model)
        return req

    @api.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await parse(request, TokenizeRequest, "/tokenize")
        if req is None:
            return Response(status_code=499)
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await gw.tokenization.encode(req.prompt, add_special_tokens=special)
        else:
            try:
                ids = await gw.tokenization.chat([m.to_template() for m in req.messages],
                                                 add_generation_prompt=req.add_generation_prompt,
                                                 add_special_tokens=bool(req.add_special_tokens))
            except Exception as exc:  # noqa: BLE001 - template errors are the caller's
                raise bad_request(f"could not apply the chat template: {exc}", param="messages") from None
        strs = list(gw.tokenizer.convert_ids_to_tokens(ids)) if req.return_token_strs else None
        return _json(TokenizeResponse(count=len(ids), max_model_len=gw.max_model_len(), tokens=ids,
                                      token_strs=strs))

    @api.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest, "/detokenize")
        if req is None:
            return Response(status_code=499)
        gw.check_token_ids(req.tokens, "tokens")
        return _json(DetokenizeResponse(prompt=gw.tokenizer.decode(req.tokens)))

    return api


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")
