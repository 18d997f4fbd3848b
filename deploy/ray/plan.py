"""Flags of `python -m deploy.ray.launch` and the command lines of one run (pure: no Ray).

`build_launch_parser()` parses the launcher's flags; `make_plan(args, run_id, etcd, device)`
turns them into the `tandem` command line of every worker and of the router (without the
host and port, which each actor picks on its node) and checks each one with the `tandem` CLI's
own parser, so a bad flag is one line before anything starts; `head_etcd_argv` is the command
line of the single-member etcd the launcher runs on the head node when no --etcd is given.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
from dataclasses import dataclass

from tandem_cli.args import KV_TRANSFER_BACKENDS, OneLineParser, build_parser, positive_int

STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
SET_BY_LAUNCHER = ("--host", "--port", "--advertise-host", "--etcd", "--etcd-prefix", "--cluster-token-file",
                   "--model")


class UsageError(Exception):
    """A flag that cannot work (one line, exit code 2)."""


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_launch_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m deploy.ray.launch",
                      description="Tandem router + prefill + decode workers as the actors of one Ray job")
    p.add_argument("--prefill", type=positive_int, default=1, help="prefill workers")
    p.add_argument("--decode", type=positive_int, default=1, help="decode workers")
    p.add_argument("--model", required=True,
                   help="checkpoint directory readable at the same path on every node (or a hub id)")
    p.add_argument("--served-model-name", action="append", default=None)
    p.add_argument("--api-key", default=None, help="the router requires `Authorization: Bearer <key>`")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when workers get GPUs, else cpu")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--kv-transfer-backend", default="grpc", choices=KV_TRANSFER_BACKENDS)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--host", default="0.0.0.0", help="address the router binds on the head node")
    p.add_argument("--port", type=int, default=8000, help="the router's port (0: a free one)")
    p.add_argument("--etcd", default="", help="etcd endpoints host:port,... (default: start one on the head node)")
    p.add_argument("--etcd-prefix", default="", help="key prefix of this cluster (default: /tandem/ray-<run id>)")
    p.add_argument("--etcd-binary", default="etcd", help="the etcd program on the head node")
    p.add_argument("--gpus-per-worker", type=non_negative, default=None,
                   help="GPUs each worker reserves (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=non_negative, default=1.0)
    p.add_argument("--router-cpus", type=non_negative, default=1.0)
    p.add_argument("--placement-strategy", default="SPREAD", choices=STRATEGIES,
                   help="of the workers' placement group (SPREAD: prefill and decode on different nodes "
                        "where possible; PACK: as few nodes as possible)")
    for role in ("worker", "prefill", "decode", "router"):
        what = "prefill and decode" if role == "worker" else role
        p.add_argument(f"--{role}-args", default="", help=f"more flags for the {what} command line (one string)")
    p.add_argument("--cluster-token-file", default="",
                   help="the cluster's shared secret (default: a fresh one for this run)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds the whole start may take")
    p.add_argument("--stop-grace", type=float, default=1.5,
                   help="seconds each process gets after SIGTERM before SIGKILL")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the job's)")
    return p


@dataclass(frozen=True)
class Plan:
    """Who runs what. argv: after `python -m tandem_cli.main`, without --host/--port/
    --advertise-host (the actor's node and free port, known once it runs)."""
    run_id: str
    etcd_prefix: str
    workers: tuple[tuple[str, tuple[str, ...]], ...]   # (label "prefill-0", argv)
    router: tuple[str, ...]


def make_plan(args: argparse.Namespace, run_id: str, etcd: str, device: str) -> Plan:
    prefix = args.etcd_prefix or f"/tandem/ray-{run_id}"
    extra = {role: shlex.split(getattr(args, f"{role}_args")) for role in ("worker", "prefill", "decode", "router")}
    for role, flags in extra.items():
        taken = [f for f in flags if f.split("=")[0] in SET_BY_LAUNCHER]
        if taken:
            raise UsageError(f"--{role}-args {taken[0]}: the launcher sets it (use the launcher's own flag)")
    engine = ["--model", args.model, "--device", device, "--load-format", args.load_format, "--dtype", args.dtype,
              "--kv-transfer-backend", args.kv_transfer_backend, "--log-level", args.log_level,
              "--etcd", etcd, "--etcd-prefix", prefix]
    engine += ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    workers = tuple((f"{role}-{i}", tuple([role] + engine + extra["worker"] + extra[role]))
                    for role, count in (("decode", args.decode), ("prefill", args.prefill)) for i in range(count))
    router = ["router", "--model", args.model, "--log-level", args.log_level, "--etcd", etcd, "--etcd-prefix", prefix]
    for name in args.served_model_name or []:
        router += ["--served-model-name", name]
    router += ["--api-key", args.api_key] if args.api_key else []
    router += ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    plan = Plan(run_id, prefix, workers, tuple(router + extra["router"]))
    check_command_lines(plan)
    return plan


def check_command_lines(plan: Plan) -> None:
    """Each command line must parse with the `tandem` CLI's own parser; checked before anything
    starts (its one-line complaint becomes ours)."""
    parser = build_parser()
    for label, argv in [*plan.workers, ("router", plan.router)]:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                parser.parse_args([*argv, "--host", "127.0.0.1", "--port", "1"])
        except SystemExit:
            complaint = said.getvalue().strip().removeprefix("tandem: error: ")
            raise UsageError(f"the {label} command line: {complaint}") from None


def head_etcd_argv(binary: str, run_id: str, data_dir: str, ip: str, client_port: int, peer_port: int) -> list[str]:
    client, peer = f"http://{ip}:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [binary, "--name", f"tandem-{run_id}", "--data-dir", data_dir, "--listen-client-urls", client,
            "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"tandem-{run_id}={peer}", "--log-level", "warn"]
