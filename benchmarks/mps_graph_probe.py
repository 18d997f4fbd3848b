"""Why CUDA graphs of the decode step disagree with eager (rel err nan) inside an MPS client
with an active-thread limit (issue 15): each piece captured alone against its eager run.

    python -m benchmarks.mps_graph_probe [--out probe.json]    # run it as the MPS client to test

Pieces: bf16 linears of Llama-3.1-8B's decode shapes (M = 16 and 256) through torch's default
BLAS and through cuBLAS (not Lt); then the engine's whole decode step at batch 16 (its own
graph check, `DecodeGraphs._verify`), and whether its eager logits are finite.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _graph_vs_eager(fn, ref=None) -> dict:
    cur = torch.cuda.current_stream()
    a, b = fn().float(), fn().float()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        fn(), fn()
    cur.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    o = out.float()
    rel = lambda x, y: float((x - y).norm() / y.norm().clamp_min(1e-6))
    r = {"eager_finite": bool(torch.isfinite(a).all()), "graph_finite": bool(torch.isfinite(o).all()),
         "eager_vs_eager": rel(b, a), "graph_vs_eager": rel(o, a)}
    if ref is not None:       # float32 on the host: which of the two is right
        r["eager_vs_cpu"], r["graph_vs_cpu"] = rel(a.cpu(), ref), rel(o.cpu(), ref)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mps_graph_probe")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res: dict = {"sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
              "lm_head": (4096, 128256)}
    for lib in ("default", "cublas"):
        if lib == "cublas":
            torch.backends.cuda.preferred_blas_library("cublas")
        for name, (k, n) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            for m in (16, 256):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = x.float().cpu() @ w.float().cpu().T if lib == "default" else None
                r = _graph_vs_eager(lambda: torch.nn.functional.linear(x, w), ref)
                res[f"{lib}/{name}/M{m}"] = r
                print(f"{lib:8s} {name:8s} M={m:<4d} {r}", flush=True)
    torch.backends.cuda.preferred_blas_library("default")
    from benchmarks.workloads import write_model_dir
    from engine.attention.base import build_metadata_and_ids
    from engine.config import EngineConfig
    from engine.runner import ForwardSeq, ModelRunner
    model_dir = write_model_dir(Path(tempfile.mkdtemp()) / "llama8b", tiny=False)
    runner = ModelRunner(EngineConfig(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda", page_size=16,
        gpu_memory_utilization=0.5, max_model_len=4128, max_num_seqs=16, attention_backend="triton"))
    B, ctx, ps = 16, 640, runner.page_size
    per = -(-ctx // ps)
    seqs = [ForwardSeq(token_ids=(1000 + i,), start_pos=ctx - 1, page_table=list(range(i * per, (i + 1) * per)))
            for i in range(B)]
    m, ids = build_metadata_and_ids([s.start_pos for s in seqs], [1] * B, [s.page_table for s in seqs], ps, dev,
                                    runner.num_pages, token_ids=[s.token_ids[0] for s in seqs])
    bad: list[str] = []       # modules whose eager output is not finite, in call order

    def hook(name):
        def check(mod, inp, out):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.is_floating_point() and len(bad) < 6 \
                    and not bool(torch.isfinite(t.float()).all()):
                bad.append(name)
        return check
    handles = [mod.register_forward_hook(hook(name)) for name, mod in runner.model.named_modules() if name]
    with torch.inference_mode():
        eager = runner.model.compute_logits(runner.model(ids, m, runner.kv, runner.backend, None)).float()
        res["model_eager_finite"] = bool(torch.isfinite(eager).all())
        res["first_nonfinite_modules"] = bad
    for h in handles:
        h.remove()
    with torch.inference_mode():
        # the step attends over 640 never-written slots: a pool that is not finite poisons it
        res["kv_finite"] = all(bool(torch.isfinite(t).all()) for t in list(runner.kv.k) + list(runner.kv.v))
        runner.forward(seqs)
    res["model_graphs_enabled"] = bool(runner.graphs and runner.graphs.enabled)
    print({k: v for k, v in res.items() if k.startswith(("model", "kv", "sm", "first"))}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
