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


def _ok(r):
    """cuda.bindings returns (CUresult, outputs...): raise on an error, else the outputs."""
    from cuda.bindings import driver as cu
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    out = r[1:] if isinstance(r, tuple) else ()
    return out[0] if len(out) == 1 else out


def main(argv=None) -> dict:
    from cuda.bindings import driver as cu
    from engine.gemm_check import check_matmuls
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
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
