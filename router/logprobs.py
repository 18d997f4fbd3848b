"""Logprobs in OpenAI's response shapes, from the workers' `TokenLogprob`s (proto).

The engine computes them (engine/logprobs.py: log_softmax in float32 of the raw model logits,
vLLM's default); the router only names the tokens and lays them out:

  completions  choices[i].logprobs = {tokens: [str], token_logprobs: [float | null],
               top_logprobs: [{token: logprob} | null], text_offset: [int]}
               `top_logprobs` holds the top k and the sampled token (so up to k + 1 entries,
               as OpenAI documents); with `echo` the prompt's tokens come first, the first of
               them with null logprobs (nothing precedes it).
  chat         choices[i].logprobs = {content: [{token, logprob, bytes, top_logprobs:
               [{token, logprob, bytes}] (exactly the top k)}], refusal: null}

Token strings are each token decoded alone (as vLLM names them), `bytes` their UTF-8.
`text_offset` is where each token's text starts in the choice's `text` (the echoed prompt
included), measured from the incremental detokenizer as the tokens arrive; a token that
completes a character another token began shares that token's offset, and offsets past a
stop string's cut are clamped to the text's end. A logprob of -inf (a token the bias or the
model rules out) is sent as -9999.0, as OpenAI does: JSON has no infinities.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from proto import tandem_pb2 as pb

_FLOOR = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


class LogprobFormatter:
    """One per app: token names (cached per id) and the two response shapes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}

    def name(self, token_id: int) -> str:
        s = self._names.get(token_id)
        if s is None:
            s = self._names[token_id] = self._tokenizer.decode([token_id])
        return s

    # ---- completions --------------------------------------------------------------------

    def completion(self, entries: Sequence[pb.TokenLogprob | None], token_ids: Sequence[int],
                   offsets: Sequence[int], text_len: int) -> dict[str, Any]:
        """entries[i] is None for a token with no logprob (the echoed prompt's first)."""
        tokens, lps, tops = [], [], []
        for tok, e in zip(token_ids, entries):
            tokens.append(self.name(tok))
            if e is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(_lp(e.logprob))
            top = {self.name(t): _lp(lp) for t, lp in zip(e.top_token_ids, e.top_logprobs)}
            top.setdefault(self.name(e.token_id), _lp(e.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": [min(o, text_len) for o in offsets]}

    # ---- chat ---------------------------------------------------------------------------

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self.name(token_id)
        return {"token": s, "logprob": _lp(logprob), "bytes": list(s.encode("utf-8", errors="replace"))}

    def chat(self, entries: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
        content = []
        for e in entries:
            d = self._entry(e.token_id, e.logprob)
            d["top_logprobs"] = [self._entry(t, lp) for t, lp in zip(e.top_token_ids, e.top_logprobs)]
            content.append(d)
        return {"content": content, "refusal": None}
