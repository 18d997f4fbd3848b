"""OpenAI-shaped errors for the gateway.

Every failure the router reports, whatever raised it, leaves as
`{"error": {"message", "type", "param", "code"}}` with a matching HTTP
status (or, mid-stream, as one final SSE `data: {"error": ...}` event).

    raise OpenAIError(400, "...", param="temperature")   # anywhere in a handler
    install_error_handlers(app)                          # maps it (and FastAPI's own
                                                         # 404/405/422/JSON errors) to JSON
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class OpenAIError(Exception):
    """An error that becomes an OpenAI error body with HTTP `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after   # seconds, sent as Retry-After (503 / 429)
        self.headers = dict(headers or {})   # sent as they are (405: Allow)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.to_dict(), status_code=self.status, headers=headers or None)


class BackendError(OpenAIError):
    """A decode/prefill worker failed, was unreachable or timed out (5xx)."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(status, message, code=code, retry_after=retry_after)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError | RequestValidationError) -> OpenAIError:
    """First pydantic error as a 400, naming the offending field in `param`."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    # Prefer our own messages (value errors, unknown fields) over pydantic's per-union-branch type errors.
    err = next((e for e in errors if e.get("type") in ("value_error", "extra_forbidden", "json_invalid")), errors[0])
    param = _clean_loc(err) or None
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "extra_forbidden":
        msg = f"unsupported parameter: {param!r} is not supported by this server"
    elif err.get("type") == "json_invalid":
        msg = f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
        param = None
    elif param:
        msg = f"{param}: {msg}"
    chosen = _clean_loc(err)
    # Union branches report the parent location too ("content" for "content.0"): not another error.
    others = {p for p in map(_clean_loc, errors) if p != chosen and not chosen.startswith(p + ".")}
    if others:
        msg += f" (also invalid: {', '.join(sorted(p or '<body>' for p in others))})"
    return bad_request(msg, param=param)


def _clean_loc(err: Any) -> str:
    """'messages.0.content' from a pydantic error location, without union-branch tags
    ("str", "list[int]", "function-after[...]")."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(p for p in loc if not ("[" in p or p in {"str", "int", "float", "list", "dict", "bool"}))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI/Starlette would render itself into the OpenAI shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).to_response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code,
                           headers=getattr(exc, "headers", None)).to_response()   # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}").to_response()
