"""`tandem serve`: router + prefill + decode as separate local processes.

Lifecycle:
  1. resolve the model (no --model: the built-in demo model, made once and cached);
  2. pick free loopback ports, start the decode and prefill workers (or one
     colocated worker) and wait until their gRPC servers answer Stats;
  3. start the router with the static member list and wait for /health;
     with --etcd HOST:PORT the workers register there instead and the router
     follows etcd (no static list); serve waits until /health lists them;
  4. print the URL; on Ctrl-C / SIGTERM, or when any child exits, stop every
     child (SIGTERM, then SIGKILL after a grace period).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tandem_cli.procs import free_port, stop_all, wait_grpc_ready, wait_http_ready, wait_members

DEMO_NOTE = ("NOTE: serving the built-in demo model. Its weights are random: it produces noise, "
             "not language. Pass --model DIR to serve a real checkpoint.")


def demo_model_dir() -> Path:
    from engine.tiny_models import make_tiny_model

    cache = Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))
    path = cache / "demo-llama-v1"
    if not (path / "config.json").exists():
        print(f"creating the demo model in {path} ...", flush=True)
        tmp = cache / f"demo-llama-v1.tmp{os.getpid()}"
        make_tiny_model(tmp, arch="llama", seed=0)
        tmp.rename(path)
    return path


def engine_flags(args: argparse.Namespace, model: str) -> list[str]:
    flags = ["--model", model, "--load-format", args.load_format, "--dtype", args.dtype,
             "--block-size", str(args.block_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
             "--kv-cache-memory", str(args.kv_cache_memory), "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--attention-backend", args.attention_backend, "--seed", str(args.seed),
             "--log-level", args.log_level] + (["--enforce-eager"] if args.enforce_eager else [])
    flags += [] if args.enable_prefix_caching else ["--no-enable-prefix-caching"]
    for name, value in (("--device", args.device), ("--num-pages", args.num_pages),
                        ("--max-model-len", args.max_model_len)):
        if value is not None:
            flags += [name, str(value)]
    return flags


def run_serve(args: argparse.Namespace) -> int:
    if args.tensor_parallel_size != 1:
        print("error: --tensor-parallel-size > 1 is not supported yet", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        print(DEMO_NOTE, flush=True)
        model = str(demo_model_dir())
    cli = [sys.executable, "-m", "tandem_cli.main"]
    procs: list[subprocess.Popen] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        decode_port = args.worker_base_port or free_port()
        decode_addr = f"127.0.0.1:{decode_port}"
        etcd = ["--etcd", args.etcd] if args.etcd else []
        # the KV transport matters only between separate prefill and decode workers
        kv = [] if args.colocated else ["--kv-transfer-backend", args.kv_transfer_backend]
        trace = ["--request-trace-file", args.request_trace_file] if args.request_trace_file else []
        procs.append(subprocess.Popen(cli + ["decode", "--port", str(decode_port)] + engine_flags(args, model)
                                      + kv + etcd + trace))
        prefill_addr = ""
        if not args.colocated:
            prefill_port = (args.worker_base_port + 1) if args.worker_base_port else free_port()
            prefill_addr = f"127.0.0.1:{prefill_port}"
            procs.append(subprocess.Popen(cli + ["prefill", "--port", str(prefill_port)] + engine_flags(args, model)
                                          + kv + etcd))
        wait_grpc_ready(decode_addr, procs[0], timeout=600)
        if prefill_addr:
            wait_grpc_ready(prefill_addr, procs[1], timeout=600)
        router_cmd = cli + ["router", "--model", model, "--host", args.host, "--port", str(args.port),
                            "--log-level", args.log_level]
        router_cmd += etcd or ["--decode", decode_addr, "--prefill", prefill_addr]
        for name in args.served_model_name or []:
            router_cmd += ["--served-model-name", name]
        if args.api_key:
            router_cmd += ["--api-key", args.api_key]
        if args.max_model_len:
            router_cmd += ["--max-model-len", str(args.max_model_len)]
        procs.append(subprocess.Popen(router_cmd))
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        wait_http_ready(f"http://{host}:{args.port}/health", procs[-1], timeout=120)
        if etcd:
            wait_members(f"http://{host}:{args.port}/health", 1 if args.colocated else 2, procs[-1], timeout=60)
        names = ", ".join(args.served_model_name or [model])
        print(f"Tandem is serving {names} at http://{host}:{args.port}/v1 "
              f"({'colocated' if args.colocated else '1 prefill + 1 decode'}); Ctrl-C stops it.", flush=True)
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"a child process exited (code {dead[0].returncode}); stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(procs)
