"""Goodput mode: the highest Poisson arrival rate at which >= 90% of requests meet both SLOs.

    python -m benchmarks.goodput --device cpu --tiny --layout colocated --replicas 1   # CI
    python -m benchmarks.goodput --device cuda --layout pd --num-prefill 1 --num-decode 1 --gpus 0,1

Lifecycle of one call:
  1. write the model dir (`--model-config`, benchmarks/workloads.py: config.json for dummy
     weights + a word-level tokenizer over its vocabulary) and start the layout behind the
     router (`benchmarks/layouts.py`);
  2. warm up: `--warmup` requests of every mix shape at once, unmeasured (Triton JIT, graphs);
  3. per rate r (the `--rates` list, or the search below): seeded open-loop Poisson arrivals
     over `--duration` seconds (at least `--min-requests`), each request's shape drawn from
     `--mix`; every request is a streaming `/v1/completions` call through the router
     (token-id prompt, ignore_eos, max_tokens = the shape's output length). A request
     meets the SLOs when it finishes all its tokens with TTFT <= --slo-ttft and TPOT (mean
     gap after the first token) <= --slo-tpot-ms. Such a request has finished by
     submit + ttft + (n - 1) * tpot, so it is cancelled (a miss) at that deadline; once the
     misses exceed (1 - target) of the rate's requests the rate has failed and the rest is
     cancelled ("stopped early"; unsent and unfinished requests count as misses).
     Then wait until every worker is idle; scrape the decode workers' KV counters;
  4. search: start at --start-rate, double while attainment >= target (up to --max-rate),
     halve while it is below (down to --min-rate), then bisect --search-steps times;
     goodput = the highest rate that met the target;
  5. print the per-rate table and the goodput, write --json, append to --results-md, stop.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.layouts import KV_TRANSPORTS
from benchmarks.metrics import RequestTrace
from benchmarks.slo import (SLO, Arrival, SearchResult, Shape, format_rows, meets_slo, poisson_arrivals,
                            rate_row, search_goodput)
from benchmarks.workloads import (DEFAULT_MODEL_CONFIG, MODEL_CONFIGS, describe_model_config, model_config_record,
                                  resolve_model_config, token_id_range, workloads, write_model_dir)
from engine.config import resolve_attention_backend

ROOT = Path(__file__).resolve().parent.parent


class PromptSource:
    """Fresh prompts per shape (DESIGN.md recipe; generator seed 1 + the shape's mix index;
    ids in workloads.token_id_range of the model's vocabulary)."""

    def __init__(self, shapes: list[Shape], vocab_size: int) -> None:
        import torch

        self._torch = torch
        self._low, self._high = token_id_range(vocab_size)
        self._gens = [torch.Generator().manual_seed(1 + i) for i in range(len(shapes))]
        self._shared = [torch.randint(self._low, self._high, (s.prefix_len,), generator=g).tolist()
                        for s, g in zip(shapes, self._gens)]
        self._shapes = shapes

    def next(self, i: int) -> list[int]:
        s = self._shapes[i]
        return self._shared[i] + self._torch.randint(self._low, self._high, (s.input_len - s.prefix_len,),
                                                     generator=self._gens[i]).tolist()


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, tr: RequestTrace) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            tr.error = f"HTTP {r.status_code}: {(await r.aread())[:100]!r}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                tr.error = str(obj["error"].get("message", obj["error"]))[:100]
                return
            for ch in obj.get("choices") or []:
                n = ch.get("text", "").count("<t")   # the benchmark tokenizer: id N -> "<tN>"
                if n:
                    tr.token(time.perf_counter(), n)
            if obj.get("usage"):
                tr.num_output = obj["usage"]["completion_tokens"]


