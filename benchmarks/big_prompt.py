"""A huge prompt costs only its own request (issue 11): a small completion's latency while 5 MB
prompts are being rejected, against its latency alone, through `tandem serve --colocated`.

Starts `tandem serve --colocated` (a tiny random llama on the CPU, default flags: the 8 MiB
--max-request-bytes admits a 5 MB body), then:
  1. unloaded: --rounds small completions (text prompt, non-streaming, 8 tokens), one at a
     time: their median latency;
  2. loaded: --rounds times, a 5 MB text prompt (completions, then chat, alternating) and a
     small completion sent together on pre-opened connections (bodies serialized ahead, so
     the timer measures the server): the small one's latency and the big one's status and
     time to answer.
Prints JSON: unloaded median, loaded median and max, their difference (the bar: <= 100 ms),
and the big prompts' statuses (every one a 400 context_length_exceeded).

    python -m benchmarks.big_prompt [--rounds 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.overload import _connect, serving
from tandem_cli.procs import free_port


async def _send(conn) -> tuple[int, float, bytes]:
    reader, writer, req = conn
    t0 = time.perf_counter()
    writer.write(req)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    rest = await reader.read()             # Connection: close
    writer.close()
    return status, time.perf_counter() - t0, rest


async def _conn(port: int, path: str, body: dict):
    reader, writer, req = await _connect(port, body)
    return reader, writer, req.replace(b"POST /v1/completions ", f"POST {path} ".encode(), 1)


async def _round(port: int, big: tuple[str, dict] | None, small: dict) -> dict:
    conns = [await _conn(port, "/v1/completions", small)]
    if big is not None:
        conns.insert(0, await _conn(port, *big))
    res = await asyncio.gather(*(_send(c) for c in conns))
    out = {"small_status": res[-1][0], "small_s": res[-1][1], "small_body": res[-1][2][-300:].decode("utf-8", "replace")}
    if big is not None:
        out.update(big_status=res[0][0], big_s=res[0][1], big_code=json.loads(res[0][2].split(b"\r\n\r\n", 1)[1]
                                                                              or b"{}").get("error", {}).get("code"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--mb", type=float, default=5.0, help="size of the big prompt")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from engine.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="tandem-bigprompt-"))
    model = make_tiny_model(tmp / "llama", arch="llama", seed=4)
    port = free_port()
    serve = ["--model", str(model), "--device", "cpu", "--colocated", "--served-model-name", "tiny",
             "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    huge = "hello world " * int(args.mb * 1e6 / 12)
    small = {"model": "tiny", "prompt": "hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    bigs = [("/v1/completions", {"model": "tiny", "prompt": huge, "max_tokens": 8}),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": huge}]})]
    try:
        with serving(serve, port, tmp / "serve.log"):
            for _ in range(3):                                        # warm-up
                httpx.post(f"{base}/v1/completions", json=small, timeout=60)
            alone = [asyncio.run(_round(port, None, small)) for _ in range(args.rounds)]
            loaded = [asyncio.run(_round(port, bigs[i % 2], small)) for i in range(args.rounds)]
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    base_s = statistics.median(r["small_s"] for r in alone)
    res = {
        "device": "cpu", "cpus": os.cpu_count(), "command": " ".join(sys.argv), "big_prompt_mb": args.mb,
        "rounds": args.rounds, "small_alone_s_median": base_s,
        "small_loaded_s_median": statistics.median(r["small_s"] for r in loaded),
        "small_loaded_s_max": max(r["small_s"] for r in loaded),
        "small_ok": sum(r["small_status"] == 200 for r in alone + loaded),
        "small_errors": sorted({r["small_body"] for r in alone + loaded if r["small_status"] != 200})[:3],
        "big_statuses": sorted({(r["big_status"], r["big_code"]) for r in loaded}),
        "big_answer_s_median": statistics.median(r["big_s"] for r in loaded),
    }
    res["added_s_median"] = res["small_loaded_s_median"] - base_s
    res["added_s_max"] = res["small_loaded_s_max"] - base_s
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["small_ok"] == 2 * args.rounds else 1


if __name__ == "__main__":
    raise SystemExit(main())
