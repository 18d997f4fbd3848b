"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral) over a flattened ragged batch.

Module and parameter names mirror HF checkpoints (`model.embed_tokens.weight`,
`model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`) so weight loading
is a direct name map. The forward takes tokens of all sequences concatenated
([T] ids, [T] positions, no padding) and delegates attention, including KV-cache
writes, to an `AttentionBackend`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layer_ops import TorchLayerOps
from engine.rope import cos_sin, inv_freq

TORCH_OPS = TorchLayerOps()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops=TORCH_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor,
                    ops=TORCH_OPS) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias, **factory)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias, **factory)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias, **factory)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_proj_bias, **factory)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
        self.qk_norm = cfg.qk_norm
        self.scale = d ** -0.5

    def fuse(self) -> None:
        """Replace q/k/v_proj by one qkv_proj (one GEMM instead of three)."""
        self.qkv_proj = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend, ops=TORCH_OPS) -> torch.Tensor:
        T = x.shape[0]
        if hasattr(self, "qkv_proj"):
            qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([qd, kd, kd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q, ops), self.k_norm(k, ops)
        q, k = ops.rotary(q, k, cos, sin)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **factory)

    def fuse(self) -> None:
        """Replace gate_proj/up_proj by one gate_up_proj (one GEMM instead of two)."""
        self.gate_up_proj = _fused_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, ops=TORCH_OPS) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of `parts`' outputs."""
    w = parts[0].weight
    fused = nn.Linear(w.shape[1], sum(p.weight.shape[0] for p in parts), bias=parts[0].bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.self_attn = Attention(cfg, **factory)
        self.mlp = MLP(cfg, **factory)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)

    def forward(self, x, residual, cos, sin, k_cache, v_cache, meta, backend,
                ops=TORCH_OPS) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for layer 0, residual None).
        Returns (this layer's MLP output, the residual stream before it): the residual
        add is fused into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x, ops)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual, ops)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, meta, backend, ops)
        h, residual = self.post_attention_layernorm.add_forward(h, residual, ops)
        return self.mlp(h, ops), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of HF checkpoints."""

    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, **factory) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)


class CausalLM(nn.Module):
    """Full model. `forward` returns final-normed hidden states [T, hidden];
    `compute_logits` projects selected rows to float32 logits."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = cfg
        self.model = DecoderModel(cfg, **factory)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **factory)
        if cfg.tie_word_embeddings:
            self.tie_weights()
        # Plain attribute (not a buffer): never in the state dict, rebuilt per device.
        self._inv_freq = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.ops = TORCH_OPS      # elementwise layer ops (engine/layer_ops.py); set by the runner

    def fuse_projections(self) -> None:
        """After loading: fuse q/k/v and gate/up projections of every layer (fewer,
        larger GEMMs). Parameter names then no longer match HF checkpoints."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
                backend: AttentionBackend,
                on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self._inv_freq.device != x.device:
            self._inv_freq = self._inv_freq.to(x.device)
        cos, sin = cos_sin(meta.positions, self._inv_freq, x.dtype)
        ops, residual = self.ops, None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, kv.k[i], kv.v[i], meta, backend, ops)
            if on_layer_done is not None:
                on_layer_done(i)
        return self.model.norm.add_forward(x, residual, ops)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