async def run_rate(url: str, model: str, arrivals: list[Arrival], prompts: list[list[int]],
                   outputs: list[int], slo: SLO | None,
                   early_stop: bool = True) -> tuple[list[RequestTrace], float, bool]:
    """Open loop: request i is sent at t0 + arrivals[i].t whatever the others do.
    slo None: no deadlines, no early stop (warm-up). Returns (traces, wall seconds, stopped early)."""
    import httpx

    traces = [RequestTrace(prompt_len=len(p)) for p in prompts]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=30)) as client:
        t0 = time.perf_counter()

        async def send(i: int) -> None:
            tr = traces[i]
            await asyncio.sleep(max(0.0, t0 + arrivals[i].t - time.perf_counter()))
            tr.t_submit = time.perf_counter()
            try:
                if slo is None:
                    await _one(client, url, model, prompts[i], outputs[i], tr)
                else:
                    async with asyncio.timeout(slo.deadline(outputs[i]) + 0.05):
                        await _one(client, url, model, prompts[i], outputs[i], tr)
            except TimeoutError:
                tr.error = tr.error or "past the SLO deadline"
            except httpx.HTTPError as exc:
                tr.error = f"{type(exc).__name__}: {exc}"[:100]

        tasks = [asyncio.ensure_future(send(i)) for i in range(len(prompts))]
        stopped = False
        budget = len(traces) * (1.0 - slo.target) if slo else math.inf
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
            if early_stop and slo is not None and _known_misses(traces, tasks, outputs, slo) > budget:
                stopped = True
                for t in tasks:
                    t.cancel()
                for tr, out in zip(traces, outputs):
                    if tr.num_output < out and not tr.error:
                        tr.error = "cancelled (rate already failed)"
                break
        await asyncio.gather(*tasks, return_exceptions=True)
        ends = [t.t_last for t in traces if t.t_last] + [t.t_submit for t in traces if t.t_submit]
        wall = (max(ends) if ends else time.perf_counter()) - t0
    return traces, wall, stopped


def _known_misses(traces, tasks, outputs, slo: SLO) -> int:
    now, n = time.perf_counter(), 0
    for tr, task, out in zip(traces, tasks, outputs):
        if tr.error or (task.done() and not meets_slo(tr, out, slo)) or tr.t_submit and (tr.t_first or now) - tr.t_submit > slo.ttft_s:
            n += 1
    return n


# ---- CLI --------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.goodput")
    p.add_argument("--layout", default="colocated", choices=["colocated", "pd"])
    p.add_argument("--replicas", type=int, default=1, help="colocated: number of colocated workers")
    p.add_argument("--num-prefill", type=int, default=1, help="pd: prefill workers")
    p.add_argument("--num-decode", type=int, default=1, help="pd: decode workers")
    p.add_argument("--gpus", default=None, help="comma-separated CUDA ids (default on cuda: one per worker "
                   "as far as there are GPUs); workers beyond the list wrap around (share GPUs)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU / CI)")
    p.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, metavar="NAME|PATH",
                   help=f"{', '.join(MODEL_CONFIGS)} (with --tiny: its CPU-sized twin) or a config.json path")
    p.add_argument("--mix", default="W1,W3", help="workload shapes, NAME[:weight] (W1-W4 of workloads.py)")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--attainment", type=float, default=0.9, help="target fraction meeting both SLOs")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (30; tiny 5)")
    p.add_argument("--min-requests", type=int, default=8, help="per rate")
    p.add_argument("--rates", default=None, help="comma-separated rates (req/s); skips the search")
    p.add_argument("--start-rate", type=float, default=1.0)
    p.add_argument("--max-rate", type=float, default=64.0)
    p.add_argument("--min-rate", type=float, default=0.05)
    p.add_argument("--search-steps", type=int, default=3, help="bisections after bracketing")
    p.add_argument("--no-early-stop", action="store_true", help="run failing rates to the end")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per shape before the search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: triton on cuda, torch on cpu")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.88, help="per GPU, split among its workers")
    p.add_argument("--prefill-pages", type=int, default=None)
    p.add_argument("--decode-pages", type=int, default=None)
    p.add_argument("--gpu-sharing", default="none", choices=["none", "turns", "mps"],
                   help="pd workers sharing a GPU: none (time-sliced), turns (engine/gpu_turn.py), "
                        "mps (side by side under CUDA MPS; benchmarks/layouts.py)")
    p.add_argument("--prefill-sm-fraction", type=float, default=0.6, help="mps: the prefill worker's share of the SMs")
    p.add_argument("--sm-partition", type=float, default=None,
                   help="colocated: the workers' --sm-partition (prefill lane's share of the SMs; green contexts)")
    p.add_argument("--sm-partition-adaptive", action="store_true",
                   help="with --sm-partition: the workers move that share live against this run's SLOs")
    p.add_argument("--kv-transfer-backend", "--kv-transport", dest="kv_transport", default="grpc",
                   choices=KV_TRANSPORTS, help="KV transport between the P+D workers")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--results-md", default=None, help="append a markdown section here")
    p.add_argument("--commit", default=None)
    p.add_argument("--date", default=None)
    return p.parse_args(argv)


