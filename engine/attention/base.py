"""Attention backend contract and the per-forward metadata every backend reads.

Lifecycle of one forward pass:
  1. the runner calls `build_metadata` once from its ForwardSeqs;
  2. every layer calls `backend.forward(q, k, v, k_cache, v_cache, meta, scale)`, which
     a) writes the new tokens' k/v into the paged cache at `meta.slot_mapping`, then
     b) computes causal attention of each seq's new tokens over its cached prefix plus
        itself, reading K/V through the page tables (never from the k/v arguments);
  3. the metadata is discarded.
Tokens of all seqs are flattened into one ragged batch [T, ...] (no padding), seq i
owning rows cu_seqlens[i]:cu_seqlens[i+1]. A mixed batch (prompts, then the running seqs'
decode tokens in the same forward) ends in `decode_tail` one-token seqs, which a backend
may hand to its decode kernel.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
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
    # The trailing seqs that bring one new token each, behind at least one that brings more
    # (a mixed batch's decode rows), and their longest context; 0 when there are none or
    # every seq brings one token (is_decode).
    decode_tail: int = 0
    decode_tail_max_seq_len: int = 0
    # Shared-prefix (cascade) decode: the one-token seqs (all of a decode batch, or a mixed
    # batch's decode tail) begin with keys on the same pages as a leader seq's (a prefix-cache
    # hit), up to `shared_prefix_len` of them, so a backend may read those once for all of them;
    # `shared_prefix` is the device vector of triton_kernels.paged_decode (int32 [seqs + 2]:
    # each seq's share, their most, the leader), None when off.
    shared_prefix_len: int = 0
    shared_prefix: torch.Tensor | None = None

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
    return build_metadata_and_ids(start_pos, new_lens, page_tables, page_size, device, num_pages)[0]


class PinnedStaging:
    """A small ring of reusable pinned host buffers for the per-forward metadata copy.

    Pinning a fresh buffer every step costs more than building the metadata; a ring
    slot is reused only after the event recorded behind its previous copy has fired,
    so an asynchronous copy still in flight is never overwritten. One ring per stream: a
    copy queued behind a long pass on one stream (a prefill lane) never makes a copy for
    another stream wait on the host."""

    def __init__(self, slots: int = 4):
        self.slots = slots
        self._rings: dict[int, list] = {}     # stream handle -> [bufs, events, next]

    def to_device(self, parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        n = sum(t.numel() for t in parts)
        key = torch.cuda.current_stream(device).cuda_stream
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [[None] * self.slots, [None] * self.slots, 0]
        bufs, events, i = ring
        ring[2] = (i + 1) % self.slots
        if events[i] is not None:
            events[i].synchronize()
        buf = bufs[i]
        if buf is None or buf.numel() < n:
            buf = bufs[i] = torch.empty(max(2 * n, 1 << 14), dtype=torch.int64, pin_memory=True)
        torch.cat(parts, out=buf[:n])
        dev = buf[:n].to(device, non_blocking=True)
        ev = events[i] = torch.cuda.Event()
        ev.record()
        return dev


def build_metadata_and_ids(start_pos: Sequence[int], new_lens: Sequence[int],
                           page_tables: Sequence[Sequence[int]], page_size: int,
                           device: torch.device | str, num_pages: int | None = None,
                           token_ids: Sequence[int] | None = None,
                           staging: PinnedStaging | None = None, shared_prefix_min: int = 0,
                           shared_prefix_saved: int = 0,
                           ) -> tuple[AttentionMetadata, torch.Tensor | None]:
    """`build_metadata`, plus the flattened new token ids moved to `device` in the same copy.
    shared_prefix_min > 0: when the one-token seqs (a decode batch, or a mixed batch's decode
    tail) begin with pages of a leader seq's, at least that many tokens of them, and would read
    at least `shared_prefix_saved` keys fewer (their shares but the most), the metadata gets
    `shared_prefix_len` / `shared_prefix` (see `shared_prefix_shares`).

    Host work is O(B) Python plus vectorised torch ops on the CPU (no per-token or
    per-page Python loops); every device tensor comes out of ONE host-to-device copy
    of a packed int64 buffer (pinned when the target is CUDA: from `staging`'s ring
    when given, else a buffer pinned for this call)."""
    device = torch.device(device)
    B = len(new_lens)
    starts_l = [int(s) for s in start_pos]
    lens_l = [int(n) for n in new_lens]
    seq_lens = [s + n for s, n in zip(starts_l, lens_l)]
    need = [-(-L // page_size) for L in seq_lens]
    max_pages = max(need) if need else 0
    P = max(max_pages, 1)
    pts = [pt if isinstance(pt, (list, tuple)) else [int(p) for p in pt] for pt in page_tables]
    for i, (pt, k) in enumerate(zip(pts, need)):
        if len(pt) < k:
            raise ValueError(f"seq {i}: page table has {len(pt)} pages, needs {k} for {seq_lens[i]} tokens")
    flat = torch.from_numpy(np.fromiter(chain.from_iterable(pt[:k] for pt, k in zip(pts, need)),
                                        dtype=np.int64, count=sum(need)))
    need_t = torch.tensor(need, dtype=torch.int64)
    tables = torch.zeros((B, P), dtype=torch.int64)
    if flat.numel():
        if num_pages is not None and (int(flat.max()) >= num_pages or int(flat.min()) < 0):
            raise ValueError(f"page table holds a page id outside [0, {num_pages})")
        tables[torch.arange(P)[None, :] < need_t[:, None]] = flat
    lens_t = torch.tensor(lens_l, dtype=torch.int64)
    starts_t = torch.tensor(starts_l, dtype=torch.int64)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens_t, 0)
    T = int(cu[-1]) if B else 0
    if B and max(lens_l) == 1 and T == B:      # pure decode: one token per seq
        positions = starts_t
        seq_idx = torch.arange(B)
    else:
        seq_idx = torch.repeat_interleave(torch.arange(B), lens_t)
        positions = starts_t[seq_idx] + (torch.arange(T) - cu[:-1][seq_idx])
    slots = tables[seq_idx, positions // page_size] * page_size + positions % page_size
    tail = 0
    if B and max(lens_l) > 1:
        while lens_l[B - 1 - tail] == 1:     # stops at a seq with more: there is one
            tail += 1
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64)
    shared, shares = 0, None
    rows = B if T == B else tail             # the one-token rows: all of a decode batch, or the tail
    if shared_prefix_min > 0 and rows > 1:
        shares, leader = shared_prefix_shares(tables[B - rows:], seq_lens_t[B - rows:], page_size)
        shared = int(shares.max())
        if shared < shared_prefix_min or int(shares.sum()) - shared < shared_prefix_saved:
            shared = 0
    parts = [positions, slots, cu, starts_t, seq_lens_t, tables.view(-1)]
    if token_ids is not None:
        parts.append(token_ids if isinstance(token_ids, torch.Tensor)
                     else torch.tensor(token_ids, dtype=torch.int64))
    if shared:    # paged_decode's vector: per-row shares, their most, the leader row
        parts.append(torch.cat([shares, torch.tensor([shared, leader])]))
    if device.type == "cuda" and staging is not None:
        dev = staging.to_device(parts, device)
    elif device.type == "cuda":
        dev = torch.cat(parts).pin_memory().to(device, non_blocking=True)
    else:
        dev = torch.cat(parts).to(device)
    o = 0
    out = []
    for t in parts:
        n = t.numel()
        out.append(dev[o:o + n])
        o += n
    d_pos, d_slots, d_cu, d_starts, d_seq_lens, d_tables = out[:6]
    meta = AttentionMetadata(
        page_size=page_size,
        positions=d_pos,
        slot_mapping=d_slots,
        cu_seqlens=d_cu.to(torch.int32),
        start_pos=d_starts.to(torch.int32),
        seq_lens=d_seq_lens.to(torch.int32),
        block_tables=d_tables.view(B, P).to(torch.int32),
        start_pos_list=tuple(starts_l),
        new_lens_list=tuple(lens_l),
        page_tables_list=tuple(tuple(pt[:k]) for pt, k in zip(pts, need)),
        max_new_len=max(lens_l) if B else 0,
        max_seq_len=max(seq_lens) if B else 0,
        decode_tail=tail,
        decode_tail_max_seq_len=max(seq_lens[B - tail:]) if tail else 0,
        shared_prefix_len=shared,
        shared_prefix=out[-1].to(torch.int32) if shared else None,
    )
    return meta, (out[6] if token_ids is not None else None)


def shared_prefix_shares(tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, int]:
    """(per-seq shares int64 [B], leader row) for rows of `tables` [B, P] (padded) and their
    context lengths: the leader is the first seq whose first page is the most common first page
    (the prefix most seqs hold); a seq's share is the keys on its whole leading pages that equal
    the leader's, below its context length (its newest key stays its own), 0 for a seq with
    another first page; the leader's share is the most any other seq shares, below its own
    context length."""
    first = tables[:, 0]
    leader = 0
    if not bool((first == first[0]).all()):     # the common case (one system prompt) skips this
        pages, counts = torch.unique(first, return_counts=True)
        leader = int((first == pages[counts.argmax()]).to(torch.int8).argmax())
    same = (tables == tables[leader:leader + 1]).to(torch.int32).cumprod(1).sum(1)
    shares = torch.minimum(same * page_size, seq_lens - 1).clamp_min(0)
    shares[leader] = 0
    shares[leader] = min(int(shares.max()), int(seq_lens[leader]) - 1)
    return shares, leader


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
