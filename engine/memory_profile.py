"""Worst-case passes of a loaded model: measure activation memory before the KV pool exists, and
warm up (compile kernels, fill the allocator's cache) once it does.

Lifecycle, driven by ModelRunner (engine/runner.py; the arithmetic is engine/memory.py):
  1. `profile_shapes(...)` (pure): the worst prefill batch (max_num_batched_tokens tokens:
     one long prompt for the largest attention, the rest one-token prompts up to
     max_num_seqs for the most logits rows) and the largest decode batch (the largest
     CUDA graph bucket; none for a prefill worker, which never decodes).
  2. `measure(runner, kv, page, shapes)` (CUDA): runs the passes, sampling included, on a
     one-page pool and returns what the allocator reserved beyond the weights (`Peaks`).
  3. `warm_up(runner, kv, page, shapes)`: the same passes on the real pool, so that the
     memory the worker will use is held (and visible to a worker that starts after it)
     the moment it is ready.
Every token of a pass writes its K/V into the single page `page` and reads it back:
garbage values, real memory use. The page is unused at startup (the graphs' scratch page
or page 0 of a fresh pool), so nothing meaningful is overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention.base import AttentionMetadata, build_metadata_and_ids
from engine.kv_cache import KVCache
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from engine.runner import ModelRunner

# every filter on: the sampler's largest temporaries (sort, softmax, cumsum, noise)
_WORST_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, max_tokens=1)


@dataclass(frozen=True)
class ProfileShapes:
    prefill_lens: tuple[int, ...]   # new tokens of each prompt of the worst prefill batch
    decode_batch: int               # sequences of the worst decode step; 0 = never decodes

    @property
    def prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    def describe(self) -> str:
        d = f", decode {self.decode_batch} seqs" if self.decode_batch else ""
        return f"prefill {self.prefill_tokens} tokens in {len(self.prefill_lens)} seqs{d}"


def profile_shapes(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                   decode_batch: int) -> ProfileShapes:
    """See step 1 of the module docstring; prompts are at most max_model_len tokens."""
    T, L = max(1, max_num_batched_tokens), max(1, max_model_len)
    B = max(1, min(max_num_seqs, T))
    n_long = -(-(T - (B - 1)) // L)
    n_short = max(0, B - n_long)
    long_tokens = T - n_short
    longs = [L] * (long_tokens // L) + ([long_tokens % L] if long_tokens % L else [])
    return ProfileShapes(tuple(longs + [1] * n_short), decode_batch)


@dataclass(frozen=True)
class Peaks:
    """Device bytes the allocator reserved at the peak of the passes (see `_peak`)."""
    activations: int         # prefill then decode, sampling included, one cache: what a worker holds
    decode_forward: int      # a decode forward alone (what a CUDA graph's pool holds)


def prefill_pass(runner: "ModelRunner", kv: KVCache, page: int, lens: tuple[int, ...],
                 sample: bool = True) -> None:
    ps = runner.page_size
    tables = [[page] * -(-n // ps) for n in lens]
    ids = torch.zeros(sum(lens), dtype=torch.int64)
    meta, ids = build_metadata_and_ids([0] * len(lens), lens, tables, ps, runner.device, kv.num_pages,
                                       token_ids=ids)
    hidden = runner.model(ids, meta, kv, runner.backend, None)
    logits = runner.model.compute_logits(hidden[meta.cu_seqlens[1:].long() - 1])
    if sample:
        Sampler(0).sample(logits, [_WORST_SAMPLING] * len(lens), [0] * len(lens))


def decode_metadata(runner: "ModelRunner", batch: int, page: int) -> AttentionMetadata:
    """A decode step of `batch` one-token seqs in page `page`, launch grids sized for
    max_model_len (as the CUDA graphs are)."""
    dev, ps = runner.device, runner.page_size
    max_pages = -(-runner.max_model_len // ps)
    i32 = dict(dtype=torch.int32, device=dev)
    return AttentionMetadata(
        page_size=ps, positions=torch.zeros(batch, dtype=torch.int64, device=dev),
        slot_mapping=torch.full((batch,), page * ps, dtype=torch.int64, device=dev),
        cu_seqlens=torch.arange(batch + 1, **i32), start_pos=torch.zeros(batch, **i32),
        seq_lens=torch.ones(batch, **i32), block_tables=torch.full((batch, max_pages), page, **i32),
        start_pos_list=(0,) * batch, new_lens_list=(1,) * batch, page_tables_list=((page,),) * batch,
        max_new_len=1, max_seq_len=runner.max_model_len)


def decode_pass(runner: "ModelRunner", kv: KVCache, page: int, batch: int, sample: bool = True) -> None:
    meta = decode_metadata(runner, batch, page)
    ids = torch.zeros(batch, dtype=torch.int64, device=runner.device)
    logits = runner.model.compute_logits(runner.model(ids, meta, kv, runner.backend, None))
    if sample:
        Sampler(0).sample(logits, [_WORST_SAMPLING] * batch, [0] * batch)


def _peak(device: torch.device, *passes) -> int:
    """Bytes the allocator reserved from the device at the peak of `passes` (fn, *args), run one
    after the other in one cache, above its reservation before (reserved, not allocated: the
    allocator's rounding, splitting and blocks cached for one pass that another cannot reuse
    are held too). Starts from an empty cache, so nothing hides in blocks cached earlier."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_reserved(device)
    for fn, *args in passes:
        fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.memory_stats(device)["reserved_bytes.all.peak"] - base


@torch.inference_mode()
def measure(runner: "ModelRunner", kv: KVCache, page: int, shapes: ProfileShapes) -> Peaks:
    dev = runner.device
    prefill_pass(runner, kv, page, shapes.prefill_lens)   # compile the kernels first, off the books
    passes = [(prefill_pass, runner, kv, page, shapes.prefill_lens)]
    fwd = 0
    if shapes.decode_batch:
        fwd = _peak(dev, (decode_pass, runner, kv, page, shapes.decode_batch, False))
        passes.append((decode_pass, runner, kv, page, shapes.decode_batch, True))
    return Peaks(activations=_peak(dev, *passes), decode_forward=fwd)


@torch.inference_mode()
def warm_up(runner: "ModelRunner", kv: KVCache, page: int, shapes: ProfileShapes) -> None:
    prefill_pass(runner, kv, page, shapes.prefill_lens)
    if shapes.decode_batch:
        decode_pass(runner, kv, page, shapes.decode_batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
