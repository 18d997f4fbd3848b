"""Grammar-constrained sampling on the CPU (engine/grammar.py + engine/sampler.py), against a
plain-Python reference: the allowed set comes from trying each token on a fresh matcher
(accept + rollback), not from the bitmask, and the masked draw is recomputed from it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.grammar import (GrammarError, GrammarRuntime, GrammarSpec, apply_bitmask, check_grammar,
                            grammar_for_choice, grammar_for_json_object, grammar_for_json_schema,
                            grammar_for_regex)
from engine.sampler import Sampler, _mix_seed
from engine.sampling_params import SamplingParams
from engine.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(0)


@pytest.fixture(scope="module")
def rt(tok):
    return GrammarRuntime(tok, len(tok) + 5, [tok.eos_token_id])   # 5 padding ids past the tokenizer


class Src:
    def __init__(self, rid, prompt=(1, 7), offset=0):
        self.request_id, self.prompt_token_ids, self.output_token_ids = rid, list(prompt), []
        self.output_offset = offset


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 500},
                                           "tag": {"enum": ["red", "green"]},
                                           "xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["n", "tag", "xs"], "additionalProperties": False}


def _reference_token(logits, allowed, p: SamplingParams, index: int):
    """Greedy: the allowed argmax; sampled (temperature only): the exponential race over the
    allowed softmax with the row's seeded noise, computed without the bitmask."""
    row = logits.clone().double()
    keep = torch.zeros_like(row, dtype=torch.bool)
    keep[sorted(allowed)] = True
    row[~keep] = -math.inf
    if p.greedy:
        return int(torch.argmax(row))
    gen = torch.Generator().manual_seed(_mix_seed(p.seed, index))
    noise = torch.empty(row.shape[0], dtype=torch.float32).exponential_(generator=gen)
    noise = noise.clamp_(min=torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits.float() / p.temperature).masked_fill(~keep, -math.inf), dim=-1)
    return int(torch.argmax(probs / noise))


@pytest.mark.parametrize("spec", [grammar_for_json_schema(SCHEMA), grammar_for_json_object(),
                                  grammar_for_regex(r"[a-c]{2,4}-[0-9]+"), grammar_for_choice(["yes", "no way"])],
                         ids=["schema", "object", "regex", "choice"])
def test_masked_sampling_matches_reference(tok, rt, spec):
    sampler = Sampler(0)
    sampler.grammar = rt
    vocab = rt.vocab_size
    params = [SamplingParams(temperature=0.0, grammar=spec),
              SamplingParams(temperature=0.8, seed=11, grammar=spec),
              SamplingParams(temperature=0.0),                 # a free row keeps its argmax
              SamplingParams(temperature=1.0, seed=5, presence_penalty=0.5, logprobs=2, grammar=spec)]
    srcs = [Src(f"r{i}") for i in range(len(params))]
    torch.manual_seed(0)
    done = [False] * len(params)
    for step in range(80):
        logits = torch.randn(len(params), vocab) * 3
        idx = [len(s.output_token_ids) for s in srcs]
        ref_allowed = [rt.allowed(p.grammar, s.output_token_ids) if p.grammar else None
                       for p, s in zip(params, srcs)]
        out = sampler.run(logits, params, idx, srcs)
        toks = out.tokens.tolist()
        for i, p in enumerate(params):
            if done[i]:
                continue
            if p.grammar is None:
                assert toks[i] == int(torch.argmax(logits[i]))
            elif not p.has_penalties:
                assert toks[i] == _reference_token(logits[i], ref_allowed[i], p, idx[i]), (step, i)
            assert p.grammar is None or toks[i] in ref_allowed[i]
            srcs[i].output_token_ids.append(toks[i])
            done[i] = toks[i] == tok.eos_token_id
        if out.lp_rows:     # logprobs stay raw (the model's, unmasked)
            e = out.entries(toks, out.logprobs.tolist())[3]
            raw = torch.log_softmax(logits[3].float(), -1)
            assert abs(e.logprob - float(raw[toks[3]])) < 1e-5
        if all(done[i] for i, p in enumerate(params) if p.grammar):
            break
    for s in srcs:
        sampler.release(s.request_id)
        assert s.request_id not in rt._rows
    for i, p in enumerate(params):
        if p.grammar is None:
            continue
        if spec.kind == "json_object":    # free keys and values: random logits need not close it
            continue
        assert done[i], f"row {i} did not end in 80 steps"
        text = tok.decode(srcs[i].output_token_ids[:-1])
        if spec.kind == "json_schema":
            import jsonschema
            jsonschema.validate(json.loads(text), SCHEMA)
        elif spec.kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif spec.kind == "regex":
            import re
            assert re.fullmatch(r"[a-c]{2,4}-[0-9]+", text), text
        else:
            assert text in ("yes", "no way")


