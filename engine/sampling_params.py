"""Per-request sampling parameters, shared by router, prefill and decode.

The router validates user input and builds a `SamplingParams`; the workers
receive it through protobuf (`to_proto` / `from_proto`). Stop *strings* are a
router concern (they need detokenised text) and are not sent to workers.

`grammar` (engine/grammar.GrammarSpec) constrains the output to a JSON schema, a regex or a
choice list; it is checked to compile here (GrammarError, a ValueError).

Every field's default is neutral: a request that sets none of the penalty, bias or
logprob fields samples exactly as before they existed (and takes the sampler's fast path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20          # top alternatives per position, as OpenAI's top_logprobs allows


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_k: int = -1                   # <= 0 = disabled
    top_p: float = 1.0                # 1 = disabled
    min_p: float = 0.0                # 0 = disabled
    seed: int | None = None           # per-request reproducible sampling
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # vLLM semantics (engine/sampler.py): presence/frequency count output tokens only,
    # repetition divides (positive) / multiplies (negative) the logits of every token seen
    # in the prompt or the output.
    presence_penalty: float = 0.0     # in [-2, 2]; 0 = off
    frequency_penalty: float = 0.0    # in [-2, 2]; 0 = off
    repetition_penalty: float = 1.0   # > 0; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias in [-100, 100]), sorted by id
    logprobs: int = -1                # -1 = none, 0 = the sampled token's, k = and the top k
    prompt_logprobs: int = -1         # likewise for each prompt token after the first (echo)
    # structured output (engine/grammar.py): the output follows this grammar; None = free
    grammar: "GrammarSpec | None" = None
    # no bias, penalty or logprobs: the sampler's fast path (set by __post_init__)
    plain: bool = field(init=False, repr=False, compare=False, default=True)

    def __post_init__(self) -> None:
        """The ranges the router enforces, checked again here: a worker called directly
        (or a bug) must fail the one request, not a sampling step of the whole batch."""
        bad = []
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            bad.append(f"temperature {self.temperature} (>= 0)")
        if not (0.0 <= self.top_p <= 1.0):      # 0 keeps the top token alone (the router asks > 0)
            bad.append(f"top_p {self.top_p} (in [0, 1])")
        if self.top_k < -1:
            bad.append(f"top_k {self.top_k} (>= -1)")
        if not (0.0 <= self.min_p <= 1.0):
            bad.append(f"min_p {self.min_p} (in [0, 1])")
        if self.max_tokens < 0:
            bad.append(f"max_tokens {self.max_tokens} (>= 0)")
        if any(t < 0 for t in self.stop_token_ids):
            bad.append("a negative stop token id")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2.0 <= v <= 2.0):
                bad.append(f"{name} {v} (in [-2, 2])")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            bad.append(f"repetition_penalty {self.repetition_penalty} (> 0)")
        bias = tuple(sorted((int(t), float(b)) for t, b in dict(self.logit_bias).items()))
        object.__setattr__(self, "logit_bias", bias)   # canonical: one entry per token, by id
        if any(t < 0 for t, _ in bias):
            bad.append("a negative logit_bias token id")
        if not all(math.isfinite(b) and -100.0 <= b <= 100.0 for _, b in bias):
            bad.append("a logit_bias value outside [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if not (-1 <= v <= MAX_LOGPROBS):
                bad.append(f"{name} {v} (-1 = none, or 0..{MAX_LOGPROBS})")
        if self.grammar is not None:
            from engine.grammar import GrammarSpec, check_grammar
            if not isinstance(self.grammar, GrammarSpec):
                bad.append(f"grammar {type(self.grammar).__name__} (a GrammarSpec)")
            else:
                check_grammar(self.grammar)      # GrammarError (a ValueError) with its reason
        if bad:
            raise ValueError("invalid sampling parameters: " + ", ".join(bad))
        object.__setattr__(self, "plain", not self.changes_logits and self.logprobs < 0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Any penalty on: the sampler keeps this request's token counts on the device."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def changes_logits(self) -> bool:
        """Penalties or a logit bias: the logits are processed before sampling."""
        return self.has_penalties or bool(self.logit_bias)

    def to_proto(self):
        from proto import tandem_pb2 as pb

        return pb.SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            has_seed=self.seed is not None,
            seed=self.seed or 0,
            max_tokens=self.max_tokens,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias),
            has_logprobs=self.logprobs >= 0,
            logprobs=max(self.logprobs, 0),
            has_prompt_logprobs=self.prompt_logprobs >= 0,
            prompt_logprobs=max(self.prompt_logprobs, 0),
            grammar=self.grammar.to_proto() if self.grammar is not None else None,
        )

    @classmethod
    def from_proto(cls, msg) -> "SamplingParams":
        return cls(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.top_p > 0 else 1.0,
            min_p=msg.min_p,
            seed=msg.seed if msg.has_seed else None,
            max_tokens=msg.max_tokens,
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            repetition_penalty=msg.repetition_penalty if msg.repetition_penalty != 0 else 1.0,
            logit_bias=tuple(msg.logit_bias.items()),
            logprobs=msg.logprobs if msg.has_logprobs else -1,
            prompt_logprobs=msg.prompt_logprobs if msg.has_prompt_logprobs else -1,
            grammar=_grammar_from_proto(msg),
        )


def _grammar_from_proto(msg):
    if not msg.HasField("grammar") or not msg.grammar.kind:
        return None
    from engine.grammar import GrammarSpec
    return GrammarSpec.from_proto(msg.grammar)
