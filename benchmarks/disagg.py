"""Disaggregated mode: real `python -m tandem_cli.main prefill|decode` processes on one
device, driven over gRPC `Decode.Generate` (every request sent at t=0, async).

The decode worker reserves pages, the prefill worker computes the prompt and streams
KV layer by layer through the chosen KV transport (`kv_backend`: "grpc", host-staged and
serialised; "nixl", one-sided WRITEs into the decode pool), then the decode worker
batches decodes. Only client-visible numbers are measured here
(wall, tokens, TTFT, TPOT, cached tokens); MFU/MBU need worker-side timers. Prompt ids
come from the vocabulary of the model directory's config.json (workloads.token_id_range).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from benchmarks.metrics import RequestTrace, RunResult
from benchmarks.workloads import Workload
from engine import cluster_auth
from engine.config import ModelConfig
from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from tandem_cli.procs import stop_all, wait_grpc_ready
from tests.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent


class DisaggCluster:
    def __init__(self, model_dir: Path, device: str, dtype: str, backend: str,
                 prefill_pages: int, decode_pages: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, log_dir: Path, kv_backend: str = "grpc",
                 enable_prefix_caching: bool = True):
        self.procs: list[subprocess.Popen] = []
        self.kv_backend = kv_backend
        self.vocab_size = ModelConfig.from_dir(model_dir).vocab_size
        self.cluster_token = cluster_auth.new_token()   # credentials on, as `tandem serve` runs
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        common = ["--model", str(model_dir), "--load-format", "dummy", "--device", device,
                  "--dtype", dtype, "--attention-backend", backend, "--max-model-len", str(max_model_len),
                  "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
                  "--log-level", "warning", "--kv-transfer-backend", kv_backend,
                  *([] if enable_prefix_caching else ["--no-enable-prefix-caching"])]
        self.prefill_addr = f"127.0.0.1:{free_port()}"
        self.decode_addr = f"127.0.0.1:{free_port()}"
        self.args = {
            "prefill": ["prefill", *common, "--num-pages", str(prefill_pages),
                        "--port", self.prefill_addr.split(":")[1]],
            "decode": ["decode", *common, "--num-pages", str(decode_pages),
                       "--port", self.decode_addr.split(":")[1]],
        }

    def start(self, timeout: float = 300) -> "DisaggCluster":
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{cluster_auth.TOKEN_ENV: self.cluster_token})
        for name, args in self.args.items():
            out = open(self.log_dir / f"{name}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *args],
                                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        for addr, proc in ((self.prefill_addr, self.procs[0]), (self.decode_addr, self.procs[1])):
            wait_grpc_ready(addr, proc, timeout)  # raises with the exit code; logs in self.log_dir
        return self

    def stop(self) -> None:
        stop_all(self.procs, grace=20)
        self.procs.clear()

    def run(self, wl: Workload, num_requests: int, timeout_s: float) -> RunResult:
        return asyncio.run(self._run(wl, num_requests, timeout_s))

    async def _run(self, wl: Workload, num_requests: int, timeout_s: float) -> RunResult:
        prompts = wl.prompts(num_requests, self.vocab_size)
        sp = SamplingParams(temperature=0.0, max_tokens=wl.output_len, ignore_eos=True).to_proto()
        traces = [RequestTrace(prompt_len=len(p)) for p in prompts]
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        async with cluster_auth.aio_channel(self.decode_addr, token=self.cluster_token, options=opts) as ch:
            stub = pbg.DecodeStub(ch)
            await stub.Stats(pb.StatsRequest(), timeout=30)

            async def one(i: int, prompt: list[int]) -> None:
                tr = traces[i]
                try:
                    call = stub.Generate(pb.GenerateRequest(
                        request_id=f"{wl.name}-{i}", prompt_token_ids=prompt, sampling=sp,
                        prefill_address=self.prefill_addr))
                    async for msg in call:
                        if msg.error:
                            tr.error = msg.error[:120]
                        if msg.token_ids:
                            tr.token(time.perf_counter(), len(msg.token_ids))
                        tr.cached_tokens = msg.cached_tokens
                except grpc.aio.AioRpcError as exc:
                    tr.error = f"{exc.code().name}: {exc.details()}"[:120]

            t0 = time.perf_counter()
            for tr in traces:
                tr.t_submit = t0
            tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            wall = time.perf_counter() - t0
            note = f"{num_requests} of {wl.num_requests} requests" if num_requests != wl.num_requests else ""
            if pending:
                note = (note + "; " if note else "") + f"{len(pending)} cut off at {timeout_s:.0f}s"
                for i, t in enumerate(tasks):
                    if t in pending and not traces[i].error:
                        traces[i].error = "cut off (deadline)"
            if pending:   # let the workers drop the aborted work before the next workload
                await asyncio.sleep(2)
        return RunResult("disagg", wl.name, len(prompts), wall, traces, note=note)