def test_replay_of_migrated_outputs(tok, rt):
    """A migrated request's earlier outputs end its prompt (output_offset): the matcher replays them."""
    spec = grammar_for_choice(["abc", "xyz"])
    first = tok.encode("ab")
    src = Src("m", prompt=[1, 9] + first, offset=len(first))
    bm = torch.empty(1, rt.words, dtype=torch.int32)
    rt.fill([spec], [src], bm)
    allowed = apply_bitmask(torch.zeros(1, rt.vocab_size), [0], bm)[0] > -math.inf
    assert set(torch.nonzero(allowed).flatten().tolist()) == rt.allowed(spec, first)
    assert tok.encode("c")[0] in rt.allowed(spec, first) and tok.encode("x")[0] not in rt.allowed(spec, first)
    rt.release("m")


def test_eos_only_when_complete(tok, rt):
    spec = grammar_for_choice(["ab"])
    assert tok.eos_token_id not in rt.allowed(spec, [])
    assert rt.allowed(spec, tok.encode("ab")) == {tok.eos_token_id}


def test_bad_grammars_fail_with_a_reason():
    with pytest.raises(GrammarError, match="regex does not compile"):
        check_grammar(grammar_for_regex("(a"))
    with pytest.raises(GrammarError, match="does not compile"):
        check_grammar(grammar_for_json_schema({"type": "bogus"}))
    with pytest.raises(ValueError):
        SamplingParams(grammar=grammar_for_json_schema({"type": "bogus"}))
    with pytest.raises(GrammarError):
        grammar_for_choice([])
    with pytest.raises(GrammarError):
        GrammarSpec("ebnf", "x")


def test_proto_round_trip():
    p = SamplingParams(temperature=0.0, grammar=grammar_for_json_schema(SCHEMA))
    back = SamplingParams.from_proto(p.to_proto())
    assert back.grammar == p.grammar and back == p
    assert SamplingParams.from_proto(SamplingParams().to_proto()).grammar is None


def test_bounded_strings_stay_valid_json(tok, rt):
    """xgrammar 0.2.9 lets raw control characters into strings with maxLength (invalid JSON):
    the filled mask of a JSON row drops every token holding one, and the bound still holds."""
    spec = grammar_for_json_schema({"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}},
                                    "required": ["s"]})

    def mask_after(text):
        src = Src("b", prompt=[1]) 
        src.output_token_ids = tok.encode(text, add_special_tokens=False)
        bm = torch.empty(1, rt.words, dtype=torch.int32)
        rt.fill([spec], [src], bm)
        rt.release("b")
        allowed = apply_bitmask(torch.zeros(1, rt.vocab_size), [0], bm)[0] > -math.inf
        return set(torch.nonzero(allowed).flatten().tolist())

    inside = mask_after('{"s": "')
    assert inside and not any(any(ord(ch) < 0x20 for ch in tok.decode([t])) for t in inside)
    assert any(tok.decode([t]) == "\x01" for t in range(len(tok)))      # the vocab has such tokens
    assert all(tok.decode([t]).startswith('"') for t in mask_after('{"s": "abc'))   # 3 chars: close it


class _Sink:
    def __init__(self):
        self.tokens, self.finish = [], None

    def on_reserved(self, pages):
        raise AssertionError("local seqs reserve nothing")

    def on_output(self, out):
        self.tokens += out.tokens
        self.finish = out.finish


