"""`tandem serve`: router + prefill + decode as separate local processes.

Lifecycle:
  1. resolve the model (no --model: the built-in demo model, made once and cached);
  2. cluster credentials: the token of --cluster-token-file or $TANDEM_CLUSTER_TOKEN if given,
     otherwise a fresh random one written 0600 into a private temporary directory (removed
     at exit); every process below gets --cluster-token-file (engine/cluster_auth.py);
  3. resolve the engine config once (device, attention backend "auto" -> triton on
     CUDA, torch on CPU) and pass it to every worker as explicit flags; pick free
     loopback ports and start the decode and prefill workers (or one colocated
     worker), printing progress. On CUDA they share the GPU by tandem_cli.gpu_share:
     --gpu-memory-utilization is the whole GPU's budget, decode starts first with 0.6
     of it and prefill, once decode is ready (KV allocated), gets the rest. On the
     CPU both start at once. Each is ready when its gRPC server answers.
     How P and D share the GPU's compute (--gpu-sharing, `gpu_sharing`): under CUDA MPS,
     side by side (the default on CUDA): before the workers, tandem_cli.mps starts the
     control daemon (or uses one already running) and each worker's environment gets
     its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (prefill 100 * --prefill-sm-fraction, decode the
     rest), no GPU turns; when MPS is not available serve says so in one line, counts it
     (tandem_gpu_sharing_fallbacks_total on serve's own /metrics, --serve-metrics-port)
     and the workers take turns (engine/gpu_turn.py) instead;
  4. start the router with the static member list and wait for /health;
     with --etcd HOST:PORT the workers register there instead and the router
     follows etcd (no static list); serve waits until /health lists them;
  5. print the URL; on Ctrl-C / SIGTERM, or when any child exits, stop every
     child (SIGTERM, then SIGKILL after a grace period), then quit the MPS daemon if serve
     started it (a SIGKILLed serve cannot: the next one stops the daemon it left).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.cluster_auth import TOKEN_ENV, ClusterTokenError, new_token, resolve_token, write_token_file
from engine.config import EngineConfig
from tandem_cli.args import engine_config_from_args
from engine.sm_split import thread_percentages
from tandem_cli.checks import UsageError, check_port_range, check_serve, free_worker_port
from tandem_cli.gpu_share import plan_starts, waves
from tandem_cli.mps import MpsDaemon, MpsUnavailable, SharingMetrics, check_clients, start_mps
from tandem_cli.procs import Interrupted, stop_all, wait_grpc_ready, wait_http_ready, wait_members

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


def engine_flags(config: EngineConfig, args: argparse.Namespace, model: str,
                 gpu_memory_utilization: float) -> list[str]:
    """Worker flags from serve's resolved EngineConfig (device and attention backend are
    explicit, never left for each worker to guess)."""
    flags = ["--model", model, "--load-format", config.load_format, "--dtype", config.dtype,
             "--device", config.device, "--block-size", str(config.page_size),
             "--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}",
             "--kv-cache-memory", str(config.kv_cache_memory_bytes), "--max-num-seqs", str(config.max_num_seqs),
             "--max-num-batched-tokens", str(config.max_num_batched_tokens),
             "--attention-backend", config.attention_backend, "--seed", str(config.seed),
             "--log-level", args.log_level] + (["--enforce-eager"] if config.enforce_eager else [])
    flags += [] if config.enable_prefix_caching else ["--no-enable-prefix-caching"]
    flags += [] if config.async_scheduling else ["--no-async-scheduling"]
    flags += [] if config.mixed_batches else ["--no-mixed-batches"]
    flags += ["--disable-cascade-attn"] if config.disable_cascade_attn else []
    flags += [] if config.sm_partition is None else ["--sm-partition", str(config.sm_partition)]
    if config.sm_partition_adaptive:
        flags += ["--sm-partition-adaptive", "--slo-ttft", str(config.slo_ttft_s),
                  "--slo-tpot-ms", str(1e3 * config.slo_tpot_s)]
    for name, value in (("--num-pages", config.num_pages), ("--max-model-len", config.max_model_len)):
        if value is not None:
            flags += [name, str(value)]
    return flags


@dataclass(frozen=True)
class WorkerLaunch:
    role: str                       # "decode" | "prefill" (the tandem_cli subcommand)
    address: str                    # host:port of its gRPC server
    argv: tuple[str, ...]           # arguments after `python -m tandem_cli.main`
    wave: int                       # starts once every worker of earlier waves is ready
    gpu_memory_utilization: float   # its --gpu-memory-utilization (cumulative share, gpu_share)
    on_gpu: bool
    env: tuple[tuple[str, str], ...] = ()   # added to its environment (MPS client settings)
    sm_percentage: int = 0          # its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (0: not under MPS)


def gpu_sharing(args: argparse.Namespace, device: str) -> str:
    """How serve's prefill and decode workers share their GPU, before MPS is tried: "mps",
    "turns" or "none" (colocated: "none"). --gpu-turns on/off are the older spellings of
    turns/none; a contradiction of the two flags is a UsageError."""
    if args.colocated:
        return "none"
    sharing, turns = getattr(args, "gpu_sharing", "auto"), getattr(args, "gpu_turns", "auto")
    if turns != "auto" and sharing not in ("auto", "turns" if turns == "on" else "none"):
        raise UsageError(f"--gpu-turns {turns} contradicts --gpu-sharing {sharing}; give one of them")
    if turns != "auto":
        return "turns" if turns == "on" else "none"
    if sharing == "auto":
        # turns until MPS is measured to serve better on the H200 (issue 15): MPS is opt-in
        return "turns" if device == "cuda" else "none"
    return sharing


def plan_workers(config: EngineConfig, args: argparse.Namespace, model: str,
                 ports: tuple[int, int], cluster_token_file: str = "",
                 mps: MpsDaemon | None = None) -> list[WorkerLaunch]:
    """The workers of `tandem serve` (config: `engine_config_from_args(args)`), in start
    order: one colocated decode worker, or decode + prefill sharing the GPU by
    tandem_cli.gpu_share's rule (on CUDA decode first with its share of
    --gpu-memory-utilization, prefill once decode is ready). cluster_token_file: passed to each.
    mps: the running MPS daemon when `gpu_sharing` is "mps" (None there: MPS is not
    available, and the workers take turns)."""
    roles = [("decode", "decode", "")] + ([] if args.colocated else [("prefill", "prefill", "")])
    starts = plan_starts(roles, config.gpu_memory_utilization, sequential=config.device == "cuda")
    etcd = ["--etcd", args.etcd, "--etcd-prefix", args.etcd_prefix, "--member-ttl", str(args.member_ttl)] \
        if args.etcd else []
    # the KV transport matters only between separate prefill and decode workers
    kv = [] if args.colocated else ["--kv-transfer-backend", args.kv_transfer_backend]
    port = {"decode": ports[0], "prefill": ports[1]}
    auth = ["--cluster-token-file", cluster_token_file] if cluster_token_file else []
    role_flags = {"decode": [], "prefill": []}
    for flag, value in (("--request-trace-file", getattr(args, "request_trace_file", "")),
                        ("--step-trace-file", getattr(args, "step_trace_file", ""))):
        if value:
            role_flags["decode"] += [flag, value]
    sharing = gpu_sharing(args, config.device)
    if sharing == "mps" and mps is None:
        sharing = "turns"
    if sharing == "turns":
        lock = os.path.join(tempfile.gettempdir(), f"tandem-gpu-turn-{ports[0]}.lock")
        for role in role_flags:
            role_flags[role] += ["--gpu-turn-file", lock]
    share = dict(zip(("prefill", "decode"), thread_percentages(args.prefill_sm_fraction))) \
        if sharing == "mps" else {}
    return [WorkerLaunch(s.role, f"127.0.0.1:{port[s.role]}",
                         tuple([s.role, "--port", str(port[s.role])]
                               + engine_flags(config, args, model, s.gpu_memory_utilization) + kv + etcd + auth
                               + role_flags[s.role]),
                         s.wave, s.gpu_memory_utilization, config.device == "cuda",
                         tuple(sorted(mps.client_env(share[s.role]).items())) if share else (),
                         share.get(s.role, 0)) for s in starts]


def router_argv(args: argparse.Namespace, model: str, decode_addr: str, prefill_addr: str,
                token_file: str = "") -> list[str]:
    """The router's arguments after `python -m tandem_cli.main` (model: the resolved directory)."""
    argv = ["router", "--model", model, "--host", args.host, "--port", str(args.port), "--log-level", args.log_level]
    if args.etcd:
        argv += ["--etcd", args.etcd, "--etcd-prefix", args.etcd_prefix]
    else:
        argv += ["--decode", decode_addr, "--prefill", prefill_addr]
    argv += ["--cluster-token-file", token_file] if token_file else []
    # clients name the model as the user did (a hub id, a path), not by the resolved directory
    for name in args.served_model_name or ([args.model] if args.model else []):
        argv += ["--served-model-name", name]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if getattr(args, "tool_call_parser", None):
        argv += ["--tool-call-parser", args.tool_call_parser]
    argv += ["--max-request-bytes", str(args.max_request_bytes),
             "--max-queued-requests", str(args.max_queued_requests), "--queue-timeout", str(args.queue_timeout),
             "--placement", args.placement, "--migration-limit", str(args.migration_limit)]
    return argv


