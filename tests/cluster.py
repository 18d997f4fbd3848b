"""Start real Tandem processes on loopback for end-to-end tests.

`Cluster(model_dir, colocated=False, kv_transfer_backend="grpc")` starts a decode
worker, a prefill worker (unless colocated; both on that KV transport) and the router, each as its own `python -m tandem_cli.main`
process, waits until they answer, and stops them on exit.

Credentials are on, as `tandem serve` runs: the cluster makes its own token (`cluster_token`,
written 0600 to a private temporary directory, removed on stop) and passes
--cluster-token-file to every process; `channel(address)` opens a blocking channel that
sends it, for tests that call a worker directly. `cluster_token=""` runs everything open.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from engine import cluster_auth
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from tandem_cli.procs import free_port, stop_all, wait_grpc_ready, wait_http_ready  # noqa: F401 - tests import free_port

ROOT = Path(__file__).resolve().parent.parent


class Cluster:
    def __init__(self, model_dir: Path, colocated: bool = False, num_pages: int = 256, page_size: int = 4,
                 extra_worker_args: tuple[str, ...] = (), served_name: str = "tiny", api_key: str | None = None,
                 log_dir: Path | None = None, kv_transfer_backend: str = "grpc",
                 decode_args: tuple[str, ...] = (), num_prefill: int = 1,
                 router_args: tuple[str, ...] = (), num_decode: int = 1,
                 cluster_token: str | None = None) -> None:
        """cluster_token: None = a fresh one; "" = none (every process runs open)."""
        self.cluster_token = cluster_auth.new_token() if cluster_token is None else cluster_token
        self._token_dir = ""
        self.model_dir = Path(model_dir)
        self.colocated = colocated
        self.num_pages = num_pages
        self.page_size = page_size
        self.extra = list(extra_worker_args)
        self.decode_args = list(decode_args)     # decode worker only
        self.router_args = list(router_args)
        self.served_name = served_name
        self.api_key = api_key
        self.log_dir = log_dir
        self.kv_transfer_backend = kv_transfer_backend
        self.procs: list[subprocess.Popen] = []
        self.decode_addrs = [f"127.0.0.1:{free_port()}" for _ in range(num_decode)]
        self.decode_addr = self.decode_addrs[0]
        self.decode_procs: list[subprocess.Popen] = []
        self.prefill_addrs = [] if colocated else [f"127.0.0.1:{free_port()}" for _ in range(num_prefill)]
        self.prefill_addr = self.prefill_addrs[0] if self.prefill_addrs else ""
        self.http_port = free_port()
        self.decode_metrics_ports = [free_port() for _ in self.decode_addrs]
        self.decode_metrics_port = self.decode_metrics_ports[0]
        self.prefill_metrics_ports = [free_port() for _ in self.prefill_addrs]
        self.prefill_metrics_port = self.prefill_metrics_ports[0] if self.prefill_metrics_ports else 0
        self.prefill_procs: list[subprocess.Popen] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Prometheus /metrics URL of every process, by role ("router", "decode", "prefill")."""
        urls = {"router": f"http://127.0.0.1:{self.http_port}/metrics",
                "decode": f"http://127.0.0.1:{self.decode_metrics_port}/metrics"}
        if self.prefill_metrics_port:
            urls["prefill"] = f"http://127.0.0.1:{self.prefill_metrics_port}/metrics"
        return urls

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to one of this cluster's workers, sending its token."""
        return cluster_auth.channel(address, token=self.cluster_token)

    def _token_args(self) -> list[str]:
        if not self.cluster_token:
            return []
        if not self._token_dir:
            self._token_dir = tempfile.mkdtemp(prefix="tandem-test-")
            cluster_auth.write_token_file(self._token_dir, self.cluster_token)
        return ["--cluster-token-file", os.path.join(self._token_dir, "cluster-token")]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop(cluster_auth.TOKEN_ENV, None)
        args = [*args, *self._token_args()]
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL
        p = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *args], cwd=ROOT, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def _worker_args(self, port: str) -> list[str]:
        return ["--model", str(self.model_dir), "--port", port, "--device", "cpu", "--dtype", "float32",
                "--num-pages", str(self.num_pages), "--block-size", str(self.page_size),
                *([] if self.colocated else ["--kv-transfer-backend", self.kv_transfer_backend]), *self.extra]

    def start(self) -> "Cluster":
        try:
            for i, (addr, mport) in enumerate(zip(self.decode_addrs, self.decode_metrics_ports)):
                self.decode_procs.append(self._spawn(
                    "decode" if i == 0 else f"decode{i}",
                    ["decode", *self._worker_args(addr.split(":")[1]), "--metrics-port", str(mport), *self.decode_args]))
            decode = self.decode_procs[0]
            for i, (addr, mport) in enumerate(zip(self.prefill_addrs, self.prefill_metrics_ports)):
                prefill = self._spawn("prefill" if i == 0 else f"prefill{i}",
                                      ["prefill", *self._worker_args(addr.split(":")[1]), "--metrics-port", str(mport)])
                self.prefill_procs.append(prefill)
                self._wait_grpc(addr, prefill)
            for addr, proc in zip(self.decode_addrs, self.decode_procs):
                self._wait_grpc(addr, proc)
            args = ["router", "--model", str(self.model_dir), "--port", str(self.http_port),
                    "--decode", ",".join(self.decode_addrs), "--prefill", ",".join(self.prefill_addrs),
                    "--served-model-name", self.served_name]
            if self.api_key:
                args += ["--api-key", self.api_key]
            args += self.router_args
            router = self._spawn("router", args)
            self._wait_http(f"http://127.0.0.1:{self.http_port}/health", router)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_grpc(self, address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        wait_grpc_ready(address, proc, timeout)

    def _wait_http(self, url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
        wait_http_ready(url, proc, timeout)

    def prefill_stats(self) -> pb.StatsResponse:
        with self.channel(self.prefill_addr) as ch:
            return pbg.PrefillStub(ch).Stats(pb.StatsRequest(), timeout=2)

    def decode_stats(self) -> pb.StatsResponse:
        with self.channel(self.decode_addr) as ch:
            return pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=2)

    def stop(self) -> None:
        stop_all(self.procs, grace=10)
        self.procs.clear()
        if self._token_dir:
            shutil.rmtree(self._token_dir, ignore_errors=True)
            self._token_dir = ""

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
