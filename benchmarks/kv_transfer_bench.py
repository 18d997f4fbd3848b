"""KV transfer bandwidth between two processes, through the real transport backends.

    python -m benchmarks.kv_transfer_bench --backends grpc,nixl --recv-device cuda:0 --send-device cuda:1
    python -m benchmarks.kv_transfer_bench --tiny --recv-device cpu --send-device cpu     # CI / CPU

Lifecycle: this process owns a decode-side KV pool (Llama-3.1-8B shapes: 32 layers,
page 16, 8 KV heads, head dim 128, bf16; `--tiny` shrinks it) and the backend's
receiver on a gRPC server, exactly as a decode worker does. For each backend it
spawns a sender process (this file, `--role sender`) that holds random source pages
on `--send-device`. Per trial: the receiver opens a transfer of `--tokens` tokens
(pages drawn at random from the pool, or one consecutive run with
`--pages contiguous`), the sender ships every layer's K and V with
`send_layer` the way a prefill worker does, then `finish()`; the sender times start
-> DONE (the receiver's acknowledgement included). Every trial is verified: a
checksum of the pages that landed must equal the sender's checksum of its source.
Reports median GB/s (K+V payload bytes / seconds) per backend and size. The control
channel to the child is JSON lines on its stdin/stdout (a local pipe, not a network
path); the KV itself moves only through the backend under test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import torch

from engine.cluster_auth import TOKEN_ENV

FULL = dict(layers=32, page=16, kvh=8, hd=128)
TINY = dict(layers=4, page=16, kvh=2, hd=32)


def _checksum(tensors: list[torch.Tensor]) -> int:
    total = 0
    for t in tensors:
        total += int(t.contiguous().view(torch.int16).to(torch.int64).sum().item())
    return total


def _shape(args) -> dict:
    return TINY if args.tiny else FULL


# ----------------------------------------------------------------------------- sender process
async def _sender_main(args) -> None:
    from kvtransfer import Destination, get_backend

    sh = _shape(args)
    dev = torch.device(args.send_device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    sender = get_backend(args.backend).sender_cls(cluster_token=os.environ.get(TOKEN_ENV, ""))
    loop = asyncio.get_running_loop()
    cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        n = cmd["num_pages"]
        if n not in cache:
            g = torch.Generator().manual_seed(n)
            shape = (n, sh["page"], sh["kvh"], sh["hd"])
            cache[n] = [(torch.randn(shape, generator=g).to(torch.bfloat16).to(dev),
                         torch.randn(shape, generator=g).to(torch.bfloat16).to(dev)) for _ in range(sh["layers"])]
        src = cache[n]
        dst = Destination(cmd["address"], cmd["transfer_id"], n, sh["page"], args.backend,
                          bytes.fromhex(cmd["token"]))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        h = sender.start(dst)
        for layer, (k, v) in enumerate(src):
            h.send_layer(layer, k, v)
        h.finish()
        state = await h.wait(120)
        secs = time.perf_counter() - t0
        out = {"state": state.value, "error": h.error, "seconds": secs,
               "bytes": 2 * sum(k.numel() * k.element_size() for k, _ in src),
               "checksum": _checksum([t for kv in src for t in kv])}
        sys.stdout.write("@@" + json.dumps(out) + "\n")
        sys.stdout.flush()
    await sender.close()


# ----------------------------------------------------------------------------- receiver (this process)
async def _run_backend(args, backend: str) -> list[dict]:
    from engine.cluster_auth import new_token
    from engine.grpc_util import make_server
    from kvtransfer import TransferState, get_backend
    from tandem_cli.procs import free_port

    sh = _shape(args)
    dev = torch.device(args.recv_device)
    max_pages = -(-max(args.tokens) // sh["page"])
    pool_pages = max(4 * max_pages, 64)
    shape = (pool_pages, sh["page"], sh["kvh"], sh["hd"])
    k_pool = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(sh["layers"])]
    v_pool = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(sh["layers"])]
    port = free_port()
    address = f"127.0.0.1:{port}"
    receiver = get_backend(backend).receiver_cls(k_pool, v_pool, sh["page"], address)
    token = new_token()   # as the workers run: every call carries the cluster token (engine/cluster_auth.py)
    server = make_server(cluster_token=token)
    receiver.add_to_server(server)
    server.add_insecure_port(address)
    await server.start()
    cmd = [sys.executable, "-m", "benchmarks.kv_transfer_bench", "--role", "sender", "--backend", backend,
           "--send-device", args.send_device] + (["--tiny"] if args.tiny else [])
    child = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 env={**os.environ, TOKEN_ENV: token})
    rows = []
    gen = torch.Generator().manual_seed(0)
    try:
        for tokens in args.tokens:
            n = -(-tokens // sh["page"])
            secs = []
            for trial in range(args.warmup + args.trials):
                if args.pages == "random":
                    pages = torch.randperm(pool_pages, generator=gen)[:n].tolist()
                else:       # one run of consecutive pages, as a fresh decode allocator hands out
                    first = int(torch.randint(0, pool_pages - n + 1, (1,), generator=gen))
                    pages = list(range(first, first + n))
                tid = f"{backend}-{tokens}-{trial}"
                dst = receiver.open(tid, pages)
                child.stdin.write((json.dumps({"address": dst.address, "transfer_id": tid, "num_pages": n,
                                               "token": dst.token.hex()}) + "\n").encode())
                await child.stdin.drain()
                while True:
                    line = (await asyncio.wait_for(child.stdout.readline(), 180)).decode()
                    if not line:
                        raise RuntimeError(f"{backend} sender exited")
                    if line.startswith("@@"):
                        out = json.loads(line[2:])
                        break
                rstate = await receiver.wait(tid, 30)
                if out["state"] != "done" or rstate is not TransferState.DONE:
                    raise RuntimeError(f"{backend} transfer {tid}: sender {out['state']} ({out['error']}), "
                                       f"receiver {rstate.value} ({receiver.error(tid)})")
                idx = torch.tensor(pages, device=dev)
                got = _checksum([t for l in range(sh["layers"]) for t in (k_pool[l][idx], v_pool[l][idx])])
                if got != out["checksum"]:
                    raise RuntimeError(f"{backend} transfer {tid}: pages differ from the source")
                receiver.close(tid)
                if trial >= args.warmup:
                    secs.append(out["seconds"])
            med = statistics.median(secs)
            rows.append({"backend": backend, "pages_order": args.pages, "tokens": tokens, "pages": n, "bytes": out["bytes"],
                         "median_s": med, "gb_s": out["bytes"] / med / 1e9, "trials": len(secs)})
            print(f"{backend:5s} {args.pages:10s} {tokens:6d} tokens {out['bytes'] / 2**20:9.1f} MiB  "
                  f"median {med * 1e3:8.2f} ms  {rows[-1]['gb_s']:8.2f} GB/s", flush=True)
    finally:
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 30)
        except asyncio.TimeoutError:
            child.kill()
        if hasattr(receiver, "shutdown"):
            receiver.shutdown()
        await server.stop(0)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_transfer_bench")
    p.add_argument("--role", default="receiver", choices=["receiver", "sender"])
    p.add_argument("--backend", default="grpc", help="(sender role) the backend to use")
    p.add_argument("--backends", default="grpc,nixl")
    p.add_argument("--recv-device", default="cuda:0")
    p.add_argument("--send-device", default="cuda:0")
    p.add_argument("--tokens", default="1024,4096", help="tokens per transfer (comma list)")
    p.add_argument("--pages", default="random", choices=["random", "contiguous"],
                   help="receiver pages of a transfer: scattered at random, or one consecutive run")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="4 small layers (CPU / CI)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.role == "sender":
        asyncio.run(_sender_main(args))
        return []
    args.tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for backend in args.backends.split(","):
        rows += asyncio.run(_run_backend(args, backend))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recv_device": args.recv_device, "send_device": args.send_device,
                       "shape": _shape(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
