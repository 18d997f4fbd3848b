"""Benchmark-local fast torch attention (fallback while the Triton backend is not there).

Not registered in `engine.attention` (that registry belongs to the attention
owners); `benchmarks.bench` installs it on its in-process ModelRunner when the
"triton" backend cannot be imported. Same contract as every backend: write the
new K/V into the pages first, then attend through the page tables.

- decode batches (one new token per seq): gather each seq's pages with one
  index op per layer, batched bf16 matmuls over [B, kv_heads, group, S], fp32
  softmax with a length mask. Costs ~3x the KV bytes (read, gathered copy, read).
- prefill from position 0: consecutive seqs of equal length go through one
  `scaled_dot_product_attention(is_causal=True)` call (flash on CUDA).
- extend (cached prefix): per seq, prefix K/V gathered from the pages, SDPA with
  a bottom-right-aligned causal boolean mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata, write_kv


class SdpaBackend(AttentionBackend):
    name = "sdpa-bench"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        return self._prefill(q, k, v, k_cache, v_cache, meta, scale)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        B, H, D = q.shape
        _, ps, kvh, _ = k_cache.shape
        g = H // kvh
        P = meta.block_tables.shape[1]
        S = P * ps
        bt = meta.block_tables.long()
        kk = k_cache[bt].view(B, S, kvh, D).permute(0, 2, 3, 1)          # [B, kvh, D, S]
        vv = v_cache[bt].view(B, S, kvh, D).transpose(1, 2)              # [B, kvh, S, D]
        qq = q.view(B, kvh, g, D)
        s = torch.matmul(qq, kk).float() * scale                         # [B, kvh, g, S]
        pad = torch.arange(S, device=q.device)[None, :] >= meta.seq_lens[:, None]
        s.masked_fill_(pad[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).to(vv.dtype)
        return torch.matmul(p, vv).reshape(B, H, D)

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, meta, scale):
        T, H, D = q.shape
        kvh = k_cache.shape[2]
        g = H // kvh
        out = torch.empty_like(q)
        starts, lens = meta.start_pos_list, meta.new_lens_list
        i, row = 0, 0
        while i < len(lens):
            s0, n = starts[i], lens[i]
            if s0 == 0:   # group consecutive fresh prompts of equal length
                j = i + 1
                while j < len(lens) and starts[j] == 0 and lens[j] == n:
                    j += 1
                m = j - i
                rows = slice(row, row + m * n)
                qq = q[rows].view(m, n, H, D).transpose(1, 2)
                kk = k[rows].view(m, n, kvh, D).transpose(1, 2).repeat_interleave(g, dim=1)
                vv = v[rows].view(m, n, kvh, D).transpose(1, 2).repeat_interleave(g, dim=1)
                o = F.scaled_dot_product_attention(qq, kk.to(q.dtype), vv.to(q.dtype),
                                                   is_causal=True, scale=scale)
                out[rows] = o.transpose(1, 2).reshape(m * n, H, D)
                row += m * n
                i = j
                continue
            total = s0 + n
            idx = torch.as_tensor(meta.page_tables_list[i], dtype=torch.long, device=q.device)
            kk = k_cache.index_select(0, idx).reshape(-1, kvh, D)[:total]
            vv = v_cache.index_select(0, idx).reshape(-1, kvh, D)[:total]
            kk = kk.transpose(0, 1).repeat_interleave(g, dim=0)[None]
            vv = vv.transpose(0, 1).repeat_interleave(g, dim=0)[None]
            qq = q[row:row + n].transpose(0, 1)[None]
            qpos = torch.arange(s0, total, device=q.device)[:, None]
            kpos = torch.arange(total, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qq, kk.to(q.dtype), vv.to(q.dtype),
                                               attn_mask=kpos <= qpos, scale=scale)
            out[row:row + n] = o[0].transpose(0, 1)
            row += n
            i += 1
        return out
