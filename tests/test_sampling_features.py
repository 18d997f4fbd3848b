"""Sampling features (issue 13) against a float64 torch reference on the CPU: logit bias,
presence/frequency/repetition penalties (vLLM semantics), logprobs of the sampled token and
the top k, prompt logprobs; SamplingParams validation and its proto round trip."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from engine.logprobs import TokenLogprob, prompt_logprobs, unpack
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

V = 64


@dataclass
class Src:
    """A TokenSource: what the penalty table reads of a request."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    output_offset: int = 0


def ref_process(row: torch.Tensor, p: SamplingParams, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """float64 reference, one row, Python loops over the tokens: bias, repetition, frequency, presence."""
    x = row.double().clone()
    for t, b in p.logit_bias:
        x[t] += b
    counts: dict[int, int] = {}
    for t in outputs:
        counts[t] = counts.get(t, 0) + 1
    for t in set(prompt) | set(counts):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in counts.items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def check_logprob(entry: TokenLogprob, ref_row64: torch.Tensor, k: int) -> None:
    lp = torch.log_softmax(ref_row64, dim=-1)
    assert abs(entry.logprob - float(lp[entry.token_id])) < 1e-4
    assert len(entry.top) == k
    ref_top = torch.topk(lp, k)
    assert [t for t, _ in entry.top] == ref_top.indices.tolist()
    for (_, got), want in zip(entry.top, ref_top.values.tolist()):
        assert abs(got - want) < 1e-4


def mixed_params() -> list[SamplingParams]:
    bias = ((3, 5.0), (7, -100.0), (11, 2.5))
    return [
        SamplingParams(temperature=0.0),                                           # plain greedy
        SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=3),        # greedy + rep
        SamplingParams(temperature=0.8, seed=5, frequency_penalty=0.9, presence_penalty=-0.4, logprobs=0),
        SamplingParams(temperature=1.0, seed=9),                                    # plain sampled
        SamplingParams(temperature=0.0, logit_bias=bias, logprobs=20),              # greedy + bias
        SamplingParams(temperature=1.2, top_k=10, top_p=0.9, seed=3, logit_bias=bias,
                       repetition_penalty=0.6, presence_penalty=1.5, frequency_penalty=2.0),
        SamplingParams(temperature=0.7, seed=1, logprobs=5),                        # logprobs only
        SamplingParams(temperature=0.0, presence_penalty=-2.0),                     # greedy + presence<0
    ]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_steps(sampler: Sampler, steps: int, seed: int = 0, mode_raw: bool = True, device: str = "cpu"):
    """Drive a mixed batch for `steps` steps, checking every row against the reference (the
    seeded draws are compared with a sampler on the same device: the noise is per device)."""
    params = mixed_params()
    g = torch.Generator().manual_seed(seed)
    srcs = [Src(f"r{i}", torch.randint(0, V, (6,), generator=g).tolist()) for i in range(len(params))]
    for step in range(steps):
        logits = torch.randn(len(params), V, generator=g, dtype=torch.float64) * 4
        out = sampler.run(logits.float().to(device), params, [step] * len(params), srcs)
        tokens = out.tokens.tolist()
        packed = out.logprobs.tolist() if out.logprobs is not None else None
        entries = out.entries(tokens, packed)
        assert out.lp_rows == tuple(i for i, p in enumerate(params) if p.logprobs >= 0)
        for i, p in enumerate(params):
            ref = ref_process(logits.float()[i], p, srcs[i].prompt_token_ids, srcs[i].output_token_ids)
            if p.greedy:
                assert tokens[i] == int(torch.argmax(ref)), (step, i)
            else:   # the same draw as a plain row over the reference-processed logits
                plain = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
                assert tokens[i] == Sampler().sample(ref.float()[None].to(device), [plain], [step])[0], (step, i)
            if p.logprobs >= 0:
                check_logprob(entries[i], logits.float()[i].double() if mode_raw else ref, p.logprobs)
                assert entries[i].token_id == tokens[i]
            else:
                assert entries[i] is None
            srcs[i].output_token_ids.append(tokens[i])
    return srcs


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_matches_float64_reference_over_steps(device):
    sampler = Sampler(seed=1)
    srcs = run_steps(sampler, steps=12, device=device)
    table = next(iter(sampler._tables.values()))
    assert table.num_live == 4          # rows with a penalty got a slot; the others none
    # the device counts equal the host's token counts
    for i in (1, 2, 5, 7):
        want = torch.bincount(torch.tensor(srcs[i].output_token_ids), minlength=V).to(torch.int32)
        assert torch.equal(table.counts[table._slots[f"r{i}"]].cpu(), want)


def test_processed_logprobs_mode():
    run_steps(Sampler(seed=2, logprobs_mode="processed"), steps=4, seed=4, mode_raw=False)
    with pytest.raises(ValueError):
        Sampler(logprobs_mode="softmax")


