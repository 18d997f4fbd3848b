"""Sampling features end to end on a real CPU cluster (tests/cluster.py, tiny llama): the decode
worker's Generate and Stream responses carry logprobs (sampled token + top k) and prompt
logprobs equal to a float64 transformers reference on the same tokens, colocated and P+D over
grpc; greedy decoding under penalties and logit bias equals the same penalties applied to the
float64 reference step by step."""
from __future__ import annotations

import queue

import pytest
import torch

from cluster import Cluster
from engine.sampling_params import SamplingParams
from engine.tiny_models import make_tiny_model
from hf_reference import distinct_prompts
from logprob_reference import hf_logprobs, hf_penalised_greedy
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

MAX_NEW = 12
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("lp") / "model", arch="llama", seed=5)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return model_dir, hf


def check_entry(e: pb.TokenLogprob, ref: torch.Tensor, token: int, k: int) -> None:
    assert e.token_id == token
    assert abs(e.logprob - float(ref[token])) < TOL, (e.logprob, float(ref[token]))
    top = torch.topk(ref, k)
    assert list(e.top_token_ids) == top.indices.tolist()
    assert all(abs(a - b) < TOL for a, b in zip(e.top_logprobs, top.values.tolist()))


def generate(c: Cluster, prompt: list[int], params: SamplingParams, colocated: bool) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(prompt_token_ids=prompt, sampling=params.to_proto(),
                             prefill_address="" if colocated else c.prefill_addr)
    with c.channel(c.decode_addr) as ch:
        return list(pbg.DecodeStub(ch).Generate(req, timeout=120))


def stream(c: Cluster, prompt: list[int], params: SamplingParams, colocated: bool) -> list[pb.GenerateResponse]:
    """The router's RPC: one Stream call, this request's entries of every batch."""
    q: queue.Queue = queue.Queue()
    q.put(pb.StreamRequest(generate=pb.GenerateRequest(
        request_id="s1", prompt_token_ids=prompt, sampling=params.to_proto(),
        prefill_address="" if colocated else c.prefill_addr)))
    got = []
    with c.channel(c.decode_addr) as ch:
        call = pbg.DecodeStub(ch).Stream(iter(q.get, None), timeout=120)
        for batch in call:
            got += [r for r in batch.responses if r.request_id == "s1"]
            if got and got[-1].finish_reason != pb.FINISH_NONE:
                break
        q.put(None)
        call.cancel()
    return got


def flatten(responses):
    tokens = [t for r in responses for t in r.token_ids]
    lps = [e for r in responses for e in r.logprobs]
    prompt_lps = [e for r in responses for e in r.prompt_logprobs]
    for r in responses:
        assert len(r.logprobs) in (0, len(r.token_ids))
    return tokens, lps, prompt_lps


@pytest.mark.parametrize("colocated", [True, False], ids=["colocated", "disaggregated"])
def test_logprobs_and_penalties_equal_float64_reference(model, colocated, tmp_path):
    model_dir, hf = model
    vocab = hf.config.vocab_size
    prompts = distinct_prompts(vocab, [9, 14, 5], seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    sampled = SamplingParams(temperature=0.9, seed=17, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0,
                             presence_penalty=0.7, frequency_penalty=0.4)
    penalised = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.8,
                               frequency_penalty=1.2, presence_penalty=0.6,
                               logit_bias=((prompts[2][0], 4.0), (7, -100.0)), logprobs=2)
    with Cluster(model_dir, colocated=colocated, num_pages=256, page_size=4, log_dir=tmp_path) as c:
        for call in (generate, stream):
            # greedy with logprobs + prompt logprobs (twice: the second prompt is in the prefix cache)
            for _ in range(2):
                tokens, lps, prompt_lps = flatten(call(c, prompts[0], greedy, colocated))
                assert len(tokens) == MAX_NEW and len(lps) == MAX_NEW
                ref = hf_logprobs(hf, prompts[0] + tokens)
                assert tokens == [int(torch.argmax(ref[len(prompts[0]) - 1 + i])) for i in range(MAX_NEW)]
                for i, e in enumerate(lps):
                    check_entry(e, ref[len(prompts[0]) - 1 + i], tokens[i], 5)
                assert len(prompt_lps) == len(prompts[0]) - 1
                for i, e in enumerate(prompt_lps):
                    check_entry(e, ref[i], prompts[0][i + 1], 3)
            # sampled with penalties: raw logprobs of whatever was drawn
            tokens, lps, prompt_lps = flatten(call(c, prompts[1], sampled, colocated))
            assert len(lps) == MAX_NEW and not prompt_lps
            ref = hf_logprobs(hf, prompts[1] + tokens)
            for i, e in enumerate(lps):
                check_entry(e, ref[len(prompts[1]) - 1 + i], tokens[i], 0)
            # greedy under penalties and bias: the same tokens as the float64 reference
            tokens, lps, _ = flatten(call(c, prompts[2], penalised, colocated))
            assert tokens == hf_penalised_greedy(hf, prompts[2], penalised, MAX_NEW)
            assert 7 not in tokens
            ref = hf_logprobs(hf, prompts[2] + tokens)       # logprobs stay the raw model's
            for i, e in enumerate(lps):
                check_entry(e, ref[len(prompts[2]) - 1 + i], tokens[i], 2)
        # a plain request carries none
        tokens, lps, prompt_lps = flatten(generate(c, prompts[1], SamplingParams(temperature=0.0, max_tokens=4),
                                                   colocated))
        assert tokens and not lps and not prompt_lps
        assert c.decode_stats().free_pages == 256
