"""Grammar-constrained sampling (structured output), backed by xgrammar.

Lifecycle:
  1. Router: `grammar_for_json_schema(schema)` (or _json_object / _regex / _choice) gives a
     `GrammarSpec`, a small value type (kind + text) that goes into
     `SamplingParams.grammar` and over the wire as `SamplingParams.grammar` (proto).
     `check_grammar(spec)` compiles it without a tokenizer (cached) and raises
     `GrammarError` (a ValueError) with a one-line reason: the router's 400, the workers'
     INVALID_ARGUMENT (SamplingParams.__post_init__ calls it too).
  2. Worker: one `GrammarRuntime` per Sampler, built lazily from the model dir's tokenizer
     (`LazyGrammar`) the first time a request has a grammar. It compiles each distinct spec
     once against the vocabulary (cache keyed by the spec; xgrammar's own cache below it)
     and keeps one matcher per request id.
  3. Each sampling step (engine/sampler.py): for every grammar row, `fill` replays into its
     matcher the outputs it has not seen yet (a migrated request's earlier outputs, which
     sit at the end of its prompt, `output_offset` of them, then `output_token_ids`: the
     first token sampled by the prefill worker, tokens computed again after preemption),
     then writes the row's allowed-token bitmask on the host. `apply_bitmask` uploads it
     (pinned, non_blocking on CUDA) and sets every other logit to -inf in torch, on any
     device. The engines call the sampler after queueing the forward, so on a GPU the host
     work overlaps the pass. EOS is in the mask only where the grammar may end.
  4. `release(request_id)` when the request ends (Sampler.release does it).

JSON grammars are compact (no free whitespace), so a random model reaches the end; their
masks also drop every token holding a raw control byte (never valid in compact JSON; xgrammar
0.2.9 lets them into strings with min/maxLength).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "choice")
_REGEX_SPECIAL = set("\\^$.|?*+()[]{}/-")


class GrammarError(ValueError):
    """A grammar spec that is malformed or does not compile."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str     # one of KINDS
    value: str    # json_schema: canonical schema JSON; json_object: ""; regex: pattern; choice: JSON list

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind {self.kind!r} (one of {', '.join(KINDS)})")

    def to_proto(self):
        from proto import tandem_pb2 as pb
        return pb.Grammar(kind=self.kind, value=self.value)

    @classmethod
    def from_proto(cls, msg) -> "GrammarSpec | None":
        return cls(msg.kind, msg.value) if msg.kind else None


