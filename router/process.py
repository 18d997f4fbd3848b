"""The router process: what `tandem router` runs once its flags are checked.

`run_router(config)`: resolve max_model_len from config.json, load the tokenizer, build the
app (`router.server.create_app`) with a DecodeClient to the workers, say what it runs with
(placement, pools, the event loop and HTTP parser: uvloop and httptools, or the slower
pure-Python ones, logged once and counted in `tandem_router_fallbacks_total{what}`), freeze
what start-up loaded out of the cyclic GC, then serve with uvicorn until interrupted.
"""
from __future__ import annotations

import importlib.util
import logging

from engine.worker_thread import freeze_startup_heap
from router.backend import DecodeClient
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.server import create_app

log = logging.getLogger(__name__)


def run_router(config: RouterConfig) -> None:
    """Load the tokenizer, connect to the workers, serve until interrupted."""
    import uvicorn
    from transformers import AutoTokenizer

    config = config.resolved()
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    metrics = RouterMetrics()
    if not config.cluster_token:   # said once, counted: the workers it talks to must be open too
        from engine.cluster_auth import warn_open

        warn_open("the router sends no credentials, so only workers that run open answer it")
        metrics.fallbacks.labels(what="cluster_auth_off").inc()
    app = create_app(config, tokenizer, DecodeClient.from_config(config), metrics)
    loop, http = _fast_io(metrics)
    log.info("placement %s; decode %s; prefill %s; max_model_len %d (lowered to what the workers report)",
             config.placement, ",".join(config.decode_addresses) or ("etcd" if config.etcd_endpoints else "-"),
             ",".join(config.prefill_addresses) or ("etcd" if config.etcd_endpoints else "colocated"),
             config.max_model_len)
    freeze_startup_heap()
    # no access log: a line per request costs the router's one core more than it tells (see /metrics)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", loop=loop, http=http,
                access_log=False)


def _fast_io(metrics: RouterMetrics) -> tuple[str, str]:
    """uvloop and httptools (what `uvicorn[standard]` and vLLM use) when installed; otherwise
    the pure-Python loop / HTTP parser, said once in the log and counted in a metric."""
    choice = []
    for module, fast, slow in (("uvloop", "uvloop", "asyncio"), ("httptools", "httptools", "h11")):
        if importlib.util.find_spec(module) is not None:
            choice.append(fast)
        else:
            log.warning(
                "%s is not installed: the router uses %s, which costs more CPU per streamed token",
                module, slow)
            metrics.fallbacks.labels(what=module).inc()
            choice.append(slow)
    log.info("router event loop %s, HTTP parser %s", *choice)
    return choice[0], choice[1]
