"""Grammar mask time per token: xgrammar vs llguidance on realistic byte-level BPE vocabularies.

Usage: python -m benchmarks.grammar_mask [--vocab 32000 128000] [--tokens 400] [--json OUT]

Lifecycle: trains a byte-level BPE tokenizer (the `tokenizers` package) to each vocabulary
size on generated text (pseudo-words, numbers, JSON and code-like lines, so the merges look
like a real LLM's: long words, leading spaces, punctuation runs), then for each backend and
each grammar (a nested json_schema, json_object, a regex) walks a matcher along a valid
answer tokenized by that vocabulary: at every position it times filling the next-token
bitmask (compact JSON, no whitespace, in both; what Tandem's sampler does on the host each step for each grammar row) and then
accepting the answer's token. Reports compile time and fill time per token (mean, p50, p99)
on this machine's CPU, one line per case, and writes them as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
    "name": {"type": "string", "maxLength": 40},
    "score": {"type": "number", "minimum": -1, "maximum": 1},
    "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]}, "maxItems": 6},
    "owner": {"type": "object", "properties": {"email": {"type": "string"}, "active": {"type": "boolean"},
                                               "level": {"enum": [1, 2, 3]}},
              "required": ["email", "active", "level"], "additionalProperties": False},
    "items": {"type": "array", "maxItems": 8, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"], "additionalProperties": False}},
}, "required": ["id", "name", "score", "tags", "owner", "items"], "additionalProperties": False}

ANSWER = {"id": 4821, "name": "Quarterly compute planning review", "score": 0.8125,
          "tags": ["alpha", "gamma", "delta"],
          "owner": {"email": "maria.rodriguez@example.com", "active": True, "level": 2},
          "items": [{"sku": f"SKU-{i:04d}", "qty": 3 * i + 1} for i in range(8)]}
REGEX = r"(\d{3}-\d{3}-\d{4}|[A-Z][a-z]+ [A-Z][a-z]+), (ok|retry|failed) at [0-9]{2}:[0-9]{2}"
REGEX_ANSWER = "Maria Rodriguez, retry at 12:45"


def corpus(seed: int, mb: float) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ren", "sta", "qu", "ion", "ex", "tr", "ba", "ne", "ful", "ing", "ed", "ly", "str",
            "com", "pro", "pre", "th", "ch", "sh", "al", "er", "or", "an", "en", "ul", "ab", "ic", "ous", "ment"]
    words = list({"".join(rng.choices(syll, k=rng.randint(1, 5))) for _ in range(400000)})
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    lines, size = [], 0
    while size < mb * 1e6:
        kind = rng.random()
        ws = rng.choices(words, weights=weights, k=rng.randint(6, 18))
        if kind < 0.6:
            line = " ".join(ws).capitalize() + rng.choice([".", ",", "?", "!", ";", ":"])
        elif kind < 0.8:
            line = json.dumps({ws[0]: rng.randint(-9999, 99999), ws[1]: " ".join(ws[2:5]),
                               ws[2]: [rng.random() for _ in range(rng.randint(0, 3))], ws[3]: rng.random() < 0.5})
        else:
            line = f"def {ws[0]}_{ws[1]}({ws[2]}, {ws[3]}=None):\n    return {ws[4]}.{ws[5 % len(ws)]}[{rng.randint(0, 99)}]"
        lines.append(line)
        size += len(line) + 1
    return lines


def train_tokenizer(vocab: int, seed: int = 0, cache_dir: str = ""):
    """A byte-level BPE of `vocab` tokens (saved to / loaded from cache_dir/bpe-<vocab>, if given)."""
    import os
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(cache_dir, f"bpe-{vocab}") if cache_dir else ""
    if path and os.path.isdir(path):
        return PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed, mb=3 if vocab <= 40000 else 8), trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if path:
        out.save_pretrained(path)
    return out


def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"mean_us": round(1e6 * statistics.fmean(s), 1), "p50_us": round(1e6 * s[len(s) // 2], 1),
            "p99_us": round(1e6 * s[min(len(s) - 1, int(0.99 * len(s)))], 1), "tokens": len(s)}


def bench_xgrammar(tok, cases):
    """Tandem's path (engine/grammar.py): the matcher's fill, and for JSON the AND with the
    no-control-byte row."""
    import xgrammar as xgr
    from engine.grammar import GrammarRuntime
    rt = GrammarRuntime(tok, len(tok), [tok.eos_token_id])
    comp = xgr.GrammarCompiler(rt.info, max_threads=2, cache_enabled=False)
    out = {}
    for name, (kind, grammar, text) in cases.items():
        t = time.perf_counter()
        if kind == "json_schema":
            cg = comp.compile_json_schema(json.dumps(grammar), any_whitespace=False, separators=(",", ":"))
        elif kind == "json_object":
            cg = comp.compile_json_schema('{"type":"object"}', any_whitespace=False, separators=(",", ":"))
        else:
            cg = comp.compile_regex(grammar)
        compile_s = time.perf_counter() - t
        m = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, rt.info.vocab_size)
        times = []
        for tid in tok.encode(text, add_special_tokens=False):
            t = time.perf_counter()
            m.fill_next_token_bitmask(bm, 0)
            if kind != "regex":
                bm[0] &= rt.json_ok
            times.append(time.perf_counter() - t)
            assert m.accept_token(tid), (name, tid)
        out[name] = {"compile_ms": round(1e3 * compile_s, 2), **_stats(times)}
    return out


class _Walker:
    """A TokenSource walking `ids` (what the engine hands GrammarRuntime.fill)."""

    def __init__(self, rid: str, ids: list[int], start: int):
        self.request_id, self.prompt_token_ids, self.ids = rid, [1], ids
        self.output_token_ids = list(ids[:start])


def bench_batch(tok, batch: int, steps: int) -> dict:
    """GrammarRuntime.fill (the engine's call, once per decode step) over `batch` rows of the
    nested schema, each at its own place in a valid answer; one new token per row per step.
    A row that reaches the answer's end starts over as a new request (a fresh matcher)."""
    from engine.grammar import GrammarRuntime, grammar_for_json_schema
    rt = GrammarRuntime(tok, len(tok), [tok.eos_token_id])
    spec = grammar_for_json_schema(SCHEMA)
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)    # the engine's separators
    rows = [_Walker(f"r{i}", ids, (i * 7) % len(ids)) for i in range(batch)]
    bitmask = torch.empty(batch, rt.words, dtype=torch.int32)
    specs = [spec] * batch
    rt.fill(specs, rows, bitmask)                # compile and first replay: not timed
    times, restarts = [], 0
    for step in range(steps):
        for i, r in enumerate(rows):
            if len(r.output_token_ids) == len(ids):
                rt.release(r.request_id)
                rows[i] = r = _Walker(f"r{i}.{step}", ids, 0)
                restarts += 1
            else:
                r.output_token_ids.append(ids[len(r.output_token_ids)])
        t = time.perf_counter()
        rt.fill(specs, rows, bitmask)
        times.append(time.perf_counter() - t)
    assert rt.counters.rejected_tokens == 0 and rt.counters.empty_masks == 0
    s = sorted(times)
    return {"batch": batch, "steps": steps, "restarts": restarts, "p50_ms": round(1e3 * s[len(s) // 2], 3),
            "mean_ms": round(1e3 * statistics.fmean(s), 3), "max_ms": round(1e3 * s[-1], 3)}


def bench_llguidance(tok, cases):
    import llguidance
    import llguidance.hf
    import llguidance.torch
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    out = {}
    for name, (kind, grammar, text) in cases.items():
        t = time.perf_counter()
        if kind == "json_schema":
            g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(grammar),
                                                              defaults={"whitespace_flexible": False})
        elif kind == "json_object":
            g = llguidance.LLMatcher.grammar_from_json_schema('{"type":"object"}',
                                                              defaults={"whitespace_flexible": False})
        else:
            g = llguidance.LLMatcher.grammar_from_regex(grammar)
        m = llguidance.LLMatcher(lt, g)
        bm = llguidance.torch.allocate_token_bitmask(1, len(tok))
        llguidance.torch.fill_next_token_bitmask(m, bm, 0)      # the first mask builds its lexer
        compile_s = time.perf_counter() - t
        m = llguidance.LLMatcher(lt, g)
        times = []
        for tid in tok.encode(text, add_special_tokens=False):
            t = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, bm, 0)
            times.append(time.perf_counter() - t)
            assert m.consume_token(tid), (name, tid, m.get_error())
        out[name] = {"compile_ms": round(1e3 * compile_s, 2), **_stats(times)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    ap.add_argument("--json", default="")
    ap.add_argument("--cache-dir", default="", help="keep trained tokenizers here (bpe-<vocab>)")
    ap.add_argument("--batch", type=int, default=0,
                    help="instead: time Tandem's fill of a whole decode step of this many grammar rows")
    ap.add_argument("--steps", type=int, default=200, help="steps timed with --batch")
    args = ap.parse_args(argv)
    if args.batch:
        results = []
        for vocab in args.vocab:
            tok = train_tokenizer(vocab, cache_dir=args.cache_dir)
            r = {"vocab": len(tok), **bench_batch(tok, args.batch, args.steps)}
            print(f"vocab={r['vocab']} fill of {r['batch']} rows per step: p50 {r['p50_ms']} ms, mean "
                  f"{r['mean_ms']} ms, max {r['max_ms']} ms ({r['steps']} steps, {r['restarts']} new requests)",
                  flush=True)
            results.append(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    compact = json.dumps(ANSWER, separators=(",", ":"))     # both backends' compact JSON
    cases = {"json_schema": ("json_schema", SCHEMA, compact), "json_object": ("json_object", None, compact),
             "regex": ("regex", REGEX, REGEX_ANSWER)}
    results = []
    for vocab in args.vocab:
        t = time.perf_counter()
        tok = train_tokenizer(vocab, cache_dir=args.cache_dir)
        print(f"# vocab {len(tok)} trained in {time.perf_counter() - t:.1f} s", flush=True)
        for backend, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            try:
                res = fn(tok, cases)
            except Exception as exc:  # noqa: BLE001 - a backend that fails here is a result
                print(f"vocab={len(tok)} backend={backend} FAILED: {exc}")
                results.append({"vocab": len(tok), "backend": backend, "error": str(exc)})
                continue
            for case, r in res.items():
                print(f"vocab={len(tok)} backend={backend} grammar={case} compile={r['compile_ms']} ms "
                      f"fill mean={r['mean_us']} us p50={r['p50_us']} us p99={r['p99_us']} us ({r['tokens']} tokens)",
                      flush=True)
                results.append({"vocab": len(tok), "backend": backend, "grammar": case, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