def _start_workers(cli: list[str], plan: list[WorkerLaunch], procs: list[subprocess.Popen],
                   stop=lambda: False) -> None:
    """Start the plan wave by wave, printing progress; a wave waits for the previous one.
    stop(): polled while waiting; True raises procs.Interrupted."""
    for wave in waves(plan):
        started = []
        for w in wave:
            notes = ([f"the GPU stays within {w.gpu_memory_utilization:.0%} of its memory once it is up"]
                     if w.on_gpu else []) + ([f"{w.sm_percentage}% of the SMs under MPS"] if w.sm_percentage else [])
            if stop():
                raise Interrupted
            print(f"starting the {w.role} worker on {w.address}"
                  f"{' (' + '; '.join(notes) + ')' if notes else ''} ...", flush=True)
            procs.append(subprocess.Popen(cli + list(w.argv), env={**os.environ, **dict(w.env)} if w.env else None))
            started.append((w, procs[-1], time.monotonic()))
        for w, proc, t0 in started:
            deadline = t0 + 600
            while True:
                try:
                    wait_grpc_ready(w.address, proc, timeout=min(30.0, max(0.1, deadline - time.monotonic())),
                                    stop=stop)
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"the {w.role} worker was not ready after 600 s") from None
                    print(f"  still starting the {w.role} worker ({time.monotonic() - t0:.0f} s: loading weights, "
                          "profiling memory, capturing CUDA graphs)", flush=True)
            print(f"{w.role} worker ready ({time.monotonic() - t0:.1f} s)", flush=True)


