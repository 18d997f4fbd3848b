"""All CLI parsing lives here; it produces the frozen config objects.

Flag names follow vLLM where the meaning is the same (--model,
--served-model-name, --host, --port, --api-key, --max-model-len,
--gpu-memory-utilization, --tensor-parallel-size, --load-format, --dtype,
--block-size, --max-num-seqs, --max-num-batched-tokens, --seed).
"""
from __future__ import annotations

import argparse

from engine.config import ATTENTION_BACKENDS, EngineConfig
from tandem_cli.checks import UsageError, default_device


class OneLineParser(argparse.ArgumentParser):
    """A parse error is one line on stderr and exit code 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=model_required, default=None,
                   help="local Hugging Face checkpoint directory, or a hub id (fetched when online)")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="auto and safetensors read the checkpoint's *.safetensors (the one weight format "
                        "Tandem reads); dummy = random weights from the model's config.json")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--block-size", type=positive_int, default=16, help="KV page size in tokens")
    g.add_argument("--num-gpu-blocks-override", "--num-pages", dest="num_pages", type=positive_int, default=None,
                   help="number of KV pages (default: sized from memory)")
    g.add_argument("--gpu-memory-utilization", type=unit_fraction, default=0.9,
                   help="a worker: the GPU holds at most this fraction of its memory once the worker is up "
                        "(alone on a GPU: the fraction it may use, as in vLLM; KV gets what weights, "
                        "profiled activations, CUDA graphs and transfer staging leave). serve: the budget "
                        "of the whole GPU, shared by its workers")
    g.add_argument("--kv-cache-memory", type=positive_int, default=256 << 20,
                   help="bytes of KV cache on CPU when --num-pages is not given")
    g.add_argument("--max-model-len", type=positive_int, default=None)
    g.add_argument("--max-num-seqs", type=positive_int, default=256,
                   help="most sequences in a decode batch (decode CUDA graphs cover 1..this)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    g.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                   help="auto: triton on cuda (Triton kernels, fused layer ops, decode CUDA graphs), "
                        "torch on cpu")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of cached prompt prefixes (radix cache)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="decode: queue each pass before the previous one's tokens are read, so the host "
                        "schedules while the device computes (off on a GPU shared by turns)")
    g.add_argument("--mixed-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="decode: a step with prompts to prefill runs the running seqs' decode tokens in the "
                        "same forward pass (both within --max-num-batched-tokens)")
    g.add_argument("--disable-cascade-attn", action="store_true",
                   help="decode (triton): no shared-prefix attention. By default, decode rows that begin "
                        "with the same cached prompt pages read those keys once for all of them instead of "
                        "once per sequence")
    g.add_argument("--sm-partition", type=open_fraction, default=None, metavar="FRACTION",
                   help="colocated: run prefill passes on a CUDA green-context partition of this share of "
                        "the SMs and decode passes on the rest, side by side (decode never waits behind a "
                        "prefill; no mixed batches). Experimental: on the H200 its float32 tokens equal one "
                        "stream's, but it ran at 0.80x tok/s with 10x the TTFT (benchmarks/RESULTS.md). "
                        "Default: one stream")
    g.add_argument("--sm-partition-adaptive", action="store_true",
                   help="move the --sm-partition share live from queue depth, TTFT and TPOT against "
                        "--slo-ttft / --slo-tpot-ms (engine/sm_split.py; exported as "
                        "tandem_prefill_lane_sm_fraction)")
    g.add_argument("--slo-ttft", type=float, default=1.0, metavar="SECONDS",
                   help="TTFT target of --sm-partition-adaptive (p90 per second)")
    g.add_argument("--slo-tpot-ms", type=float, default=50.0, metavar="MS",
                   help="TPOT target of --sm-partition-adaptive (p90 per second)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The resolved EngineConfig (device, attention backend) of `tandem serve|prefill|decode`."""
    if args.tensor_parallel_size != 1:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size}: only 1 is supported yet")
    device = args.device or default_device()
    try:
        return _engine_config(args, device)
    except ValueError as exc:   # a value EngineConfig refuses (e.g. --gpu-memory-utilization 0)
        raise UsageError(str(exc)) from None


