"""float64 transformers references for logprobs and penalised greedy decoding (vLLM semantics)."""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """float64 log_softmax [len(tokens), V]: row i is the distribution of token i+1."""
    with torch.inference_mode():
        logits = hf(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def hf_penalised_greedy(hf, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    """Greedy decoding with p's bias and penalties applied to float64 logits (vLLM semantics)."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            ids = torch.tensor([prompt + out])
            x = hf(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].double().clone()
        for t, b in p.logit_bias:
            x[t] += b
        for t in set(prompt) | set(out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        for t in set(out):
            x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        out.append(int(torch.argmax(x)))
    return out