def run_serve(args: argparse.Namespace) -> int:
    """The exit code: 0 stopped by a signal once serving, 128 + the signal's number when one
    came during start-up (Ctrl-C: 130), 1 a child failed. A user error raises
    checks.UsageError before anything starts (main prints it: one line, exit code 2)."""
    model = check_serve(args)   # ports, device, model directory, flag combinations
    config = engine_config_from_args(args)
    sharing = gpu_sharing(args, config.device)
    metrics_port = args.port + 1000 if args.serve_metrics_port is None else args.serve_metrics_port
    check_port_range("--serve-metrics-port" + (" (default: --port + 1000)" if args.serve_metrics_port is None else ""),
                     metrics_port, allow_zero=True)
    decode_port = args.worker_base_port or free_worker_port({args.port, metrics_port})
    prefill_port = (args.worker_base_port + 1) if args.worker_base_port else \
        free_worker_port({args.port, metrics_port, decode_port})
    if model is None:
        print(DEMO_NOTE, flush=True)
        model = str(demo_model_dir())
    try:
        token_file, token_dir = _cluster_token_file(args)
    except ClusterTokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cli = [sys.executable, "-m", "tandem_cli.main"]
    procs: list[subprocess.Popen] = []
    stopping = 0   # the signal that asks us to stop (0: none yet)
    mps: MpsDaemon | None = None
    sharing_metrics, metrics_server = SharingMetrics(), None

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = stopping or signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if sharing == "mps":
            try:
                mps = start_mps(say=lambda line: print(line, flush=True))
            except MpsUnavailable as exc:
                print(f"MPS is not available ({exc}); falling back to GPU turns: the prefill and decode "
                      "workers take turns on the GPU", file=sys.stderr, flush=True)
                sharing_metrics.fallbacks.labels(exc.reason).inc()
                sharing = "turns"
        if mps is not None and not args.colocated:
            bad = check_clients(mps, thread_percentages(args.prefill_sm_fraction), config.device,
                                say=lambda line: print(line, flush=True))
            if bad:
                print(f"MPS computes wrong matrix products on this GPU ({bad}); falling back to GPU turns: "
                      "the prefill and decode workers take turns on the GPU", file=sys.stderr, flush=True)
                sharing_metrics.fallbacks.labels("wrong_results").inc()
                print(mps.stop(), flush=True)
                mps, sharing = None, "turns"
        if not args.colocated:
            sharing_metrics.set_mode(sharing, args.prefill_sm_fraction if sharing == "mps" else None)
            if sharing == "mps":
                p, d = thread_percentages(args.prefill_sm_fraction)
                print(f"GPU sharing: CUDA MPS, prefill {p}% of the SMs, decode {d}%, side by side", flush=True)
        else:
            sharing_metrics.set_mode("none")
        if metrics_port:
            metrics_server = _serve_metrics(sharing_metrics, args.host, metrics_port)
        plan = plan_workers(config, args, model, (decode_port, prefill_port), token_file, mps)
        print(f"device {config.device}, attention backend {config.attention_backend} "
              f"({config.attention_backend_reason}), CUDA graphs "
              f"{'on' if config.uses_cuda_graphs else 'off'}", flush=True)
        signalled = lambda: bool(stopping)  # noqa: E731
        _start_workers(cli, plan, procs, signalled)
        decode_addr = next(w.address for w in plan if w.role == "decode")
        prefill_addr = next((w.address for w in plan if w.role == "prefill"), "")
        if stopping:
            raise Interrupted
        procs.append(subprocess.Popen(cli + router_argv(args, model, decode_addr, prefill_addr, token_file)))
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        wait_http_ready(f"http://{host}:{args.port}/health", procs[-1], timeout=120, stop=signalled)
        if args.etcd:
            wait_members(f"http://{host}:{args.port}/health", 1 if args.colocated else 2, procs[-1], timeout=60,
                         stop=signalled)
        names = ", ".join(args.served_model_name or [args.model or model])
        print(f"Tandem is serving {names} at http://{host}:{args.port}/v1 "
              f"({'colocated' if args.colocated else '1 prefill + 1 decode'}); Ctrl-C stops it.", flush=True)
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"a child process exited (code {dead[0].returncode}); stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except Interrupted:   # Ctrl-C (or SIGTERM) while starting: stop the children, say so once
        print(f"interrupted while starting ({signal.Signals(stopping).name}); stopping {len(procs)} "
              f"child process{'es' if len(procs) != 1 else ''}", file=sys.stderr, flush=True)
        return 128 + stopping
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(procs)
        if mps is not None:   # after its clients: `quit` waits for them
            print(mps.stop(), flush=True)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if token_dir:
            shutil.rmtree(token_dir, ignore_errors=True)


def _serve_metrics(metrics: SharingMetrics, host: str, port: int):
    """serve's own /metrics from a daemon thread (the HTTP server, to shut down), or None when
    the port cannot be bound: said on stderr, serving goes on without it."""
    from prometheus_client import start_http_server

    try:
        httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        print(f"warning: cannot serve serve's /metrics on {host}:{port} ({exc}); going on without it",
              file=sys.stderr, flush=True)
        return None
    return httpd


def _cluster_token_file(args: argparse.Namespace) -> tuple[str, str]:
    """(the --cluster-token-file every child gets, the directory to remove at exit): the user's
    file (checked now, before any process starts), nothing when $TANDEM_CLUSTER_TOKEN is set
    (the children inherit it), else a fresh token in a new private directory."""
    if args.cluster_token_file or os.environ.get(TOKEN_ENV):
        resolve_token(args.cluster_token_file)
        return args.cluster_token_file, ""
    directory = tempfile.mkdtemp(prefix="tandem-serve-")   # 0700
    return write_token_file(directory, new_token()), directory
