"""Prefill worker process: load the model, start the engine thread and gRPC."""
from __future__ import annotations

import asyncio
import logging
import time

from engine.config import EngineConfig
from engine.gpu_turn import open_turn
from engine.worker_thread import apply_switch_interval, freeze_startup_heap
from engine.grpc_util import make_server, serve_until_shutdown
from engine.metrics import WorkerMetrics, start_metrics_server
from engine.runner import ModelRunner
from engine.sampler import Sampler
from kvtransfer.base import get_backend
from prefill_worker.engine import PrefillEngine
from prefill_worker.server import PrefillServicer
from membership.registry import register_worker
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


async def serve_prefill(config: EngineConfig, host: str, port: int, kv_backend: str = "grpc",
                        advertise: str = "", registry_config=None, metrics_address: str = "",
                        gpu_turn_file: str = "", cluster_token: str = "", metrics_host: str = "") -> None:
    """registry_config: a `membership.registry.RegistryConfig` to register in etcd once serving.
    gpu_turn_file: take turns on a shared GPU with a decode worker (engine/gpu_turn.py).
    cluster_token: every call to this worker must carry it, and its KV sends to decode workers
    carry it (engine/cluster_auth.py; "" = open, said once and counted)."""
    start_epoch_ms = int(time.time() * 1000)
    advertise = advertise or f"{host}:{port}"
    loop = asyncio.get_running_loop()
    runner = await loop.run_in_executor(None, ModelRunner, config)
    engine = PrefillEngine(runner, Sampler(config.seed), loop, config.max_num_batched_tokens,
                           config.enable_prefix_caching, max_num_seqs=config.max_num_seqs)
    kw = {}
    if kv_backend == "nixl":  # the layer copies it may hold: the batch's KV, as engine/memory.py reserves
        kw["max_pending_bytes"] = runner.batch_kv_bytes
    sender = get_backend(kv_backend).sender_cls(cluster_token=cluster_token, **kw)
    # nixl: writes read the pool itself (no per-layer copies); grpc copies each layer
    engine.pool_send = sender.bind_pool(runner.kv.k, runner.kv.v)
    engine.gpu_turn = open_turn(gpu_turn_file, "prefill")
    apply_switch_interval()
    engine.start()
    metrics = WorkerMetrics(role="prefill", address=advertise)
    server = make_server(cluster_token=cluster_token, what="the prefill worker's gRPC services",
                         on_reject=metrics.call_rejected)
    if not cluster_token:
        metrics.count_fallback("cluster_auth_off")
    servicer = PrefillServicer(engine, sender, metrics=metrics)
    pbg.add_PrefillServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    # Prometheus /metrics on its own port (metrics_address "" = off); a daemon thread
    start_metrics_server(servicer.metrics.registry, metrics_host or host, int(metrics_address.rpartition(":")[2] or 0))
    log.info("KV transport: %s (sending to the decode workers' pools, %s)", kv_backend,
             "straight from the registered KV pool" if engine.pool_send else "copying each layer first")
    log.info("prefill worker ready on %s:%d (%d KV pages of %d tokens)", host, port,
             runner.num_pages, runner.page_size)
    freeze_startup_heap()
    registry = await register_worker(registry_config, servicer, "prefill", config, runner, advertise,
                                     metrics_address, start_epoch_ms)
    await serve_until_shutdown(server, registry, sender.close, engine.stop)
