"""Router gateway: validation, OpenAI error shapes, and streaming against a fake decode worker.

Validation tests point the DecodeClient at a port where nothing listens: every
invalid request must be rejected before any backend call, and a valid one must
fail fast with a clean 5xx. The fake-worker tests run a grpc.aio Decode
servicer in the test's event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from stream_adapter import StreamFromGenerate
from router.backend import DecodeClient
from router.config import RouterConfig
from router.protocol import CompletionRequest
from router.server import _input_ids, create_app

MAX_LEN = 64
WORDS = ["hello", "world", "tandem", "prefill", "decode", "router", "the", "a", "cat", "dog",
         "runs", "fast", "slow", "token", "cache", "page", "STOP"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>", "<|user|>",
                                                                  "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return hf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(decode: str, **kw) -> RouterConfig:
    kw.setdefault("max_model_len", MAX_LEN)
    kw.setdefault("request_timeout_s", 10.0)
    return RouterConfig(model_path="tiny", served_model_names=("tiny", "tiny-alias"),
                        decode_addresses=(decode,), **kw)


@pytest.fixture()
def dead_client(tokenizer):
    """TestClient whose decode worker address has nothing listening."""
    config = make_config(f"127.0.0.1:{free_port()}")
    with TestClient(create_app(config, tokenizer, DecodeClient.from_config(config))) as c:
        yield c


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "*", contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "server_error", "rate_limit_error")
    if param != "*":
        assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err
    return err


def cmpl(**kw) -> dict:
    return {"model": "tiny", "prompt": "hello world", **kw}


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], **kw}


# ---------------------------------------------------------------- validation (dead worker)

def test_health_and_models(dead_client):
    health = dead_client.get("/health").json()   # the router is up; its dead worker may be ejected already
    assert health["status"] == "ok" and all("Stats failed" in why for why in health["ejected"].values())
    body = dead_client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny", "tiny-alias"]
    assert all(m["object"] == "model" for m in body["data"])


def test_unknown_model_is_404(dead_client):
    for path, body in (("/v1/completions", cmpl(model="gpt-9")), ("/v1/chat/completions", chat(model="gpt-9"))):
        err = assert_openai_error(dead_client.post(path, json=body), 404, param="model", contains="gpt-9")
        assert err["code"] == "model_not_found"


@pytest.mark.parametrize("value", [-0.5, "hot", True, [1], "1.0"])
def test_bad_temperature(dead_client, value):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(temperature=value)), 400, "temperature")


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, "x"])
def test_bad_top_p(dead_client, value):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(top_p=value)), 400, "top_p")


@pytest.mark.parametrize("field,value", [("top_k", -2), ("min_p", 1.5), ("seed", "abc"), ("stop", [""]),
                                         ("ignore_eos", "yes"), ("stop_token_ids", [1.5])])
def test_bad_other_sampling_fields(dead_client, field, value):
    err = assert_openai_error(dead_client.post("/v1/completions", json=cmpl(**{field: value})), 400)
    assert err["param"].startswith(field), err


@pytest.mark.parametrize("value", [0, -3, 1.5, "ten"])
def test_bad_max_tokens(dead_client, value):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(max_tokens=value)), 400, "max_tokens")
    assert_openai_error(dead_client.post("/v1/chat/completions", json=chat(max_tokens=value)), 400, "max_tokens")
    assert_openai_error(dead_client.post("/v1/chat/completions", json=chat(max_completion_tokens=value)),
                        400, "max_completion_tokens")


@pytest.mark.parametrize("prompt", ["", [], [[]], [""]])
def test_empty_prompt(dead_client, prompt):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=prompt)), 400, "prompt", "empty")


def test_empty_or_bad_messages(dead_client):
    assert_openai_error(dead_client.post("/v1/chat/completions", json=chat(messages=[])), 400, "messages")
    assert_openai_error(dead_client.post("/v1/chat/completions", json={"model": "tiny"}), 400, "messages")
    bad_role = chat(messages=[{"role": "wizard", "content": "hi"}])
    assert_openai_error(dead_client.post("/v1/chat/completions", json=bad_role), 400)
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert_openai_error(dead_client.post("/v1/chat/completions", json=image), 400, contains="text content")


@pytest.mark.parametrize("prompt", [[1, 2, 999999], [-1, 5], [[3, 100000]]])
def test_token_ids_outside_vocab(dead_client, tokenizer, prompt):
    err = assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=prompt)), 400, "prompt")
    assert str(len(tokenizer) - 1) in err["message"]


def test_stop_token_ids_outside_vocab(dead_client):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(stop_token_ids=[10**6])),
                        400, "stop_token_ids")


def test_context_length(dead_client, tokenizer):
    prompt = list(range(10, 10 + 50))
    err = assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=prompt, max_tokens=20)),
                              400, "max_tokens")
    assert str(MAX_LEN) in err["message"] and "70" in err["message"] and "50" in err["message"]
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=[7] * MAX_LEN, max_tokens=None)),
                        400, "max_tokens", str(MAX_LEN))
    long_chat = chat(messages=[{"role": "user", "content": "hello world " * 40}], max_tokens=5)
    assert_openai_error(dead_client.post("/v1/chat/completions", json=long_chat), 400, "max_tokens", str(MAX_LEN))


def test_malformed_json_is_400_not_422(dead_client):
    for path in ("/v1/completions", "/v1/chat/completions"):
        for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"):
            r = dead_client.post(path, content=raw, headers={"content-type": "application/json"})
            assert_openai_error(r, 400)
    assert_openai_error(dead_client.post("/v1/completions", json={"model": "tiny"}), 400, "prompt", "required")


@pytest.mark.parametrize("extra,param", [
    ({"suffix": "x"}, "suffix"), ({"guided_grammar": "root ::= \"a\""}, "guided_grammar"),
    ({"stream_options": {"include_usage": True}}, None), ({"min_tokens": 3}, "min_tokens"),
    ({"response_format": {"type": "regex", "regex": "a"}}, "response_format"),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, "structured_outputs.grammar"),
])
def test_unsupported_completion_fields(dead_client, extra, param):
    err = assert_openai_error(dead_client.post("/v1/completions", json=cmpl(**extra)), 400)
    if param:
        assert err["param"] == param and "support" in err["message"]


@pytest.mark.parametrize("extra,param", [
    ({"echo": True}, "echo"),
    ({"functions": []}, "functions"),      # tools / tool_choice / tool_calls: tests/test_tools.py
    ({"response_format": {"type": "grammar", "grammar": "x"}}, "response_format"),
])
def test_unsupported_chat_fields(dead_client, extra, param):
    err = assert_openai_error(dead_client.post("/v1/chat/completions", json=chat(**extra)), 400, param)
    assert "support" in err["message"]


@pytest.mark.parametrize("extra,param,words", [     # structured output: 400 before anything is queued
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema", "does not compile"),
    ({"guided_regex": "(ab"}, "guided_regex", "does not compile"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
])
def test_bad_output_constraints(dead_client, extra, param, words):
    err = assert_openai_error(dead_client.post("/v1/chat/completions", json=chat(**extra)), 400, param)
    assert words in err["message"]


@pytest.mark.parametrize("path,extra,param,words", [
    ("/v1/completions", {"n": 0}, "n", "greater than or equal"),
    ("/v1/completions", {"n": 129}, "n", "less than or equal"),
    ("/v1/chat/completions", {"n": 200}, "n", "less than or equal"),
    ("/v1/completions", {"n": 3, "best_of": 2}, "best_of", "at least n"),
    ("/v1/completions", {"best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    ("/v1/completions", {"best_of": 129}, "best_of", "less than or equal"),
])
def test_bad_n_and_best_of(dead_client, path, extra, param, words):
    body = cmpl(**extra) if path == "/v1/completions" else chat(**extra)
    err = assert_openai_error(dead_client.post(path, json=body), 400, param)
    assert words in err["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", cmpl(frobnicate=1, metadata={"a": "b"})),
    ("/v1/chat/completions", chat(metadata={"team": "x"}, store=False, service_tier="auto",
                                  parallel_tool_calls=True, response_format={"type": "text"}, tool_choice="none",
                                  frobnicate={"deep": [1]})),
    ("/v1/chat/completions", chat(messages=[      # an SDK's response message sent back as history
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo", "refusal": None, "annotations": [], "audio": None,
         "function_call": None, "tool_calls": None}])),
    ("/v1/completions", cmpl(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})),
])
def test_ignored_and_unknown_fields_reach_the_backend(dead_client, path, body):
    """Accepted (the dead worker's 503 shows validation passed), not rejected as before."""
    assert_openai_error(dead_client.post(path, json=body), 503)


@pytest.mark.parametrize("body,param", [
    (chat(metadata={"a": 1}), "metadata.a"), (chat(store="yes"), "store"),
    (chat(parallel_tool_calls=2), "parallel_tool_calls"), (chat(response_format={"type": 3}), "response_format.type"),
    (cmpl(frobnicate=1, temperature=-1), "temperature"),
])
def test_known_fields_with_invalid_values_stay_400(dead_client, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert_openai_error(dead_client.post(path, json=body), 400, param)


def test_unknown_fields_warned_once_and_counted(tokenizer, caplog):
    async def body():
        async with gateway(tokenizer) as (_, c):
            rs = [await c.post("/v1/completions", json=cmpl(max_tokens=2, frobnicate=i, zap=None))
                  for i in range(3)]
            rs.append(await c.post("/v1/chat/completions", json=chat(max_tokens=2, frobnicate=True,
                                                                     stream=True, stream_options={"x": 1})))
            return rs, (await c.get("/metrics")).text

    with caplog.at_level("WARNING", logger="router.ignored"):
        rs, scrape = run(body())
    assert [r.status_code for r in rs] == [200] * 4
    assert rs[0].json()["choices"][0]["text"]
    warned = [r.getMessage() for r in caplog.records if r.name == "router.ignored"]
    assert len(warned) == 3 and sum("'frobnicate'" in m for m in warned) == 1, warned
    assert any("'stream_options.x'" in m and "/v1/chat/completions" in m for m in warned), warned
    assert 'tandem_router_ignored_fields_total{field="frobnicate"} 4.0' in scrape
    assert 'tandem_router_ignored_fields_total{field="zap"} 3.0' in scrape
    assert 'tandem_router_ignored_fields_total{field="stream_options.x"} 1.0' in scrape


def test_ignored_field_labels_and_logs_are_bounded(caplog):
    from router.ignored import IgnoredFields
    from router.metrics import RouterMetrics

    m = RouterMetrics()
    ig = IgnoredFields(m, max_labels=3, max_logged=5)
    with caplog.at_level("WARNING", logger="router.ignored"):
        for i in range(10):
            ig.note("/x", [f"f{i}", "f0"])
    scrape = m.render()[0].decode()
    assert 'field="f0"} 11.0' in scrape and 'field="f2"} 1.0' in scrape and 'field="f3"' not in scrape
    assert 'field="other"} 7.0' in scrape
    assert len(caplog.records) == 6 and "not logged" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", cmpl(presence_penalty=2.5), "presence_penalty"),
    ("/v1/completions", cmpl(frequency_penalty=-2.01), "frequency_penalty"),
    ("/v1/completions", cmpl(repetition_penalty=0), "repetition_penalty"),
    ("/v1/completions", cmpl(logit_bias={"5": 101}), "logit_bias.5"),
    ("/v1/completions", cmpl(logit_bias={"five": 1}), "logit_bias.five"),
    ("/v1/completions", cmpl(logit_bias={"-5": 1}), "logit_bias.-5"),
    ("/v1/completions", cmpl(logit_bias={"5": "1"}), "logit_bias.5"),
    ("/v1/completions", cmpl(logit_bias={"100000": 1}), "logit_bias"),      # past the vocabulary
    ("/v1/completions", cmpl(logprobs=21), "logprobs"), ("/v1/completions", cmpl(logprobs=-1), "logprobs"),
    ("/v1/completions", cmpl(logprobs=True), "logprobs"), ("/v1/completions", cmpl(echo=1), "echo"),
    ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat(logprobs=3), "logprobs"),
])
def test_sampling_feature_ranges(dead_client, path, body, param):
    assert_openai_error(dead_client.post(path, json=body), 400, param)


