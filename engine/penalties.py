"""Logit bias and presence/frequency/repetition penalties as batched tensor ops (vLLM's semantics).

`PenaltyTable` keeps, on the sampling device, one slot per live request that uses a
penalty: its output-token counts (int32 [V]) and which tokens its prompt holds (bool [V]).
Lifecycle of a slot:
  1. the first `apply` that sees the request (`TokenSource.request_id`) takes a free slot
     and fills it from the tokens the host knows (prompt, outputs so far; every new
     request of one step in one host->device copy);
  2. every sampling step adds the tokens it drew to the rows' counts on the device
     (`count`), so a step queued before the previous one's tokens are read back (async
     scheduling) still sees them, with no device->host sync;
  3. `release(request_id)` when the request ends frees the slot (the device work already
     queued for it stays ordered before the slot's next use: one stream).
The table grows by doubling; it holds nothing until some request uses a penalty.

Semantics, in vLLM v1's order (after any logit bias):
  repetition r: a token seen in the prompt or the output has its logit divided by r if
                positive, multiplied by r otherwise;
  frequency f:  logit -= f * (times the token was output);
  presence p:   logit -= p * (1 if the token was output at all).
A migrated request (`output_offset` > 0) carries its earlier outputs at the end of its
prompt; they are counted as outputs, so its penalties continue as if it had not moved.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import PENDING


class TokenSource(Protocol):
    """What the table needs of a request the first time it sees it (engine.sequence.Sequence
    fits; so does the prefill worker's job)."""
    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    output_offset: int


# upload(host tensors) -> the same on the device, in one host->device copy (engine/sampler.py)
Upload = Callable[..., list[torch.Tensor]]


def _plain_upload(device: torch.device) -> Upload:
    return lambda *parts: [t.to(device) for t in parts]


def add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams], upload: Upload | None = None) -> None:
    """In place: add each row's logit_bias to float32 `logits` [N, V]. One host->device copy.
    A token id >= V raises ValueError (the workers refuse such requests before they run)."""
    rows, toks, vals = [], [], []
    for i, p in enumerate(params):
        for t, b in p.logit_bias:
            rows.append(i)
            toks.append(t)
            vals.append(b)
    if not rows:
        return
    vocab = logits.shape[1]
    if max(toks) >= vocab:
        raise ValueError(f"logit_bias token id {max(toks)} outside the vocabulary [0, {vocab})")
    upload = upload or _plain_upload(logits.device)
    # flat index_add_: one kernel (a CUDA index_put_ with accumulate costs ~0.6 ms of host time)
    flat, val = upload(torch.tensor(rows, dtype=torch.int64) * vocab + torch.tensor(toks, dtype=torch.int64),
                       torch.tensor(vals, dtype=torch.float64))
    logits.view(-1).index_add_(0, flat, val.to(torch.float32))


class PenaltyTable:
    """Per-request token counts on one device (see the module docstring)."""

    def __init__(self, vocab: int, device: torch.device, capacity: int = 8, upload: Upload | None = None) -> None:
        self.vocab = vocab
        self.device = torch.device(device)
        self.upload = upload or _plain_upload(self.device)
        self._initial = capacity
        self.counts: torch.Tensor | None = None       # int32 [S, V]: output-token counts
        self.in_prompt: torch.Tensor | None = None    # bool [S, V]
        self._slots: dict[str, int] = {}
        self._free: list[int] = []

    @property
    def num_live(self) -> int:
        return len(self._slots)

    def _grow(self) -> None:
        old = 0 if self.counts is None else self.counts.shape[0]
        new = max(self._initial, 2 * old)
        counts = torch.zeros(new, self.vocab, dtype=torch.int32, device=self.device)
        in_prompt = torch.zeros(new, self.vocab, dtype=torch.bool, device=self.device)
        if old:
            counts[:old] = self.counts
            in_prompt[:old] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
        self._free.extend(range(new - 1, old - 1, -1))

    def slots(self, sources: Sequence[TokenSource]) -> list[int]:
        """Each request's slot; those seen for the first time are filled from their known
        tokens, all in one host->device copy."""
        out, fill = [], []
        for src in sources:
            s = self._slots.get(src.request_id)
            if s is None:
                if not self._free:
                    self._grow()
                s = self._free.pop()
                self._slots[src.request_id] = s
                fill.append((s, src))
            out.append(s)
        if fill:
            try:
                self._fill(fill)
            except ValueError:
                for s, src in fill:
                    self.release(src.request_id)
                raise
        return out

    def _fill(self, fill: list[tuple[int, TokenSource]]) -> None:
        rows_p, toks_p, rows_o, toks_o = [], [], [], []
        for s, src in fill:
            prompt = list(src.prompt_token_ids)
            off = max(0, min(int(src.output_offset or 0), len(prompt)))
            outputs = prompt[len(prompt) - off:] + [t for t in src.output_token_ids if t != PENDING]
            prompt = prompt[:len(prompt) - off]
            rows_p += [s] * len(prompt)
            toks_p += prompt
            rows_o += [s] * len(outputs)
            toks_o += outputs
        if max(toks_p + toks_o, default=0) >= self.vocab or min(toks_p + toks_o, default=0) < 0:
            raise ValueError(f"token id outside the vocabulary [0, {self.vocab})")
        n_p = len(toks_p)
        flat = torch.tensor(rows_p + rows_o, dtype=torch.int64) * self.vocab + torch.tensor(toks_p + toks_o,
                                                                                             dtype=torch.int64)
        slots, flat = self.upload(torch.tensor([s for s, _ in fill], dtype=torch.int64), flat)
        self.counts.index_fill_(0, slots, 0)
        self.in_prompt.index_fill_(0, slots, False)
        self.in_prompt.view(-1).index_fill_(0, flat[:n_p], True)
        out = flat[n_p:]
        self.counts.view(-1).index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def release(self, request_id: str) -> None:
        s = self._slots.pop(request_id, None)
        if s is not None:
            self._free.append(s)

    def apply(self, logits: torch.Tensor, params: Sequence[SamplingParams],
              sources: Sequence[TokenSource]) -> torch.Tensor:
        """In place on float32 `logits` [N, V] (one row per params/sources entry, each with a
        penalty); returns the int64 slot index [N] on the device, for `count`."""
        slots, knobs = self.upload(
            torch.tensor(self.slots(sources), dtype=torch.int64),
            torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                         dtype=torch.float64))
        knobs = knobs.to(torch.float32)
        counts = self.counts.index_select(0, slots)
        seen = self.in_prompt.index_select(0, slots) | (counts > 0)
        rep = knobs[:, 0:1]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(seen, penalised, logits))
        counts_f = counts.to(torch.float32)
        logits.sub_(knobs[:, 1:2] * counts_f).sub_(knobs[:, 2:3] * (counts_f > 0).to(torch.float32))
        return slots

    def count(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one sampled token per slot (device tensors, same length) to the counts."""
        self.counts.view(-1).index_add_(0, slots * self.vocab + tokens, torch.ones_like(tokens, dtype=torch.int32))
