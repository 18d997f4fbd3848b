"""The served benchmark's load generator: several client processes, each an asyncio
aiohttp client, all starting their requests at one shared wall-clock t0.

Lifecycle of a `ClientPool`:
  1. `ClientPool(n)`: spawn n processes (spawn context: no forked torch state); each
     waits on its own job queue. Everything crossing a process boundary is a JSON string.
  2. `run(url, model, requests, timeout)`: request i goes to process i % n. Each process
     pre-encodes its request bodies, opens an aiohttp session and answers "ready"; once
     all are ready the pool sends every process the same start time t0 (wall clock,
     now + 0.25 s). Each sleeps until t0, sends all its requests at once (streaming
     `POST /v1/completions`), reports progress about once a second and, when all its
     requests have ended, its results: per request TTFT (first chunk carrying text),
     time of the last text chunk and of the end of the stream, usage completion / prompt
     / cached tokens, chunk count, error; per process its CPU seconds and chunk count.
     Times are seconds since t0 (each process maps t0 onto its own perf_counter once).
  3. `close()` (also on __exit__): a "stop" job to each process, join, then terminate
     any that did not exit. A run that passes its deadline terminates the processes and
     raises TimeoutError; the next `run` starts fresh ones.

Parsing: a chunk is JSON-decoded only when it carries a usage object (not the `"usage": null`
of every other chunk under include_usage, as OpenAI sends) or "error"; text chunks are
recognised by bytes (`"text":"` present, `"text":""` absent), so one process parses tens
of thousands of chunks per CPU-second (`python -m benchmarks.served_client` measures it
against a synthetic SSE server).
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable


# ---- inside a client process ------------------------------------------------------------

async def _one(session, url: str, body: bytes, timeout, rec: dict, clock: Callable[[], float]) -> None:
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=timeout) as r:
            if r.status != 200:
                rec["error"] = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].rstrip()
                if data == b"[DONE]":
                    break
                rec["chunks"] += 1
                if b'"usage":{' in data or b'"usage": {' in data or b'"error"' in data:   # not "usage":null
                    obj = json.loads(data)
                    if "error" in obj:
                        err = obj["error"]
                        rec["error"] = "SSE error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:200]
                        return
                    u = obj.get("usage")
                    if u:
                        rec["output_tokens"] = int(u.get("completion_tokens", 0))
                        rec["prompt_tokens"] = int(u.get("prompt_tokens", 0))
                        rec["cached_tokens"] = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                    if not any(c.get("text") for c in obj.get("choices") or ()):
                        continue
                elif b'"text":"' not in data or b'"text":""' in data:
                    continue
                t = clock()
                if rec["ttft_s"] is None:
                    rec["ttft_s"] = t
                rec["t_last_s"] = t
        rec["t_end_s"] = clock()
        if rec["output_tokens"] is None:
            rec["error"] = "stream ended without a usage chunk"
    except asyncio.TimeoutError:
        rec["error"] = "client timeout"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]


async def _run_job(job: dict, jobs: mp.Queue, results: mp.Queue, idx: int, parent: int) -> None:
    import aiohttp

    url, model, reqs, extra = job["url"], job["model"], job["requests"], job.get("extra") or {}
    bodies = [json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra},
                         separators=(",", ":")).encode() for _, prompt, max_tokens in reqs]
    recs = [{"i": i, "ttft_s": None, "t_last_s": None, "t_end_s": None, "output_tokens": None,
             "prompt_tokens": len(prompt), "cached_tokens": 0, "chunks": 0, "error": ""}
            for i, prompt, _ in reqs]
    timeout = aiohttp.ClientTimeout(total=job["timeout"], connect=30)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        results.put(json.dumps({"op": "ready", "proc": idx}))
        start = _next_job(jobs, parent)         # blocks the (idle) loop until the shared t0
        t0 = start["t0"]
        pc0 = time.perf_counter() + (t0 - time.time())
        clock = lambda: time.perf_counter() - pc0     # noqa: E731 - seconds since t0
        await asyncio.sleep(max(0.0, -clock()))
        cpu0 = time.process_time()
        tasks = [asyncio.ensure_future(_one(session, url, b, timeout, r, clock)) for b, r in zip(bodies, recs)]
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
            results.put(json.dumps({"op": "progress", "proc": idx, "done": len(tasks) - len(pending),
                                    "chunks": sum(r["chunks"] for r in recs)}))
        cpu = time.process_time() - cpu0
    results.put(json.dumps({"op": "result", "proc": idx, "results": recs, "cpu_s": cpu, "wall_s": clock(),
                            "chunks": sum(r["chunks"] for r in recs)}))


def _next_job(jobs: mp.Queue, parent: int) -> dict:
    """The next message; exits if the parent went away (killed) meanwhile."""
    while True:
        try:
            return json.loads(jobs.get(timeout=5))
        except queue.Empty:
            if os.getppid() != parent:
                raise SystemExit(1) from None


def _worker_main(idx: int, jobs: mp.Queue, results: mp.Queue, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C and stops us
    while True:
        job = _next_job(jobs, parent)
        if job["op"] == "stop":
            return
        try:
            asyncio.run(_run_job(job, jobs, results, idx, parent))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
            results.put(json.dumps({"op": "failed", "proc": idx, "error": f"{type(exc).__name__}: {exc}"}))


# ---- in the benchmark process -----------------------------------------------------------

class ClientPool:
    """n client processes; see the module docstring for the lifecycle."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.n)]
        self._procs = [ctx.Process(target=_worker_main, args=(i, self._jobs[i], self._results, os.getpid()), daemon=True,
                                   name=f"served-client-{i}") for i in range(self.n)]
        for p in self._procs:
            p.start()

    def _get(self, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("client processes did not finish before the deadline")
            try:
                return json.loads(self._results.get(timeout=min(left, 1.0)))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    raise RuntimeError("a client process died")

    def run(self, url: str, model: str, requests: list[tuple[list[int], int]], timeout: float,
            progress: Callable[[int, int], None] | None = None, extra: dict | None = None) -> dict:
        """requests: (prompt ids, max_tokens); extra: more fields for every request body (e.g. a
        guided_json). Returns {"results": one dict per request, in order, "procs": [{"cpu_s",
        "wall_s", "chunks", "requests"}]}."""
        if not self._procs:
            self._start()
        try:
            return self._run(url, model, requests, timeout, progress, extra)
        except BaseException:      # a deadline, a dead server (from progress), Ctrl-C: no stragglers
            self._kill()
            raise

    def _run(self, url, model, requests, timeout, progress, extra=None) -> dict:
        parts = [[(i, p, m) for i, (p, m) in enumerate(requests) if i % self.n == k] for k in range(self.n)]
        active = [k for k in range(self.n) if parts[k]]
        for k in active:
            self._jobs[k].put(json.dumps({"op": "run", "url": url, "model": model, "requests": parts[k],
                                          "timeout": timeout, "extra": extra or {}}))
        deadline = time.monotonic() + 120 + len(requests) / 100   # bodies encoded, sessions open
        ready: set[int] = set()
        while len(ready) < len(active):
            msg = self._get(deadline)
            if msg["op"] == "failed":
                raise RuntimeError(f"client process {msg['proc']}: {msg['error']}")
            ready.add(msg["proc"])
        t0 = time.time() + 0.25
        for k in active:
            self._jobs[k].put(json.dumps({"op": "start", "t0": t0}))
        deadline = time.monotonic() + timeout + 60
        done: dict[int, int] = {}
        out: dict[int, dict] = {}
        while len(out) < len(active):
            msg = self._get(deadline)
            if msg["op"] == "failed":
                raise RuntimeError(f"client process {msg['proc']}: {msg['error']}")
            if msg["op"] == "progress":
                done[msg["proc"]] = msg["done"]
                if progress:
                    progress(sum(done.values()), len(requests))
            elif msg["op"] == "result":
                out[msg["proc"]] = msg
        recs = sorted((r for m in out.values() for r in m["results"]), key=lambda r: r["i"])
        procs = [{"cpu_s": m["cpu_s"], "wall_s": m["wall_s"], "chunks": m["chunks"],
                  "requests": len(m["results"])} for _, m in sorted(out.items())]
        return {"results": recs, "procs": procs}

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(5)
        self._procs = []

    def close(self) -> None:
        for k, p in enumerate(self._procs):
            if p.is_alive():
                self._jobs[k].put(json.dumps({"op": "stop"}))
        for p in self._procs:
            p.join(5)
        self._kill()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- client capacity: one client process against a synthetic SSE server ------------------

def _fake_chunk(text: str, finish: str | None) -> bytes:
    ev = {"id": "cmpl-" + "0" * 32, "object": "text_completion", "created": 1700000000, "model": "bench",
          "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
          "usage": None}                              # as the router sends them with include_usage
    b = b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(b), b)