@pytest.mark.parametrize("lanes", [False, True], ids=["one-stream", "lanes"])
@pytest.mark.parametrize("tight", [None, 14], ids=["roomy", "preempting"])
def test_grammar_rows_in_the_decode_engine(tmp_path, tight, lanes):
    """Hand-stepped decode engine (CPU): grammar rows beside free rows, mixed batches, and with
    a pool small enough that running seqs are preempted and recomputed (their outputs replayed
    into the matcher); every grammar output is complete and valid, finished by EOS ("stop").
    `lanes`: partitioned lanes with each prefill pass in flight for 3 polls (the first token
    read steps after its launch, its grammar state replayed then)."""
    import jsonschema

    from decode_worker.main import make_decode_engine
    from engine.config import EngineConfig
    from engine.sequence import FinishReason, Sequence
    from engine.tiny_models import make_tiny_model
    from hand_stepped import InlineLoop

    model_dir = make_tiny_model(tmp_path / "m", "llama", seed=2)
    pages = dict(page_size=4, num_pages=tight) if tight else dict(page_size=16, num_pages=64)
    engine = make_decode_engine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", max_num_seqs=8,
                                             **pages), InlineLoop())
    if lanes:
        from test_sm_partition_lanes import SlowLanes
        engine.lanes = SlowLanes(engine, polls=3)
    small = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"enum": ["x", "y"]}}, "required": ["a", "b"]}
    specs = [grammar_for_json_schema(small), grammar_for_regex(r"[a-c]{3}"), None,
             grammar_for_choice(["left", "right"]), grammar_for_json_schema(small), None]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=40, grammar=g,
                             ignore_eos=g is None) for i, g in enumerate(specs)]
    prompts = [[5 + i, 9, 12, 40 + i, 7, 8][: 3 + i] for i in range(len(specs))]
    sinks = [_Sink() for _ in specs]
    import io
    engine.step_trace = io.StringIO()
    for i, (p, sp, sink) in enumerate(zip(prompts, params, sinks)):
        engine.submit(Sequence(f"g{i}", list(p), sp), sink)
        if i == 2:      # later ones join running seqs: mixed passes
            engine._drain(block=False)
            engine.step()
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
        engine.flush()
    assert (engine.counters.preemptions > 0) == bool(tight)
    assert (engine.counters.prefill_lane_passes > 0) == lanes
    assert engine.counters.grammar_late_samples > 0       # pipelined: sampled after reading the last pass
    assert engine.sampler.grammar_runtime().counters.rejected_tokens == 0   # every mask from the true state
    tok = engine.sampler.grammar_runtime().info
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    for g, sink in zip(specs, sinks):
        if g is None:
            assert len(sink.tokens) == 40
            continue
        assert sink.finish == FinishReason.STOP and sink.tokens[-1] == hf_tok.eos_token_id, sink.tokens
        text = hf_tok.decode(sink.tokens[:-1])
        if g.kind == "json_schema":
            jsonschema.validate(json.loads(text), small)
        elif g.kind == "regex":
            assert len(text) == 3 and set(text) <= set("abc"), text
        else:
            assert text in ("left", "right")
    assert not engine.sampler.grammar_runtime()._rows and tok is not None    # every matcher released
    # the step trace reports each step's grammar mask work; it adds up to the runtime's counters
    steps = [json.loads(line) for line in engine.step_trace.getvalue().splitlines()]
    c = engine.sampler.grammar_runtime().counters
    assert sum(r.get("grammar_rows", 0) for r in steps) == c.mask_rows > 0
    assert abs(sum(r.get("grammar_ms", 0.0) for r in steps) - 1e3 * c.mask_seconds) < 0.01 * len(steps) + 1e-6
    assert engine.stats()["grammar_mask_rows"] == c.mask_rows


