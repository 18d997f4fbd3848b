"""Rotary position embeddings: inverse frequencies (default, linear, llama3) and their application.

Frequencies follow the rotate-half (GPT-NeoX) layout used by HF Llama/Qwen/Mistral
checkpoints: dimension i and i + head_dim/2 form one rotated pair.
"""
from __future__ import annotations

import math

import torch

from engine.config import RopeScaling


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies theta^(-2i/d), scaled as configured."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    freqs = 1.0 / (theta ** exponents)
    if scaling is None:
        return freqs
    if scaling.rope_type == "linear":
        # Positions are divided by `factor`: same as dividing every frequency.
        return freqs / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scale(freqs, scaling)
    raise ValueError(f"unsupported rope type {scaling.rope_type!r}")


def _llama3_scale(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: keep short wavelengths, divide long ones by `factor`,
    and interpolate linearly (in 1/wavelength) in the band between."""
    ctx = s.original_max_position_embeddings
    long_wavelen = ctx / s.low_freq_factor     # wavelengths above this are fully scaled
    short_wavelen = ctx / s.high_freq_factor   # wavelengths below this are untouched
    wavelen = 2 * math.pi / freqs
    scaled = freqs / s.factor
    # smooth goes 0 -> 1 as wavelen goes long_wavelen -> short_wavelen
    smooth = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mixed = (1.0 - smooth) * scaled + smooth * freqs
    out = torch.where(wavelen > long_wavelen, scaled, mixed)
    return torch.where(wavelen < short_wavelen, freqs, out)


def cos_sin(positions: torch.Tensor, inv_freq_: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for integer positions [T], computed in float32 then cast."""
    angles = positions.to(torch.float32)[:, None] * inv_freq_[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by per-token cos/sin [T, head_dim] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
