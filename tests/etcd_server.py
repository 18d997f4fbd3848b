"""A real etcd for tests: free loopback ports, a temp data dir, stop/restart.

`EtcdServer(data_dir).start()` runs the `etcd` binary (Debian: etcd-server) as
a single-member cluster; `stop()` / `start()` again reuse the same data dir and
ports (a restart keeps keys, leases and revisions). `call(fn)` runs
`await fn(aetcd_client)` on a fresh client, for test-side puts, revokes and
compactions. `TcpProxy` sits between a process and etcd so a test can cut that
process's connection (the watch) while etcd itself stays up.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

_CANDIDATES = ("/usr/bin/etcd", "/usr/local/bin/etcd", "/usr/sbin/etcd")


def find_etcd() -> str | None:
    found = shutil.which("etcd")
    if found:
        return found
    return next((p for p in _CANDIDATES if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, data_dir: Path, binary: str | None = None, log_path: Path | None = None) -> None:
        self.binary = binary or find_etcd()
        if self.binary is None:
            raise FileNotFoundError("etcd binary not found (Debian: apt-get install etcd-server)")
        self.data_dir = Path(data_dir)
        self.log_path = log_path
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        out = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.binary, "--name", "test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"test={peer_url}", "--log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT, env=self._env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("etcd did not become healthy")

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        machine = os.uname().machine
        if machine not in ("x86_64", "amd64"):
            env.setdefault("ETCD_UNSUPPORTED_ARCH", {"aarch64": "arm64"}.get(machine, machine))
        return env

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def call(self, fn):
        """Run `await fn(client)` with a fresh aetcd client; returns its result."""
        import aetcd

        async def main():
            host, port = self.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
                return await fn(client)

        return asyncio.run(main())

    def revision(self) -> int:
        async def get(client):
            return (await client.get_prefix(b"\0")).header.revision
        return self.call(get)

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to `revision` (default: the current one)."""
        rev = revision or self.revision()

        async def compact(client):
            await client.compact(rev, physical=True)
        self.call(compact)
        return rev


class TcpProxy:
    """Forwards 127.0.0.1:port -> target; `cut()` drops every connection and refuses
    new ones (a partition of whoever connects through it), `restore()` heals it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._cut = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._cut:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._cut = True
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._sock.close()
