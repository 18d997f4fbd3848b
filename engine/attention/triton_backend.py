"""Triton attention backend: same contract as TorchRefBackend (its oracle).

Per layer and forward: (1) a Triton store kernel scatters the new k/v into the paged
caches at meta.slot_mapping; (2) if every seq brings exactly one token (meta.is_decode)
the split-KV paged decode kernel runs, otherwise the paged extend kernel (prefix pages
plus the new tokens, causal). Launch grids come from Python ints already in the
metadata (max_new_len, max_seq_len): no device->host sync on the hot path.
Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention import triton_kernels as K


class TritonBackend(AttentionBackend):
    name = "triton"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        if q.stride(-1) != 1:
            q = q.contiguous()
        K.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_seqs == 0:
            return out
        if meta.is_decode:
            return K.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                  meta.max_seq_len, scale, out)
        return K.paged_extend(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens,
                              meta.start_pos, meta.max_new_len, scale, out)