def parse_mix(spec: str, tiny: bool) -> list[Shape]:
    known = {w.name: w for w in workloads(tiny)}
    shapes = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in known:
            raise SystemExit(f"error: unknown workload {name!r} in --mix (known: {', '.join(known)})")
        w = known[name]
        shapes.append(Shape(w.name, w.input_len, w.output_len, w.prefix_len, float(weight or 1.0)))
    return shapes


def _provenance(device: str, gpus: tuple[str, ...]) -> tuple[str, str]:
    """(device name, short commit); nvidia-smi, so that this client process opens no CUDA context."""
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20,
                                  check=False).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    names = out(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", ",".join(gpus)]).splitlines() \
        if device == "cuda" else ["cpu"]
    name = (names[0] if len(names) == 1 else f"{len(names)}x {names[0]}") if names else device
    commit = out(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if out(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (plus uncommitted changes)"
    return name, commit


def results_md(r: dict) -> str:
    s = r["slo"]
    good = f"{r['goodput']:g} req/s" + (" (target still met at --max-rate)" if r["capped"] else "")
    return "\n".join([
        f"## Goodput: {r['layout']}, {r['device']}, {r['date']}", "",
        f"- commit: {r['commit']}", f"- command: `{r['command']}`",
        f"- model config: {describe_model_config(r['model_config']['name'], r['model_config']['config'])}",
        (f"- SLO: TTFT <= {s['ttft_s']} s and TPOT <= {1e3 * s['tpot_s']:g} ms for >= {s['target']:.0%} of "
         f"requests; mix {r['mix']}; {r['duration_s']:g} s of Poisson arrivals per rate, seed {r['seed']}"),
        f"- workers started in {r['startup_s']:.0f} s; KV transport "
        f"{r['kv_transport'] if 'P+' in r['layout'] else 'none (colocated)'}; "
        f"total {r['total_s']:.0f} s",
        f"- **goodput: {good}**", "", format_rows(r["rows"]), "", ""])


def main(argv=None) -> int:
    from benchmarks.layouts import Layout, LayoutConfig

    args = parse_args(argv)
    try:
        model_name, model_cfg = resolve_model_config(args.model_config, args.tiny)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    if argv is None:   # the CLI: `timeout` / kill still stops the layout's processes
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuda = args.device == "cuda"
    shapes = parse_mix(args.mix, args.tiny)
    slo = SLO(args.slo_ttft, args.slo_tpot_ms / 1e3, args.attainment)
    duration = args.duration or (5.0 if args.tiny else 30.0)
    n_workers = (args.num_prefill + args.num_decode) if args.layout == "pd" else args.replicas
    if args.gpus is not None:
        gpus = tuple(g for g in args.gpus.split(",") if g)
    elif cuda:
        import torch

        gpus = tuple(str(i) for i in range(max(1, min(n_workers, torch.cuda.device_count()))))
    else:
        gpus = ()
    backend = resolve_attention_backend(args.attention_backend, args.device)[0]  # the workers' rule
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-goodput-logs-"))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tandem-goodput-model-") as tmp:
        cfg = LayoutConfig(
            layout=args.layout, model_dir=write_model_dir(Path(tmp), args.tiny, model_cfg, tokenizer=True),
            log_dir=log_dir,
            num_prefill=args.num_prefill, num_decode=args.num_decode, replicas=args.replicas, gpus=gpus,
            device=args.device, dtype="bfloat16" if cuda else "float32", attention_backend=backend,
            max_model_len=max(s.input_len + s.output_len for s in shapes) + 16,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization, prefill_pages=args.prefill_pages,
            decode_pages=args.decode_pages, kv_transport=args.kv_transport, gpu_sharing=args.gpu_sharing,
            prefill_sm_fraction=args.prefill_sm_fraction, sm_partition=args.sm_partition,
            sm_partition_adaptive=(args.slo_ttft, args.slo_tpot_ms / 1e3) if args.sm_partition_adaptive else None)
        print(f"starting {cfg.describe()}; model config {describe_model_config(model_name, model_cfg)}; "
              f"logs in {log_dir}", flush=True)
        t = time.perf_counter()
        with Layout(cfg) as lay:
            startup = time.perf_counter() - t
            url, prompts = f"{lay.base_url}/v1/completions", PromptSource(shapes, model_cfg["vocab_size"])
            print(f"ready in {startup:.0f}s at {lay.base_url}", flush=True)
            if args.warmup:
                idx = [i for i in range(len(shapes)) for _ in range(args.warmup)]
                asyncio.run(run_rate(url, cfg.served_name, [Arrival(0.0, i) for i in idx],
                                     [prompts.next(i) for i in idx], [shapes[i].output_len for i in idx], None))
                lay.wait_idle()

            def measure(rate: float) -> float:
                arr = poisson_arrivals(rate, duration, [s.weight for s in shapes], args.seed, args.min_requests)
                outs = [shapes[a.shape].output_len for a in arr]
                kv0 = lay.kv_counters()
                traces, wall, stopped = asyncio.run(run_rate(url, cfg.served_name, arr,
                                                             [prompts.next(a.shape) for a in arr], outs, slo,
                                                             early_stop=not args.no_early_stop))
                idle = lay.wait_idle()
                lay.check_alive()
                kv1 = lay.kv_counters()
                row = rate_row(rate, traces, outs, slo, wall, stopped)
                dbytes, dsec = kv1["bytes"] - kv0["bytes"], kv1["seconds"] - kv0["seconds"]
                row.update(kv_mb=dbytes / 1e6 if args.layout == "pd" else None,
                           kv_gb_s=dbytes / dsec / 1e9 if dsec > 0 else None,
                           kv_transfers=kv1["transfers"] - kv0["transfers"], idle_after=idle)
                rows.append(row)
                print(format_rows([row]).splitlines()[-1], flush=True)
                return row["attainment"]

            print(format_rows([]).splitlines()[0], flush=True)
            if args.rates:
                rates = [float(x) for x in args.rates.split(",") if x]
                passed = [r for r in rates if measure(r) >= slo.target]
                res = SearchResult(max(passed, default=0.0), False, (max(passed, default=0.0), math.nan),
                                   tuple((r["rate"], r["attainment"]) for r in rows))
            else:
                res = search_goodput(measure, args.start_rate, slo.target, args.max_rate, args.min_rate,
                                     args.search_steps)
    dev_name, commit = _provenance(args.device, gpus)
    result = {
        "layout": cfg.describe(), "device": dev_name, "model_config": model_config_record(model_name, model_cfg),
        "date": args.date or datetime.date.today().isoformat(), "commit": args.commit or commit,
        "command": "python -m benchmarks.goodput " + shlex.join(sys.argv[1:] if argv is None else argv),
        "slo": asdict(slo), "mix": args.mix, "shapes": [asdict(s) for s in shapes], "duration_s": duration,
        "seed": args.seed, "kv_transport": args.kv_transport, "startup_s": startup,
        "gpu_sharing": args.gpu_sharing, "prefill_sm_fraction": args.prefill_sm_fraction,
        "goodput": res.goodput, "capped": res.capped, "bracket": list(res.bracket), "rows": rows,
        "total_s": time.perf_counter() - t_all,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.results_md:
        with open(args.results_md, "a") as f:
            f.write(results_md(result))
    print()
    print(f"{result['layout']} on {result['device']}; SLO TTFT <= {slo.ttft_s:g} s, TPOT <= "
          f"{args.slo_tpot_ms:g} ms, target {slo.target:.0%}; mix {args.mix}; {duration:g} s per rate")
    print(format_rows(rows))
    tail = (" (capped: target met at --max-rate)" if res.capped else " (highest listed rate that passed)"
            if args.rates else f" (next rate tried failed: {res.bracket[1]:g})")
    print(f"goodput: {res.goodput:g} req/s{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