def test_a_finished_grammar_allows_only_stop_tokens(tok, rt):
    """ignore_eos keeps a row going after its grammar ended: stop tokens only, nothing refused."""
    spec = grammar_for_choice(["ab"])
    src = Src("t")
    src.output_token_ids = tok.encode("ab", add_special_tokens=False) + [tok.eos_token_id] * 3
    before = rt.counters.rejected_tokens
    bm = torch.empty(1, rt.words, dtype=torch.int32)
    for n in range(len(src.output_token_ids) - 2, len(src.output_token_ids) + 1):   # step by step
        src_n = Src("t")
        src_n.output_token_ids = src.output_token_ids[:n]
        rt.fill([spec], [src_n], bm)
    allowed = apply_bitmask(torch.zeros(1, rt.vocab_size), [0], bm)[0] > -math.inf
    assert set(torch.nonzero(allowed).flatten().tolist()) == {tok.eos_token_id}
    assert rt.counters.rejected_tokens == before
    rt.release("t")


def test_one_batched_fill_equals_each_row_alone(tok, rt):
    """One fill over rows of different kinds and states (JSON and regex rows, a replay of
    several tokens, a row that just ended, a row one token along) gives each row the set a
    fresh matcher allows after the same tokens."""
    specs = [grammar_for_json_schema(SCHEMA), grammar_for_regex(r"[a-c]{2,4}-[0-9]+"),
             grammar_for_choice(["ab"]), grammar_for_json_object(), grammar_for_json_schema(SCHEMA)]
    texts = ['{"n": 4', "ab", "ab", "{", ""]
    srcs = [Src(f"b{i}") for i in range(len(specs))]
    bm = torch.empty(len(specs), rt.words, dtype=torch.int32)
    rt.fill(specs, srcs, bm)                           # first sight: nothing to replay
    for s, text in zip(srcs, texts):
        s.output_token_ids = tok.encode(text, add_special_tokens=False)
    srcs[4].output_token_ids = []
    for n in range(1, max(len(s.output_token_ids) for s in srcs) + 1):    # one token a step, then the rest
        step = [Src(s.request_id) for s in srcs]
        for a, s in zip(step, srcs):
            a.output_token_ids = s.output_token_ids[:n]
        rt.fill(specs, step, bm)
    for j, (spec, s) in enumerate(zip(specs, srcs)):
        allowed = apply_bitmask(torch.zeros(1, rt.vocab_size), [0], bm[j:j + 1].clone())[0] > -math.inf
        assert set(torch.nonzero(allowed).flatten().tolist()) == rt.allowed(spec, s.output_token_ids), j
        rt.release(s.request_id)


def test_a_vocabulary_that_cannot_write_the_grammar_ends_the_row_once(tmp_path):
    """Tokens that spell no '{' (a word-level vocabulary of "<tN>" words) leave a JSON row
    with an empty mask: it gets stop tokens only and is counted, instead of a masked-out
    argmax (token 0) that its matcher then refuses."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<t{i}>": i for i in range(300)}
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=wl)
    rt_w = GrammarRuntime(words, 300, [299])
    bm = torch.empty(3, rt_w.words, dtype=torch.int32)
    rows = [Src("w0"), Src("w1"), Src("w2")]
    # row 2 allows token 31 alone: its only bit is word 0's sign bit (INT32_MIN), not an empty row
    rt_w.fill([grammar_for_json_object(), grammar_for_regex("<t[0-9]+>"), grammar_for_regex("<t31>")], rows, bm)
    logits = torch.zeros(3, 300)
    masked = apply_bitmask(logits, [0, 1, 2], bm)
    assert torch.nonzero(masked[0] > -math.inf).flatten().tolist() == [299]
    assert (masked[1] > -math.inf).sum() > 100                      # the regex row is untouched
    assert torch.nonzero(masked[2] > -math.inf).flatten().tolist() == [31]
    assert rt_w.counters.empty_masks == 1 and rt_w.counters.rejected_tokens == 0
    rows[0].output_token_ids = [299]
    rt_w.fill([grammar_for_json_object()], rows[:1], bm[:1])
    assert rt_w.counters.empty_masks == 1 and rt_w.counters.rejected_tokens == 0
