"""Elementwise layer ops of the decoder (RMSNorm with residual add, rotary, SiLU-and-mul).

Two implementations share one contract, chosen by name like attention backends and
imported lazily (a CPU-only install never imports Triton):

  "torch"   `TorchLayerOps` below: plain torch, the numerics of HF `transformers`
            (RMSNorm in float32, cast back, then times the weight; bf16 residual add).
            It is the reference every other implementation is tested against.
  "triton"  `engine.layer_ops_triton.TritonLayerOps`: one fused kernel per op, so a
            decode step launches a few kernels per layer instead of dozens of tiny
            ones (tests/test_layer_ops.py compares it with "torch").

Contract (all inputs 2-D or 3-D with a contiguous last dim; outputs are new tensors
unless stated):
  rms_norm(x, w, eps)               -> w * normalize(x)
  add_rms_norm(x, residual, w, eps) -> (w * normalize(s), s) with s = x + residual
  rotary(q, k, cos, sin)            -> (q', k') rotate-half RoPE, [T, heads, D] by [T, D]
  silu_and_mul(gate_up)             -> silu(gate_up[:, :I]) * gate_up[:, I:]
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from engine.rope import apply_rotary


class TorchLayerOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + residual
        return self.rms_norm(s, weight, eps), s

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


_OPS = {"torch": ("engine.layer_ops", "TorchLayerOps"),
        "triton": ("engine.layer_ops_triton", "TritonLayerOps")}


def get_layer_ops(name: str):
    """Instantiate the layer-op implementation registered under `name`."""
    if name not in _OPS:
        raise ValueError(f"unknown layer ops {name!r}; available: {sorted(_OPS)}")
    module, cls = _OPS[name]
    return getattr(importlib.import_module(module), cls)()
