"""What the cluster token (engine/cluster_auth.py) costs a gRPC call: a Decode servicer in this
process, called over loopback through `cluster_auth.aio_channel` with the token (client and
server interceptors) and without (no interceptors at all).

Measures, rounds alternating which mode goes first: the latency of a unary Stats call (the
shape of Prefill, Stats, Hello: one interceptor task per call on each side) and the time per
message of a server stream (the shape of the router's Decode.Stream: the interceptors run once
per call, each message crosses one more async generator on the client).

    python -m benchmarks.auth_overhead [--rounds 7] [--calls 2000] [--messages 20000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

from engine import cluster_auth
from engine.grpc_util import make_server
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg


class _Decode(pbg.DecodeServicer):
    def __init__(self, messages: int) -> None:
        self.messages = messages

    async def Stats(self, request, context):
        return pb.StatsResponse(num_pages=1)

    async def Stream(self, request_iterator, context):
        async for _ in request_iterator:   # the first request opens the stream
            break
        batch = pb.StreamBatch()
        for _ in range(self.messages):
            yield batch


async def _one(token: str, calls: int, messages: int) -> tuple[float, float, float, float]:
    """µs per unary call and per streamed message: wall clock, then CPU time of this process
    (client and server both; steadier than wall time on a shared machine)."""
    server = make_server(cluster_token=token)
    pbg.add_DecodeServicer_to_server(_Decode(messages), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with cluster_auth.aio_channel(address, token=token) as ch:
            stub = pbg.DecodeStub(ch)
            for _ in range(200):
                await stub.Stats(pb.StatsRequest())
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                await stub.Stats(pb.StatsRequest())
            unary = (time.perf_counter() - t0) / calls * 1e6
            unary_cpu = (time.process_time() - c0) / calls * 1e6

            async def requests():
                yield pb.StreamRequest()
                await asyncio.Event().wait()

            call = stub.Stream(requests())
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            async for _ in call:
                n += 1
                if n == messages:
                    break
            stream = (time.perf_counter() - t0) / messages * 1e6
            stream_cpu = (time.process_time() - c0) / messages * 1e6
            call.cancel()
    finally:
        await server.stop(0)
    return unary, stream, unary_cpu, stream_cpu


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--messages", type=int, default=20000)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)   # the open mode's start-up warning, once per round
    token = cluster_auth.new_token()
    runs: dict[str, list[tuple[float, ...]]] = {"open": [], "token": []}
    for i in range(args.rounds):
        for mode in (("open", "token") if i % 2 else ("token", "open")):
            runs[mode].append(asyncio.run(_one(token if mode == "token" else "", args.calls, args.messages)))
    keys = ("unary_call_us", "stream_message_us", "unary_call_cpu_us", "stream_message_cpu_us")
    out = {mode: {k: round(statistics.median(r[i] for r in rs), 2) for i, k in enumerate(keys)}
           for mode, rs in runs.items()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
