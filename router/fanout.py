"""Running a request's jobs side by side (router/generation.py), all or nothing.

  all_or_none(coros)  every result in order, or the first failure, once the others are
                      cancelled (and awaited: their gRPC streams are closed by then);
  merge(streams)      the items of several async iterators as they come, tagged with the
                      iterator's index; one pump task per iterator feeds a queue, the first
                      failure is raised, and closing the merge cancels and awaits the pumps.
A single coroutine or iterator is run directly, with no task.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def all_or_none(coros: list[Awaitable[Any]]) -> list[Any]:
    """Every result in order; the first failure (in index order among those done) cancels the
    rest and is raised."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, piece) as they come from all streams; the first failure is raised (the
    caller's exit cancels the rest)."""
    if len(streams) == 1:
        async for piece in streams[0]:
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[T]) -> None:
        try:
            async for piece in s:
                queue.put_nowait((i, piece))
            queue.put_nowait((i, _END))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
