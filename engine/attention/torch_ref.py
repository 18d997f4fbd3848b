"""Torch reference attention over the paged KV cache (CPU path and oracle for GPU kernels).

Deliberately simple: one loop over seqs, K/V gathered through each page table,
float32 math with an explicit causal mask.
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, write_kv


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        T, H, D = q.shape
        kvh = k_cache.shape[2]
        group = H // kvh
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        row = 0
        for start, n, pages in zip(meta.start_pos_list, meta.new_lens_list, meta.page_tables_list):
            total = start + n
            idx = torch.as_tensor(pages, dtype=torch.long, device=k_cache.device)
            keys = k_cache.index_select(0, idx).reshape(-1, kvh, D)[:total].float()
            vals = v_cache.index_select(0, idx).reshape(-1, kvh, D)[:total].float()
            keys = keys.repeat_interleave(group, dim=1)          # [L, H, D]
            vals = vals.repeat_interleave(group, dim=1)
            qs = q[row:row + n].float()                          # [n, H, D]
            scores = torch.einsum("nhd,lhd->hnl", qs, keys) * scale
            q_pos = torch.arange(start, total, device=q.device)[:, None]
            k_pos = torch.arange(total, device=q.device)[None, :]
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[row:row + n] = torch.einsum("hnl,lhd->nhd", probs, vals).to(q.dtype)
            row += n
        return out