def test_sampling_features_reach_the_worker(tokenizer):
    async def body():
        async with gateway(tokenizer) as (servicer, c):
            await c.post("/v1/completions", json=cmpl(max_tokens=2, presence_penalty=0.5, frequency_penalty=-1,
                                                      repetition_penalty=1.3, logit_bias={"7": -100, "3": 2.5},
                                                      logprobs=0, echo=True))
            await c.post("/v1/chat/completions", json=chat(max_tokens=2, logprobs=True, top_logprobs=4))
            await c.post("/v1/chat/completions", json=chat(max_tokens=2, logprobs=False))
            return [q.sampling for q in servicer.requests]

    a, b, plain = run(body())
    assert (a.presence_penalty, a.frequency_penalty, a.repetition_penalty) == (0.5, -1.0, pytest.approx(1.3))
    assert dict(a.logit_bias) == {7: -100.0, 3: 2.5}
    assert (a.has_logprobs, a.logprobs, a.has_prompt_logprobs, a.prompt_logprobs) == (True, 0, True, 0)
    assert (b.has_logprobs, b.logprobs, b.has_prompt_logprobs) == (True, 4, False)
    assert not plain.has_logprobs and not plain.logit_bias and plain.repetition_penalty in (0.0, 1.0)


def test_neutral_values_accepted_until_backend(dead_client):
    """Defaults clients send explicitly pass validation (and reach the dead worker -> 503)."""
    body = cmpl(n=1, echo=False, best_of=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                temperature=0, top_p=1, seed=3, stop=["x"], user="u", prompt=["hello"])
    assert_openai_error(dead_client.post("/v1/completions", json=body), 503)