async def _fake_server(port: int, n_chunks: int, step_s: float) -> None:
    """HTTP/1.1 keep-alive SSE server answering every POST with n_chunks router-shaped text
    chunks, one per connection per "engine step" of step_s seconds (as a server streaming
    every request's token of each step does), then a usage chunk and [DONE]."""
    loop = asyncio.get_running_loop()
    state = {"step": loop.create_future()}

    async def ticker() -> None:
        while True:
            await asyncio.sleep(step_s)
            old, state["step"] = state["step"], loop.create_future()
            old.set_result(None)

    text = _fake_chunk(" <t12345>", None)
    last = _fake_chunk(" <t12345>", "length")
    usage = b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n_chunks,
                                     "prompt_tokens_details": {"cached_tokens": 0}}}).encode() + b"\n\n"
    tail = b"%x\r\n%s\r\n" % (len(usage), usage) + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            line = await r.readline()
            if not line:
                return
            length = 0
            while (h := await r.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            await r.readexactly(length)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(n_chunks - 1):
                w.write(text)
                await w.drain()
                await state["step"]
            w.write(last + tail)
            await w.drain()

    tick = asyncio.ensure_future(ticker())
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        await server.serve_forever()
    finally:
        tick.cancel()


def _serve_fake(port: int, n_chunks: int, step_s: float) -> None:
    asyncio.run(_fake_server(port, n_chunks, step_s))


def measure_capacity(step_ms: float = 10.0, requests: int = 256, chunks: int = 200) -> dict:
    """One client process (the pool's code path) against the synthetic server in another,
    which offers requests / step_ms chunks per second."""
    from tandem_cli.procs import free_port

    port = free_port()
    srv = mp.get_context("spawn").Process(target=_serve_fake, args=(port, chunks, step_ms / 1e3), daemon=True)
    srv.start()
    try:
        time.sleep(1.0)
        with ClientPool(1) as pool:
            res = pool.run(f"http://127.0.0.1:{port}/v1/completions", "bench", [([1000] * 8, chunks)] * requests, 120)
    finally:
        srv.terminate()
        srv.join(5)
    p = res["procs"][0]
    bad = [r["error"] for r in res["results"] if r["error"]]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    return {"step_ms": step_ms, "offered_chunks_per_s": requests / step_ms * 1e3, "chunks": p["chunks"], "wall_s": p["wall_s"], "cpu_s": p["cpu_s"],
            "chunks_per_s": p["chunks"] / p["wall_s"], "chunks_per_cpu_s": p["chunks"] / p["cpu_s"]}


if __name__ == "__main__":
    import sys

    for ms in (float(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "20,10,5,2.5").split(",")):
        c = measure_capacity(ms)
        print(f"step {ms} ms x 256 streams (offered {c['offered_chunks_per_s']:,.0f} chunks/s): one client process "
              f"took {c['chunks']} chunks in {c['wall_s']:.2f} s ({c['chunks_per_s']:,.0f}/s) using "
              f"{c['cpu_s']:.2f} s CPU ({c['chunks_per_cpu_s']:,.0f} chunks per CPU-second)", flush=True)
