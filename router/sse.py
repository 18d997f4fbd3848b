"""Server-sent events for the OpenAI streaming responses, and client-disconnect watching."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")


_ENC = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))   # one encoder, not one per event
_str = json.encoder.encode_basestring   # a str as JSON, not ASCII-escaped: what _ENC writes for one


def sse_event(obj: Any) -> str:
    return f"data: {_ENC.encode(obj)}\n\n"


class ChunkEvents:
    """One streamed request's chunk events, equal to sse_event of the chunk dict
    {"id", "object", "created", "model", "choices": [choice], ("usage": null)} (key order kept),
    with the fields every chunk shares encoded once and the choice written out by hand: a
    streamed token's chunk was a dict and an encoder run each, a tenth of the router's time
    per token."""

    def __init__(self, request_id: str, obj: str, created: int, model: str, include_usage: bool) -> None:
        self.head = (f'data: {{"id":{_str(request_id)},"object":{_str(obj)},"created":{_ENC.encode(created)},'
                     f'"model":{_str(model)},"choices":[')
        self.tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def completion(self, index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
        return (f'{self.head}{{"index":{index},"text":{_str(text)},"logprobs":{_json(logprobs)},'
                f'"finish_reason":{_json(finish)}}}{self.tail}')

    def chat(self, index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
        if len(delta) == 1 and type(delta.get("content")) is str:     # a streamed token's delta
            d = f'{{"content":{_str(delta["content"])}}}'
        else:
            d = _ENC.encode(delta)
        return (f'{self.head}{{"index":{index},"delta":{d},"logprobs":{_json(logprobs)},'
                f'"finish_reason":{_json(finish)}}}{self.tail}')


def _json(value: Any) -> str:
    if value is None:
        return "null"
    return _str(value) if type(value) is str else _ENC.encode(value)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that watches for client disconnect whatever the ASGI
    spec version (Starlette only does for < 2.4) and always closes its body and
    runs `on_close` at the end, so the backend gRPC call is cancelled even if
    the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._on_close()


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work()`; if the client disconnects first, cancel it and return None."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
