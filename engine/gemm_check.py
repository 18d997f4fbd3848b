"""A startup check that the GPU computes matrix products right, against the host.

Why: measured on the lent H200 (benchmarks/RESULTS.md, 2026-12-01), a process that is a CUDA
MPS client with an active-thread limit (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=40) got wrong bf16
products from cuBLAS for 9 of 10 of Llama-3.1-8B's decode shapes (relative error 0.2-0.9,
eager and in CUDA graphs; 0.0017, bf16 rounding, without the limit). Nothing failed: the
tokens were simply wrong. A worker therefore checks a few decode-shaped products before it
loads weights, and `tandem serve` checks as an MPS client before it starts workers under MPS.

    check_matmuls(device) -> GemmCheck     # ok, worst relative error and its shape
    python -m engine.gemm_check [--device cuda:0]   # one JSON line; exit 1 when wrong

Each product: seeded bf16 inputs drawn on the host, `F.linear` on the device, compared in
float32 with the host's product of the same bf16 values. Roughly 11 GFLOP on the host (a
fraction of a second on a GPU machine's CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from engine.errors import EngineStartupError

# (M, K, N) of x [M, K] @ w [N, K]^T: decode batches through qkv, o/gate-like and down shapes
SHAPES = ((16, 4096, 6144), (256, 4096, 4096), (16, 14336, 4096))
TOLERANCE = 0.02      # bf16 products are within ~0.002 of the host; the MPS failure was >= 0.2


@dataclass(frozen=True)
class GemmCheck:
    ok: bool
    worst_rel_err: float
    worst_shape: tuple[int, int, int]
    device: str

    def describe(self) -> str:
        m, k, n = self.worst_shape
        return (f"matrix products on {self.device} {'match' if self.ok else 'do not match'} the host's "
                f"(worst relative error {self.worst_rel_err:.3g} on [{m}x{k}] @ [{k}x{n}], tolerance {TOLERANCE})")


def check_matmuls(device: torch.device | str, shapes=SHAPES, dtype: torch.dtype = torch.bfloat16,
                  linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.linear,
                  seed: int = 0) -> GemmCheck:
    """`linear(x, w)` on `device` for each shape against the float32 host product."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    worst, worst_shape = -1.0, shapes[0]
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
        ref = x.float() @ w.float().T
        got = linear(x.to(device), w.to(device)).float().cpu()
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        if not err == err:    # NaN: as wrong as it gets
            err = float("inf")
        if err > worst:
            worst, worst_shape = err, (m, k, n)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return GemmCheck(worst < TOLERANCE, worst, worst_shape, str(device))


class GemmCheckError(EngineStartupError):
    """The device computes wrong matrix products: serving would return wrong tokens."""


def require_right_matmuls(device: torch.device | str, **check) -> GemmCheck:
    """check_matmuls(device, **check), raising GemmCheckError (one line, naming an MPS limit
    if one is set)."""
    import os
    res = check_matmuls(device, **check)
    if not res.ok:
        pct = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        hint = (f"; this process is a CUDA MPS client limited to {pct}% of the SMs, which computed wrong "
                "products on the H200 we measured: run without the limit (tandem serve --gpu-sharing turns)"
                if pct else "")
        raise GemmCheckError(f"refusing to serve: {res.describe()}{hint}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.gemm_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    res = check_matmuls(args.device)
    print(json.dumps({"ok": res.ok, "worst_rel_err": res.worst_rel_err, "worst_shape": list(res.worst_shape),
                      "device": res.device, "message": res.describe()}), flush=True)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
