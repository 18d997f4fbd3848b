"""The official `openai` client against real router + prefill + decode processes."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from cluster import Cluster
from engine.tiny_models import make_tiny_model

NUM_PAGES = 256


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=3)
    logs = tmp_path_factory.mktemp("logs")
    with Cluster(model_dir, num_pages=NUM_PAGES, page_size=4, log_dir=logs) as c:
        yield c


@pytest.fixture
def client(cluster):
    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)


def wait_idle(cluster: Cluster, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d, p = cluster.decode_stats(), cluster.prefill_stats()
        if d.free_pages == NUM_PAGES and p.free_pages == NUM_PAGES and d.running == 0 and d.waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not idle: decode {cluster.decode_stats()} prefill {cluster.prefill_stats()}")


def test_models_lists_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming(client, cluster):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    wait_idle(cluster)


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=20,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_completions_streaming_and_text_prompt(client):
    kw = dict(model="tiny", prompt="the quick brown fox", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == full.choices[0].text


def test_sixteen_concurrent_requests(cluster):
    async def main():
        client = AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
        prompts = [[5 + i] * (3 + 5 * i) for i in range(16)]

        async def one(i, p):
            if i % 2:
                text = ""
                async for c in await client.completions.create(model="tiny", prompt=p, max_tokens=24, stream=True,
                                                              temperature=0.8, seed=i, extra_body={"ignore_eos": True}):
                    text += c.choices[0].text
                return text
            r = await client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0.8, seed=i,
                                                extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 24
            return r.choices[0].text

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    texts = asyncio.run(main())
    assert len(texts) == 16 and all(texts)
    wait_idle(cluster)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt=[7, 8, 9, 10], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    b = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    assert a == b


def test_stop_string_cuts_output(client, cluster):
    base = dict(model="tiny", prompt="once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    expected = full[: full.index(stop)]
    r = client.completions.create(stop=[stop], **base)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **base))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    wait_idle(cluster)


def post(cluster, path, body, raw=None):
    url = cluster.base_url + path
    if raw is not None:
        return httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    return httpx.post(url, json=body, timeout=30)


def assert_openai_error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", -3), ("prompt", ""), ("prompt", []), ("max_tokens", 100_000),
])
def test_bad_completion_parameters_are_400(cluster, client, field, value):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, field: value}
    err = assert_openai_error(post(cluster, "/completions", body), 400)
    assert err["type"] == "invalid_request_error"
    # the official client raises the matching exception type
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**body)


def test_bad_chat_inputs_are_400(cluster):
    assert_openai_error(post(cluster, "/chat/completions", {"model": "tiny", "messages": []}), 400)
    assert_openai_error(post(cluster, "/chat/completions",
                             {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}), 400)
    assert_openai_error(post(cluster, "/chat/completions", None, raw=b'{"model": "tiny", "messages": [}'), 400)


def test_unknown_model_is_404(cluster, client):
    err = assert_openai_error(post(cluster, "/completions", {"model": "nope", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_bad_requests_do_not_disturb_accepted_ones(cluster):
    """A stream in flight survives a burst of invalid requests and completes intact."""
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    kw = dict(model="tiny", prompt=[11, 12, 13], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kw).choices[0].text
    stream = client.completions.create(stream=True, **kw)
    text = next(iter(stream)).choices[0].text
    for body in ({"model": "tiny", "prompt": "x", "temperature": -1}, {"model": "nope", "prompt": "x"}):
        assert post(cluster, "/completions", body).status_code in (400, 404)
    text += "".join(c.choices[0].text for c in stream)
    assert text == expected
    wait_idle(cluster)


def test_client_disconnect_frees_pages_on_both_workers(cluster):
    """Drop a streaming connection mid-generation: both workers return to idle page counts."""
    body = {"model": "tiny", "prompt": list(range(3, 60)), "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cluster.base_url + "/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 5:
                        break
            # generation is in flight and holds pages on the decode worker
            assert cluster.decode_stats().free_pages < NUM_PAGES
        # leaving the block closes the connection mid-stream
    wait_idle(cluster)
    # and the cluster still serves afterwards
    r = OpenAI(base_url=cluster.base_url, api_key="unused").completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert r.usage.completion_tokens >= 1
