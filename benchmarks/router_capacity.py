"""Router capacity: CPU seconds the real router process spends per streamed token.

    python -m benchmarks.router_capacity            # N=256 streams, OUT=200 tokens each
    N=256 OUT=400 STEP_S=0.004 SPY=1 python -m benchmarks.router_capacity   # + py-spy profile to /tmp/router.txt
    N=256 OUT=16 PROMPT_LEN=1024 python -m benchmarks.router_capacity      # ingest: the fake worker prints
                                                                           # how long a burst took to arrive

A stand-in decode worker (this file, `fake` mode) answers Decode.Stream with one
StreamBatch per STEP_S seconds carrying one token for every live request, as
the real decode worker does per engine step, so only the router's own path is
measured: `tandem router` (the command users run), N concurrent streaming
/v1/completions clients (httpx) with include_usage. Prints tok/s and router
CPU microseconds per token and per SSE chunk (psutil, user + system).
"""
import asyncio, json, os, subprocess, sys, time
from pathlib import Path
import grpc, httpx, psutil
from proto import tandem_pb2 as pb, tandem_pb2_grpc as pbg
from benchmarks.layouts import write_model_dir
from tandem_cli.procs import free_port, wait_http_ready

STEP_S = float(os.environ.get("STEP_S", "0.004"))
PROMPT_LEN = int(os.environ.get("PROMPT_LEN", "3"))   # 1024: W1/W2's prompts (ingest cost)

class Fake(pbg.DecodeServicer):
    async def Stream(self, it, ctx):
        live = {}
        q = asyncio.Queue()
        arrivals = []
        async def read():
            async for m in it:
                if m.WhichOneof("msg") == "generate":
                    arrivals.append(time.perf_counter())
                    live[m.generate.request_id] = [m.generate.sampling.max_tokens, len(m.generate.prompt_token_ids)]
                else:
                    live.pop(m.abort_request_id, None)
        r = asyncio.ensure_future(read())
        while True:
            await asyncio.sleep(STEP_S)
            if not live:
                if len(arrivals) > 1:   # a burst ended: how long the router took to forward it
                    print(f"fake worker: {len(arrivals)} requests arrived over "
                          f"{1e3 * (arrivals[-1] - arrivals[0]):.1f} ms", file=sys.stderr, flush=True)
                arrivals.clear()
                continue
            out = []
            for rid, st in list(live.items()):
                st[0] -= 1
                fin = pb.FINISH_LENGTH if st[0] <= 0 else pb.FINISH_NONE
                out.append(pb.GenerateResponse(request_id=rid, token_ids=[3 + st[0] % 200], finish_reason=fin, prompt_tokens=st[1]))
                if fin: del live[rid]
            yield pb.StreamBatch(responses=out)
    async def Stats(self, req, ctx):
        return pb.StatsResponse(role="decode", num_pages=100000, free_pages=100000, page_size=16)

async def fake_main(port):
    s = grpc.aio.server(); pbg.add_DecodeServicer_to_server(Fake(), s); s.add_insecure_port(f"127.0.0.1:{port}")
    await s.start(); await s.wait_for_termination()

async def client(url, n, out_len):
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n+10)) as c:
        async def one():
            body = {"model": "m", "prompt": [3 + i % 50 for i in range(PROMPT_LEN)], "max_tokens": out_len, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            toks = chunks = 0
            async with c.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        d = json.loads(line[6:])
                        if d.get("usage"): toks = d["usage"]["completion_tokens"]
            return toks, chunks
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one() for _ in range(n)))
        toks = sum(r[0] for r in res)
        if not toks:   # every request failed: say why instead of dividing by zero
            r = await c.post(url, json={"model": "m", "prompt": [3] * PROMPT_LEN, "max_tokens": 1})
            raise SystemExit(f"no tokens streamed; a plain request answers {r.status_code}: {r.text[:300]}")
        return time.perf_counter() - t0, toks, sum(r[1] for r in res)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fake":
        asyncio.run(fake_main(int(sys.argv[2]))); sys.exit()
    md = write_model_dir(Path("/tmp/capmodel"), tiny=True)
    gp, hp = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, __file__, "fake", str(gp)])
    router = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "router", "--model", str(md), "--served-model-name", "m",
                               "--decode", f"127.0.0.1:{gp}", "--port", str(hp), "--log-level", "warning"])
    try:
        wait_http_ready(f"http://127.0.0.1:{hp}/health", router, timeout=60)
        rp = psutil.Process(router.pid)
        n, out_len = int(os.environ.get("N", 256)), int(os.environ.get("OUT", 200))
        asyncio.run(client(f"http://127.0.0.1:{hp}/v1/completions", 8, 10))
        c0 = rp.cpu_times(); c0 = c0.user + c0.system
        spy = subprocess.Popen(["py-spy", "record", "-p", str(router.pid), "-o", "/tmp/router.txt", "-f", "raw", "-d", "4", "-r", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if os.environ.get("SPY") else None
        wall, toks, chunks = asyncio.run(client(f"http://127.0.0.1:{hp}/v1/completions", n, out_len))
        c1 = rp.cpu_times(); c1 = c1.user + c1.system
        print(f"N={n} out={out_len}: {toks} tokens in {wall:.2f}s = {toks/wall:.0f} tok/s; {chunks} chunks; router cpu {c1-c0:.2f}s = {1e6*(c1-c0)/toks:.1f} us/token, {1e6*(c1-c0)/chunks:.1f} us/chunk")
    finally:
        for p in (router, fake): p.terminate(); p.wait()
