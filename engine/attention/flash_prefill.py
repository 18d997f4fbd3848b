"""Prompts with no cached prefix: causal attention by flash-attention (torch's own build).

A prefill pass whose prompts all start at position 0 needs no page table for attention: every
key it attends to is one of its own new tokens, already in the forward's contiguous k / v
[T, KVH, D]. Torch ships flash-attention 2 for CUDA (`torch.ops.aten._flash_attention_forward`,
the kernel under `torch.nn.attention.varlen.varlen_attn`): ragged rows by cumulative lengths,
causal, grouped-query heads (KVH dividing H). The Triton backend stores the new K/V in the
pages as always, then hands such batches (or a mixed batch's prompt rows) here instead of its
paged extend kernel. Prompts after a prefix-cache hit keep the extend kernel: their keys are
partly in the pages only.

Opt-in for now (`$TANDEM_FLASH_PREFILL=1`, read when a backend is made): it is not yet measured
against the extend kernel on the H200. `flash_prefill_usable(device, dtype)` decides once per
device and dtype: CUDA, fp16/bf16, the op present, and a trial on a small ragged GQA batch equal
to a float32 reference within 16-bit rounding. The answer and its reason are logged once; asked
for and not usable, the runner names it among its fallbacks ("flash_prefill_unavailable",
counted in the worker's `tandem_*_fallbacks_total`); `TritonBackend.flash_calls` counts the
layer passes it ran.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


def flash_prefill_requested() -> bool:
    """$TANDEM_FLASH_PREFILL=1: prompts without a cached prefix may use flash-attention."""
    return os.environ.get("TANDEM_FLASH_PREFILL", "") == "1"


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of ragged prompts (rows cu_seqlens[i]:cu_seqlens[i+1], int32 on the
    device) over their own tokens: q [T, H, D], k / v [T, KVH, D] -> [T, H, D]."""
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True,
                                                  False, scale=scale)[0]
    return out


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    outs, o = [], 0
    for n in lens:
        qs, ks, vs = (t[o:o + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        s = (qs @ ks.transpose(1, 2)) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
        o += n
    return torch.cat(outs)


@functools.lru_cache(maxsize=None)
def flash_prefill_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash_prefill runs here and agrees with a float32 reference (logged once)."""
    why = ""
    if device.type != "cuda":
        why = f"needs CUDA, not {device.type}"
    elif dtype not in (torch.float16, torch.bfloat16):
        why = f"needs float16/bfloat16, not {dtype}"
    elif not hasattr(torch.ops.aten, "_flash_attention_forward"):
        why = "this torch has no aten._flash_attention_forward"
    if not why:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            lens = [37, 1, 130]
            T = sum(lens)
            # strided views of one fused projection's rows, as the model hands them over
            qkv = torch.randn(T, (8 + 2 + 2) * 128, device=device, dtype=dtype, generator=g)
            q, k, v = (t.view(T, -1, 128) for t in qkv.split([8 * 128, 2 * 128, 2 * 128], dim=-1))
            cu = torch.tensor([0, 37, 38, T], dtype=torch.int32, device=device)
            out = flash_prefill(q, k, v, cu, max(lens), 128 ** -0.5)
            ref = _reference(q, k, v, lens, 128 ** -0.5)
            err = float((out.float() - ref).norm() / ref.norm())
            if not err < 2e-2:
                why = f"its trial differs from the reference (rel err {err:.3g})"
        except Exception as exc:  # noqa: BLE001 - any failure means: keep the Triton kernel
            why = f"its trial raised {type(exc).__name__}: {str(exc)[:120]}"
    if why:   # asked for ($TANDEM_FLASH_PREFILL=1) and not given: say so
        log.warning("prefill attention of prompts without a cached prefix: Triton paged extend kernel "
                    "(flash-attention not used: %s)", why)
        return False
    log.info("prefill attention of prompts without a cached prefix: flash-attention (torch's aten op)")
    return True