@pytest.mark.parametrize("prompt,contains", [
    (["a", ""], "prompt 1 is empty"), ([[1, 2], []], "prompt 1 is empty"), (["a", [1]], "not a mix"),
    ([[1], ["a"]], "prompt 1"), ([[1, 2], [3, True]], "prompt 1"), ([1.5], "not a mix"),
])
def test_bad_batched_prompts(dead_client, prompt, contains):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=prompt)), 400, "prompt", contains)


def test_a_batched_prompt_too_long_or_out_of_vocabulary_fails_the_request(dead_client):
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=[[1], [5] * MAX_LEN])), 400,
                        "max_tokens", str(MAX_LEN))
    assert_openai_error(dead_client.post("/v1/completions", json=cmpl(prompt=[[1], [10**6]])), 400, "prompt")


def test_dead_worker_fails_fast(dead_client):
    for stream in (False, True):
        for path, body in (("/v1/completions", cmpl(stream=stream)), ("/v1/chat/completions", chat(stream=stream))):
            t0 = time.monotonic()
            err = assert_openai_error(dead_client.post(path, json=body), 503)
            assert time.monotonic() - t0 < 5.0
            assert err["type"] == "server_error" and err["code"] == "worker_unavailable"


def test_api_key(tokenizer):
    config = make_config(f"127.0.0.1:{free_port()}", api_key="sekret")
    with TestClient(create_app(config, tokenizer, DecodeClient.from_config(config))) as c:
        assert c.get("/health").status_code == 200  # not under /v1
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            err = assert_openai_error(c.get("/v1/models", headers=headers), 401)
            assert err["code"] == "invalid_api_key"
            assert_openai_error(c.post("/v1/completions", json=cmpl(), headers=headers), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        # authorised: reaches validation
        r = c.post("/v1/completions", json=cmpl(top_p=3), headers={"Authorization": "Bearer sekret"})
        assert_openai_error(r, 400, "top_p")


def test_unknown_route_and_method(dead_client):
    assert_openai_error(dead_client.get("/v1/nope"), 404)
    assert_openai_error(dead_client.get("/v1/completions"), 405)


# ---------------------------------------------------------------- fake decode worker

class FakeDecode(StreamFromGenerate, pbg.DecodeServicer):
    """Streams `reply` token by token; records requests and cancellations."""

    def __init__(self, reply: list[int], eos: int) -> None:
        self.reply, self.eos = reply, eos
        self.delay = 0.0                     # seconds before each token
        self.fail_after: int | None = None   # send FINISH_ERROR instead of token i
        self.hang = False                    # never answer
        self.fail_first_token: int | None = None   # a request whose prompt starts with it fails after 1 token
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled_ids: list[str] = []
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()

    async def Generate(self, request, context):
        self.requests.append(request)
        try:
            if self.hang:
                await asyncio.sleep(3600)
            max_tokens = request.sampling.max_tokens
            out = self.reply if request.sampling.ignore_eos else self.reply + [self.eos]
            for i, tok in enumerate(out):
                fails_here = self.fail_first_token is not None and i == 1 and \
                    request.prompt_token_ids[0] == self.fail_first_token
                if fails_here or (self.fail_after is not None and i == self.fail_after):
                    yield pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_ERROR,
                                              error="GPU on fire")
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                done = i + 1 == max_tokens or tok == self.eos
                reason = (pb.FINISH_STOP if tok == self.eos else pb.FINISH_LENGTH) if done else pb.FINISH_NONE
                resp = pb.GenerateResponse(request_id=request.request_id, token_ids=[tok], finish_reason=reason,
                                           prompt_tokens=len(request.prompt_token_ids), cached_tokens=2)
                if request.sampling.has_logprobs:
                    resp.logprobs.append(fake_logprob(tok, i, request.sampling.logprobs))
                if request.sampling.has_prompt_logprobs and i == 0:
                    resp.prompt_logprobs.extend(fake_logprob(t, j, request.sampling.prompt_logprobs)
                                                for j, t in enumerate(request.prompt_token_ids[1:]))
                yield resp
                if done:
                    break
            self.finished.set()
        except asyncio.CancelledError:
            self.cancelled_ids.append(request.request_id)
            self.cancelled.set()
            raise


