"""Prefill worker process: load the model, start the engine thread and gRPC."""
from __future__ import annotations

import asyncio
import logging

from engine.config import EngineConfig
from engine.grpc_util import make_server, wait_for_shutdown
from engine.runner import ModelRunner
from engine.sampler import Sampler
from kvtransfer.base import get_backend
from prefill_worker.engine import PrefillEngine
from prefill_worker.server import PrefillServicer
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


async def serve_prefill(config: EngineConfig, host: str, port: int, kv_backend: str = "grpc") -> None:
    loop = asyncio.get_running_loop()
    runner = await loop.run_in_executor(None, ModelRunner, config)
    engine = PrefillEngine(runner, Sampler(config.seed), loop, config.max_num_batched_tokens)
    engine.start()
    sender = get_backend(kv_backend).sender_cls()
    server = make_server()
    pbg.add_PrefillServicer_to_server(PrefillServicer(engine, sender), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("prefill worker ready on %s:%d (%d KV pages of %d tokens)", host, port,
             runner.num_pages, runner.page_size)
    try:
        await wait_for_shutdown()
    finally:
        await server.stop(grace=2)
        await sender.close()
        engine.stop()
