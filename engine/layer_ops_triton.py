"""Fused Triton kernels for the decoder's elementwise ops (contract: engine/layer_ops.py).

  rms_norm / add_rms_norm  one program per row: (residual add, stored once,) the
                           float32 mean of squares, the cast back to the input dtype,
                           then times the weight; the same roundings as the torch
                           reference, in one pass over the row.
  rotary                   one program per token rotates every q head and every k
                           head of that token IN PLACE (rotate-half layout).
  silu_and_mul             grid (tokens, column blocks): silu(gate) rounded to the
                           dtype, times up.

Every function falls back to the torch reference for shapes a kernel does not take
(a non-power-of-two head dim for rotary). Runs on CUDA, or on the CPU under
TRITON_INTERPRET=1 (tests/test_layer_ops.py, float16/float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layer_ops import TorchLayerOps


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, stride_x, stride_r, stride_o, stride_s,
                     n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(base_ptr, stride_h, n_heads, c1, c2, s1, s2,
                HP: tl.constexpr, HALF: tl.constexpr):
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, HALF)
    m = (offs_h < n_heads)[:, None]
    p1 = base_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c1[None, :] - x2 * s1[None, :]).to(base_ptr.dtype.element_ty), mask=m)
    tl.store(p1 + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(base_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, stride_st, n_q, n_k,
                   HQP: tl.constexpr, HKP: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * stride_ct + offs_d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs_d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + offs_d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + offs_d).to(tl.float32)
    _rope_heads(q_ptr + t * stride_qt, stride_qh, n_q, c1, c2, s1, s2, HQP, HALF)
    _rope_heads(k_ptr + t * stride_kt, stride_kh, n_k, c1, c2, s1, s2, HKP, HALF)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(gu_ptr + t * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_g + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, n] tensor with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_warps(n: int) -> int:
    return 8 if n >= 4096 else 4 if n >= 1024 else 1


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x [+ residual]) * weight, x + residual or x) through one kernel launch."""
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x2.shape[0]:
        n = x2.shape[1]
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, s, x2.stride(0), r2.stride(0), out.stride(0),
                                         s.stride(0), n, eps, HAS_RES=residual is not None,
                                         BLOCK=triton.next_power_of_2(n), num_warps=_norm_warps(n))
    return out.view(x.shape), (s.view(x.shape) if residual is not None else x)


class TritonLayerOps(TorchLayerOps):
    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _norm(x, residual, weight, eps)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: q [T, H, D] and k [T, KVH, D] are overwritten and returned."""
        d = q.shape[-1]
        if d & (d - 1) or d < 4 or q.stride(-1) != 1 or k.stride(-1) != 1 \
                or cos.stride(-1) != 1 or sin.stride(-1) != 1:
            return super().rotary(q, k, cos, sin)
        T = q.shape[0]
        if T:
            _rotary_kernel[(T,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                 cos.stride(0), sin.stride(0), q.shape[1], k.shape[1],
                                 HQP=triton.next_power_of_2(q.shape[1]),
                                 HKP=triton.next_power_of_2(k.shape[1]), HALF=d // 2,
                                 num_warps=4 if q.shape[1] * d >= 2048 else 1)
        return q, k

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        g2 = _rows(gate_up)
        n = g2.shape[1] // 2
        out = torch.empty((g2.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
        if g2.shape[0]:
            block = min(1024, triton.next_power_of_2(n))
            _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
                g2, out, g2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4 if block >= 512 else 1)
        return out.view(*gate_up.shape[:-1], n)