REPLY_TEXT = " the cat runs fast STOP the dog runs slow"


def fake_logprob(tok: int, i: int, k: int) -> pb.TokenLogprob:
    """Position i's made-up entry: the token at -0.25 * (i + 1) (the third -inf), top k = tok, tok+1, ..."""
    lp = float("-inf") if i == 2 else -0.25 * (i + 1)
    return pb.TokenLogprob(token_id=tok, logprob=lp, top_token_ids=[tok + j for j in range(k)],
                           top_logprobs=[lp - j for j in range(k)])


def run(coro, timeout: float = 30.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def fake_worker(tokenizer):
    """(servicer, address) of a fresh grpc.aio Decode server in the running loop."""
    servicer = FakeDecode(tokenizer.encode(REPLY_TEXT), tokenizer.eos_token_id)
    server = grpc.aio.server()
    pbg.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def gateway(tokenizer, **config_kw):
    """(servicer, httpx client of the app over ASGI); tests tweak the servicer before requests."""
    async with fake_worker(tokenizer) as (servicer, addr):
        config = make_config(addr, **config_kw)
        client = DecodeClient.from_config(config)
        try:
            transport = httpx.ASGITransport(app=create_app(config, tokenizer, client))
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
                yield servicer, c
        finally:
            await client.close()


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@contextlib.asynccontextmanager
async def reachable_addresses(n: int):
    """n live gRPC servers with no service: reachable workers (the router does not eject them;
    their Stats are UNIMPLEMENTED) whose addresses only end up in GenerateRequest.prefill_address."""
    servers, addresses = [], []
    for _ in range(n):
        server = grpc.aio.server()
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    try:
        yield tuple(addresses)
    finally:
        for server in servers:
            await server.stop(grace=None)


def test_completion_non_streaming(tokenizer):
    async def body():
        async with reachable_addresses(2) as prefills:
            async with gateway(tokenizer, prefill_addresses=prefills) as (servicer, c):
                r = await c.post("/v1/completions", json=cmpl(max_tokens=50))
                r2 = await c.post("/v1/completions", json=cmpl(max_tokens=3, prompt=[5, 6, 7]))
                return servicer, r, r2, prefills

    servicer, r, r2, prefills = run(body())
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == REPLY_TEXT and body["choices"][0]["finish_reason"] == "stop"
    n_reply = len(tokenizer.encode(REPLY_TEXT)) + 1  # + EOS
    n_prompt = len(tokenizer.encode("hello world"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply,
                             "total_tokens": n_prompt + n_reply, "prompt_tokens_details": {"cached_tokens": 2}}
    assert r2.json()["choices"][0]["finish_reason"] == "length" and r2.json()["usage"]["completion_tokens"] == 3
    assert [q.prefill_address for q in servicer.requests] == list(prefills)
    assert list(servicer.requests[1].prompt_token_ids) == [5, 6, 7]
    assert servicer.requests[1].sampling.max_tokens == 3


def test_stop_string_cancels_worker(tokenizer):
    async def body():
        async with gateway(tokenizer) as (servicer, c):
            servicer.delay = 0.01
            r = await c.post("/v1/chat/completions", json=chat(stop=["STOP"], max_tokens=40))
            await asyncio.wait_for(servicer.cancelled.wait(), 5)
            finished_early = not servicer.finished.is_set()
            rs = await c.post("/v1/completions", json=cmpl(stop="STOP", stream=True,
                                                           stream_options={"include_usage": True}))
            return r, rs, finished_early

    r, rs, finished_early = run(body())
    assert finished_early
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " the cat runs fast "}
    assert body["choices"][0]["finish_reason"] == "stop"
    events = sse_events(rs.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " the cat runs fast "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


def test_chat_streaming_shape(tokenizer):
    async def body():
        async with gateway(tokenizer) as (_, c):
            return await c.post("/v1/chat/completions", json=chat(stream=True, max_tokens=4))

    r = run(body())
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == tokenizer.decode(tokenizer.encode(REPLY_TEXT)[:4])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_worker_error_mid_stream_and_non_stream(tokenizer, caplog):
    async def body():
        async with gateway(tokenizer) as (servicer, c):
            servicer.fail_after = 2
            r = await c.post("/v1/completions", json=cmpl(stream=True, max_tokens=20))
            r2 = await c.post("/v1/completions", json=cmpl(max_tokens=20))
            return r, r2, (await c.get("/metrics")).text

    with caplog.at_level("WARNING", logger="router.server"):
        r, r2, scrape = run(body())
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "GPU on fire" in events[-1]["error"]["message"] and events[-1]["error"]["type"] == "server_error"
    assert_openai_error(r2, 500, contains="GPU on fire")
    # the error after the 200 is logged with its request id and counted, not only sent to the client
    rid = events[0]["id"]
    assert any(rid in rec.getMessage() and "GPU on fire" in rec.getMessage() for rec in caplog.records), caplog.text
    assert 'tandem_router_stream_errors_total{code="worker_error"} 1.0' in scrape, scrape[-2000:]


def test_request_timeout(tokenizer):
    async def body():
        async with gateway(tokenizer, request_timeout_s=0.5) as (servicer, c):
            servicer.hang = True
            t0 = time.monotonic()
            r = await c.post("/v1/completions", json=cmpl())
            return r, time.monotonic() - t0

    r, elapsed = run(body())
    assert elapsed < 5
    assert_openai_error(r, 504, contains="timed out")


def test_client_disconnect_cancels_grpc_call(tokenizer):
    """Real uvicorn + real socket: leaving a stream mid-way cancels the Generate call."""
    import uvicorn

    async def body():
        async with fake_worker(tokenizer) as (servicer, addr):
            servicer.delay = 0.2
            config = make_config(addr)
            client = DecodeClient.from_config(config)
            server = uvicorn.Server(uvicorn.Config(create_app(config, tokenizer, client), host="127.0.0.1",
                                                   port=free_port(), log_level="warning"))
            serving = asyncio.create_task(server.serve())
            try:
                while not server.started:
                    await asyncio.sleep(0.01)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}") as c:
                    async with c.stream("POST", "/v1/completions", json=cmpl(stream=True, max_tokens=40)) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                break  # one chunk, then hang up
                await asyncio.wait_for(servicer.cancelled.wait(), 5)
                assert not servicer.finished.is_set()
                # Non-streaming: the client gives up while the router is still collecting.
                servicer.cancelled.clear()
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}") as c:
                    with pytest.raises(httpx.ReadTimeout):
                        await c.post("/v1/completions", json=cmpl(max_tokens=40), timeout=0.5)
                await asyncio.wait_for(servicer.cancelled.wait(), 5)
                assert not servicer.finished.is_set()
            finally:
                server.should_exit = True
                await serving
                await client.close()

    run(body())


