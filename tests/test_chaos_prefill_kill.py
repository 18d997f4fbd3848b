"""A prefill worker SIGKILLed with requests in flight (issue 10), real processes on loopback.

Two prefill workers, one decode worker, the router; a steady stream of requests, 8 at a
time, while prefill worker 0 is killed. Every request must complete with the tokens it
asked for (a failed prefill is retried on the other worker), the router must eject the
dead worker at its first failure (not at a lease expiry) and place no request on it
afterwards, and every KV page must be back on the decode worker at the end.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from engine.tiny_models import make_tiny_model

MAX_NEW = 6
NUM_PAGES = 512


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url, timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=9)
    with Cluster(model_dir, num_pages=NUM_PAGES, page_size=4, num_prefill=2,
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_prefill_worker_killed_mid_traffic_loses_no_request(cluster):
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=60)
    router_metrics = cluster.metrics_urls["router"]
    dead = cluster.prefill_addrs[0]

    completed = []

    def one(i: int) -> int:
        prompt = [3 + (i * 7 + j) % 200 for j in range(40 + i % 50)]   # distinct prompts, 40-89 tokens
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                      extra_body={"ignore_eos": True})
        completed.append(i)
        return r.usage.completion_tokens

    killed = threading.Event()

    def kill_soon() -> None:
        # freeze it first, so that requests are surely in flight on it when it dies: a frozen
        # worker still accepts connections, and the router keeps placing on it until its Stats
        # time out
        while len(completed) < 10:      # traffic is flowing through both workers
            time.sleep(0.01)
        proc = cluster.prefill_procs[0]
        proc.send_signal(signal.SIGSTOP)
        placed = _metric(router_metrics, "tandem_router_placements_total", worker=dead)
        deadline = time.monotonic() + 5
        while (_metric(router_metrics, "tandem_router_placements_total", worker=dead) < placed + 2
               and time.monotonic() < deadline):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed.set()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(one, range(200)))
    killer.join()
    assert killed.is_set() and all(n == MAX_NEW for n in first)
    assert _metric(router_metrics, "tandem_router_worker_ejections_total", worker=dead) == 1
    assert _metric(router_metrics, "tandem_router_request_retries_total") >= 1   # the kill did hit requests
    placed_after_kill = _metric(router_metrics, "tandem_router_placements_total", worker=dead)
    with ThreadPoolExecutor(8) as pool:
        second = list(pool.map(one, range(200, 230)))
    assert all(n == MAX_NEW for n in second)
    assert _metric(router_metrics, "tandem_router_placements_total", worker=dead) == placed_after_kill
    assert _metric(router_metrics, "tandem_router_worker_ejections_total", worker=dead) == 1   # never readmitted
    assert httpx.get(f"http://127.0.0.1:{cluster.http_port}/health", timeout=5).json()["ejected"].keys() == {dead}
    deadline = time.monotonic() + 10
    while cluster.decode_stats().free_pages != NUM_PAGES:
        assert time.monotonic() < deadline, "decode pages not back"
        time.sleep(0.1)
