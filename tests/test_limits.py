"""One source of truth for limits (issue 11): a worker whose KV pool holds fewer tokens than the
model's context lowers its max_model_len, says so at start, reports it in Stats, and the router
serves that limit: a chat request without max_tokens fits it and succeeds, /v1/models reports
it, and a request past it is the router's 400 naming it (not the worker's)."""
from __future__ import annotations

import httpx
import pytest

from cluster import Cluster
from engine.tiny_models import make_tiny_model
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

PAGES, PAGE = 24, 4          # a 96-token pool under the tiny model's 512 positions


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=8)
    logs = tmp_path_factory.mktemp("logs")
    with Cluster(model_dir, colocated=True, num_pages=PAGES, page_size=PAGE, log_dir=logs) as c:
        c.logs = logs
        yield c


def test_pool_limit_reaches_the_router(cluster):
    limit = PAGES * PAGE
    with cluster.channel(cluster.decode_addr) as ch:
        assert pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=10).max_model_len == limit
    assert f"max_model_len lowered from 512 to {limit}" in (cluster.logs / "decode.log").read_text()
    with httpx.Client(base_url=cluster.base_url, timeout=120) as c:
        models = c.get("/models").json()["data"]
        assert {m["max_model_len"] for m in models} == {limit}
        r = c.post("/chat/completions", json={"model": "tiny", "temperature": 0,
                                              "messages": [{"role": "user", "content": "hello there"}]})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] + usage["completion_tokens"] <= limit
        r = c.post("/completions", json={"model": "tiny", "prompt": [5] * 50, "max_tokens": limit - 49})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and f"maximum context length is {limit}" in err["message"]
        r = c.post("/completions", json={"model": "tiny", "prompt": [5] * 50, "max_tokens": limit - 50,
                                         "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == limit - 50, r.text
