"""Log-probabilities of sampled and prompt tokens, computed on the device, read back packed.

What is measured: log_softmax in float32 of the logits the sampler was given (the raw model
distribution, before logit bias, penalties, temperature and the top-k/top-p/min-p filters:
vLLM v1's default `logprobs_mode="raw_logprobs"`; `Sampler(logprobs_mode="processed")`
takes them after bias and penalties instead, still before temperature).

One step's logprobs travel as ONE float32 tensor [rows, 1 + 2K] (`pack`): column 0 the
sampled token's logprob, then K top token ids (exact in float32: ids < 2^24) and their K
logprobs, best first. The decode engine copies it back beside the sampled tokens (same
event, no extra sync); `unpack` turns the host copy into `TokenLogprob`s, each row cut to
the k its request asked for.

Prompt logprobs (echo): `prompt_logprobs(...)` scores prompt token i+1 under the logits at
position i, for every position of a prompt computed in one pass, in chunks of rows so the
[n, V] logits never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_MAX_EXACT_ID = 1 << 24       # float32 holds every integer below this exactly


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the chosen token's logprob and the top alternatives (best first)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_proto(self):
        from proto import tandem_pb2 as pb

        return pb.TokenLogprob(token_id=self.token_id, logprob=self.logprob,
                               top_token_ids=[t for t, _ in self.top], top_logprobs=[lp for _, lp in self.top])

    @classmethod
    def from_proto(cls, msg) -> "TokenLogprob":
        return cls(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


def pack(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [N, V] logprobs and int64 [N] chosen tokens -> float32 [N, 1 + 2k] (see above)."""
    if logprobs.shape[1] >= _MAX_EXACT_ID:
        raise ValueError(f"vocab of {logprobs.shape[1]} too large to pack token ids in float32")
    chosen = logprobs.gather(1, tokens.view(-1, 1))
    if k <= 0:
        return chosen
    k = min(k, logprobs.shape[1])
    top = torch.topk(logprobs, k, dim=-1)
    return torch.cat([chosen, top.indices.to(torch.float32), top.values], dim=1)


def unpack(rows: Sequence[Sequence[float]], tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Host rows of `pack` -> TokenLogprobs; row i keeps its first ks[i] alternatives."""
    out = []
    for row, tok, k in zip(rows, tokens, ks):
        width = (len(row) - 1) // 2
        k = min(k, width)
        out.append(TokenLogprob(int(tok), float(row[0]),
                                tuple(zip(map(int, row[1:1 + k]), map(float, row[1 + width:1 + width + k])))))
    return out


@torch.inference_mode()
def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    prompt: Sequence[int], k: int, chunk: int = 1024) -> torch.Tensor:
    """Packed logprobs [len(prompt) - 1, 1 + 2k] of prompt[1:], the row for token i+1 from the
    final hidden state of position i (`hidden` [len(prompt), H], or at least len(prompt) - 1
    rows), `compute_logits` mapping hidden rows to float32 logits."""
    n = len(prompt) - 1
    if n <= 0:
        return torch.zeros(0, 1 + 2 * max(k, 0), dtype=torch.float32, device=hidden.device)
    targets = torch.tensor(list(prompt[1:]), dtype=torch.int64).to(hidden.device)
    parts = []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        lp = torch.log_softmax(compute_logits(hidden[a:b]).float(), dim=-1)
        parts.append(pack(lp, targets[a:b], k))
    return torch.cat(parts)
