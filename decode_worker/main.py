"""Decode worker process: load the model, start the engine thread and gRPC."""
from __future__ import annotations

import asyncio
import logging
import time

from decode_worker.engine import DecodeEngine
from decode_worker.server import DecodeServerConfig, DecodeServicer
from engine.config import EngineConfig
from engine.gpu_turn import open_turn
from engine.worker_thread import apply_switch_interval, freeze_startup_heap
from engine.grpc_util import make_server, serve_until_shutdown
from engine.metrics import WorkerMetrics, start_metrics_server
from engine.page_allocator import PageAllocator
from engine.prefix_cache_manager import PrefixCacheManager
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import DecodeScheduler, SchedulerConfig
from kvtransfer.base import get_backend
from membership.registry import register_worker
from proto import tandem_pb2_grpc as pbg

log = logging.getLogger(__name__)


def make_decode_engine(config: EngineConfig, loop: asyncio.AbstractEventLoop) -> DecodeEngine:
    """The decode worker's engine (also what `benchmarks.bench` runs in colocated mode)."""
    runner = ModelRunner(config)
    mc = runner.model_config
    allocator = PageAllocator(runner.num_pages)
    cache = PrefixCacheManager(allocator, runner.page_size) if config.enable_prefix_caching else None
    max_len = min(runner.max_model_len, runner.num_pages * runner.page_size)
    if max_len < runner.max_model_len:   # said once at start; the router learns it from Stats
        log.warning("max_model_len lowered from %d to %d: the KV pool holds %d pages of %d tokens",
                    runner.max_model_len, max_len, runner.num_pages, runner.page_size)
    scheduler = DecodeScheduler(SchedulerConfig(
        page_size=runner.page_size, num_pages=runner.num_pages, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_len,
        eos_token_ids=tuple(mc.eos_token_ids),
    ), allocator, cache)
    engine = DecodeEngine(runner, scheduler, Sampler(config.seed), loop)
    engine.async_scheduling = config.async_scheduling
    return engine


async def serve_decode(config: EngineConfig, host: str, port: int, advertise: str,
                       kv_backend: str = "grpc", registry_config=None, metrics_address: str = "",
                       trace_file: str = "", gpu_turn_file: str = "", step_trace_file: str = "",
                       cluster_token: str = "", metrics_host: str = "") -> None:
    """registry_config: a `membership.registry.RegistryConfig` to register in etcd once serving.
    gpu_turn_file: take turns on a shared GPU with a prefill worker (engine/gpu_turn.py).
    cluster_token: every call to this worker must carry it, and its calls to prefill workers
    carry it (engine/cluster_auth.py; "" = open, said once and counted)."""
    start_epoch_ms = int(time.time() * 1000)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, make_decode_engine, config, loop)
    engine.gpu_turn = open_turn(gpu_turn_file, "decode")
    apply_switch_interval()
    if step_trace_file:
        engine.step_trace = open(step_trace_file, "a", buffering=1)  # noqa: SIM115 - line-buffered, lives with the process
    engine.start()
    kv = engine.runner.kv
    receiver = get_backend(kv_backend).receiver_cls(kv.k, kv.v, engine.runner.page_size, advertise)
    metrics = WorkerMetrics(role="decode", address=advertise)
    server = make_server(cluster_token=cluster_token, what="the decode worker's gRPC services",
                         on_reject=metrics.call_rejected)
    if not cluster_token:
        metrics.count_fallback("cluster_auth_off")
    servicer = DecodeServicer(engine, receiver, DecodeServerConfig(address=advertise, trace_file=trace_file,
                                                                   cluster_token=cluster_token), metrics)
    pbg.add_DecodeServicer_to_server(servicer, server)
    receiver.add_to_server(server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    # Prometheus /metrics on its own port (metrics_address "" = off); a daemon thread
    start_metrics_server(servicer.metrics.registry, metrics_host or host, int(metrics_address.rpartition(":")[2] or 0))
    log.info("KV transport: %s (receiving into this worker's pool; advertised at %s)", kv_backend, advertise)
    log.info("decode worker ready on %s:%d (%d KV pages of %d tokens)", host, port,
             engine.runner.num_pages, engine.runner.page_size)
    freeze_startup_heap()
    registry = await register_worker(registry_config, servicer, "decode", config, engine.runner, advertise,
                                     metrics_address, start_epoch_ms)
    # backends that hold resources beyond the server (nixl: the registered pool) release them last
    shutdown = getattr(receiver, "shutdown", None)
    await serve_until_shutdown(server, registry, engine.stop, *([shutdown] if shutdown else []))
