"""Shared gRPC server plumbing for the workers (options, cluster credentials, signals)."""
from __future__ import annotations

import asyncio
import signal

import grpc

from engine.cluster_auth import ClusterTokenInterceptor, warn_open

MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def make_server(*, cluster_token: str, what: str = "this process's gRPC services",
                on_reject=None) -> grpc.aio.Server:
    """A grpc.aio server whose every call must carry `cluster_token` (engine/cluster_auth.py);
    "" = open, said once in the log (`what` names the services; the caller counts it).
    on_reject(method): called for each call refused for its token."""
    if not cluster_token:
        warn_open(f"{what} accept calls from anyone who can connect")
        return grpc.aio.server(options=GRPC_OPTIONS)
    return grpc.aio.server(options=GRPC_OPTIONS,
                           interceptors=[ClusterTokenInterceptor(cluster_token, on_reject)])


async def wait_for_shutdown() -> None:
    """Block until SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_until_shutdown(server: grpc.aio.Server, registry, *cleanups) -> None:
    """Run until SIGINT/SIGTERM, then: revoke the etcd registration first (the
    router stops placing work here), stop the gRPC server, run `cleanups`
    (callables; awaited when they return awaitables)."""
    try:
        await wait_for_shutdown()
    finally:
        if registry is not None:
            await registry.stop()
        await server.stop(grace=2)
        for fn in cleanups:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
