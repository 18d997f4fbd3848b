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
Penalties and logit bias change the logits, never the noise, so they keep that property.

Before step 1, rows that ask for them get logit bias and presence/frequency/repetition
penalties (engine/penalties.py: vLLM's semantics; the output-token counts live on the
device in a `PenaltyTable`, updated with each step's draws, so a step queued before the
previous one is read back sees its tokens). Penalties apply to greedy rows too.
Logprobs (engine/logprobs.py) come from the same logits in the same call: by default the
raw ones (before bias and penalties), as vLLM v1; `run` returns them packed in one small
device tensor beside the tokens.

Structured output (engine/grammar.py): rows with `params.grammar` get their grammar's
bitmask applied after bias and penalties, before greedy/sampled selection, so both obey it;
logprobs stay raw (the model's distribution, unmasked). The mask is filled on the host from
each row's matcher (`Sampler.grammar`, a LazyGrammar / GrammarRuntime the worker sets), after
replaying the row's outputs: callers queue the forward first, so on a GPU this overlaps it.
A grammar row's outputs must be on the host except the trailing PENDING ones
(`num_pending`) of the pass being sampled (decode_worker/engine.py reads earlier passes first).

Fast path: a batch in which no row uses bias, penalties, logprobs or a grammar costs one pass over
the params more than before (`SamplingParams.plain`), nothing on the device.
Lifecycle of per-request state: `release(request_id)` once a request that used a
penalty ends (the engines call it for every request that ends; unknown ids are no-ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engine.logprobs import TokenLogprob, pack, unpack
from engine.penalties import PenaltyTable, TokenSource, add_logit_bias
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
                  top_p: torch.Tensor, min_p: torch.Tensor, any_k_or_p: bool | None = None,
                  any_min_p: bool | None = None) -> torch.Tensor:
    """Temperature-scale float32 `logits` [N, V] and set filtered-out entries to -inf.

    temperature/top_p/min_p are float32 [N], top_k is int64 [N] (<= 0 disabled),
    all on the logits' device. Returns a new tensor. any_k_or_p / any_min_p: whether
    some row uses top_k or top_p / min_p, when the caller knows (else read from the
    device, a sync).
    """
    n, vocab = logits.shape
    scaled = logits / temperature.unsqueeze(1)
    neg_inf = float("-inf")

    use_k = top_k > 0
    use_p = top_p < 1.0
    if any_k_or_p is None:
        any_k_or_p = bool(use_k.any()) or bool(use_p.any())
    if any_min_p is None:
        any_min_p = bool((min_p > 0).any())
    if any_k_or_p:
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

    if any_min_p:
        # prob >= min_p * max_prob  <=>  logit - max_logit >= log(min_p)
        row_max = scaled.max(dim=-1, keepdim=True).values
        thresh = row_max + torch.log(min_p.clamp(min=1e-30)).unsqueeze(1)
        thresh = torch.where((min_p > 0).unsqueeze(1), thresh, neg_inf)
        scaled = torch.where(scaled >= thresh, scaled, neg_inf)
    return scaled


@dataclass(frozen=True)
class SampleOutput:
    """One `Sampler.run`: the tokens, and the packed logprobs of the rows that asked."""
    tokens: torch.Tensor                      # int64 [B] on the device
    logprobs: torch.Tensor | None = None      # float32 [len(lp_rows), 1 + 2K] (logprobs.pack), device
    lp_rows: tuple[int, ...] = ()             # batch rows with params.logprobs >= 0, in order
    lp_ks: tuple[int, ...] = ()               # their params.logprobs

    def entries(self, tokens: Sequence[int], packed: Sequence[Sequence[float]] | None
                ) -> list[TokenLogprob | None]:
        """Per batch row, its TokenLogprob (None where not asked), from the host copies of
        `tokens` and `logprobs`."""
        out: list[TokenLogprob | None] = [None] * len(tokens)
        if self.lp_rows:
            for i, e in zip(self.lp_rows, unpack(packed, [tokens[i] for i in self.lp_rows], self.lp_ks)):
                out[i] = e
        return out


class Sampler:
    """Samples one token per row; owns the RNG used by rows without a seed, and the
    per-request penalty state (one `PenaltyTable` per device).

    Keeps one generator per device, created lazily from `seed`. logprobs_mode: "raw"
    (the model's distribution) or "processed" (after logit bias and penalties).
    """

    def __init__(self, seed: int = 0, logprobs_mode: str = "raw"):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode {logprobs_mode!r}: 'raw' or 'processed'")
        self._seed = seed
        self.logprobs_mode = logprobs_mode
        self._generators: dict[torch.device, torch.Generator] = {}
        self._tables: dict[torch.device, PenaltyTable] = {}
        self._staging = None     # PinnedStaging for the feature paths' host->device copies (CUDA)
        self.grammar = None      # engine.grammar.LazyGrammar | GrammarRuntime: set by the worker

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed & _MASK64)
            self._generators[device] = gen
        return gen

    def _upload(self, device: torch.device):
        """upload(*host tensors of int64 / float64) -> device copies, in one copy on CUDA (pinned)."""
        if device.type != "cuda":
            return lambda *parts: list(parts)
        if self._staging is None:
            from engine.attention.base import PinnedStaging
            self._staging = PinnedStaging(slots=32)   # a few copies per step: reused steps later

        def upload(*parts: torch.Tensor) -> list[torch.Tensor]:
            flat = [p.reshape(-1).view(torch.int64) for p in parts]
            dev = self._staging.to_device(flat, device)
            out, o = [], 0
            for p, f in zip(parts, flat):
                out.append(dev[o:o + f.numel()].view(p.dtype).view(p.shape))
                o += f.numel()
            return out
        return upload

    def table(self, device: torch.device, vocab: int) -> PenaltyTable:
        t = self._tables.get(device)
        if t is None or t.vocab != vocab:
            t = self._tables[device] = PenaltyTable(vocab, device, upload=self._upload(device))
        return t

    def release(self, request_id: str) -> None:
        """The request ended: free its penalty state (no-op if it had none)."""
        for t in self._tables.values():
            t.release(request_id)
        rt = self.grammar_runtime(load=False)
        if rt is not None:
            rt.release(request_id)

    def grammar_runtime(self, load: bool = True):
        """The GrammarRuntime (built now if `load`), or None. GrammarError if none can be made."""
        g = self.grammar
        if g is None:
            if load:
                from engine.grammar import GrammarError
                raise GrammarError("structured output is not available on this worker (no tokenizer set)")
            return None
        if hasattr(g, "get"):
            return g.get() if load else g.loaded
        return g

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               output_index: list[int], sources: Sequence[TokenSource] | None = None) -> list[int]:
        """Return one token id per row of `logits` [B, V] (see module docstring)."""
        return self.run(logits, params, output_index, sources).tokens.tolist()

    def sample_on_device(self, logits: torch.Tensor, params: list[SamplingParams],
                         output_index: list[int], sources: Sequence[TokenSource] | None = None) -> torch.Tensor:
        """`sample`, left on logits' device (int64 [B]); reading it back is the caller's sync."""
        return self.run(logits, params, output_index, sources).tokens

    def run(self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int],
            sources: Sequence[TokenSource] | None = None) -> SampleOutput:
        """Sample every row, on logits' device. `sources[i]` (a TokenSource, e.g. the Sequence)
        is read for rows with a penalty (their request id and, on first sight, their tokens)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(output_index) != batch:
            raise ValueError(f"{batch} rows but {len(params)} params and {len(output_index)} output indices")
        if batch == 0:
            return SampleOutput(torch.zeros(0, dtype=torch.int64, device=logits.device))
        device = logits.device
        raw = logits = logits.float()
        special = [i for i, p in enumerate(params) if not p.plain]
        pen_slots = pen_idx = None
        if special:
            logits, pen_slots, pen_idx = self._process(logits, params, special, sources)
        g_rows = [i for i, p in enumerate(params) if p.grammar is not None]
        if g_rows:
            logits = self._grammar_mask(logits, params, g_rows, sources)
        out = torch.argmax(logits, dim=-1)

        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sp = [params[i] for i in rows]
            unseeded = [j for j, p in enumerate(sp) if p.seed is None]
            # one host->device copy (pinned on CUDA) for every per-row input: no sync
            idx, top_k, knobs, unseeded_idx = self._upload(device)(
                torch.tensor(rows, dtype=torch.int64), torch.tensor([p.top_k for p in sp], dtype=torch.int64),
                torch.tensor([[p.temperature, p.top_p, p.min_p] for p in sp], dtype=torch.float64),
                torch.tensor(unseeded, dtype=torch.int64))
            knobs = knobs.to(torch.float32)
            sub = logits.index_select(0, idx) if len(rows) < batch else logits
            filtered = filter_logits(
                sub, temperature=knobs[:, 0], top_k=top_k, top_p=knobs[:, 1], min_p=knobs[:, 2],
                any_k_or_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sp), any_min_p=any(p.min_p > 0 for p in sp))
            probs = torch.softmax(filtered, dim=-1)
            noise = self._exponential_noise(sp, [output_index[i] for i in rows], vocab, device,
                                            unseeded, unseeded_idx)
            drawn = torch.argmax(probs / noise, dim=-1)
            if len(rows) < batch:
                out.index_copy_(0, idx, drawn)
            else:
                out = drawn
        if not special:
            return SampleOutput(out)
        if pen_slots is not None:
            self.table(device, vocab).count(pen_slots, out.index_select(0, pen_idx))
        lp_rows = tuple(i for i in special if params[i].logprobs >= 0)
        if not lp_rows:
            return SampleOutput(out)
        ks = tuple(params[i].logprobs for i in lp_rows)
        src = raw if self.logprobs_mode == "raw" else logits
        if len(lp_rows) < batch:
            idx, = self._upload(device)(torch.tensor(lp_rows, dtype=torch.int64))
            src, toks = src.index_select(0, idx), out.index_select(0, idx)
        else:
            toks = out
        packed = pack(torch.log_softmax(src, dim=-1), toks, max(ks))
        return SampleOutput(out, packed, lp_rows, ks)

    def _process(self, logits: torch.Tensor, params: list[SamplingParams], special: list[int],
                 sources: Sequence[TokenSource] | None):
        """Logit bias and penalties of the rows that have them, into a new logits tensor (the
        input stays as it was: raw logprobs read it). Returns (logits, penalty slots, their rows)."""
        rows = [i for i in special if params[i].changes_logits]
        if not rows:
            return logits, None, None
        device, upload = logits.device, self._upload(logits.device)
        pen = [j for j, i in enumerate(rows) if params[i].has_penalties]
        if pen and sources is None:
            raise ValueError("penalties need each row's token source (Sampler.run's sources)")
        idx, pen_local, pen_rows = upload(torch.tensor(rows, dtype=torch.int64), torch.tensor(pen, dtype=torch.int64),
                                          torch.tensor([rows[j] for j in pen], dtype=torch.int64))
        sub = logits.index_select(0, idx)
        add_logit_bias(sub, [params[i] for i in rows], upload)
        slots = None
        if pen:
            table = self.table(device, logits.shape[1])
            psub = sub if len(pen) == len(rows) else sub.index_select(0, pen_local)
            slots = table.apply(psub, [params[rows[j]] for j in pen], [sources[rows[j]] for j in pen])
            if psub is not sub:
                sub.index_copy_(0, pen_local, psub)
        return logits.index_copy(0, idx, sub), slots, (pen_rows if pen else None)

    def _grammar_mask(self, logits: torch.Tensor, params: list[SamplingParams], rows: list[int],
                      sources: Sequence[TokenSource] | None) -> torch.Tensor:
        """The logits with each grammar row's disallowed tokens at -inf (a new tensor)."""
        from engine.grammar import apply_bitmask
        if sources is None:
            raise ValueError("grammar rows need each row's token source (Sampler.run's sources)")
        rt = self.grammar_runtime()
        cuda = logits.device.type == "cuda"
        bitmask = torch.empty(len(rows), rt.words, dtype=torch.int32, pin_memory=cuda)
        rt.fill([params[i].grammar for i in rows], [sources[i] for i in rows], bitmask)
        return apply_bitmask(logits, rows, bitmask)

    def _exponential_noise(self, params: list[SamplingParams], output_index: list[int],
                           vocab: int, device: torch.device, unseeded: list[int],
                           unseeded_idx: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise [N, V]: per-row generators for seeded rows, the shared one otherwise
        (rows `unseeded`, the same on the device as `unseeded_idx`)."""
        noise = torch.empty(len(params), vocab, dtype=torch.float32, device=device)
        if len(unseeded) == len(params):
            noise.exponential_(generator=self._generator(device))
        elif unseeded:
            draw = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)
            draw.exponential_(generator=self._generator(device))
            noise.index_copy_(0, unseeded_idx, draw)
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
