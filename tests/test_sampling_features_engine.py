"""Sampling features in the decode engine, in process, with async scheduling and mixed batches:
on the CPU, and on the GPU (skipped without CUDA) with the Triton backend, with and without
CUDA graphs. A tiny llama in float32; plain, logprob and
penalised requests in one running batch: logprobs (sampled + top 5, prompt) equal a float64
transformers reference on the CPU to 1e-4, greedy-with-penalties tokens equal the reference
with the same penalties applied step by step, and plain greedy rows equal plain greedy.
On the H200:  python3 -m pytest -q tests/test_sampling_features_engine.py
"""
from __future__ import annotations

import pytest
import torch

from decode_worker.main import make_decode_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402
from hf_reference import distinct_prompts  # noqa: E402
from logprob_reference import hf_logprobs, hf_penalised_greedy  # noqa: E402
from hand_stepped import InlineLoop

MAX_NEW = 10


class _Sink:
    def __init__(self):
        self.tokens, self.logprobs, self.prompt_logprobs, self.finish = [], [], [], None

    def on_reserved(self, pages):
        raise AssertionError("local seqs reserve nothing")

    def on_output(self, out):
        assert out.logprobs is None or len(out.logprobs) == len(out.tokens)
        self.tokens += out.tokens
        self.logprobs += list(out.logprobs or ())
        self.prompt_logprobs += list(out.prompt_logprobs or ())
        self.finish = out.finish


def _check(entry, ref, token, k):
    assert entry.token_id == token and abs(entry.logprob - float(ref[token])) < 1e-4
    top = torch.topk(ref, k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert all(abs(a - b) < 1e-4 for (_, a), b in zip(entry.top, top.values.tolist()))


# (device, eager, pages of 4 tokens: None = plenty, else few enough that running seqs are
# preempted and recomputed, their penalty counts and prompt logprobs kept)
CASES = [("cpu", True, None), ("cpu", True, 14), ("cpu-lanes", True, None)] + (
    [("cuda", False, None), ("cuda", True, None)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,eager,tight", CASES,
                         ids=[f"{d}-{'eager' if e else 'graphs'}{'-preempting' if t else ''}" for d, e, t in CASES])
def test_features_in_the_decode_engine(tmp_path, device, eager, tight):
    model_dir = make_tiny_model(tmp_path / "m", "llama", seed=2)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    gpu = dict(attention_backend="triton", enforce_eager=eager) if device == "cuda" else {}
    pages = dict(page_size=4, num_pages=tight) if tight else dict(page_size=16, num_pages=64)
    # cpu-lanes: partitioned lanes, each prefill pass in flight for 3 polls (its first token,
    # logprobs and penalty counts read steps after the launch)
    lanes, device = device.endswith("-lanes"), device.removesuffix("-lanes")
    cfg = EngineConfig(model=str(model_dir), dtype="float32", device=device, max_num_seqs=16, **pages, **gpu)
    engine = make_decode_engine(cfg, InlineLoop())
    if lanes:
        from test_sm_partition_lanes import SlowLanes
        engine.lanes = SlowLanes(engine, polls=3)
    assert (engine.runner.graphs is None) == eager and engine.async_scheduling
    prompts = distinct_prompts(hf.config.vocab_size, [7, 12, 5, 9, 20, 3], seed=4)
    base = dict(max_tokens=MAX_NEW, ignore_eos=True)
    params = [SamplingParams(temperature=0.0, **base),
              SamplingParams(temperature=0.0, logprobs=5, prompt_logprobs=2, **base),
              SamplingParams(temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.4,
                             logit_bias=((5, 3.0),), logprobs=1, **base),
              SamplingParams(temperature=0.8, seed=3, presence_penalty=1.0, logprobs=0, **base),
              SamplingParams(temperature=0.0, **base),
              SamplingParams(temperature=0.0, frequency_penalty=-0.5, **base)]
    sinks = [_Sink() for _ in prompts]
    for i, (p, sp, sink) in enumerate(zip(prompts, params, sinks)):
        engine.submit(Sequence(f"r{i}", list(p), sp), sink)
        if i == 2:          # the later prompts join running seqs: mixed prefill + decode passes
            engine._drain(block=False)
            engine.step()
            engine.step()
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
        engine.flush()
    assert engine.counters.mixed_steps >= 1 or tight or lanes
    assert (engine.counters.prefill_lane_passes > 0) == lanes
    assert (engine.counters.preemptions > 0) == bool(tight)
    for i, (p, sp, sink) in enumerate(zip(prompts, params, sinks)):
        assert len(sink.tokens) == MAX_NEW, i
        ref = hf_logprobs(hf, p + sink.tokens)
        if sp.greedy:
            assert sink.tokens == hf_penalised_greedy(hf, p, sp, MAX_NEW), i
        if sp.logprobs >= 0:
            assert len(sink.logprobs) == MAX_NEW
            for j, e in enumerate(sink.logprobs):
                _check(e, ref[len(p) - 1 + j], sink.tokens[j], sp.logprobs)
        else:
            assert not sink.logprobs
        if sp.prompt_logprobs >= 0:
            assert len(sink.prompt_logprobs) == len(p) - 1
            for j, e in enumerate(sink.prompt_logprobs):
                _check(e, ref[j], p[j + 1], sp.prompt_logprobs)
    assert [t.num_live for t in engine.sampler._tables.values()] == [0]   # every penalty slot released
    if not eager:
        assert engine.runner.graphs.verified
