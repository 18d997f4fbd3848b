"""Overload (issue 10): many more streams than the cluster can hold, real processes.

A colocated worker with a running batch of 2 and a router that lets 1 more request wait
per worker: of 12 streams sent at once, 3 are admitted and complete in full; every other
one gets 503 with Retry-After and the OpenAI error shape at once (it never waits for a
slot), and /health keeps answering while the admitted ones run.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster import Cluster
from engine.tiny_models import make_tiny_model

MAX_TOKENS = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=4)
    with Cluster(model_dir, colocated=True, num_pages=256, page_size=4,
                 extra_worker_args=("--max-num-seqs", "2"),
                 router_args=("--max-queued-requests", "1", "--queue-timeout", "5"),
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_excess_streams_get_503_with_retry_after_and_health_stays_up(cluster):
    url = f"{cluster.base_url}/completions"
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as c:   # the router learns each worker's batch limit from Stats
        warm = {k: v for k, v in body.items() if k != "stream_options"}
        assert c.post(url, json=dict(warm, stream=False, max_tokens=2)).status_code == 200
    time.sleep(1.0)
    start = threading.Barrier(12)

    def one(_):
        with httpx.Client(timeout=60) as c:
            start.wait()
            with c.stream("POST", url, json=body) as r:
                text = r.read().decode()
                return r.status_code, r.headers.get("retry-after"), text

    health = []
    stop = threading.Event()

    def poll_health():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                health.append(c.get(f"http://127.0.0.1:{cluster.http_port}/health").status_code)
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
    finally:
        stop.set()
        poller.join()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == 12 and len(ok) == 3, [r[0] for r in results]
    for _, _, text in ok:
        assert '"completion_tokens":%d' % MAX_TOKENS in text and text.rstrip().endswith("data: [DONE]")
    for _, retry_after, text in refused:
        assert retry_after == "1" and '"code":"worker_overloaded"' in text.replace(" ", "")
    assert health and set(health) == {200}
