"""Launchers for the serving layouts the goodput benchmark compares, all behind the router.

Layouts (`LayoutConfig.layout`):
  - "pd":        `num_prefill` prefill workers on GPUs gpus[0..P) and `num_decode` decode
                 workers on gpus[P..P+D) (indices wrap around, so `--gpus 0` puts P and D
                 on one GPU: "P+D sharing one GPU");
  - "colocated": `replicas` colocated workers (a decode worker with no prefill member
                 prefills itself), worker i on gpus[i % len(gpus)].
Each worker is pinned with CUDA_VISIBLE_DEVICES; with no `gpus` (CPU) nothing is pinned.
Workers sharing a GPU (`gpu_sharing`): "none" = the driver's time-slicing, "turns" = one at
a time through a lock file (engine/gpu_turn.py), "mps" = side by side under CUDA MPS, the
prefill workers with `prefill_sm_fraction` of the SMs and the decode workers the rest
(tandem_cli/mps.py starts the daemon before the workers and quits it after them; MPS not
available fails the start: a benchmark does not fall back).

Lifecycle of a `Layout`:
  1. `write_model_dir(dir, tiny)`: config.json (Llama-3.1-8B or the tiny Llama, dummy
     weights) plus a word-level tokenizer over the whole vocabulary (the router needs one;
     every id decodes to the text "<tN>", so a client can count streamed tokens);
  2. `start()`: workers start in waves by `tandem_cli.gpu_share.plan_starts`, the rule
     `tandem serve` uses too: the workers sharing a GPU start one after the other
     (decode first), each once the previous answers gRPC, with cumulative shares of
     `gpu_memory_utilization` (P+D on one GPU: decode 0.6 of it, prefill the rest;
     replicas: equal); without GPUs everyone starts at once. Then the router with
     the static member lists; wait for /health;
  3. the benchmark drives `base_url`; `wait_idle()` between rates polls every worker's
     Stats until nothing runs or waits; `kv_counters()` scrapes the decode workers'
     /metrics (KV bytes received, seconds of completed transfers);
  4. `stop()` (also on __exit__ and on any start error): SIGTERM, then SIGKILL.
Worker and router logs go to `log_dir/<name>.log`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks import workloads
from engine import cluster_auth
from engine.sm_split import thread_percentages
from tandem_cli.gpu_share import plan_starts, waves
from tandem_cli.mps import start_mps
from tandem_cli.procs import free_port, stop_all, wait_grpc_ready, wait_http_ready

ROOT = Path(__file__).resolve().parent.parent
from tandem_cli.args import KV_TRANSFER_BACKENDS as KV_TRANSPORTS


@dataclass(frozen=True)
class LayoutConfig:
    layout: str                         # "pd" | "colocated"
    model_dir: Path
    log_dir: Path
    num_prefill: int = 1                # pd
    num_decode: int = 1                 # pd
    replicas: int = 1                   # colocated
    gpus: tuple[str, ...] = ()          # CUDA device ids; () = no pinning (CPU)
    device: str = "cpu"                 # worker --device
    dtype: str = "float32"
    attention_backend: str = "auto"     # triton on cuda, torch on cpu
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.88  # per GPU, split among the workers sharing it
    prefill_pages: int | None = None    # explicit KV pages (default: sized from memory)
    decode_pages: int | None = None
    kv_transport: str = "grpc"
    startup_timeout_s: float = 900.0
    served_name: str = "bench"
    gpu_sharing: str = "none"           # workers sharing a GPU: "none" | "turns" | "mps"
    prefill_sm_fraction: float = 0.6    # mps: the prefill workers' share of the SMs
    sm_partition: float | None = None   # colocated: --sm-partition (prefill and decode lanes on SM partitions)
    sm_partition_adaptive: tuple[float, float] | None = None   # (TTFT s, TPOT s): --sm-partition-adaptive

    def __post_init__(self) -> None:
        if self.gpu_sharing not in ("none", "turns", "mps"):
            raise ValueError(f"gpu_sharing must be none, turns or mps, got {self.gpu_sharing!r}")
        thread_percentages(self.prefill_sm_fraction)   # raises outside (0, 1)
        if self.layout not in ("pd", "colocated"):
            raise ValueError(f"layout must be 'pd' or 'colocated', got {self.layout!r}")
        if self.sm_partition is not None and (self.layout != "colocated" or not 0 < self.sm_partition < 1):
            raise ValueError(f"sm_partition is a colocated worker's prefill share in (0, 1), got {self.sm_partition}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"unknown kv transport {self.kv_transport!r}; choose from {KV_TRANSPORTS}")
        if min(self.num_prefill, self.num_decode, self.replicas) < 1:
            raise ValueError("worker counts must be >= 1")
        object.__setattr__(self, "gpus", tuple(str(g) for g in self.gpus))

    def workers(self) -> list[tuple[str, str, str]]:
        """(name, role, gpu or "") of every worker; role is the tandem_cli subcommand."""
        if self.layout == "pd":
            plan = [(f"prefill{i}", "prefill") for i in range(self.num_prefill)]
            plan += [(f"decode{j}", "decode") for j in range(self.num_decode)]
        else:
            plan = [(f"colocated{i}", "decode") for i in range(self.replicas)]
        g = self.gpus
        return [(name, role, g[i % len(g)] if g else "") for i, (name, role) in enumerate(plan)]

    def describe(self) -> str:
        where = {}
        for name, _, gpu in self.workers():
            where.setdefault(gpu or "cpu", []).append(name)
        shape = (f"{self.num_prefill}P+{self.num_decode}D" if self.layout == "pd"
                 else f"colocated x{self.replicas}")
        sharing = ""
        if self.layout == "pd" and any(len(v) > 1 for k, v in where.items() if k != "cpu"):
            p, d = thread_percentages(self.prefill_sm_fraction)
            sharing = {"none": ", time-sliced", "turns": ", GPU turns",
                       "mps": f", MPS {p}/{d} (SM % prefill/decode)"}[self.gpu_sharing]
        if self.sm_partition is not None:
            sharing = f", prefill and decode lanes on {round(100 * self.sm_partition)}/{100 - round(100 * self.sm_partition)}% of the SMs"
            sharing += ", moved live" if self.sm_partition_adaptive else ""
        return shape + " (" + "; ".join(f"{'GPU ' + k if k != 'cpu' else 'cpu'}: {', '.join(v)}"
                                        for k, v in where.items()) + sharing + ")"


def write_model_dir(out_dir: Path, tiny: bool) -> Path:
    """config.json for dummy weights + a word-level tokenizer covering the whole vocabulary
    (benchmarks.workloads.write_model_dir; Llama-3.1-8B or its tiny twin)."""
    return workloads.write_model_dir(out_dir, tiny, tokenizer=True)


class Layout:
    """The processes of one layout; see the module docstring for the lifecycle."""

    def __init__(self, config: LayoutConfig) -> None:
        self.config = config
        self.procs: list[subprocess.Popen] = []
        self.prefill_addrs: list[str] = []
        self.decode_addrs: list[str] = []
        self.decode_metrics: list[str] = []     # http URLs of the decode workers' /metrics
        self.http_port = 0
        self.cluster_token = cluster_auth.new_token()   # credentials on, as `tandem serve` runs
        self.mps = None                                 # tandem_cli.mps.MpsDaemon when gpu_sharing is mps

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _spawn(self, name: str, args: list[str], gpu: str | None, extra_env: dict | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{cluster_auth.TOKEN_ENV: self.cluster_token},
                   **(extra_env or {}))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.config.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        out = open(self.config.log_dir / f"{name}.log", "w")
        try:
            p = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *args], cwd=ROOT, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        self.procs.append(p)
        return p

    def _worker_args(self, role: str, port: int, metrics_port: int, util: float) -> list[str]:
        c = self.config
        args = [role, "--model", str(c.model_dir), "--load-format", "dummy", "--device", c.device,
                "--dtype", c.dtype, "--attention-backend", c.attention_backend,
                "--max-model-len", str(c.max_model_len), "--max-num-seqs", str(c.max_num_seqs),
                "--max-num-batched-tokens", str(c.max_num_batched_tokens),
                "--gpu-memory-utilization", f"{util:.4f}", "--port", str(port),
                "--metrics-port", str(metrics_port), "--log-level", "warning"]
        if c.layout == "pd":   # colocated replicas move no KV
            args += ["--kv-transfer-backend", c.kv_transport]
        pages = c.prefill_pages if (role == "prefill") else c.decode_pages
        if pages:
            args += ["--num-pages", str(pages)]
        if c.layout == "pd" and c.gpu_sharing == "turns":
            args += ["--gpu-turn-file", str(c.log_dir / "gpu.turn")]
        if c.sm_partition is not None:
            args += ["--sm-partition", str(c.sm_partition)]
        if c.sm_partition_adaptive is not None:
            ttft, tpot = c.sm_partition_adaptive
            args += ["--sm-partition-adaptive", "--slo-ttft", str(ttft), "--slo-tpot-ms", str(1e3 * tpot)]
        return args

    def start(self) -> Layout:
        c = self.config
        c.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            share = {}
            if c.layout == "pd" and c.gpu_sharing == "mps":
                self.mps = start_mps(say=lambda line: print(line, flush=True))
                share = dict(zip(("prefill", "decode"), thread_percentages(c.prefill_sm_fraction)))
            starts = plan_starts(c.workers(), c.gpu_memory_utilization, sequential=bool(c.gpus))
            for wave in waves(starts):
                started = []
                for w in wave:
                    name, role, gpu, util = w.name, w.role, w.gpu, w.gpu_memory_utilization
                    port, mport = free_port(), free_port()
                    addr = f"127.0.0.1:{port}"
                    p = self._spawn(name, self._worker_args(role, port, mport, util), gpu if gpu else None,
                                    self.mps.client_env(share[role]) if share else None)
                    started.append((addr, p))
                    if role == "prefill":
                        self.prefill_addrs.append(addr)
                    else:
                        self.decode_addrs.append(addr)
                        self.decode_metrics.append(f"http://127.0.0.1:{mport}/metrics")
                for addr, p in started:
                    wait_grpc_ready(addr, p, c.startup_timeout_s)
            self.http_port = free_port()
            router = self._spawn("router", [
                "router", "--model", str(c.model_dir), "--port", str(self.http_port),
                "--decode", ",".join(self.decode_addrs), "--prefill", ",".join(self.prefill_addrs),
                "--served-model-name", c.served_name, "--max-model-len", str(c.max_model_len),
                "--log-level", "warning"], gpu="")
            wait_http_ready(f"{self.base_url}/health", router, timeout=120)
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a layout process exited (code {dead[0].returncode}); "
                               f"logs in {self.config.log_dir}")

    def _stats(self) -> list:
        from proto import tandem_pb2 as pb
        from proto import tandem_pb2_grpc as pbg

        out = []
        for addrs, stub_cls in ((self.prefill_addrs, pbg.PrefillStub), (self.decode_addrs, pbg.DecodeStub)):
            for a in addrs:
                with cluster_auth.channel(a, token=self.cluster_token) as ch:
                    out.append(stub_cls(ch).Stats(pb.StatsRequest(), timeout=5))
        return out

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Poll Stats until no worker runs, queues or transfers anything (after cancelled requests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if all(s.running == 0 and s.waiting == 0 and s.active_transfers == 0 for s in self._stats()):
                    return True
            except Exception:  # noqa: BLE001 - a slow Stats answer: poll again
                pass
            time.sleep(0.25)
        return False

    def kv_counters(self) -> dict[str, float]:
        """Summed over decode workers: KV bytes received, seconds and count of completed transfers."""
        from prometheus_client.parser import text_string_to_metric_families

        tot = {"bytes": 0.0, "seconds": 0.0, "transfers": 0.0}
        for url in self.decode_metrics:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == "tandem_kv_transfer_bytes_total":
                        tot["bytes"] += s.value
                    elif s.name == "tandem_kv_transfer_seconds_sum":
                        tot["seconds"] += s.value
                    elif s.name == "tandem_kv_transfer_seconds_count":
                        tot["transfers"] += s.value
        return tot

    def stop(self) -> None:
        stop_all(self.procs, grace=20)
        self.procs.clear()
        if self.mps is not None:   # after its clients: `quit` waits for them
            print(self.mps.stop(), flush=True)
            self.mps = None

    def __enter__(self) -> Layout:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
