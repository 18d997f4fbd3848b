"""Token sampling from a batch of logits, shared by prefill and decode workers.

One call samples one token per row of `logits` [B, V] under that row's
`SamplingParams`:

1. Greedy rows (`params.greedy`: temperature <= 0 or top_k == 1) take the argmax.
2. Sampled rows are scaled by 1/temperature in float32, then filtered by
   top_k (<= 0 disabled), top_p (>= 1 disabled; the smallest set of tokens whose
   mass is >= top_p, always keeping the top token) and min_p (keep tokens with
   prob >= min_p * max prob). Every filter is a threshold on the row's values, so
   ties at the cut are all kept and the result does not depend on sort order.
3. A token is drawn by exponential race: argmax(p / E) with E ~ Exp(1) i.i.d.,
   which picks token i with probability p_i.

Reproducibility: a row with `params.seed` draws its E from its own
`torch.Generator` seeded from (seed, output_index), so the token depends only on
that pair, the row's logits and its params -- not on the batch it sits in, nor on
which worker samples it (the prefill worker draws output 0, the decode worker the
rest). Rows without a seed draw from the generator owned by the `Sampler`.
"""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, output_index: int) -> int:
    """SplitMix64-style mix of (seed, output_index) into a 63-bit generator seed."""
    x = (seed * 0x9E3779B97F4A7C15 + output_index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x >> 1


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scale float32 `logits` [N, V] and set filtered-out entries to -inf.

    temperature/top_p/min_p are float32 [N], top_k is int64 [N] (<= 0 disabled),
    all on the logits' device. Returns a new tensor.
    """
    n, vocab = logits.shape
    scaled = logits / temperature.unsqueeze(1)
    neg_inf = torch.tensor(float("-inf"), device=scaled.device)

    use_k = top_k > 0
    use_p = top_p < 1.0
    if bool(use_k.any()) or bool(use_p.any()):
        sorted_vals = torch.sort(scaled, dim=-1, descending=True).values
        ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
        k = torch.where(use_k, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        # top_k: drop sorted positions past k, then keep values >= the k-th largest.
        sorted_vals = sorted_vals.masked_fill(ranks >= k.unsqueeze(1), float("-inf"))
        # top_p on the top_k-renormalised distribution: keep position j while the
        # mass strictly before it is < top_p (position 0 always kept).
        sorted_probs = torch.softmax(sorted_vals, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = (mass_before < top_p.unsqueeze(1)) | ~use_p.unsqueeze(1)
        keep[:, 0] = True
        keep &= ranks < k.unsqueeze(1)
        last_kept = keep.sum(dim=-1, keepdim=True) - 1
        cutoff = sorted_vals.gather(1, last_kept)
        scaled = torch.where(scaled >= cutoff, scaled, neg_inf)

    if bool((min_p > 0).any()):
        # prob >= min_p * max_prob  <=>  logit - max_logit >= log(min_p)
        row_max = scaled.max(dim=-1, keepdim=True).values
        thresh = row_max + torch.log(min_p.clamp(min=1e-30)).unsqueeze(1)
        thresh = torch.where((min_p > 0).unsqueeze(1), thresh, neg_inf)
        scaled = torch.where(scaled >= thresh, scaled, neg_inf)
    return scaled


class Sampler:
    """Samples one token per row; owns the RNG used by rows without a seed.

    Keeps one generator per device, created lazily from `seed`.
    """

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed & _MASK64)
            self._generators[device] = gen
        return gen

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               output_index: list[int]) -> list[int]:
        """Return one token id per row of `logits` [B, V] (see module docstring)."""
        return self.sample_on_device(logits, params, output_index).tolist()

    def sample_on_device(self, logits: torch.Tensor, params: list[SamplingParams],
                         output_index: list[int]) -> torch.Tensor:
        """`sample`, left on logits' device (int64 [B]); reading it back is the caller's sync."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(output_index) != batch:
            raise ValueError(f"{batch} rows but {len(params)} params and {len(output_index)} output indices")
        if batch == 0:
            return torch.zeros(0, dtype=torch.int64, device=logits.device)
        device = logits.device
        logits = logits.float()
        out = torch.argmax(logits, dim=-1)

        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sub = logits[torch.tensor(rows, device=device)] if len(rows) < batch else logits
            sp = [params[i] for i in rows]
            f32 = dict(dtype=torch.float32, device=device)
            filtered = filter_logits(
                sub,
                temperature=torch.tensor([p.temperature for p in sp], **f32),
                top_k=torch.tensor([p.top_k for p in sp], dtype=torch.int64, device=device),
                top_p=torch.tensor([p.top_p for p in sp], **f32),
                min_p=torch.tensor([p.min_p for p in sp], **f32),
            )
            probs = torch.softmax(filtered, dim=-1)
            noise = self._exponential_noise(sp, [output_index[i] for i in rows], vocab, device)
            drawn = torch.argmax(probs / noise, dim=-1)
            if len(rows) < batch:
                out[torch.tensor(rows, device=device)] = drawn
            else:
                out = drawn
        return out

    def _exponential_noise(self, params: list[SamplingParams], output_index: list[int],
                           vocab: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise [N, V]: per-row generators for seeded rows, the shared one otherwise."""
        noise = torch.empty(len(params), vocab, dtype=torch.float32, device=device)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if unseeded:
            draw = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)
            draw.exponential_(generator=self._generator(device))
            noise[torch.tensor(unseeded, device=device)] = draw
        for j, p in enumerate(params):  # one generator per seeded row, never per token
            if p.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(_mix_seed(p.seed, output_index[j]))
                noise[j].exponential_(generator=gen)
        # exponential_ may return exactly 0 in float32; keep p / E finite.
        return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int],
           sampler: Sampler | None = None) -> list[int]:
    """Convenience wrapper; without `sampler`, unseeded rows use a fresh Sampler
    seeded from torch's default generator (so `torch.manual_seed` governs them)."""
    if sampler is None:
        sampler = Sampler(seed=int(torch.randint(0, 2**62, (1,)).item()))
    return sampler.sample(logits, params, output_index)