# ---------------------------------------------------------------- tokenization off the loop

def test_tokenization_threads_match_the_tokenizer_and_the_bound_holds(tokenizer):
    from router.tokenize import Tokenization

    tz = Tokenization(tokenizer, threads=3, inline_chars=0)      # every text goes to a thread
    rng = random.Random(5)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400))) for _ in range(12)]
    texts += ["<|eos|>" * 50, "a" * 3000, "héllo wörld " * 40]
    chats = [[{"role": "user", "content": t}] for t in texts[:4]]

    async def go():
        ids = await asyncio.gather(*(tz.encode(t) for t in texts))
        chat = await asyncio.gather(*(tz.chat(m) for m in chats))
        return ids, chat

    try:
        ids, chat = asyncio.run(go())
    finally:
        tz.close()
    assert ids == [list(tokenizer.encode(t)) for t in texts]
    assert [_input_ids(c) for c in chat] == [
        _input_ids(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)) for m in chats]
    for t, got in zip(texts, ids):
        assert len(got) >= tz.min_tokens(len(t)) >= 1, t[:40]


def test_a_prompt_that_cannot_fit_is_rejected_before_tokenizing(dead_client):
    huge = "hello world " * 200_000          # 2.4 MB: far past MAX_LEN tokens whatever it encodes to
    for path, body in (("/v1/completions", cmpl(prompt=huge, max_tokens=4)),
                       ("/v1/chat/completions", chat(messages=[{"role": "user", "content": huge}]))):
        err = assert_openai_error(dead_client.post(path, json=body), 400, contains="at least")
        assert err["code"] == "context_length_exceeded" and str(MAX_LEN) in err["message"]