def grammar_for_json_schema(schema: dict | str | bool, *, strict: bool = True) -> GrammarSpec:
    """Output is JSON text valid under `schema` (a dict, or its JSON text). `strict` is accepted
    for OpenAI's flag; the grammar always follows the schema (additionalProperties false unless
    the schema says otherwise)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"the schema is not JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    # compact, key order kept: the output's properties come in the schema's order
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


def grammar_for_json_object() -> GrammarSpec:
    """Output is one JSON object (any keys and values)."""
    return GrammarSpec("json_object", "")


def grammar_for_regex(pattern: str) -> GrammarSpec:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("a regex must be a non-empty string")
    return GrammarSpec("regex", pattern)


def grammar_for_choice(choices: Sequence[str]) -> GrammarSpec:
    """Output is exactly one of `choices`."""
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return GrammarSpec("choice", json.dumps(list(choices)))


def _choice_regex(value: str) -> str:
    alts = ["".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in c) for c in json.loads(value)]
    return "(" + "|".join(alts) + ")"


def _backend():
    import xgrammar
    return xgrammar


@lru_cache(maxsize=1024)
def check_grammar(spec: GrammarSpec) -> None:
    """Raise GrammarError (one line) unless `spec` compiles; no tokenizer needed."""
    xgr = _backend()
    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.value)
        elif spec.kind == "choice":
            xgr.Grammar.from_regex(_choice_regex(spec.value))
    except (RuntimeError, ValueError, TypeError) as exc:
        msg = " ".join(str(exc).split())
        if "] " in msg and msg.startswith("["):     # xgrammar's "[time] file:line: reason"
            msg = msg.split(": ", 1)[-1]
        raise GrammarError(f"the {spec.kind.replace('_', ' ')} does not compile: {msg}") from None


@dataclass
class _Row:
    matcher: Any
    seen: int = 0          # replayed tokens accepted so far
    broken: bool = False   # a replayed token was refused: only EOS from here on


@dataclass
class GrammarCounters:
    compiles: int = 0
    compile_seconds: float = 0.0
    mask_rows: int = 0
    mask_seconds: float = 0.0        # host time replaying tokens and filling bitmasks
    rejected_tokens: int = 0         # replayed tokens a matcher refused (a bug upstream)
    empty_masks: int = 0             # live rows no token of the vocabulary could continue
    extra: dict = field(default_factory=dict)


class GrammarRuntime:
    """Compiled grammars (one per spec) and per-request matchers, for one vocabulary."""

    MAX_COMPILED = 256

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        xgr = _backend()
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(self.stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self.words = (vocab_size + 31) // 32      # int32 words per bitmask row
        self._compiled: dict[GrammarSpec, Any] = {}
        self._rows: dict[str, _Row] = {}
        self.counters = GrammarCounters()
        self._warned_refused = self._warned_empty = False
        # masks filled by xgrammar's threads (C++): half the cores, at most 8
        self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        # Compact JSON never holds a raw byte below 0x20 (escaped inside strings, no whitespace
        # outside), but xgrammar 0.2.9's strings with min/maxLength let them through: JSON rows'
        # masks are ANDed with this row of every token free of such bytes (stop tokens kept).
        ok = [not any(b < 0x20 for b in tok_bytes) for tok_bytes in self.info.decoded_vocab[:vocab_size]]
        ok += [False] * (vocab_size - len(ok))
        for t in self.stop_token_ids:
            ok[t] = True
        self.json_ok = _pack_bits(ok, self.words)
        self.stop_only = _pack_bits([t in self.stop_token_ids for t in range(vocab_size)], self.words)
        self._json_ok_set = {t for t, v in enumerate(ok) if v}

    def compile(self, spec: GrammarSpec):
        cg = self._compiled.get(spec)
        if cg is not None:
            return cg
        check_grammar(spec)
        t = time.perf_counter()
        try:
            if spec.kind == "json_schema":
                cg = self.compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            elif spec.kind == "json_object":
                cg = self.compiler.compile_json_schema('{"type":"object"}', any_whitespace=False)
            elif spec.kind == "regex":
                cg = self.compiler.compile_regex(spec.value)
            else:
                cg = self.compiler.compile_regex(_choice_regex(spec.value))
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(f"the {spec.kind} does not compile: {' '.join(str(exc).split())}") from None
        self.counters.compiles += 1
        self.counters.compile_seconds += time.perf_counter() - t
        if len(self._compiled) >= self.MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[spec] = cg
        return cg

    def _row(self, request_id: str, spec: GrammarSpec) -> _Row:
        row = self._rows.get(request_id)
        if row is None:
            row = self._rows[request_id] = _Row(_backend().GrammarMatcher(self.compile(spec)))
        return row

    def release(self, request_id: str) -> None:
        self._rows.pop(request_id, None)

    @staticmethod
    def history(source) -> list[int]:
        """The outputs a request has produced so far (a migrated one's earlier outputs end its
        prompt), PENDING ones included."""
        off = getattr(source, "output_offset", 0)
        prompt = source.prompt_token_ids
        earlier = list(prompt[len(prompt) - off:]) if off else []
        return earlier + list(source.output_token_ids)

    def fill(self, specs: Sequence[GrammarSpec], sources: Sequence, bitmask: torch.Tensor) -> None:
        """Row j of int32 `bitmask` [n, words] (host) = allowed next tokens of sources[j].

        Batched: the live rows' masks are filled by xgrammar's thread pool in one call (C++,
        no Python per row); the JSON rows' AND, the empty-row check and the stop-only rows
        are one tensor op each. (Accepting the new tokens stays one call per row: xgrammar's
        batch accept is slower than that on one thread.)"""
        t = time.perf_counter()
        rows = [self._row(src.request_id, spec) for spec, src in zip(specs, sources)]
        for row, src in zip(rows, sources):
            off, outs = getattr(src, "output_offset", 0), src.output_token_ids
            # trailing PENDING outputs: the pass being sampled (the engine read the earlier ones)
            known = len(outs) - getattr(src, "num_pending", 0)
            total = off + known
            # only what this matcher has not seen (no copy of the whole output each step)
            new = outs[row.seen - off:known] if row.seen >= off else self.history(src)[row.seen:total]
            row.seen = total
            for tok in new:   # one token a step; more on first sight, after preemption, migration
                if row.broken or row.matcher.is_terminated():
                    break     # an ended grammar (e.g. ignore_eos past EOS) takes stop tokens only
                if not row.matcher.accept_token(tok):
                    self._refused(row, src, tok)
        live = [j for j, row in enumerate(rows) if not (row.broken or row.matcher.is_terminated())]
        if live:
            self._batch.batch_fill_next_token_bitmask([rows[j].matcher for j in live], bitmask, live)
            json_rows = [j for j in live if specs[j].kind in _JSON_KINDS]
            if json_rows:
                if len(json_rows) == len(specs):
                    bitmask &= self.json_ok
                else:
                    idx = torch.tensor(json_rows, dtype=torch.int64)
                    bitmask[idx] = bitmask[idx] & self.json_ok
            lo, hi = torch.aminmax(bitmask, dim=1)       # both 0: no bit set in the row
            empty = set(torch.nonzero((lo == 0) & (hi == 0)).flatten().tolist()).intersection(live)
            for j in empty:    # the vocabulary cannot write what the grammar needs next
                self._stuck(rows[j], sources[j])
            live = [j for j in live if j not in empty]
        if len(live) < len(rows):    # ended, broken or stuck: stop tokens only
            ended = sorted(set(range(len(rows))).difference(live))
            idx = torch.tensor(ended, dtype=torch.int64)
            bitmask[idx] = self.stop_only
        self.counters.mask_rows += len(specs)
        self.counters.mask_seconds += time.perf_counter() - t

    def _refused(self, row: _Row, src, tok: int) -> None:
        row.broken = True
        self.counters.rejected_tokens += 1
        if not self._warned_refused:
            self._warned_refused = True
            log.error("request %s: its grammar refused replayed token %d; it may only end now "
                      "(logged once; GrammarCounters.rejected_tokens)", src.request_id, tok)

    def _stuck(self, row: _Row, src) -> None:
        row.broken = True
        self.counters.empty_masks += 1
        if not self._warned_empty:
            self._warned_empty = True
            log.error("request %s: no token of this vocabulary continues its grammar; it ends now "
                      "(logged once; GrammarCounters.empty_masks)", src.request_id)

    def allowed(self, spec: GrammarSpec, tokens: Sequence[int]) -> set[int]:
        """The allowed next tokens after `tokens` (a fresh matcher: the tests' reference)."""
        m = _backend().GrammarMatcher(self.compile(spec))
        for tok in tokens:
            if not m.accept_token(tok):
                raise GrammarError(f"token {tok} refused")
        if m.is_terminated():
            return set(self.stop_token_ids)
        never = set(self.info.special_token_ids) - set(self.stop_token_ids)   # ids no grammar emits
        out = {t for t in range(self.vocab_size) if t not in never and _reference_allows(m, t)}
        return out & self._json_ok_set if spec.kind in _JSON_KINDS else out


_JSON_KINDS = ("json_schema", "json_object")


def _pack_bits(flags: Sequence[bool], words: int) -> torch.Tensor:
    """int32 [words] with bit t%32 of word t//32 set where flags[t] (xgrammar's bitmask layout)."""
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: len(flags)] = torch.tensor(flags, dtype=torch.int64)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    packed = (bits.view(words, 32) * weights).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _reference_allows(matcher, token: int) -> bool:
    """Whether `matcher` takes `token` (tries it, then rolls back): independent of the bitmask."""
    ok = matcher.accept_token(token)
    if ok:
        matcher.rollback(1)
    return ok


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor,
                  upload=None) -> torch.Tensor:
    """A new logits tensor: rows `rows` of `logits` [B, V] with every token not set in host
    int32 `bitmask` [len(rows), words] at -inf. `upload(host tensor)` -> device copy."""
    device, (batch, vocab) = logits.device, logits.shape
    if device.type == "cuda":
        mask_dev = bitmask.pin_memory().to(device, non_blocking=True) if not bitmask.is_pinned() else \
            bitmask.to(device, non_blocking=True)
        idx = torch.tensor(list(rows), dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    else:
        mask_dev, idx = bitmask, torch.tensor(list(rows), dtype=torch.int64)
    # bytes -> 8 flags through a 256-entry table (little-endian: bit t%32 of word t//32 is
    # bit t%8 of byte t//8): ~30% faster than shifting every word 32 times, on the CPU
    lut = _BYTE_BITS.get(device)
    if lut is None:
        lut = _BYTE_BITS[device] = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool().to(device)
    allowed = lut[mask_dev.view(torch.uint8).long()].reshape(len(rows), -1)[:, :vocab]
    if len(rows) == batch and list(rows) == list(range(batch)):
        return torch.where(allowed, logits, float("-inf"))
    sub = torch.where(allowed, logits.index_select(0, idx), float("-inf"))
    return logits.index_copy(0, idx, sub)


_BYTE_BITS: dict = {}     # device -> bool [256, 8]


class LazyGrammar:
    """A GrammarRuntime built on first use from a model dir's tokenizer (workers load none
    otherwise). Raises GrammarError if the dir has no tokenizer."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: Sequence[int]):
        self.model_dir, self.vocab_size, self.stop_token_ids = model_dir, vocab_size, tuple(stop_token_ids)
        self._rt: GrammarRuntime | None = None
        self._lock = threading.Lock()

    def get(self) -> GrammarRuntime:
        with self._lock:
            if self._rt is None:
                try:
                    from transformers import AutoTokenizer
                    tok = AutoTokenizer.from_pretrained(self.model_dir)
                except Exception as exc:  # noqa: BLE001 - any load failure is the request's error
                    raise GrammarError(f"structured output needs the model's tokenizer: {exc}") from None
                self._rt = GrammarRuntime(tok, self.vocab_size, self.stop_token_ids)
            return self._rt

    @property
    def loaded(self) -> GrammarRuntime | None:
        return self._rt


def lazy_grammar_for(runner) -> LazyGrammar:
    """The workers' LazyGrammar for a ModelRunner's model (its dir's tokenizer, its vocab and EOS)."""
    mc = runner.model_config
    return LazyGrammar(str(runner.model_path), mc.vocab_size, tuple(mc.eos_token_ids))