def test_penalties_change_the_choice():
    """A repeated token loses to the runner-up under each penalty (so the tests above are not vacuous)."""
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 3.0, 2.0
    for kw in (dict(repetition_penalty=2.0), dict(frequency_penalty=0.6), dict(presence_penalty=1.5)):
        p = SamplingParams(temperature=0.0, **kw)
        s = Sampler()
        assert s.sample(logits, [p], [0], [Src("a", [1, 2], [5, 5])]) == [6], kw
        assert s.sample(logits, [p], [0], [Src("b", [1, 2], [])]) == [5], kw
    assert Sampler().sample(logits, [SamplingParams(temperature=0.0, logit_bias=((9, 3.5),))], [0]) == [9]


def test_table_fill_release_and_reuse():
    s = Sampler()
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    logits = torch.zeros(1, V)
    logits[0, 4], logits[0, 8] = 2.0, 1.5
    # known outputs on first sight (the prefill worker's first token), and a migrated request
    # whose prompt ends with 2 earlier outputs (counted as outputs, not prompt)
    assert s.sample(logits, [p], [1], [Src("a", [1], [4])]) == [8]
    assert s.sample(logits, [p], [2], [Src("m", [1, 4, 4], [], output_offset=2)]) == [8]
    table = s._tables[torch.device("cpu")]
    assert int(table.counts[table._slots["m"], 4]) == 2 and int(table.counts[table._slots["m"], 8]) == 1
    slot = table._slots["a"]
    s.release("a")
    s.release("never-seen")
    assert s.sample(logits, [p], [0], [Src("b", [1], [])]) == [4]      # fresh counts in the reused slot
    assert table._slots["b"] == slot
    many = [Src(f"x{i}", [2]) for i in range(20)]                       # the table grows
    s.sample(logits.expand(20, V).contiguous(), [p] * 20, [0] * 20, many)
    assert table.num_live == 22 and table.counts.shape[0] >= 22
    with pytest.raises(ValueError):
        s.sample(logits, [p], [0])                                      # penalties need sources
    with pytest.raises(ValueError):
        s.sample(logits, [SamplingParams(logit_bias=((V, 1.0),))], [0])


def test_fast_path_builds_nothing():
    s = Sampler()
    logits = torch.randn(5, V)
    out = s.run(logits, [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0, 0.5, 2.0)], [0] * 5)
    assert out.logprobs is None and out.lp_rows == () and s._tables == {}
    assert all(SamplingParams(temperature=t).plain for t in (0.0, 1.0))
    assert not SamplingParams(logprobs=0).plain and not SamplingParams(repetition_penalty=1.1).plain


def test_seeded_reproducibility_with_features():
    p = SamplingParams(temperature=1.0, seed=42, presence_penalty=0.5, logprobs=2)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    filler = SamplingParams(temperature=1.0)
    alone = Sampler(seed=0).sample(logits, [p], [3], [Src("a", [1])])
    batched = Sampler(seed=7).sample(torch.cat([torch.randn(2, V), logits]), [filler, filler, p], [0, 0, 3],
                                     [None, None, Src("a", [1])])
    assert alone[0] == batched[2]


def test_prompt_logprobs_chunks_match_reference():
    g = torch.Generator().manual_seed(3)
    head = torch.randn(V, 16, generator=g, dtype=torch.float64)
    hidden = torch.randn(9, 16, generator=g, dtype=torch.float64)
    prompt = torch.randint(0, V, (9,), generator=g).tolist()
    packed = prompt_logprobs(lambda h: (h.double() @ head.T).float(), hidden.float(), prompt, k=4, chunk=3)
    assert packed.shape == (8, 9)
    entries = unpack(packed.tolist(), prompt[1:], [4] * 8)
    ref = hidden @ head.T
    for i, e in enumerate(entries):
        assert e.token_id == prompt[i + 1]
        check_logprob(e, ref[i], 4)
    assert prompt_logprobs(lambda h: h, hidden[:1].float(), prompt[:1], k=2).shape == (0, 5)


def test_token_logprob_proto_round_trip():
    e = TokenLogprob(7, -0.5, ((7, -0.5), (3, -1.25)))
    assert TokenLogprob.from_proto(e.to_proto()) == e


def test_sampling_params_validation_and_proto():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25,
                       logit_bias={5: 2.0, 3: -100.0}, logprobs=3, prompt_logprobs=0)
    assert p.logit_bias == ((3, -100.0), (5, 2.0))
    assert SamplingParams.from_proto(p.to_proto()) == p
    assert SamplingParams.from_proto(SamplingParams().to_proto()) == SamplingParams()
    assert SamplingParams.from_proto(SamplingParams().to_proto()).repetition_penalty == 1.0
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-2.01), dict(repetition_penalty=0.0),
                dict(logit_bias=((1, 100.5),)), dict(logit_bias=((-1, 1.0),)), dict(logprobs=21),
                dict(prompt_logprobs=-2), dict(presence_penalty=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
