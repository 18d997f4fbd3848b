"""Placement benchmark (CPU, tiny model): how much of the prompt the prefill pool reuses.

Workload: 4 distinct 512-token prefixes; each request is one of them (seeded
uniform choice) + a unique 16-token suffix, max_tokens 2, sent through the
router's /v1/completions with `--concurrency` requests in flight.

Setups, each a fresh set of real processes (`python -m tandem_cli.main`):
  single       1 prefill worker with 2 x `--prefill-pages` pages (the same KV
               memory as the two-worker pool) + 1 decode worker + router
  cache_aware  2 prefill workers with `--prefill-pages` each + 1 decode + router --placement cache_aware
  round_robin  the same with --placement round_robin  (and least_load when asked)
The per-worker pool is sized to hold about two of the four prefixes, so a
worker that sees every prefix evicts them in turn.

Cluster-wide cached ratio = sum of cached prompt tokens / sum of prompt tokens,
from the prefill workers' Stats. Acceptance: cache_aware >= 0.9 x single.

    python -m benchmarks.placement_bench [--requests 200] [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import cluster_auth
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from tandem_cli.procs import stop_all, wait_grpc_ready, wait_http_ready
from tests.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    requests: int = 200
    num_prefixes: int = 4
    prefix_len: int = 512
    suffix_len: int = 16
    max_tokens: int = 2
    seed: int = 1

    def prompts(self, vocab: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        prefixes = [[rng.randrange(3, vocab) for _ in range(self.prefix_len)] for _ in range(self.num_prefixes)]
        return [rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(self.suffix_len)]
                for _ in range(self.requests)]


@dataclass
class SetupResult:
    setup: str
    prefill_workers: int
    pages_per_worker: int
    requests: int
    prompt_tokens: int
    cached_tokens: int
    cached_ratio: float
    usage_cached_tokens: int          # from the responses' usage, cross-check
    per_worker_prompt_tokens: list[int]
    wall_s: float


class BenchCluster:
    """n prefill workers + 1 decode worker + router, real processes on loopback."""

    def __init__(self, model_dir: Path, placement: str, prefill_workers: int, prefill_pages: int,
                 decode_pages: int, page_size: int, log_dir: Path) -> None:
        self.model_dir, self.placement, self.page_size = model_dir, placement, page_size
        self.log_dir = log_dir
        self.prefill = [f"127.0.0.1:{free_port()}" for _ in range(prefill_workers)]
        self.decode = f"127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.prefill_pages, self.decode_pages = prefill_pages, decode_pages
        self.procs: list[subprocess.Popen] = []
        self.cluster_token = cluster_auth.new_token()   # credentials on, as `tandem serve` runs

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   **{cluster_auth.TOKEN_ENV: self.cluster_token})
        out = open(self.log_dir / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *args], cwd=ROOT, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def _worker(self, role: str, address: str, pages: int) -> list[str]:
        return [role, "--model", str(self.model_dir), "--port", address.split(":")[1], "--device", "cpu",
                "--dtype", "float32", "--num-pages", str(pages), "--block-size", str(self.page_size),
                "--log-level", "warning"]

    def start(self, timeout: float = 120) -> "BenchCluster":
        try:
            workers = [(a, self._spawn(f"prefill{i}", self._worker("prefill", a, self.prefill_pages)))
                       for i, a in enumerate(self.prefill)]
            workers.append((self.decode, self._spawn("decode", self._worker("decode", self.decode,
                                                                            self.decode_pages))))
            for address, proc in workers:
                wait_grpc_ready(address, proc, timeout)
            router = self._spawn("router", ["router", "--model", str(self.model_dir), "--port", str(self.http_port),
                                            "--decode", self.decode, "--prefill", ",".join(self.prefill),
                                            "--served-model-name", "tiny", "--placement", self.placement,
                                            "--log-level", "warning"])
            wait_http_ready(f"http://127.0.0.1:{self.http_port}/health", router, timeout)
            time.sleep(1.0)  # let the router's CacheEvents subscriptions and first Stats poll land
        except BaseException:
            self.stop()
            raise
        return self

    def prefill_stats(self) -> list[pb.StatsResponse]:
        out = []
        for address in self.prefill:
            with cluster_auth.channel(address, token=self.cluster_token) as ch:
                out.append(pbg.PrefillStub(ch).Stats(pb.StatsRequest(), timeout=5))
        return out

    def stop(self) -> None:
        stop_all(self.procs, grace=10)
        self.procs.clear()

    def __enter__(self) -> "BenchCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _drive(base_url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> int:
    """Send every prompt (at most `concurrency` at once); returns the usage's cached tokens sum."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    cached = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async def one(p: list[int]) -> None:
            nonlocal cached
            async with sem:
                r = await client.post("/completions", json={"model": "tiny", "prompt": p, "max_tokens": max_tokens,
                                                            "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                cached += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        await asyncio.gather(*(one(p) for p in prompts))
    return cached


def run_setup(setup: str, model_dir: Path, workload: Workload, vocab: int, prefill_pages: int,
              page_size: int, concurrency: int, log_dir: Path) -> SetupResult:
    single = setup == "single"
    n_workers, pages = (1, 2 * prefill_pages) if single else (2, prefill_pages)
    prompts = workload.prompts(vocab)
    decode_pages = concurrency * (-(-(workload.prefix_len + workload.suffix_len + workload.max_tokens)
                                    // page_size) + 2) + 64
    (log_dir / setup).mkdir(parents=True, exist_ok=True)
    with BenchCluster(model_dir, "cache_aware" if single else setup, n_workers, pages, decode_pages,
                      page_size, log_dir / setup) as c:
        t0 = time.monotonic()
        usage_cached = asyncio.run(_drive(f"http://127.0.0.1:{c.http_port}/v1", prompts, workload.max_tokens,
                                          concurrency))
        wall = time.monotonic() - t0
        stats = c.prefill_stats()
    per_worker = [s.cached_prompt_tokens + s.computed_prompt_tokens for s in stats]
    cached = sum(s.cached_prompt_tokens for s in stats)
    total = sum(per_worker)
    assert total == sum(map(len, prompts)), (total, sum(map(len, prompts)))
    return SetupResult(setup, n_workers, pages, len(prompts), total, cached, cached / total, usage_cached,
                       per_worker, wall)


def markdown(results: list[SetupResult], args, commit: str, date: str) -> str:
    by = {r.setup: r for r in results}
    lines = ["## Placement (CPU)", "",
             f"- date: {date}", f"- commit: {commit}",
             f"- command: `python -m benchmarks.placement_bench --requests {args.requests} "
             f"--concurrency {args.concurrency} --prefill-pages {args.prefill_pages} --page-size {args.page_size}`",
             f"- workload: {args.requests} requests, 4 distinct 512-token prefixes (seeded uniform choice) + a "
             f"unique 16-token suffix, max_tokens 2, {args.concurrency} in flight; tiny llama (2 layers, hidden 64), "
             f"CPU float32, KV page {args.page_size} tokens",
             f"- prefill KV: {args.prefill_pages} pages per worker in the two-worker setups (about two of the four "
             f"prefixes); the single worker gets {2 * args.prefill_pages} (the same total KV memory)",
             "- cached ratio = sum of cached prompt tokens / sum of prompt tokens over the prefill workers' Stats",
             "",
             "| setup | prefill workers | pages/worker | cached ratio | vs single | prompt tokens per worker | wall s |",
             "|---|---|---|---|---|---|---|"]
    base = by.get("single")
    for r in results:
        rel = f"{r.cached_ratio / base.cached_ratio:.3f}x" if base else "-"
        lines.append(f"| {r.setup} | {r.prefill_workers} | {r.pages_per_worker} | {r.cached_ratio:.3f} | {rel} | "
                     f"{', '.join(map(str, r.per_worker_prompt_tokens))} | {r.wall_s:.1f} |")
    if base and "cache_aware" in by:
        ok = by["cache_aware"].cached_ratio >= 0.9 * base.cached_ratio
        lines += ["", f"- [{'x' if ok else ' '}] cache_aware cached ratio >= 0.9 x single worker: "
                      f"{by['cache_aware'].cached_ratio:.3f} vs {base.cached_ratio:.3f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefill-pages", type=int, default=80, help="KV pages per prefill worker (two-worker setups)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--setups", default="single,cache_aware,round_robin")
    ap.add_argument("--model-dir", default=None, help="tiny model dir (default: make one in a temp dir)")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results-md", default=None, help="insert the section into this RESULTS.md")
    ap.add_argument("--commit", default="")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args(argv)
    workload = Workload(requests=args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-placement-"))
    log_dir = Path(args.log_dir) if args.log_dir else tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from engine.tiny_models import make_tiny_model

        model_dir = make_tiny_model(tmp / "tiny", arch="llama", seed=0, max_position_embeddings=1024)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    results = []
    for setup in args.setups.split(","):
        r = run_setup(setup, model_dir, workload, vocab, args.prefill_pages, args.page_size, args.concurrency,
                      log_dir)
        print(f"{setup}: cached ratio {r.cached_ratio:.3f} ({r.cached_tokens}/{r.prompt_tokens}), "
              f"per worker {r.per_worker_prompt_tokens}, {r.wall_s:.1f} s", flush=True)
        results.append(r)
    md = markdown(results, args, args.commit or "uncommitted", args.date)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.results_md:
        path = Path(args.results_md)
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        head, sep, rest = text.partition("\n## ")
        path.write_text(head.rstrip("\n") + "\n\n" + md + ("\n## " + rest if sep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
