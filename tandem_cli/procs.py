"""Child-process plumbing shared by `tandem serve`, the benchmarks and the tests:
free loopback ports, readiness waits (gRPC channel ready, HTTP 200) and a
SIGTERM-then-SIGKILL stop of a process group. Each wait takes `stop`, a callable
polled at least twice a second: when it returns True the wait raises `Interrupted`
(`tandem serve` passes "a signal arrived", so Ctrl-C during start-up ends it)."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from typing import Callable


class Interrupted(Exception):
    """A wait gave up because its `stop()` returned True."""


def _never() -> bool:
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_grpc_ready(address: str, proc: subprocess.Popen, timeout: float,
                    stop: Callable[[], bool] = _never) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        while time.monotonic() < deadline:
            if stop():
                raise Interrupted
            if proc.poll() is not None:
                raise RuntimeError(f"worker at {address} exited with code {proc.returncode}")
            try:
                grpc.channel_ready_future(ch).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    raise TimeoutError(f"worker at {address} not ready after {timeout:.0f}s")


def _poll_router(url: str, proc: subprocess.Popen, timeout: float, ready, what: str,
                 stop: Callable[[], bool] = _never) -> None:
    """Poll GET `url` until `ready(body)` holds; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop():
            raise Interrupted
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200 and ready(r.read()):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def wait_http_ready(url: str, proc: subprocess.Popen, timeout: float, stop: Callable[[], bool] = _never) -> None:
    _poll_router(url, proc, timeout, lambda body: True, "router not ready", stop)


def wait_members(url: str, roles: int, proc: subprocess.Popen, timeout: float,
                 stop: Callable[[], bool] = _never) -> None:
    """Wait until the router's /health lists members of `roles` roles (etcd mode)."""
    import json

    def ready(body: bytes) -> bool:
        members = json.loads(body).get("membership", {}).get("members", {})
        return sum(1 for addrs in members.values() if addrs) >= roles

    _poll_router(url, proc, timeout, ready, "workers not registered in etcd", stop)


def stop_all(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
