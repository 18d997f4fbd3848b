"""Overload (issue 10): 10x the batch capacity in streams at once, through `tandem serve`.

Starts `tandem serve --colocated` (a tiny random llama, CPU unless --device cuda) with a
running batch of --max-num-seqs and --max-queued-requests waiting per worker, then:
  1. control: as many streams as the cluster admits (batch + queue), alone;
  2. overload: --factor x max-num-seqs streams sent at once (asyncio + httpx), while
     /health is polled every 10 ms.
Reports the latency of every 503 (request sent -> status line; must carry Retry-After),
/health latency p50/p99 during the overload, and the admitted streams' wall time against
the control (admitted requests must be unaffected). Medians and p99 from one run.

    python -m benchmarks.overload [--max-num-seqs 8] [--factor 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _connect(port: int, body: dict):
    """A connection opened and an HTTP/1.1 request serialized ahead of the burst, so that the
    timer measures the server, not this client's own request building."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    return reader, writer, req


async def _stream(conn) -> dict:
    reader, writer, req = conn
    t0 = time.perf_counter()
    writer.write(req)
    await writer.drain()
    status_line = await reader.readline()
    first = time.perf_counter() - t0
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    rest = await reader.read()          # Connection: close: the body ends with the stream
    writer.close()
    retry = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                  if line.startswith("retry-after:")), None)
    return {"status": int(status_line.split()[1]), "retry_after": retry, "status_s": first,
            "wall_s": time.perf_counter() - t0, "done": b"[DONE]" in rest}


@contextlib.contextmanager
def serving(args: list[str], port: int, log_path: Path, timeout: float = 180.0):
    """`tandem serve <args> --port port` in its own session, logging to log_path; yields once its
    /health answers (its log tail on stderr and RuntimeError if it exits or times out first);
    SIGTERM (then SIGKILL after 30 s: tandem_cli.procs.stop_all) on the way out. benchmarks.big_prompt uses it too."""
    from tandem_cli.procs import stop_all, wait_http_ready

    cmd = [sys.executable, "-m", "tandem_cli.main", "serve", *args, "--port", str(port)]
    print("starting:", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_http_ready(f"http://127.0.0.1:{port}/health", proc, timeout)
            except Exception:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise RuntimeError(f"tandem serve did not come up (log: {log_path})") from None
            yield proc
        finally:
            stop_all([proc], grace=30.0)


async def _run(port: int, body: dict, n: int, health_url: str | None) -> tuple[list[dict], list[float]]:
    health: list[float] = []
    stop = asyncio.Event()
    conns = [await _connect(port, body) for _ in range(n)]

    async def poll():
        async with httpx.AsyncClient(timeout=10) as hc:
            while not stop.is_set():
                t = time.perf_counter()
                r = await hc.get(health_url)
                if r.status_code == 200:
                    health.append(time.perf_counter() - t)
                await asyncio.sleep(0.01)
    poller = asyncio.create_task(poll()) if health_url else None
    results = await asyncio.gather(*[_stream(c) for c in conns])
    stop.set()
    if poller:
        await poller
    return list(results), health


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-queued-requests", type=int, default=8)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from engine.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="tandem-overload-"))
    model = make_tiny_model(tmp / "llama", arch="llama", seed=4)
    serve = ["--model", str(model), "--device", args.device, "--colocated", "--block-size", "4",
             "--num-pages", "2048", "--max-num-seqs", str(args.max_num_seqs),
             "--max-queued-requests", str(args.max_queued_requests), "--served-model-name", "tiny",
             "--log-level", "warning"]
    base = f"http://127.0.0.1:{args.port}"
    try:
        with serving(serve, args.port, tmp / "serve.log"):
            url = f"{base}/v1/completions"
            body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            httpx.post(url, json=dict(body, stream=False, max_tokens=2), timeout=60)   # warm-up; Stats learned
            time.sleep(1.0)
            admit = args.max_num_seqs + args.max_queued_requests
            control, _ = asyncio.run(_run(args.port, body, admit, None))
            n = args.factor * args.max_num_seqs
            over, health = asyncio.run(_run(args.port, body, n, f"{base}/health"))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    ok = [r for r in over if r["status"] == 200]
    rejected = [r for r in over if r["status"] == 503]
    other = [r for r in over if r["status"] not in (200, 503)]
    res = {
        "device": args.device, "cpus": os.cpu_count(), "max_num_seqs": args.max_num_seqs,
        "max_queued_requests": args.max_queued_requests, "streams": n, "command": " ".join(sys.argv),
        "control_wall_s_median": statistics.median(r["wall_s"] for r in control),
        "control_complete": sum(r["done"] for r in control),
        "admitted": len(ok), "admitted_complete": sum(r["done"] for r in ok),
        "admitted_wall_s_median": statistics.median(r["wall_s"] for r in ok) if ok else None,
        "rejected_503": len(rejected), "other_status": sorted({r["status"] for r in other}),
        "rejected_with_retry_after": sum(r["retry_after"] is not None for r in rejected),
        "reject_s_p50": _pct([r["status_s"] for r in rejected], 0.5),
        "reject_s_p99": _pct([r["status_s"] for r in rejected], 0.99),
        "reject_s_max": max((r["status_s"] for r in rejected), default=float("nan")),
        "health_samples": len(health), "health_s_p50": _pct(health, 0.5), "health_s_p99": _pct(health, 0.99),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if not other and res["admitted_complete"] == len(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