def _engine_config(args: argparse.Namespace, device: str) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        # "auto" reads safetensors, the one weight format the engine reads: the same thing
        load_format="auto" if args.load_format == "safetensors" else args.load_format,
        dtype=args.dtype,
        device=device,
        page_size=args.block_size,
        num_pages=args.num_pages,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        async_scheduling=args.async_scheduling,
        mixed_batches=args.mixed_batches,
        disable_cascade_attn=args.disable_cascade_attn,
        sm_partition=getattr(args, "sm_partition", None),
        sm_partition_adaptive=getattr(args, "sm_partition_adaptive", False),
        slo_ttft_s=getattr(args, "slo_ttft", 1.0), slo_tpot_s=getattr(args, "slo_tpot_ms", 50.0) / 1e3,
        role=args.command if args.command in ("prefill", "decode") else "colocated",
        kv_transfer_backend=getattr(args, "kv_transfer_backend", "") or "",
    )


def router_config_from_args(args: argparse.Namespace, model_path: str, cluster_token: str = ""):
    """The RouterConfig of `tandem router` (model_path: --model resolved to a directory)."""
    from router.config import RouterConfig

    try:
        return RouterConfig(
            host=args.host, port=args.port, model_path=model_path,
            served_model_names=tuple(args.served_model_name or [args.model]),
            api_key=args.api_key, max_model_len=args.max_model_len,
            decode_addresses=tuple(a for a in args.decode.split(",") if a),
            prefill_addresses=tuple(a for a in args.prefill.split(",") if a),
            request_timeout_s=args.request_timeout,
            etcd_endpoints=tuple(a for a in args.etcd.split(",") if a),
            etcd_prefix=args.etcd_prefix, placement=args.placement,
            max_queued_per_worker=None if args.max_queued_requests < 0 else args.max_queued_requests,
            queue_timeout_s=args.queue_timeout, migration_limit=max(0, args.migration_limit),
            max_request_bytes=args.max_request_bytes, cluster_token=cluster_token,
            tool_call_parser=getattr(args, "tool_call_parser", None),
        ).resolved()
    except ValueError as exc:   # e.g. neither --decode nor --etcd
        raise UsageError(str(exc)) from None


def add_server_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])


def add_cluster_token_arg(p) -> None:
    p.add_argument("--cluster-token-file", default="",
                   help="file holding the cluster's shared secret: every gRPC call between Tandem processes "
                        "carries it and workers refuse calls without it (default: $TANDEM_CLUSTER_TOKEN; "
                        "neither: run open, with a warning; serve makes a fresh one per run)")


def add_cluster_args(p: argparse.ArgumentParser, worker: bool) -> None:
    g = p.add_argument_group("cluster")
    add_cluster_token_arg(g)
    g.add_argument("--etcd", default="", help="comma-separated etcd endpoints host:port (empty: static members)")
    g.add_argument("--etcd-prefix", default="/tandem", help="key prefix of this cluster in etcd")
    if worker:
        g.add_argument("--member-ttl", type=float, default=10.0, help="etcd lease TTL in seconds")
        g.add_argument("--metrics-port", type=int, default=None,
                       help="port of this worker's Prometheus /metrics (default: --port + 1000; 0 = off)")
        g.add_argument("--metrics-host", default=None,
                       help="address /metrics binds (default: --host), e.g. a monitoring network's")


KV_TRANSFER_BACKENDS = ("grpc", "nixl")


def add_kv_transfer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-transfer-backend", default="grpc", choices=KV_TRANSFER_BACKENDS,
                   help="KV transport between prefill and decode workers (both sides must match; "
                        "nixl needs the `nixl` package)")


