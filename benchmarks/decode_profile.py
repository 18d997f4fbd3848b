"""Where a large-batch decode step spends its time (the W3 shape), on the GPU.

    python3 -m benchmarks.decode_profile [--batch 256] [--context 640] [--page-order contiguous] [--out profile.json]

Builds the Llama-3.1-8B architecture (bf16, dummy weights) with the benchmark's
engine settings, gives `batch` sequences `context` tokens of context each, then
times, as medians: the host metadata build, the CUDA-graph replay alone (events),
the whole `runner.forward` (host work included), and greedy sampling. A torch
profiler pass over eager steps lists the top GPU kernels by total time. Bytes per
step follow benchmarks/metrics.py (weights once + K/V of every context token), and
MBU is quoted against the device copy bandwidth measured in the same run.

--page-order lays out each seq's pages: `contiguous` (seq i owns pages i*P .. i*P+P-1),
`interleaved` (page j of seq i is j*B + i: what the engine's pool gives seqs that grow a page
at a time side by side) or `shuffled` (a random permutation over the whole pool); the W3 engine
step's device time was ~1 ms above this benchmark's contiguous replay at the same context.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.metrics import ModelCost, measure_ceilings
from benchmarks.workloads import write_model_dir
from engine.attention.base import build_metadata_and_ids
from engine.config import EngineConfig
from engine.runner import ForwardSeq, ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams


def _host_median(fn, n: int = 20) -> float:
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _event_median(fn, n: int = 20) -> float:
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(ts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.decode_profile")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--max-model-len", type=int, default=4128)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--page-order", choices=("contiguous", "interleaved", "shuffled"), default="contiguous")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev, tiny=False)
    model_dir = write_model_dir(Path(tempfile.mkdtemp()) / "llama8b", tiny=False)
    runner = ModelRunner(EngineConfig(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda", page_size=16,
        gpu_memory_utilization=0.88, max_model_len=args.max_model_len, max_num_seqs=args.batch,
        attention_backend="triton"))
    B, ctx, ps = args.batch, args.context, runner.page_size
    per = -(-ctx // ps)
    if args.page_order == "contiguous":
        tables = [list(range(i * per, (i + 1) * per)) for i in range(B)]
    elif args.page_order == "interleaved":
        tables = [[j * B + i for j in range(per)] for i in range(B)]
    else:
        perm = torch.randperm(runner.num_pages, generator=torch.Generator().manual_seed(0))[:B * per].tolist()
        tables = [perm[i * per:(i + 1) * per] for i in range(B)]
    res_order = args.page_order
    seqs = [ForwardSeq(token_ids=(1000 + i,), start_pos=ctx - 1, page_table=tables[i]) for i in range(B)]
    cost = ModelCost.of(runner.model_config, 2)
    step_bytes = cost.decode_step_bytes(B * ctx)
    res: dict = {"batch": B, "context": ctx, "page_order": res_order, "step_bytes": step_bytes, **ceil}

    def meta():
        return build_metadata_and_ids([s.start_pos for s in seqs], [1] * B, [s.page_table for s in seqs],
                                      ps, dev, runner.num_pages, token_ids=[s.token_ids[0] for s in seqs])

    runner.forward(seqs)   # verifies the bucket's graph against eager
    res["graphs_enabled"] = bool(runner.graphs and runner.graphs.enabled)
    res["host_meta_s"] = _host_median(meta)
    res["forward_s"] = _host_median(lambda: runner.forward(seqs))
    if runner.graphs is not None:
        bs = runner.graphs.bucket(B)
        graph = runner.graphs.graphs[bs, False]
        res["replay_s"] = _event_median(graph.replay)
    logits = runner.forward(seqs)
    sampler, params = Sampler(0), [SamplingParams(temperature=0.0, max_tokens=8)] * B
    res["sample_s"] = _host_median(lambda: sampler.sample(logits, params, [0] * B))
    res["step_s"] = _host_median(lambda: sampler.sample(runner.forward(seqs), params, [0] * B))
    for k in ("replay_s", "forward_s", "step_s"):
        if k in res:
            res[k.replace("_s", "_mbu")] = step_bytes / res[k] / ceil["copy_bw"]
    # Kernel breakdown from eager steps (graph replays hide kernel names from some profilers).
    from torch.profiler import ProfilerActivity, profile

    m, ids = meta()
    with torch.inference_mode():
        runner.model.compute_logits(runner.model(ids, m, runner.kv, runner.backend, None))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.model.compute_logits(runner.model(ids, m, runner.kv, runner.backend, None))
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / 3 / 1e3, e.count // 3, e.key[:90]))
    rows.sort(reverse=True)
    res["eager_kernel_ms_total"] = sum(r[0] for r in rows)
    res["kernels"] = [{"ms_per_step": round(t, 3), "calls_per_step": c, "name": n} for t, c, n in rows[:args.top]]
    print(json.dumps({k: v for k, v in res.items() if k != "kernels"}, indent=1))
    for r in res["kernels"]:
        print(f"{r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:<5d} {r['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
