"""Prometheus /metrics of the router and of each worker.

Unit part: metric objects built in-process (several registries side by side).
Cluster part: real router + prefill + decode processes; after known traffic every
/metrics endpoint is scraped and its numbers are checked against what was sent.
"""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster, free_port
from decode_worker.timeline import STAGES
from engine.metrics import WorkerMetrics, WorkerSnapshot, metrics_port_for, start_metrics_server
from engine.tiny_models import make_tiny_model
from kvtransfer.base import TransferState
from router.metrics import RouterMetrics

NUM_PAGES = 256
MAX_TOKENS = 8


class Scrape:
    """One parsed /metrics page: sample values looked up by name and a label subset."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def has(self, family: str) -> bool:
        return family in self.families

    def values(self, name: str, **labels: str) -> list[float]:
        return [s.value for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, name: str, **labels: str) -> float:
        return sum(self.values(name, **labels))

    def one(self, name: str, **labels: str) -> float:
        vals = self.values(name, **labels)
        assert len(vals) == 1, f"{name}{labels}: {vals}"
        return vals[0]


def scrape(url: str) -> Scrape:
    r = httpx.get(url, timeout=5)
    r.raise_for_status()
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


# ---------------------------------------------------------------------------- unit

def test_router_metrics_are_per_registry():
    a, b = RouterMetrics(CollectorRegistry()), RouterMetrics(CollectorRegistry())
    a.requests.labels("/v1/completions", "200").inc()
    a.set_members("decode", "up", 2)
    timer = a.timer({})
    timer.on_tokens(1)
    timer.on_tokens(3)        # 3 tokens in one message: 3 gaps
    timer.on_finish(10, 4, 2)
    timer.on_finish(10, 4, 2)  # counted once
    sa, sb = Scrape(a.render()[0].decode()), Scrape(b.render()[0].decode())
    assert sa.one("tandem_router_requests_total", route="/v1/completions", status="200") == 1
    assert sb.values("tandem_router_requests_total") == []
    assert sa.one("tandem_router_time_to_first_token_seconds_count") == 1
    assert sa.one("tandem_router_inter_token_latency_seconds_count") == 3
    assert sa.one("tandem_router_e2e_request_latency_seconds_count") == 1
    assert sa.one("tandem_router_generation_tokens_total") == 4
    assert sa.one("tandem_router_prompt_tokens_cached_total") == 2
    a.replace_members({("decode", "draining"): 1})
    s = Scrape(a.render()[0].decode())
    assert s.one("tandem_members", role="decode", state="up") == 0
    assert s.one("tandem_members", role="decode", state="draining") == 1


def test_worker_metrics_snapshot_hooks_and_http_server():
    snap = WorkerSnapshot(kv_pages_total=10, kv_pages_free=7, waiting_requests=2, running_requests=1,
                          prompt_tokens_computed=5, kv_transfers_active=1, kv_transfer_bytes=4096)
    decode = WorkerMetrics(CollectorRegistry(), "decode")
    prefill = WorkerMetrics(CollectorRegistry(), "prefill")   # a second one in the same process

    class Engine:
        step_observer = None

    class Transport:
        on_transfer_end = None

    engine, transport = Engine(), Transport()
    decode.attach(lambda: snap, engine=engine, transport=transport)
    engine.step_observer(0.01)
    transport.on_transfer_end(TransferState.DONE, 0.2, "")
    transport.on_transfer_end(TransferState.FAILED, 0.1, "crc_mismatch")
    transport.on_transfer_end(TransferState.ABORTED, 0.1, "")
    decode.transfer_failed("timeout")
    prefill.attach(lambda: WorkerSnapshot(kv_pages_total=4, kv_pages_free=4, waiting_requests=0))

    assert metrics_port_for(50051, None) == 51051 and metrics_port_for(50051, 0) == 0
    assert start_metrics_server(decode.registry, "127.0.0.1", 0) is None  # 0 = off
    servers = [start_metrics_server(m.registry, "127.0.0.1", free_port()) for m in (decode, prefill)]
    try:
        d, p = (scrape(f"http://127.0.0.1:{srv.port}/metrics") for srv in servers)
    finally:
        for srv in servers:
            srv.stop()
    assert d.one("tandem_worker_info", role="decode") == 1
    assert d.one("tandem_kv_pages_used") == 3 and d.one("tandem_kv_pages_free") == 7
    assert d.one("tandem_running_requests") == 1 and d.one("tandem_waiting_requests") == 2
    assert d.one("tandem_decode_step_seconds_count") == 1
    assert d.one("tandem_kv_transfer_seconds_count", direction="receive") == 1
    assert d.one("tandem_kv_transfers_total", direction="receive", state="aborted") == 1
    assert d.one("tandem_kv_transfer_failures_total", reason="crc_mismatch") == 1
    assert d.one("tandem_kv_transfer_failures_total", reason="timeout") == 1
    assert d.one("tandem_kv_transfer_bytes_total", direction="receive") == 4096
    assert p.one("tandem_worker_info", role="prefill") == 1
    assert p.one("tandem_kv_transfer_bytes_total", direction="send") == 0
    assert p.total("tandem_kv_transfer_failures_total") == 0
    assert not p.has("tandem_running_requests") and p.has("tandem_prefill_batch_seconds")


# ---------------------------------------------------------------------------- cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)
    logs = tmp_path_factory.mktemp("logs")
    with Cluster(model_dir, num_pages=NUM_PAGES, page_size=4, log_dir=logs,
                 decode_args=("--request-trace-file", str(logs / "trace.jsonl"))) as c:
        c.trace_file = logs / "trace.jsonl"
        yield c


def _stream_usage(stream) -> openai.types.CompletionUsage:
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage


def test_metrics_after_traffic(cluster):
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    kw = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    shared = "the quick brown fox jumps over the lazy dog and keeps on running far away " * 2
    usages = [
        client.completions.create(prompt=shared, **kw).usage,
        _stream_usage(client.completions.create(prompt=shared, stream=True,   # repeated: cached prefix
                                                stream_options={"include_usage": True}, **kw)),
        client.completions.create(prompt="a different prompt entirely", **kw).usage,
        _stream_usage(client.completions.create(prompt="streaming along", stream=True,
                                                stream_options={"include_usage": True}, **kw)),
        client.completions.create(prompt=[5, 6, 7, 8, 9, 10, 11], **kw).usage,
    ]
    n_completions = len(usages)
    usages.append(client.chat.completions.create(messages=[{"role": "user", "content": "hi there"}], **kw).usage)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt="bad", model="tiny", max_tokens=4, temperature=-1)
    n = len(usages)
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    completion_tokens = sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages if u.prompt_tokens_details)
    assert completion_tokens == n * MAX_TOKENS and cached > 0

    urls = cluster.metrics_urls
    deadline = time.monotonic() + 10
    while True:  # pages come back and the batch empties just after the last response
        d = scrape(urls["decode"])
        # pages a finished request leaves in the prefix cache (remote KV joins it too) count as free
        idle_free = d.one("tandem_kv_pages_free") + (d.one("tandem_prefix_cache_evictable_pages") or 0)
        if idle_free == NUM_PAGES and d.one("tandem_running_requests") == 0:
            break
        assert time.monotonic() < deadline, "decode worker did not go idle"
        time.sleep(0.05)
    r, p = scrape(urls["router"]), scrape(urls["prefill"])

    # router: requests by route and status, latencies, tokens, members
    assert r.one("tandem_router_requests_total", route="/v1/completions", status="200") == n_completions
    assert r.one("tandem_router_requests_total", route="/v1/completions", status="400") == 1
    assert r.one("tandem_router_requests_total", route="/v1/chat/completions", status="200") == 1
    assert r.one("tandem_router_requests_in_flight") == 0
    assert r.one("tandem_router_time_to_first_token_seconds_count") == n
    assert r.one("tandem_router_inter_token_latency_seconds_count") == completion_tokens - n
    assert r.one("tandem_router_e2e_request_latency_seconds_count") == n
    assert 0 < r.one("tandem_router_time_to_first_token_seconds_sum") < r.one(
        "tandem_router_e2e_request_latency_seconds_sum")
    assert r.one("tandem_router_prompt_tokens_total") == prompt_tokens
    assert r.one("tandem_router_generation_tokens_total") == completion_tokens
    assert r.one("tandem_router_prompt_tokens_cached_total") == cached
    assert r.total("tandem_members", role="prefill") == 1
    assert r.total("tandem_members", role="decode") == 1

    # decode: KV pool, batch, queue, steps, received KV
    assert d.one("tandem_kv_pages_total") == NUM_PAGES
    # idle: every page in use is one the prefix cache holds (none leaked by a request or a transfer)
    assert d.one("tandem_kv_pages_used") == (d.one("tandem_prefix_cache_pages") or 0)
    assert d.one("tandem_waiting_requests") == 0
    assert d.one("tandem_decode_step_seconds_count") >= MAX_TOKENS - 1
    assert d.one("tandem_generation_tokens_total") == completion_tokens - n  # the first token is prefill's
    assert d.one("tandem_kv_transfers_active", direction="receive") == 0

    # prefill: prompt tokens cached / computed, batches, queue, pool
    assert p.one("tandem_prompt_tokens_cached_total") + p.one("tandem_prompt_tokens_computed_total") == prompt_tokens
    assert p.one("tandem_prompt_tokens_cached_total") == cached
    assert 1 <= p.one("tandem_prefill_batch_seconds_count") <= n
    assert p.one("tandem_waiting_requests") == 0
    assert p.one("tandem_kv_pages_total") == NUM_PAGES
    assert p.one("tandem_kv_pages_used") == p.one("tandem_prefix_cache_pages") > 0

    # KV transfer: one per request on each side, the same bytes, no failures
    sent = p.one("tandem_kv_transfer_bytes_total", direction="send")
    assert sent > 0 and sent == d.one("tandem_kv_transfer_bytes_total", direction="receive")
    assert p.one("tandem_kv_transfer_chunks_total", direction="send") == d.one(
        "tandem_kv_transfer_chunks_total", direction="receive")
    for scr, direction in ((p, "send"), (d, "receive")):
        assert scr.one("tandem_kv_transfer_seconds_count", direction=direction) == n
        assert scr.one("tandem_kv_transfer_seconds_sum", direction=direction) > 0
        assert scr.one("tandem_kv_transfers_total", direction=direction, state="done") == n
        assert scr.total("tandem_kv_transfer_failures_total") == 0
        assert scr.has("tandem_kv_transfer_failures")

    # request timeline: every stage of every request, on the decode worker; the trace file agrees
    for stage in STAGES:
        assert d.one("tandem_request_stage_seconds_count", stage=stage) == n, stage
    lines = [json.loads(line) for line in cluster.trace_file.read_text().splitlines()]
    assert len(lines) == n and all(line["outcome"] == "length" for line in lines)
    for line in lines:
        st = line["stages_s"]
        assert list(st) == list(STAGES)
        chains = (("decode_received", "reserved", "prefill_queued", "prefill_start", "prefill_end"),
                  ("prefill_start", "kv_first_layer", "kv_last_layer", "admitted", "first_token", "last_token"))
        for chain in chains:
            values = [st[s] for s in chain]
            assert values == sorted(values) and values[0] >= 0, (chain, st)


def test_worker_metrics_bind_their_own_address(tmp_path):
    """--metrics-host: /metrics listens there only (here 127.0.0.2), gRPC stays on --host."""
    import socket
    import subprocess
    import sys

    from cluster import ROOT, stop_all, wait_grpc_ready
    from engine.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "m", arch="llama", seed=3)
    port, mport = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "decode", "--model", str(model), "--device", "cpu",
                          "--dtype", "float32", "--num-pages", "64", "--port", str(port), "--metrics-port", str(mport),
                          "--metrics-host", "127.0.0.2", "--log-level", "warning"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_grpc_ready(f"127.0.0.1:{port}", p, timeout=120)
        deadline = time.monotonic() + 10
        while True:
            try:
                scrape(f"http://127.0.0.2:{mport}/metrics")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", mport), timeout=2).close()
    finally:
        stop_all([p])
