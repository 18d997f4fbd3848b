"""A decode worker SIGKILLed mid-stream (issue 10), real processes on loopback.

Three colocated decode workers behind the router. A seeded sampled stream runs alone; after
some tokens the worker serving it is killed, and the router moves the stream to another
worker (prompt + the tokens so far prefilled again, seeded sampling continuing from its
output index). Then the same with a greedy stream on one of the two left. The full text of
each equals an undisturbed run of the same request, with no token lost or repeated, and
usage counts every token once.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from engine.tiny_models import make_tiny_model

MAX_TOKENS = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=6)
    with Cluster(model_dir, colocated=True, num_decode=3, num_pages=256, page_size=4,
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


def _body(prompt, **kw):
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, **kw}


def _stream(url, body, on_chunk=None):
    """(text, token count from usage) of one streamed completion."""
    text, usage = [], None
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            assert "error" not in d, d
            if d.get("usage"):
                usage = d["usage"]
            for ch in d.get("choices", []):
                text.append(ch.get("text", ""))
                if on_chunk is not None:
                    on_chunk()
    return "".join(text), usage["completion_tokens"]


def test_streams_continue_on_another_decode_worker(cluster):
    url = f"{cluster.base_url}/completions"
    requests = [_body([11, 12, 13], temperature=0.9, seed=1234), _body([5, 6, 7, 8, 9], temperature=0)]
    expected = [_stream(url, b) for b in requests]          # undisturbed runs
    assert all(n == MAX_TOKENS for _, n in expected) and expected[0] != expected[1]
    alive = set(range(len(cluster.decode_addrs)))
    for request, want in zip(requests, expected):
        chunks = [0]
        got = []
        t = threading.Thread(target=lambda: got.append(_stream(
            url, request, on_chunk=lambda: chunks.__setitem__(0, chunks[0] + 1))))
        t.start()
        deadline = time.monotonic() + 30
        while chunks[0] < 20:                              # under way
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.005)
        serving = [i for i in alive if _running(cluster, i) > 0]
        assert len(serving) == 1, serving
        cluster.decode_procs[serving[0]].send_signal(signal.SIGKILL)
        alive.discard(serving[0])
        t.join(60)
        assert got == [want]
    text = httpx.get(cluster.metrics_urls["router"], timeout=5).text
    migrations = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "tandem_router_request_migrations_total")
    assert migrations == 2


def _running(cluster, i) -> int:
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pbg
    with cluster.channel(cluster.decode_addrs[i]) as ch:
        return pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=2).running
