"""Benchmark harness: W1-W4 colocated and disaggregated, plus transformers `generate`.

    python -m benchmarks.bench --device cuda            # H100: Llama-3.1-8B shapes, bf16, dummy weights
    python -m benchmarks.bench --device cpu --tiny      # CI: tiny model, tiny workloads
    python -m benchmarks.bench --device cuda --model-config qwen2.5-7b   # or mistral-7b-v0.3, or a config.json

`--model-config` picks the model (benchmarks/workloads.py: MODEL_CONFIGS, or a config.json
path; with --tiny a name gives its CPU-sized twin); prompt ids are drawn inside its
vocabulary (workloads.token_id_range) and the JSON / RESULTS.md record which config ran.

Order in one process: ceilings (bf16 matmul, device copy) -> HF generate on W1 ->
colocated W1-W4 (the decode worker's DecodeEngine in this process, requests through its
submit()) -> disaggregated W1-W4 (two worker processes on the same device, grpc KV
transport). Prints the table last, writes JSON (and RESULTS.md with --results-md).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.metrics import format_table, measure_ceilings
from benchmarks.workloads import (DEFAULT_MODEL_CONFIG, MODEL_CONFIGS, describe_model_config, model_config_record,
                                  resolve_model_config, token_id_range, workloads, write_model_dir)

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and workloads (CPU / CI)")
    p.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, metavar="NAME|PATH",
                   help=f"{', '.join(MODEL_CONFIGS)} (with --tiny: its CPU-sized twin) or a config.json path")
    p.add_argument("--modes", default="hf,colocated,disagg")
    p.add_argument("--workloads", default="W1,W2,W3,W4")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch", "sdpa"],
                   help="auto: triton if it imports, else the benchmark-local sdpa fallback "
                        "(colocated) / torch (disaggregated workers)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.88)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="the engines' radix prefix cache (the workers' flag of the same name)")
    p.add_argument("--mixed-batches", action=argparse.BooleanOptionalAction, default=None,
                   help="colocated: decode tokens ride the prefill's forward (EngineConfig.mixed_batches; "
                        "default: its default)")
    p.add_argument("--hf-batch", type=int, default=None, help="default 64 (tiny: 4)")
    p.add_argument("--hf-batches", type=int, default=1)
    p.add_argument("--disagg-requests", type=int, default=None, help="per workload; default all (tiny) / 8")
    p.add_argument("--disagg-timeout", type=float, default=60.0, help="seconds per workload")
    p.add_argument("--disagg-decode-pages", type=int, default=None)
    p.add_argument("--kv-transfer-backend", default="grpc", choices=["grpc", "nixl"],
                   help="KV transport between the disaggregated workers")
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--results-md", default=None, help="write a RESULTS.md here")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--step-trace-file", default="",
                   help="colocated: one JSON line per engine step here (as the decode worker's flag)")
    p.add_argument("--disable-cascade-attn", action="store_true",
                   help="colocated: no shared-prefix decode attention (as the workers' flag)")
    p.add_argument("--worker-process", action=argparse.BooleanOptionalAction, default=True,
                   help="colocated: set the process up as the decode worker does (GIL switch interval, "
                        "start-up heap frozen out of the GC); --no-worker-process keeps Python's defaults")
    p.add_argument("--commit", default=None)
    p.add_argument("--date", default=None)
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda":     # Triton kernels need a GPU (TRITON_INTERPRET aside)
        return False
    try:
        from engine.attention import get_attention_backend

        get_attention_backend("triton")
        return True
    except Exception:  # noqa: BLE001
        return False


def run_colocated(args, model_dir: Path, device: torch.device, wls, rows, summ) -> str:
    from benchmarks.colocated import ColocatedEngine
    from benchmarks.sdpa_backend import SdpaBackend
    from engine.config import EngineConfig
    from engine.runner import ForwardSeq

    backend = args.attention_backend
    if backend == "auto":
        backend = "triton" if _triton_available(device) else "sdpa"
    max_len = max(w.input_len + w.output_len for w in wls) + 16
    cfg = EngineConfig(model=str(model_dir), load_format="dummy",
                       dtype="float32" if device.type == "cpu" else "bfloat16", device=device.type,
                       page_size=16, num_pages=(4096 if args.tiny else None),
                       gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=max_len,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       attention_backend="torch" if backend == "sdpa" else backend,
                       enable_prefix_caching=args.enable_prefix_caching,
                       disable_cascade_attn=args.disable_cascade_attn,
                       **({} if args.mixed_batches is None else {"mixed_batches": args.mixed_batches}))
    bench = ColocatedEngine(cfg, worker_process=args.worker_process)   # make_decode_engine, thread not started yet
    runner = bench.runner
    fallback_note = ""
    if backend == "triton":   # check it against the fp32-math torch reference before trusting it
        try:
            from engine.attention import get_attention_backend

            ref = get_attention_backend("torch")
            err_t = _compare_backends(runner, runner.backend, ref)
            err_s = _compare_backends(runner, SdpaBackend(), ref)
            print(f"logits vs torch reference: triton {err_t:.3g}, sdpa {err_s:.3g}", flush=True)
            if not err_t <= max(5e-2, 2 * err_s):
                raise RuntimeError(f"logits differ from the torch reference by {err_t:.3g} (sdpa: {err_s:.3g})")
        except Exception as exc:  # noqa: BLE001
            fallback_note = f" (triton rejected: {type(exc).__name__}: {str(exc)[:80]})"
            print("triton backend" + fallback_note, flush=True)
            backend = "sdpa"
    if backend == "sdpa":
        runner.backend = SdpaBackend()
    # warm-up: a prefill and a decode pass (kernel selection, allocator), then one decode pass
    # per CUDA-graph bucket: a bucket's first replay is checked against an eager pass (15-40 ms
    # more than the step at batch 30-210 on the H200), once per process, which would land in
    # the first workload's steps (W1's prefill steps, or its decode steps with mixed batches);
    # rows on the same 7 pages replay the shared-prefix graphs (100 shared keys >= its threshold)
    pages = list(range(8))
    vocab = runner.model_config.vocab_size
    lo = token_id_range(vocab)[0]
    warm = [lo + i % (vocab - lo) for i in range(32)]    # Llama-3.1: 1000..1031, as before issue 14
    runner.forward([ForwardSeq(warm, 0, pages)] * 1)
    runner.forward([ForwardSeq(warm[:1], 32, pages), ForwardSeq(warm[1:2], 10, pages)])
    for b in runner.graph_buckets:
        runner.forward([ForwardSeq(warm[:1], 32, pages)] * b)
        if runner.shared_prefix_min and b > 1:    # the same pages: the shared-prefix graphs too
            saved, runner.shared_prefix_saved = runner.shared_prefix_saved, 0
            runner.forward([ForwardSeq(warm[:1], 100, pages)] * b)
            runner.shared_prefix_saved = saved
    _free(device)
    note = (f"DecodeEngine (make_decode_engine); attention {backend}; {runner.num_pages} KV pages; "
            f"prefix caching {'on' if args.enable_prefix_caching else 'off'}; mixed batches "
            f"{'on' if cfg.mixed_batches else 'off'}; shared-prefix attention "
            f"{'off' if cfg.disable_cascade_attn else 'on'}; MFU/MBU from the engine's prefill/decode pass timers")
    if args.step_trace_file:
        bench.engine.step_trace = open(args.step_trace_file, "a", buffering=1)  # noqa: SIM115
    bench.start()
    try:
        for wl in wls:
            dense_before = getattr(runner.backend, "dense_calls", 0)
            res = bench.run(wl)
            res.note = f"attention {backend}{fallback_note}"
            if getattr(runner.backend, "dense_calls", 0) > dense_before:   # $TANDEM_DENSE_PREFILL=1
                res.note += "; prompts by cuDNN attention"
            if res.extra.get("preemptions"):
                res.note += f"; {res.extra['preemptions']} preemptions"
            rows.append(res.summary(summ["matmul_flops"], summ["copy_bw"]))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        bench.close()
    del bench, runner
    _free(device)
    return note


def probe_token_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """n token ids drawn uniformly from the workload range of the model's vocabulary
    (workloads.token_id_range: above the low ids, where special tokens tend to sit)."""
    low, high = token_id_range(vocab_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()


def _compare_backends(runner, backend, ref) -> float:
    """Relative difference of logits of a mixed batch (prefill, extend, decode) computed
    with `backend` and with `ref`, on the same pages."""
    from engine.runner import ForwardSeq

    toks = probe_token_ids(runner.model_config.vocab_size, 300)
    pages = [list(range(0, 20)), list(range(20, 40))]
    out = []
    for be in (backend, ref):
        saved, runner.backend = runner.backend, be
        try:
            runner.forward([ForwardSeq(toks[:100], 0, pages[0]), ForwardSeq(toks[:200], 0, pages[1])])
            logits = [runner.forward([ForwardSeq(toks[100:150], 100, pages[0]),
                                      ForwardSeq([toks[200]], 200, pages[1])]),
                      runner.forward([ForwardSeq([toks[150]], 150, pages[0]),
                                      ForwardSeq([toks[201]], 201, pages[1])])]
        finally:
            runner.backend = saved
        out.append(torch.cat(logits).float())
    return float((out[0] - out[1]).norm() / out[1].norm())


def run_disagg(args, model_dir: Path, device: torch.device, wls, rows, summ, log_dir: Path) -> str:
    from benchmarks.disagg import DisaggCluster

    backend = args.attention_backend
    if backend in ("auto", "sdpa"):
        backend = "triton" if _triton_available(device) else "torch"
    ps = 16
    max_len = max(w.input_len + w.output_len for w in wls) + 16
    prefill_pages = 2 * max(args.max_num_batched_tokens, max_len) // ps
    decode_pages = args.disagg_decode_pages or (2048 if args.tiny else 6144)
    n_req = args.disagg_requests
    cl = DisaggCluster(model_dir, device.type, "float32" if device.type == "cpu" else "bfloat16", backend,
                       prefill_pages, decode_pages, args.max_num_seqs, args.max_num_batched_tokens,
                       max_len, log_dir, kv_backend=args.kv_transfer_backend,
                       enable_prefix_caching=args.enable_prefix_caching)
    t = time.perf_counter()
    cl.start()
    started = time.perf_counter() - t
    try:
        for wl in wls:
            n = wl.num_requests if n_req is None else min(n_req, wl.num_requests)
            res = cl.run(wl, n, args.disagg_timeout)
            res.note = (f"attention {backend}; {cl.kv_backend} KV; " + res.note).rstrip("; ")
            rows.append(res.summary(summ["matmul_flops"], summ["copy_bw"]))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        cl.stop()
    return (f"attention {backend}; prefill {prefill_pages} pages, decode {decode_pages} pages; "
            f"workers started in {started:.0f}s")


def main(argv=None) -> int:
    from benchmarks.served import forward_from_bench   # `--modes served`: benchmarks/served.py's own CLI

    if (rc := forward_from_bench(argv)) is not None:
        return rc
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model_name, model_cfg = resolve_model_config(args.model_config, args.tiny)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --tiny", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    wanted = set(args.workloads.split(","))
    wls = [w for w in workloads(args.tiny) if w.name in wanted]
    if args.disagg_requests is None and not args.tiny:
        args.disagg_requests = 8
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-logs-"))
    t_all = time.perf_counter()
    summ = measure_ceilings(device, args.tiny)
    print(f"device {dev_name}: matmul {summ['matmul_flops'] / 1e12:.1f} TFLOP/s "
          f"({summ['matmul_dtype']} {summ['matmul_n']}^3), copy {summ['copy_bw'] / 1e9:.0f} GB/s", flush=True)
    print(f"model config: {describe_model_config(model_name, model_cfg)}", flush=True)
    rows: list[dict] = []
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-model-") as tmp:
        model_dir = write_model_dir(Path(tmp), args.tiny, model_cfg)
        if "hf" in modes:
            from benchmarks.hf_baseline import run_hf

            w1 = next(w for w in workloads(args.tiny) if w.name == "W1")
            res = run_hf(model_cfg, w1, device,
                         torch.float32 if device.type == "cpu" else torch.bfloat16,
                         args.hf_batch or (4 if args.tiny else 64), args.hf_batches)
            rows.append(res.summary(summ["matmul_flops"], summ["copy_bw"]))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if "colocated" in modes:
            notes["colocated"] = run_colocated(args, model_dir, device, wls, rows, summ)
        if "disagg" in modes:
            try:
                notes["disagg"] = run_disagg(args, model_dir, device, wls, rows, summ, log_dir)
            except Exception as exc:  # noqa: BLE001 - report, keep the other rows
                notes["disagg"] = f"FAILED: {type(exc).__name__}: {exc} (logs in {log_dir})"
                print(notes["disagg"], flush=True)
    checks = acceptance(rows)
    result = {
        "device": dev_name, "date": args.date or datetime.date.today().isoformat(),
        "commit": args.commit or git_commit(), "command": "python -m benchmarks.bench " + shlex.join(argv or sys.argv[1:]),
        "torch": torch.__version__, "tiny": args.tiny, "model_config": model_config_record(model_name, model_cfg),
        "ceilings": summ, "notes": notes,
        "rows": rows, "acceptance": checks, "total_s": time.perf_counter() - t_all,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.results_md:
        Path(args.results_md).write_text(results_md(result))
    print()
    for k, v in notes.items():
        print(f"{k}: {v}")
    for c in checks:
        print(f"[{'PASS' if c['ok'] else 'MISS'}] {c['what']}: {c['value']}")
    print(f"ceilings: matmul {summ['matmul_flops'] / 1e12:.1f} TFLOP/s, copy {summ['copy_bw'] / 1e9:.0f} GB/s; "
          f"total {result['total_s']:.0f}s")
    print(format_table(rows))
    return 0


def _get(rows, mode, wl, key):
    for r in rows:
        if r["mode"] == mode and r["workload"] == wl:
            return r.get(key, float("nan"))
    return float("nan")


def acceptance(rows: list[dict]) -> list[dict]:
    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"
    hf = _get(rows, "hf-generate", "W1", "output_tok_s")
    w1 = _get(rows, "colocated", "W1", "output_tok_s")
    mbu = _get(rows, "colocated", "W3", "decode_mbu")
    mfu = _get(rows, "colocated", "W4", "prefill_mfu")
    cr = _get(rows, "colocated", "W2", "cached_ratio")
    t2, t1 = _get(rows, "colocated", "W2", "ttft_mean_s"), _get(rows, "colocated", "W1", "ttft_mean_s")
    return [
        {"what": "W1 output tok/s >= 5x transformers generate", "ok": w1 >= 5 * hf,
         "value": f"{fmt(w1)} vs {fmt(hf)} ({fmt(w1 / hf if hf else float('nan'))}x)"},
        {"what": "W3 decode MBU >= 0.6", "ok": mbu >= 0.6, "value": fmt(mbu)},
        {"what": "W4 prefill MFU >= 0.5", "ok": mfu >= 0.5, "value": fmt(mfu)},
        {"what": "W2 cached-token ratio >= 0.74", "ok": cr >= 0.74, "value": fmt(cr)},
        {"what": "W2 mean TTFT <= W1 mean TTFT / 2", "ok": t2 <= t1 / 2, "value": f"{fmt(t2)} s vs {fmt(t1)} s"},
    ]


def results_md(r: dict) -> str:
    c = r["ceilings"]
    lines = [
        "# Benchmark results", "",
        f"- device: {r['device']}", f"- date: {r['date']}", f"- commit: {r['commit']} (plus uncommitted work)",
        f"- command: `{r['command']}`", f"- torch {r['torch']}; total run {r['total_s']:.0f} s",
        f"- model config: {describe_model_config(r['model_config']['name'], r['model_config']['config'])}",
        f"- ceilings (same call): {c['matmul_dtype']} {c['matmul_n']}^3 matmul "
        f"{c['matmul_flops'] / 1e12:.1f} TFLOP/s; device copy {c['copy_bw'] / 1e9:.0f} GB/s (read+write)",
        "",
    ]
    for k, v in r["notes"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Acceptance", ""]
    for ch in r["acceptance"]:
        lines.append(f"- [{'x' if ch['ok'] else ' '}] {ch['what']}: {ch['value']}")
    lines += ["", "## Table", "", format_table(r["rows"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
