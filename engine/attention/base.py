"""Attention backend contract and the per-forward metadata every backend reads.

Lifecycle of one forward pass:
  1. the runner calls `build_metadata` once from its ForwardSeqs;
  2. every layer calls `backend.forward(q, k, v, k_cache, v_cache, meta, scale)`, which
     a) writes the new tokens' k/v into the paged cache at `meta.slot_mapping`, then
     b) computes causal attention of each seq's new tokens over its cached prefix plus
        itself, reading K/V through the page tables (never from the k/v arguments);
  3. the metadata is discarded.
Tokens of all seqs are flattened into one ragged batch [T, ...] (no padding), seq i
owning rows cu_seqlens[i]:cu_seqlens[i+1].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    page_size: int
    positions: torch.Tensor      # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor   # [T] int64, page * page_size + offset of each new token
    cu_seqlens: torch.Tensor     # [B+1] int32, prefix sums of new_lens (ragged row offsets)
    start_pos: torch.Tensor      # [B] int32, tokens already cached before this pass
    seq_lens: torch.Tensor       # [B] int32, start_pos + new_len (total context after this pass)
    block_tables: torch.Tensor   # [B, max_pages] int32, page tables padded with 0
    # Host-side copies, so CPU backends and launch-grid sizing need no device sync.
    start_pos_list: tuple[int, ...]
    new_lens_list: tuple[int, ...]
    page_tables_list: tuple[tuple[int, ...], ...]
    max_new_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.new_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every seq contributes exactly one new token."""
        return self.max_new_len == 1


def build_metadata(start_pos: Sequence[int], new_lens: Sequence[int],
                   page_tables: Sequence[Sequence[int]], page_size: int,
                   device: torch.device | str, num_pages: int | None = None) -> AttentionMetadata:
    """Metadata for one ragged batch; page_tables[i] must cover start_pos[i] + new_lens[i] tokens.
    With num_pages given, page ids outside [0, num_pages) raise ValueError."""
    B = len(new_lens)
    seq_lens = [s + n for s, n in zip(start_pos, new_lens)]
    need = [(L + page_size - 1) // page_size for L in seq_lens]
    max_pages = max(need) if need else 0
    tables = torch.zeros((B, max(max_pages, 1)), dtype=torch.int64)
    for i, (pt, k) in enumerate(zip(page_tables, need)):
        if len(pt) < k:
            raise ValueError(f"seq {i}: page table has {len(pt)} pages, needs {k} for {seq_lens[i]} tokens")
        if k:
            tables[i, :k] = torch.as_tensor(list(pt[:k]), dtype=torch.int64)
    if num_pages is not None and B and (int(tables.max()) >= num_pages or int(tables.min()) < 0):
        raise ValueError(f"page table holds a page id outside [0, {num_pages})")
    lens_t = torch.as_tensor(list(new_lens), dtype=torch.int64)
    starts_t = torch.as_tensor(list(start_pos), dtype=torch.int64)
    seq_idx = torch.repeat_interleave(torch.arange(B), lens_t)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens_t, 0)
    positions = starts_t[seq_idx] + (torch.arange(int(cu[-1])) - cu[:-1][seq_idx])
    slots = tables[seq_idx, positions // page_size] * page_size + positions % page_size
    return AttentionMetadata(
        page_size=page_size,
        positions=positions.to(device),
        slot_mapping=slots.to(device),
        cu_seqlens=cu.to(torch.int32).to(device),
        start_pos=starts_t.to(torch.int32).to(device),
        seq_lens=torch.as_tensor(seq_lens, dtype=torch.int32).to(device),
        block_tables=tables.to(torch.int32).to(device),
        start_pos_list=tuple(int(s) for s in start_pos),
        new_lens_list=tuple(int(n) for n in new_lens),
        page_tables_list=tuple(tuple(int(p) for p in pt[:k]) for pt, k in zip(page_tables, need)),
        max_new_len=max(new_lens) if B else 0,
        max_seq_len=max(seq_lens) if B else 0,
    )


class AttentionBackend(ABC):
    """One attention implementation. Stateless across forwards."""

    name: str = "base"

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T,H,D], k/v [T,KVH,D]; caches [num_pages, page_size, KVH, D].
        Writes k/v into the caches at meta.slot_mapping, returns out [T,H,D] in q's dtype."""


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new k/v [T,KVH,D] into the paged caches by flat slot index."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
