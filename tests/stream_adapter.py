"""`Decode.Stream` for test stand-ins that only write a per-request `Generate`.

The router talks to decode workers over the multiplexed `Stream` call; a fake worker
in a router test mixes this in and keeps its simple `Generate` generator: each
request runs it in a task of its own (one response per StreamBatch), an abort
cancels that task, and ending the call cancels them all.
"""
from __future__ import annotations

import asyncio

from proto import tandem_pb2 as pb


class StreamFromGenerate:
    async def Stream(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def run_one(request):
            async for resp in self.Generate(request, context):
                out.put_nowait(pb.StreamBatch(responses=[resp]))

        async def read():
            async for msg in request_iterator:
                if msg.WhichOneof("msg") == "generate":
                    tasks[msg.generate.request_id] = asyncio.ensure_future(run_one(msg.generate))
                else:
                    task = tasks.pop(msg.abort_request_id, None)
                    if task is not None:
                        task.cancel()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()
            for task in tasks.values():
                task.cancel()
