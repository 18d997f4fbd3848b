"""Entry point of the `tandem` command."""
from __future__ import annotations

import asyncio
import logging
import os
import sys

from engine.errors import EngineStartupError
from tandem_cli.args import build_parser, engine_config_from_args, router_config_from_args
from tandem_cli.checks import UsageError, check_router, check_worker


def main(argv: list[str] | None = None) -> None:
    """User errors (tandem_cli/checks.py) are one line and exit code 2; Ctrl-C before a command
    is up (each one stops cleanly by itself once serving) exits 130 without a traceback."""
    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalization. Whatever had to be shut down is (servers
    stopped, etcd lease revoked, trace files line-buffered); finalization would only wait for a
    thread still loading the model (Ctrl-C during start-up) and add triton's nanobind "leaked
    instances" report, ~30 lines on stderr after every clean stop."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s {args.command} %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from tandem_cli.serve import run_serve

        sys.exit(run_serve(args))
    cluster_token = cluster_token_from_args(args)
    if args.command == "router":
        config = router_config_from_args(args, check_router(args), cluster_token)
        from router.process import run_router

        run_router(config)
        return
    try:
        run_worker(args, cluster_token)
    except EngineStartupError as exc:  # one clear line, no traceback (engine/errors.py)
        print(f"error: {args.command} worker cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def cluster_token_from_args(args) -> str:
    """--cluster-token-file, else $TANDEM_CLUSTER_TOKEN, else "" (engine/cluster_auth.py); a file
    that cannot be used is one line and exit code 2."""
    from engine.cluster_auth import ClusterTokenError, resolve_token

    try:
        return resolve_token(args.cluster_token_file)
    except ClusterTokenError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_worker(args, cluster_token: str = "") -> None:
    args.model = check_worker(args)   # the local directory (a hub id is fetched here)
    config = engine_config_from_args(args)
    advertise_host = args.advertise_host or args.host
    advertise = f"{advertise_host}:{args.port}"
    registry_config = None
    if args.etcd:
        from membership.registry import RegistryConfig

        registry_config = RegistryConfig(endpoints=tuple(a for a in args.etcd.split(",") if a),
                                         prefix=args.etcd_prefix, ttl_s=args.member_ttl)
    from engine.metrics import metrics_port_for

    metrics_port = metrics_port_for(args.port, args.metrics_port)
    metrics_host = args.metrics_host or args.host
    # what others scrape: the advertised host unless /metrics binds one specific address of its own
    shown = metrics_host if args.metrics_host and args.metrics_host not in ("0.0.0.0", "::") else advertise_host
    metrics_address = f"{shown}:{metrics_port}" if metrics_port else ""
    if args.command == "decode":
        from decode_worker.main import serve_decode

        asyncio.run(serve_decode(config, args.host, args.port, advertise,
                                 kv_backend=args.kv_transfer_backend,
                                 registry_config=registry_config, metrics_address=metrics_address,
                                 trace_file=args.request_trace_file, gpu_turn_file=args.gpu_turn_file,
                                 step_trace_file=args.step_trace_file, cluster_token=cluster_token,
                                 metrics_host=metrics_host))
    elif args.command == "prefill":
        from prefill_worker.main import serve_prefill

        asyncio.run(serve_prefill(config, args.host, args.port, advertise=advertise,
                                  kv_backend=args.kv_transfer_backend,
                                  registry_config=registry_config, metrics_address=metrics_address,
                                  gpu_turn_file=args.gpu_turn_file, cluster_token=cluster_token,
                                  metrics_host=metrics_host))


if __name__ == "__main__":
    main()
