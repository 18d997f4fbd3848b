"""P+D: the first token (sampled on the prefill worker) reaches the client once its KV has
landed, even while the decode engine cannot run a step.

On one GPU the decode engine waits for its turn (engine/gpu_turn.py) while the prefill worker
runs a batch; the first token used to leave with the engine's next step, so it waited behind
that batch (H200 trace: admitted at 0.35 s, first token at 0.83 s). Here the test itself holds
the turn as the "prefill" role (the real prefill worker runs without one), so the decode engine
is blocked before every step: the first token must still arrive, and nothing after it until
the turn is given back; then the whole output equals transformers' greedy tokens. A first token
that ends the request (max_tokens=1) still comes with its finish, from the engine.
"""
from __future__ import annotations

import queue
import threading
import time

import pytest
from openai import OpenAI

from cluster import Cluster
from engine.gpu_turn import GpuTurn
from engine.tiny_models import make_tiny_model
from hf_reference import distinct_prompts, hf_greedy
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ahead")
    model_dir = make_tiny_model(tmp / "model", arch="llama", seed=5)
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = distinct_prompts(vocab, [9, 21], seed=3)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    lock = tmp / "gpu.lock"
    with Cluster(model_dir, decode_args=("--gpu-turn-file", str(lock))) as cluster:
        yield cluster, GpuTurn(str(lock), "prefill"), prompts, expected


def _collect(it, out: queue.Queue) -> None:
    try:
        for item in it:
            out.put(item)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        out.put(exc)
    out.put(None)


def _get(q: queue.Queue, timeout: float):
    item = q.get(timeout=timeout)
    if isinstance(item, Exception):
        raise item
    return item


def test_first_token_arrives_while_the_engine_waits_for_the_gpu(setup):
    cluster, turn, prompts, expected = setup
    request = pb.GenerateRequest(request_id="ahead-1", prompt_token_ids=prompts[0],
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                                 prefill_address=cluster.prefill_addr)
    with cluster.channel(cluster.decode_addr) as ch:
        turn.acquire()
        try:
            got: queue.Queue = queue.Queue()
            threading.Thread(target=_collect, args=(pbg.DecodeStub(ch).Generate(request, timeout=120), got),
                             daemon=True).start()
            first = _get(got, 60)
            assert list(first.token_ids) == expected[0][:1] and first.finish_reason == pb.FINISH_NONE
            # the engine is really blocked: nothing more while the turn is held
            with pytest.raises(queue.Empty):
                got.get(timeout=1.5)
        finally:
            turn.release()
        tokens = list(first.token_ids)
        while (resp := _get(got, 60)) is not None:
            tokens += resp.token_ids
            last = resp
        assert last.finish_reason == pb.FINISH_LENGTH
        assert tokens == expected[0]


def test_through_the_router_the_first_chunk_comes_before_the_turn_is_given_back(setup):
    cluster, turn, prompts, expected = setup
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    turn.acquire()
    try:
        got: queue.Queue = queue.Queue()
        stream = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=MAX_NEW, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        threading.Thread(target=_collect, args=(stream, got), daemon=True).start()
        t0 = time.monotonic()
        text = ""
        while not text:           # a token can detokenize to nothing yet; the first one must arrive
            chunk = _get(got, max(1.0, 60 - (time.monotonic() - t0)))
            text += chunk.choices[0].text
        assert chunk.choices[0].finish_reason is None
    finally:
        turn.release()
    while (chunk := _get(got, 60)) is not None:
        text += chunk.choices[0].text
    full = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=MAX_NEW, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert full.choices[0].model_extra["token_ids"] == expected[1]
    assert text == full.choices[0].text


def test_a_first_token_that_ends_the_request_comes_with_its_finish(setup):
    cluster, _, prompts, expected = setup
    request = pb.GenerateRequest(request_id="ahead-2", prompt_token_ids=prompts[0],
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                                 prefill_address=cluster.prefill_addr)
    with cluster.channel(cluster.decode_addr) as ch:
        responses = list(pbg.DecodeStub(ch).Generate(request, timeout=60))
    assert [list(r.token_ids) for r in responses] == [expected[0][:1]]
    assert responses[-1].finish_reason == pb.FINISH_LENGTH
