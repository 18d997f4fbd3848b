"""Do green contexts (SM partitions inside one process, CUDA 12.4+) compute matrix products
right on this GPU, where an MPS client with an SM limit did not (benchmarks/RESULTS.md)? Issue 15.

    python -m benchmarks.green_ctx_probe [--sms 64] [--out probe.json]

Splits the device's SMs into a group of at least `--sms` (and the rest), makes a green
context and a stream on each, and runs engine/gemm_check's decode-shaped products on each
stream (torch on `torch.cuda.ExternalStream`) against the host, then times an 8192^3 bf16
matmul per partition alone. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _side_by_side(mm_stream, copy_stream, seconds: float = 2.0) -> dict:
    """A prefill-like matmul loop on one partition and a decode-like copy loop (1 GiB) on the
    other: alone, then both queued at once; rates of each from events on its stream (one host
    thread enqueues both, in rounds sized so that the two take about as long)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    mm_flops, copy_bytes = 2 * 8192 ** 3, 2 * src.numel()

    def run(mm: bool, cp: bool) -> dict:
        torch.cuda.synchronize()
        ev = {}
        for name, s, on in (("mm", mm_stream, mm), ("cp", copy_stream, cp)):
            if on:
                ev[name] = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), 0]
                ev[name][0].record(s)
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            # ~2 matmuls per 8 copies keep both streams busy about as long (64 vs 68 SMs)
            if mm:
                with torch.cuda.stream(mm_stream):
                    for _ in range(2):
                        a @ b
                ev["mm"][2] += 2
            if cp:
                with torch.cuda.stream(copy_stream):
                    for _ in range(8):
                        dst.copy_(src)
                ev["cp"][2] += 8
            mm_stream.synchronize()
            copy_stream.synchronize()
        out = {}
        for name, s in (("mm", mm_stream), ("cp", copy_stream)):
            if name in ev:
                ev[name][1].record(s)
        torch.cuda.synchronize()
        for name, (e0, e1, n) in ev.items():
            sec = e0.elapsed_time(e1) / 1e3
            out[name] = (n * mm_flops / sec / 1e12) if name == "mm" else (n * copy_bytes / sec / 1e12)
        return out

    alone_mm, alone_cp, both = run(True, False)["mm"], run(False, True)["cp"], run(True, True)
    return {"alone_matmul_tflops": round(alone_mm, 1), "alone_copy_tbps": round(alone_cp, 2),
            "both_matmul_tflops": round(both["mm"], 1), "both_copy_tbps": round(both["cp"], 2),
            "both_sum_of_fractions": round(both["mm"] / alone_mm + both["cp"] / alone_cp, 2)}


def main(argv=None) -> dict:
    from cuda.bindings import driver as cu

    from decode_worker.lanes import driver_out
    from engine.gemm_check import check_matmuls

    def _ok(r):
        return driver_out(cu, r, "green_ctx_probe")
    p = argparse.ArgumentParser(prog="python -m benchmarks.green_ctx_probe")
    p.add_argument("--sms", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.zeros(1, device="cuda")                      # the primary context, as torch uses it
    res: dict = {"device_sms": torch.cuda.get_device_properties(0).multi_processor_count}
    res["primary"] = check_matmuls("cuda").describe()
    dev = _ok(cu.cuDeviceGet(0))
    sm = _ok(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    split = _ok(cu.cuDevSmResourceSplitByCount(1, sm, 0, args.sms))
    groups, remaining = split[0], split[-1]
    parts = {"group": groups[0], "rest": remaining}
    streams = {}
    for name, r in parts.items():
        desc = _ok(cu.cuDevResourceGenerateDesc([r], 1))
        g = _ok(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        st = _ok(cu.cuGreenCtxStreamCreate(g, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        streams[name] = torch.cuda.ExternalStream(int(st))
        res[f"{name}_sms"] = int(r.sm.smCount)
    for name, s in streams.items():
        def on(x, w, s=s):
            with torch.cuda.stream(s):
                y = torch.nn.functional.linear(x, w)
            s.synchronize()
            return y
        chk = check_matmuls("cuda", linear=on)
        res[f"{name}_gemm"] = chk.describe()
        res[f"{name}_gemm_ok"] = chk.ok
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        with torch.cuda.stream(s):
            for _ in range(3):
                a @ b
            s.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                a @ b
            s.synchronize()
        res[f"{name}_matmul_tflops"] = round(20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12, 1)
    res.update(_side_by_side(streams["group"], streams["rest"]))
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
