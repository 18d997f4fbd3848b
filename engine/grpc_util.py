"""Shared gRPC server plumbing for the workers (options, signals)."""
from __future__ import annotations

import asyncio
import signal

import grpc

MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def make_server() -> grpc.aio.Server:
    return grpc.aio.server(options=GRPC_OPTIONS)


async def wait_for_shutdown() -> None:
    """Block until SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
