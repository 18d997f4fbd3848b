"""Checks of a `tandem` command's flags before anything starts.

A user error must cost a second and one line, not a worker start-up and its
tracebacks. `tandem_cli.main` runs these right after parsing, before it starts a
process or imports torch/transformers (where a check can avoid them); each one
raises `UsageError(one line)`, which main prints as `error: ...` and exits 2.

  - ports: in range and free on their host (a trial bind with SO_REUSEADDR, so a
    port in TIME_WAIT passes as it will for uvicorn and gRPC); a worker's metrics
    port is only range-checked (one in use is logged, not fatal: engine/metrics.py);
  - device: `--device cuda` needs a torch built with CUDA (read from
    torch/version.py, no torch import) and a visible device
    (`torch.cuda.is_available()`, imported only on a CUDA build);
  - model: a local directory with a config.json we can parse (plus weights unless
    `--load-format dummy`, plus a tokenizer where the router needs one), or a hub
    id, fetched now (`engine.weights.resolve_model_path`); one that cannot be
    fetched (offline, unknown id) is one line;
  - flag combinations: a KV transport that is not installed, an etcd endpoint
    that is not host:port.
"""
from __future__ import annotations

import ast
import errno
import importlib.util
import json
import re
import socket
from pathlib import Path


class UsageError(Exception):
    """A flag's value cannot work; the message is one line saying which and why."""


# ---- ports -------------------------------------------------------------------------


def check_port_range(flag: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise UsageError(f"{flag} {port} is out of range ({low}-65535)")


def check_port_free(flag: str, host: str, port: int) -> None:
    """Raise unless `host:port` can be bound now (port in range first)."""
    check_port_range(flag, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"{flag} {port}: {host}:{port} is already in use") from None
            raise UsageError(f"{flag} {port}: cannot bind {host}:{port} ({exc.strerror or exc})") from None


def free_worker_port(taken: set[int]) -> int:
    """A free loopback port whose metrics port (+1000) is free too, not in `taken`."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in taken or port + 1000 in taken or port + 1000 > 65535:
            continue
        try:
            check_port_free("metrics port", "127.0.0.1", port + 1000)
        except UsageError:
            continue
        return port
    raise UsageError("no free loopback port pair (port, port + 1000) for a worker")


# ---- device ------------------------------------------------------------------------


def torch_build() -> tuple[str, bool]:
    """(torch version, whether it was built with CUDA or ROCm), read from torch/version.py
    without importing torch (which takes seconds); ("", False) when torch is missing."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return "", False
    values: dict[str, object] = {}
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError):
        return "?", True   # unknown layout: let torch itself answer
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return str(values.get("__version__", "?")), bool(values.get("cuda") or values.get("hip"))


def check_cuda() -> None:
    version, built = torch_build()
    if not version:
        raise UsageError("--device cuda: torch is not installed")
    if not built:
        raise UsageError(f"--device cuda: this torch ({version}) is built without CUDA; use --device cpu")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")


def default_device() -> str:
    """cuda when a device is visible, else cpu (a CPU-only torch build answers without an import)."""
    if not torch_build()[1]:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- model -------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]*[A-Za-z0-9_])?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_model_dir(path: Path, flag_value: str, weights: bool, tokenizer: bool) -> None:
    """Raise unless `path` is a model directory we can serve."""
    from engine.config import ModelConfig   # json parsing only, no torch

    if not path.is_dir():
        raise UsageError(f"--model {flag_value}: not a directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {flag_value}: not a model directory (no config.json in {path})")
    try:
        ModelConfig.from_dir(path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UsageError(f"--model {flag_value}: cannot use {path / 'config.json'}: {_one_line(what)}") from None
    if weights and not any(path.glob("*.safetensors")):
        raise UsageError(f"--model {flag_value}: no *.safetensors weights in {path} "
                         "(--load-format dummy gives random weights from config.json)")
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(f"--model {flag_value}: no tokenizer in {path} (none of {', '.join(_TOKENIZER_FILES)})")


def resolve_model(model: str, weights: bool, tokenizer: bool) -> str:
    """The local directory to serve for `--model` (a hub id is fetched now), or UsageError."""
    path = Path(model).expanduser()
    if not path.exists():
        if not _HUB_ID.match(model) or ".." in model:
            raise UsageError(f"--model {model}: no such directory")
        from engine.weights import resolve_model_path   # imports torch: only for hub ids

        try:
            path = resolve_model_path(model, weights=weights)
        except FileNotFoundError as exc:
            raise UsageError(f"--model {model}: no such directory, and not fetchable as a hub id here "
                             f"({_one_line(str(exc.__cause__ or exc), 200)})") from None
    check_model_dir(path, model, weights=weights, tokenizer=tokenizer)
    return str(path)


# ---- flag combinations -------------------------------------------------------------


def check_kv_transfer(backend: str) -> None:
    if backend == "nixl" and importlib.util.find_spec("nixl") is None:
        raise UsageError("--kv-transfer-backend nixl: the `nixl` package is not installed (use grpc)")


def check_etcd(endpoints: str) -> None:
    for ep in (a for a in endpoints.split(",") if a):
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--etcd {endpoints}: {ep!r} is not host:port")
        check_port_range("--etcd port", int(port))


# ---- per command (args: the parsed namespace of tandem_cli.args.build_parser) ------


def check_serve(args) -> str | None:
    """`tandem serve`: raise UsageError, or the model directory to serve (None: the demo model)."""
    if args.tensor_parallel_size != 1:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size}: only 1 is supported yet")
    check_port_free("--port", args.host, args.port)
    if args.worker_base_port:
        roles = ((0, "decode"),) if args.colocated else ((0, "decode"), (1, "prefill"))
        for i, what in roles:
            port = args.worker_base_port + i
            flag = f"--worker-base-port ({what} worker)"
            check_port_free(flag, "127.0.0.1", port)
            check_port_range(f"{flag} metrics port (+ 1000)", port + 1000)
    if args.device == "cuda":
        check_cuda()
    if not args.colocated:
        check_kv_transfer(args.kv_transfer_backend)
    check_etcd(args.etcd)
    if args.model is None:
        return None
    return resolve_model(args.model, weights=args.load_format != "dummy", tokenizer=True)


def check_router(args) -> str:
    """`tandem router`: raise UsageError, or the model directory (tokenizer and config.json)."""
    check_port_free("--port", args.host, args.port)
    check_etcd(args.etcd)
    if not args.decode and not args.etcd:
        raise UsageError("router: give the decode workers (--decode HOST:PORT,...) or --etcd HOST:PORT")
    return resolve_model(args.model, weights=False, tokenizer=True)


def check_worker(args) -> str:
    """`tandem prefill|decode`: raise UsageError, or the model directory."""
    if args.tensor_parallel_size != 1:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size}: only 1 is supported yet")
    check_port_free("--port", args.host, args.port)
    # range only: a metrics port in use is logged, not fatal (engine.metrics.start_metrics_server)
    if args.metrics_port is None:
        check_port_range("--metrics-port (default: --port + 1000)", args.port + 1000)
    else:
        check_port_range("--metrics-port", args.metrics_port, allow_zero=True)
    if args.device == "cuda":
        check_cuda()
    check_kv_transfer(args.kv_transfer_backend)
    check_etcd(args.etcd)
    return resolve_model(args.model, weights=args.load_format != "dummy", tokenizer=False)
