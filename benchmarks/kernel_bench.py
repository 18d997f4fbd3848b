"""Attention kernel timings on the GPU: Triton paged decode / extend vs torch SDPA on
contiguous tensors (a side-by-side peer, not the same work: SDPA reads no page table).

    python3 benchmarks/kernel_bench.py [--out results.json] [--only decode,shared,extend] [--no-sweep]

Decode: GB/s of K+V bytes read (sum of context lengths * KVH * D * 2 tensors * 2 B)
against the ~3.0 TB/s device-to-device copy ceiling. Extend: causal TFLOP/s
(4 * H * D * sum over queries of keys seen) against ~790 TFLOP/s bf16 matmul.
Also sweeps block configs / split counts so defaults can be picked from one run.
Medians of triton.testing.do_bench (events, warm-up excluded). Random data, never zeros.

Measured on the lent H100 80GB (torch 2.11, triton 3.6), bf16, H=32 KVH=8 D=128 page 16:
  decode B=256 ctx~1205   triton 0.448 ms = 2.82 TB/s (0.94 of 3.0)   SDPA contiguous 0.431 ms
  decode B=8   ctx~8080   triton auto 9 splits 0.114 ms = 2.33 TB/s (1 split: 1.22 TB/s)
  extend 4x4096 causal    triton 1.78 ms = 310 TFLOP/s                SDPA (its default pick) 1.04 ms = 530
  extend 4x(2048+2048)    312 TFLOP/s;  64x(768+256): 245 TFLOP/s
  sweep: extend (BLOCK_M, BLOCK_N, warps, stages) = (128, 128, 8, 3) gave 359 TFLOP/s, not yet
  the default because the correctness suite ran with (128, 64, 8, 3).
On the H200 (2026-12-02, RESULTS.md) SDPA's 530-540 was its cuDNN backend (GQA too); forced to
flash-attention 2 it ran at 325, as did aten's ragged flash-attention. engine/attention/
dense_prefill.py runs the cuDNN kernel for prompts of one length ($TANDEM_DENSE_PREFILL=1).
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench

from engine.attention import build_metadata
from engine.attention import triton_kernels as K
from engine.attention.triton_backend import TritonBackend

H, KVH, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16
ROWS: list[dict] = []
PROFILE = False


def paged_case(starts, news, gen):
    """Random pages (shuffled tables) holding random K/V for every position."""
    need = [(s + n + PAGE - 1) // PAGE for s, n in zip(starts, news)]
    num_pages = sum(need) + 8
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, i = [], 0
    for k in need:
        tables.append(perm[i:i + k])
        i += k
    meta = build_metadata(starts, news, tables, PAGE, "cuda", num_pages)
    kc = torch.randn(num_pages, PAGE, KVH, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(news), H, D, device="cuda", dtype=DT)
    return meta, q, kc, vc


def row(name, ms, gbs=None, tflops=None, note=""):
    r = {"name": name, "ms": round(ms, 4), "GB/s": gbs and round(gbs), "TFLOP/s": tflops and round(tflops, 1),
         "note": note}
    ROWS.append(r)
    print(f"{name:<48} {ms:9.4f} ms  {'' if gbs is None else f'{gbs:8.0f} GB/s'}"
          f"{'' if tflops is None else f'{tflops:8.1f} TFLOP/s'}  {note}", flush=True)


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def decode_suite(batch, ctx_lo, ctx_hi, gen, sweep):
    ctx = torch.randint(ctx_lo, ctx_hi + 1, (batch,), generator=gen).tolist()
    meta, q, kc, vc = paged_case([c - 1 for c in ctx], [1] * batch, gen)
    scale = D ** -0.5
    out = torch.empty_like(q)
    nbytes = sum(ctx) * KVH * D * 2 * 2
    tag = f"decode B={batch} ctx~{sum(ctx) // batch}"
    auto = K.decode_num_splits(batch, KVH, meta.max_seq_len, q.device, 64)
    run = lambda **kw: K.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens,  # noqa: E731
                                      meta.max_seq_len, scale, out, **kw)
    ms = bench(run)
    row(f"{tag} triton (auto splits={auto})", ms, nbytes / ms * 1e-6)
    if sweep:
        for splits in (1, 2, 4, 8, 16):
            if splits != auto:
                ms = bench(lambda: run(num_splits=splits))
                row(f"{tag} triton splits={splits}", ms, nbytes / ms * 1e-6)
        for cfg in ((32, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3), (32, 2, 4)):
            try:
                ms = bench(lambda: run(config=cfg))
                row(f"{tag} triton cfg(bn,w,st)={cfg}", ms, nbytes / ms * 1e-6)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is just skipped
                row(f"{tag} cfg={cfg} FAILED", 0.0, note=type(e).__name__)
    k1 = torch.randn(1, KVH, 1, D, device="cuda", dtype=DT)
    be = TritonBackend()
    kn, vn = torch.randn(batch, KVH, D, device="cuda", dtype=DT), torch.randn(batch, KVH, D, device="cuda", dtype=DT)
    ms = bench(lambda: be.forward(q, kn, vn, kc, vc, meta, scale))
    row(f"{tag} TritonBackend.forward (store+decode)", ms, nbytes / ms * 1e-6)
    # Peer: SDPA on contiguous [B, KVH, L, D] with the mean context (GQA via enable_gqa).
    L = sum(ctx) // batch
    qs = q.view(batch, H, 1, D)
    ks = torch.randn(batch, KVH, L, D, device="cuda", dtype=DT)
    vs = torch.randn_like(ks)
    del k1
    try:
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True))
        row(f"{tag} torch SDPA contiguous gqa L={L}", ms, batch * L * KVH * D * 4 / ms * 1e-6)
    except Exception as e:  # noqa: BLE001
        row(f"{tag} torch SDPA FAILED", 0.0, note=type(e).__name__)


def shared_suite(batch, shared, own_lo, own_hi, gen, sweep):
    """Decode rows that all begin with the same `shared` keys (the same pages: a prefix-cache
    hit, as W2's 768-token prefix), then own_lo..own_hi keys of their own: the plain kernel
    (every row reads every key) against the shared-prefix path. GB/s counts the bytes the plain
    kernel reads, so the two rows compare as times."""
    own = torch.randint(own_lo, own_hi + 1, (batch,), generator=gen).tolist()
    pre = shared // PAGE
    need = [(shared + n + PAGE - 1) // PAGE - pre for n in own]
    num_pages = pre + sum(need) + 8
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, i = [], pre
    for k in need:
        tables.append(perm[:pre] + perm[i:i + k])
        i += k
    lens = [shared + n for n in own]
    meta = build_metadata([L - 1 for L in lens], [1] * batch, tables, PAGE, "cuda", num_pages)
    kc = torch.randn(num_pages, PAGE, KVH, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, H, D, device="cuda", dtype=DT)
    scale = D ** -0.5
    out, ref = torch.empty_like(q), torch.empty_like(q)
    nbytes = sum(lens) * KVH * D * 2 * 2
    tag = f"decode B={batch} shared={shared} own~{sum(own) // batch}"
    plain = lambda: K.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens,  # noqa: E731
                                   meta.max_seq_len, scale, ref)
    s = K.shared_prefix_vector([shared] * batch, 0, "cuda")
    run = lambda bound=shared: K.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens,  # noqa: E731
                                              meta.max_seq_len, scale, out, shared=s, shared_max=bound)
    ms = bench(plain)
    row(f"{tag} plain", ms, nbytes / ms * 1e-6)
    run()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    ms = bench(run)
    row(f"{tag} shared prefix", ms, nbytes / ms * 1e-6, note=f"rel err vs plain {err:.2e}")
    ms = bench(lambda: run(4128))
    row(f"{tag} shared prefix, grid for 4128 keys (as a CUDA graph)", ms, nbytes / ms * 1e-6)
    if PROFILE:   # each kernel of the two paths
        from torch.profiler import ProfilerActivity, profile
        for name, fn in (("plain", plain), ("shared", run)):
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            for e in prof.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if t > 0:
                    row(f"{tag} {name}: {e.key[:40]}", t / 10 / 1e3, note=f"x{e.count // 10}")
    if sweep:
        keep = K.PREFIX_CONFIG
        for cfg in ((64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2)):
            K.PREFIX_CONFIG = cfg
            try:
                ms = bench(run)
                row(f"{tag} shared prefix cfg(bq,bn,w,st)={cfg}", ms, nbytes / ms * 1e-6)
            except Exception as e:  # noqa: BLE001
                row(f"{tag} cfg={cfg} FAILED", 0.0, note=type(e).__name__)
        K.PREFIX_CONFIG = keep


def extend_suite(nseq, prefix, new, gen, sweep):
    meta, q, kc, vc = paged_case([prefix] * nseq, [new] * nseq, gen)
    scale = D ** -0.5
    out = torch.empty_like(q)
    keys_seen = nseq * sum(prefix + i + 1 for i in range(new))
    flops = 4 * H * D * keys_seen
    tag = f"extend {nseq}x({prefix}+{new})"
    run = lambda **kw: K.paged_extend(q, kc, vc, meta.block_tables, meta.cu_seqlens,  # noqa: E731
                                      meta.start_pos, meta.max_new_len, scale, out, **kw)
    ms = bench(run)
    row(f"{tag} triton default", ms, tflops=flops / ms * 1e-9)
    if sweep:
        for cfg in ((128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 4),
                    (64, 128, 4, 3), (128, 128, 8, 3)):
            try:
                ms = bench(lambda: run(config=cfg))
                row(f"{tag} cfg(bm,bn,w,st)={cfg}", ms, tflops=flops / ms * 1e-9)
            except Exception as e:  # noqa: BLE001
                row(f"{tag} cfg={cfg} FAILED", 0.0, note=type(e).__name__)
    if prefix == 0:  # what the Triton backend runs for such prompts when it can (dense_prefill.py)
        from engine.attention.dense_prefill import dense_prefill, dense_prefill_usable, fused_qkv_case
        if dense_prefill_usable(q.device, DT, H, KVH, D):
            kn = torch.randn(nseq * new, KVH, D, device="cuda", dtype=DT)
            vn = torch.randn_like(kn)
            o = torch.empty_like(q)
            ms = bench(lambda: dense_prefill(q, kn, vn, [new] * nseq, scale, o))
            row(f"{tag} dense_prefill (cuDNN via SDPA, GQA, own k/v)", ms, tflops=flops / ms * 1e-9)
            # as the model hands them over: strided views of one fused q/k/v projection's rows
            fq, fk, fv = fused_qkv_case([new] * nseq, H, KVH, D, q.device, DT)
            ms = bench(lambda: dense_prefill(fq, fk, fv, [new] * nseq, scale, o))
            row(f"{tag} dense_prefill on fused-projection views", ms, tflops=flops / ms * 1e-9)
    if prefix == 0:  # peer: SDPA causal on contiguous, K/V expanded to H heads
        qs = torch.randn(nseq, H, new, D, device="cuda", dtype=DT)
        ks = torch.randn(nseq, H, new, D, device="cuda", dtype=DT)
        vs = torch.randn_like(ks)
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        row(f"{tag} torch SDPA causal contiguous", ms, tflops=flops / ms * 1e-9)
        dense_peers(tag, nseq, new, flops, gen)


def dense_peers(tag, nseq, new, flops, gen):
    """Prompts of `new` tokens from position 0, attention over their own k / v [T, KVH, D] (what
    dense_prefill gets) by each of torch's fused kernels, against a float32 reference: SDPA with
    one backend forced (GQA, [B, heads, new, D] views of the ragged rows), flash-attention 2's
    ragged entry point, and cuDNN's ragged (cumulative lengths) forward, GQA and with K/V
    expanded to H heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.attention.dense_prefill import _reference
    T, scale = nseq * new, D ** -0.5
    q = torch.randn(T, H, D, generator=gen).to("cuda", DT)
    k, v = (torch.randn(T, KVH, D, generator=gen).to("cuda", DT) for _ in range(2))
    cu = torch.arange(0, T + 1, new, dtype=torch.int32, device="cuda")
    ref = _reference(q, k, v, [new] * nseq, scale)

    def err(out):
        return f"rel err vs float32 {float((out.float() - ref).norm() / ref.norm()):.2e}"

    def fa2():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, new, new, 0.0, True, False, scale=scale)[0]
    ms = bench(fa2)
    row(f"{tag} flash-attention 2 ragged (aten, GQA)", ms, tflops=flops / ms * 1e-9, note=err(fa2()))

    views = [t.view(nseq, new, -1, D).transpose(1, 2) for t in (q, k, v)]
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(*views, is_causal=True, scale=scale,
                                                                        enable_gqa=True)
        try:
            out = run().transpose(1, 2).reshape(T, H, D)
            ms = bench(run)
            row(f"{tag} SDPA {name} GQA", ms, tflops=flops / ms * 1e-9, note=err(out))
        except Exception as e:  # noqa: BLE001
            row(f"{tag} SDPA {name} GQA FAILED", 0.0, note=f"{type(e).__name__}: {str(e)[:80]}")
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (t.repeat_interleave(H // KVH, 1) for t in (k, v))

        def run(kk=kk, vv=vv):
            return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, new, new, False, 0.0, True,
                                                           False, scale=scale)[0]
        name = f"{tag} cuDNN ragged {'GQA' if gqa else 'K/V expanded'}"
        try:
            out = run()
            ms = bench(run)
            row(name, ms, tflops=flops / ms * 1e-9, note=err(out.reshape(T, H, D)))
        except Exception as e:  # noqa: BLE001
            row(f"{name} FAILED", 0.0, note=f"{type(e).__name__}: {str(e)[:80]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--only", default="", help="comma list of suites: decode, shared, extend (default all)")
    ap.add_argument("--profile", action="store_true", help="shared suite: each kernel's time (torch profiler)")
    a = ap.parse_args()
    global PROFILE
    PROFILE = a.profile
    gen = torch.Generator().manual_seed(0)
    sweep = not a.no_sweep
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    only = set(filter(None, a.only.split(","))) or {"decode", "shared", "extend"}
    if "decode" in only:
        decode_suite(256, 1100, 1300, gen, sweep)
        decode_suite(8, 8000, 8192, gen, sweep)
    if "shared" in only:
        shared_suite(256, 768, 1, 512, gen, sweep)
        shared_suite(64, 768, 1, 512, gen, False)
        shared_suite(16, 2048, 1, 256, gen, False)
        shared_suite(256, 64, 100, 600, gen, False)
    if "extend" in only:
        extend_suite(4, 0, 4096, gen, sweep)
        extend_suite(4, 2048, 2048, gen, False)
        extend_suite(64, 768, 256, gen, False)
        extend_suite(16, 0, 1024, gen, False)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
