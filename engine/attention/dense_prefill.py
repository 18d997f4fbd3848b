"""Prompts with no cached prefix: causal attention by cuDNN's fused kernel (through torch SDPA).

A prefill pass whose prompts all start at position 0 needs no page table for attention: every
key a prompt attends to is one of its own new tokens, already in the forward's k / v
[T, KVH, D]. The Triton backend stores the new K/V in the pages as always, then hands such
prompts (a mixed batch's prompt rows too) here instead of its paged extend kernel.

On the H200 (RESULTS.md, 2026-12-02, kernel_bench --only extend) cuDNN's kernel, through
`scaled_dot_product_attention` with the CUDNN_ATTENTION backend and grouped-query heads, ran
4 x 4096-token prompts at 541 TFLOP/s and 16 x 1024 at 445, against the extend kernel's 304 and
221, equal to flash-attention's output within bf16 rounding. SDPA takes dense [B, heads, n, D]
tensors, so a run of consecutive prompts of one length n is one call on strided views of their
rows: no copy in, one copy of the output back into the ragged rows. cuDNN's own ragged entry
point (cumulative lengths) took ~41 ms a call there, whatever the size, so it is not used.

Which prompts: those after a prefix-cache hit keep the extend kernel (their keys are partly in
the pages only), a pass's consecutive ones at a time (`prompt_plan`: the kernel runs on a slice
of the seqs); a pass whose plan takes more than MAX_CALLS calls keeps the extend kernel for all.
cuDNN builds a plan per shape, so ragged traffic with a new length in every pass would build
plans all the time, and it would run one small call per prompt; uniform batches (the benchmark
workloads, fixed-length batch jobs) are the case this is for.

Opt-in for now (`$TANDEM_DENSE_PREFILL=1`, read when a backend is made): its kernel is measured,
the engine with it is not yet. `dense_prefill_usable(device, dtype, heads, kv_heads, head_dim)`
decides once per device, dtype and head shape (cuDNN's support depends on it): CUDA, fp16/bf16,
and a trial on small runs of the model's head shape (strided views of one fused projection, as the
model hands them over) equal to a float32 reference within 16-bit rounding. The answer is
logged once; asked for and not usable, the runner names it among its fallbacks
("dense_prefill_unavailable", counted in the worker's `tandem_*_fallbacks_total`). A pass cuDNN
refuses later (a shape the trial did not cover) runs on the extend kernel, and so does every
pass after it: logged once, counted as "dense_prefill_failed" (engine.metrics.runtime_fallbacks).
`TritonBackend.dense_calls` counts the layer passes it ran.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

MAX_CALLS = 4    # a pass's prompts in at most this many calls (runs of one length, extend-kernel segments)


def dense_prefill_requested() -> bool:
    """$TANDEM_DENSE_PREFILL=1: prompts without a cached prefix may use cuDNN's attention."""
    return os.environ.get("TANDEM_DENSE_PREFILL", "") == "1"


def equal_length_runs(lens) -> list[tuple[int, int]]:
    """Consecutive prompts of one length: [(length, count), ...] in row order."""
    runs: list[tuple[int, int]] = []
    for n in lens:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def prompt_plan(starts, lens) -> list[tuple[bool, int, int]] | None:
    """How a pass's prompts (their start positions and new lengths, in row order) split between
    the two kernels: [(dense, first seq, end seq), ...] covering them in order, dense segments
    being prompts from position 0 (cuDNN, one call per run of one length) and the others
    prompts after a prefix-cache hit (the paged extend kernel, one call per segment); None when
    no prompt starts at 0 or the plan takes more than MAX_CALLS calls."""
    segs: list[tuple[bool, int, int]] = []
    for i, s in enumerate(starts):
        fresh = s == 0
        if segs and segs[-1][0] == fresh:
            segs[-1] = (fresh, segs[-1][1], i + 1)
        else:
            segs.append((fresh, i, i + 1))
    calls = sum(len(equal_length_runs(lens[a:b])) if fresh else 1 for fresh, a, b in segs)
    if not any(fresh for fresh, _, _ in segs) or calls > MAX_CALLS:
        return None
    return segs


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens, scale: float, out: torch.Tensor,
                  backend: SDPBackend = SDPBackend.CUDNN_ATTENTION) -> torch.Tensor:
    """Causal attention of prompts lens[0], lens[1], ... (consecutive rows from 0) over their own
    tokens, into out[:sum(lens)]: q / out [T, H, D], k / v [T, KVH, D] (KVH dividing H; any row
    stride, the last dim contiguous). `backend`: SDPA's kernel (tests on a CPU: MATH)."""
    row = 0
    for n, count in equal_length_runs(lens):
        rows = n * count
        views = [t[row:row + rows].view(count, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(*views, is_causal=True, scale=scale,
                                                                 enable_gqa=True)
        out[row:row + rows].view(count, n, out.shape[1], out.shape[2]).copy_(o.transpose(1, 2))
        row += rows
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


def fused_qkv_case(lens: list[int], heads: int, kv_heads: int, dim: int, device, dtype, seed: int = 0):
    """q, k, v as the model hands them over: strided views of one fused projection's rows."""
    T = sum(lens)
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype, generator=g)
    return [t.view(T, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)]


@functools.lru_cache(maxsize=None)
def dense_prefill_usable(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether dense_prefill runs here (cuDNN) for this head shape and agrees with a float32
    reference (logged once)."""
    why = ""
    if device.type != "cuda":
        why = f"needs CUDA, not {device.type}"
    elif dtype not in (torch.float16, torch.bfloat16):
        why = f"needs float16/bfloat16, not {dtype}"
    if not why:
        try:
            lens = [37, 37, 1, 130]
            q, k, v = fused_qkv_case(lens, heads, kv_heads, head_dim, device, dtype)
            out = dense_prefill(q, k, v, lens, head_dim ** -0.5, torch.empty_like(q))
            ref = _reference(q, k, v, lens, head_dim ** -0.5)
            err = float((out.float() - ref).norm() / ref.norm())
            if not err < 2e-2:
                why = f"its trial differs from the reference (rel err {err:.3g})"
        except Exception as exc:  # noqa: BLE001 - any failure means: keep the Triton kernel
            why = f"its trial raised {type(exc).__name__}: {str(exc)[:120]}"
    if why:   # asked for ($TANDEM_DENSE_PREFILL=1) and not given: say so
        log.warning("prefill attention of prompts without a cached prefix: Triton paged extend kernel "
                    "(cuDNN attention not used for %d/%d heads of %d: %s)", heads, kv_heads, head_dim, why)
        return False
    log.info("prefill attention of prompts without a cached prefix: cuDNN attention (torch SDPA), "
             "in passes whose prompts take at most %d calls (runs of one length)", MAX_CALLS)
    return True
