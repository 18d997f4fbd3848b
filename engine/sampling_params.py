"""Per-request sampling parameters, shared by router, prefill and decode.

The router validates user input and builds a `SamplingParams`; the workers
receive it through protobuf (`to_proto` / `from_proto`). Stop *strings* are a
router concern (they need detokenised text) and are not sent to workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


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
        if bad:
            raise ValueError("invalid sampling parameters: " + ", ".join(bad))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

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
        )