def test_integral_floats_are_integers_as_openai_takes_them():
    from router.errors import OpenAIError
    from router.protocol import parse_request

    req = parse_request(CompletionRequest, b'{"prompt": [1, 2], "max_tokens": 12.0, "seed": 3.0, "n": 1.0}')
    assert (req.max_tokens, req.seed, req.n) == (12, 3, 1) and type(req.max_tokens) is int
    for bad in (b'12.5', b'"12"', b'true'):
        with pytest.raises(OpenAIError) as exc:
            parse_request(CompletionRequest, b'{"prompt": [1, 2], "max_tokens": ' + bad + b"}")
        assert exc.value.status == 400 and exc.value.param == "max_tokens"


def test_a_client_without_an_event_hook_polls_from_start():
    """DecodeClient works without create_app (benchmarks, tools): start() runs the Stats poll
    and waits for its first round; a dead worker is ejected by it."""
    async def go():
        addr = f"127.0.0.1:{free_port()}"
        c = DecodeClient([addr])
        try:
            await c.start(first_poll_s=5.0)
            return addr, c._polled.is_set(), c.ejections.snapshot(), c.max_model_len()
        finally:
            await c.close()

    addr, polled, ejected, limit = run(go())
    assert polled and "Stats failed" in ejected[addr] and limit is None