def add_admission_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-request-bytes", type=int, default=8 << 20,
                   help="largest request body the router reads; larger ones get 413 at once")
    p.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json"),
                   help="how tool_choice 'auto' reads tool calls in the model's output (default: from the "
                        "chat template: <tool_call> = hermes, <|python_tag|> / ipython = llama3_json)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait on each decode worker beyond its running batch; when every "
                        "worker is that full the router answers 503 with Retry-After at once (-1: no limit)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for a decode worker with free KV pages before a 503")
    p.add_argument("--migration-limit", type=int, default=3,
                   help="times a stream may continue on another decode worker after its own died mid-stream "
                        "(its prompt and the tokens so far are prefilled again; 0 = end it with an error)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tandem", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run router + prefill + decode on this machine")
    add_engine_args(serve, model_required=False)
    add_server_args(serve, default_port=8000)
    serve.add_argument("--served-model-name", action="append", default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--colocated", action="store_true",
                       help="one worker does prefill and decode (no KV transfer)")
    serve.add_argument("--worker-base-port", type=int, default=0, help="0 = pick free ports")
    add_kv_transfer_arg(serve)

    serve.add_argument("--etcd", default="", help="use etcd membership (default: static member list)")
    serve.add_argument("--etcd-prefix", default="/tandem", help="key prefix of this cluster in etcd")
    serve.add_argument("--member-ttl", type=float, default=10.0, help="the workers' etcd lease TTL in seconds")
    serve.add_argument("--placement", default="cache_aware", choices=["round_robin", "least_load", "cache_aware"])
    add_cluster_token_arg(serve)
    add_admission_args(serve)
    serve.add_argument("--request-trace-file", default="",
                       help="the decode worker appends one JSON line per request timeline here")
    serve.add_argument("--step-trace-file", default="",
                       help="the decode worker appends one JSON line per engine step here")
    serve.add_argument("--gpu-turns", default="auto", choices=["auto", "on", "off"],
                       help="prefill and decode workers sharing a GPU take turns on it (auto: as --gpu-sharing "
                            "says; on = --gpu-sharing turns, off = no turns; see engine/gpu_turn.py)")
    serve.add_argument("--gpu-sharing", default="auto", choices=["auto", "mps", "turns", "none"],
                       help="how the prefill and decode workers share one GPU: mps = side by side under CUDA "
                            "MPS, each with its share of the SMs (--prefill-sm-fraction; serve runs the MPS "
                            "daemon, tandem_cli/mps.py); turns = one at a time (engine/gpu_turn.py); none = "
                            "the driver's time-slicing. auto: turns on a CUDA device (the measured default; mps is "
                            "opt-in until measured better), else none. When MPS is not "
                            "available serve says so and the workers take turns")
    serve.add_argument("--prefill-sm-fraction", type=open_fraction, default=0.6,
                       help="with MPS: the prefill worker's share of the GPU's SMs "
                            "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE); decode gets the rest")
    serve.add_argument("--serve-metrics-port", type=int, default=None,
                       help="port of serve's own /metrics (GPU sharing mode, MPS fallbacks, SM split; "
                            "default: --port + 1000; 0 = off)")

    router = sub.add_parser("router", help="run the OpenAI-compatible gateway")
    add_server_args(router, default_port=8000)
    router.add_argument("--model", required=True, help="checkpoint dir (for tokenizer and config)")
    router.add_argument("--served-model-name", action="append", default=None)
    router.add_argument("--api-key", default=None)
    router.add_argument("--max-model-len", type=int, default=None)
    router.add_argument("--decode", default="", help="comma-separated decode worker addresses (static members)")
    router.add_argument("--prefill", default="", help="comma-separated prefill worker addresses (empty: colocated)")
    router.add_argument("--request-timeout", type=float, default=600.0)
    add_admission_args(router)
    router.add_argument("--placement", default="cache_aware", choices=["round_robin", "least_load", "cache_aware"])
    add_cluster_args(router, worker=False)

    for role, port in (("prefill", 50061), ("decode", 50051)):
        w = sub.add_parser(role, help=f"run one {role} worker")
        add_engine_args(w)
        add_server_args(w, default_port=port)
        w.add_argument("--advertise-host", default=None, help="host other workers use to reach this one")
        if role == "decode":
            w.add_argument("--request-trace-file", default="",
                           help="append one JSON line per request with its timeline (stage times) here")
            w.add_argument("--step-trace-file", default="",
                           help="append one JSON line per engine step (passes' sizes, host and step ms) here")
        w.add_argument("--gpu-turn-file", default="",
                       help="a prefill and a decode worker sharing one GPU take turns on it through this lock "
                            "file (both get the same path; `tandem serve` sets it when P and D share a GPU)")
        add_kv_transfer_arg(w)
        add_cluster_args(w, worker=True)
    return parser
