"""Out of GPU memory in a step: the engine classifies it (pure function), the request fails with
a clear message, and the router answers 503 in the OpenAI error shape (not 500)."""
from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import httpx
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.errors import (RESOURCE_EXHAUSTED, ResourceExhaustedError, classify_step_error,
                           is_resource_exhausted)
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from stream_adapter import StreamFromGenerate
from router.backend import DecodeClient
from router.config import RouterConfig
from router.server import create_app


def test_out_of_memory_is_a_resource_error_naming_the_batch():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    err = classify_step_error(oom, "decode", 256, 256)
    assert err.is_resource and err.kind == RESOURCE_EXHAUSTED
    assert "out of GPU memory in a decode step of 256 sequences; lower --max-num-seqs or " \
           "--gpu-memory-utilization" in err.message
    err = classify_step_error(torch.OutOfMemoryError("x"), "prefill", 3, 9000)
    assert "a prefill step of 3 sequences (9000 tokens); lower --max-num-batched-tokens" in err.message
    # already classified (the runner did): kept as is
    again = classify_step_error(ResourceExhaustedError(err.message), "", 0)
    assert again == err
    # anything else is an internal error with its own message
    other = classify_step_error(ValueError("page table holds a page id outside [0, 8)"), "decode", 2)
    assert not other.is_resource and other.message == "page table holds a page id outside [0, 8)"
    assert classify_step_error(RuntimeError()).message == "RuntimeError"


def test_marker_survives_the_wrappers_around_it():
    msg = classify_step_error(torch.OutOfMemoryError("x"), "prefill", 1, 10).message
    # decode_worker/engine.py and the prefill path quote the engine's message
    assert is_resource_exhausted(f"decode step failed: {msg}")
    assert is_resource_exhausted(f"prefill worker 127.0.0.1:1 failed: INTERNAL: prefill failed: {msg}")
    assert not is_resource_exhausted("decode step failed: GPU on fire")


# ------------------------------------------------------------ router against a worker that reports it

WORDS = [f"w{i}" for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return hf


class FailingDecode(StreamFromGenerate, pbg.DecodeServicer):
    """Streams `before` tokens, then finishes with FINISH_ERROR and `error`, as the real decode
    worker does when its engine step fails (decode_worker/server.py forwards the engine's text)."""

    def __init__(self) -> None:
        self.error, self.before = "", 0

    async def Generate(self, request, context):
        for i in range(self.before):
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[5 + i],
                                      prompt_tokens=len(request.prompt_token_ids))
        yield pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_ERROR, error=self.error)


@contextlib.asynccontextmanager
async def gateway(tokenizer):
    servicer = FailingDecode()
    server = grpc.aio.server()
    pbg.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = RouterConfig(model_path="tiny", served_model_names=("tiny",), decode_addresses=(f"127.0.0.1:{port}",),
                          max_model_len=64, request_timeout_s=10.0)
    client = DecodeClient.from_config(config)
    try:
        transport = httpx.ASGITransport(app=create_app(config, tokenizer, client))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            yield servicer, c
    finally:
        await client.close()
        await server.stop(grace=None)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_engine_out_of_memory_is_503_in_openai_shape(tokenizer):
    oom = "decode step failed: " + classify_step_error(torch.OutOfMemoryError("x"), "decode", 256, 256).message
    body = {"model": "tiny", "prompt": "w3 w4 w5", "max_tokens": 8}

    async def run():
        async with gateway(tokenizer) as (servicer, c):
            servicer.error = oom
            plain = await c.post("/v1/completions", json=body)
            stream_head = await c.post("/v1/completions", json={**body, "stream": True})
            chat = await c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                               "messages": [{"role": "user", "content": "w3"}]})
            servicer.before = 2
            mid = await c.post("/v1/completions", json={**body, "stream": True})
            servicer.error, servicer.before = "decode step failed: GPU on fire", 0
            internal = await c.post("/v1/completions", json=body)
            return plain, stream_head, chat, mid, internal

    plain, stream_head, chat, mid, internal = asyncio.run(asyncio.wait_for(run(), 30))
    for r in (plain, stream_head, chat):
        err = assert_openai_error(r, 503)
        assert err["type"] == "server_error" and err["code"] == RESOURCE_EXHAUSTED
        assert "out of GPU memory in a decode step of 256 sequences" in err["message"]
        assert "lower --max-num-seqs or --gpu-memory-utilization" in err["message"]
    # after tokens were streamed the status is already 200: the stream ends with the error event
    assert mid.status_code == 200
    events = [json.loads(line[6:]) for line in mid.text.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == RESOURCE_EXHAUSTED and "out of GPU memory" in events[-1]["error"]["message"]
    assert mid.text.rstrip().endswith("data: [DONE]")
    # an engine error that is not about memory stays a 500
    assert assert_openai_error(internal, 500)["code"] == "worker_error"
