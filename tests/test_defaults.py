"""Fast by default: what `tandem serve` / the workers resolve from no flags, and the
worker plan serve and the benchmark layouts share (no GPU needed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.layouts import LayoutConfig
from engine.config import EngineConfig, resolve_attention_backend
from engine.cuda_graphs import graph_buckets
from tandem_cli.args import build_parser, engine_config_from_args
from tandem_cli.gpu_share import plan_starts, waves
from tandem_cli.procs import free_port
from tandem_cli.serve import plan_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_plan(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    config = engine_config_from_args(args)
    return config, plan_workers(config, args, "MODEL", (5001, 5002))


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_serve_on_cuda_defaults_to_triton_with_graphs_and_forwards_them():
    config, plan = serve_plan("--device", "cuda")
    assert config.attention_backend == "triton" and config.attention_backend_reason == "auto -> triton on cuda"
    assert config.enforce_eager is False and config.uses_cuda_graphs
    assert config.max_num_seqs == 256 and config.gpu_memory_utilization == 0.9
    assert [w.role for w in plan] == ["decode", "prefill"]
    for w in plan:
        assert flag(w.argv, "--attention-backend") == "triton" and flag(w.argv, "--device") == "cuda"
        assert "--enforce-eager" not in w.argv and flag(w.argv, "--max-num-seqs") == "256"
        assert flag(w.argv, "--kv-transfer-backend") == "grpc"


def test_serve_pd_on_one_gpu_starts_decode_first_with_its_share():
    _, (decode, prefill) = serve_plan("--device", "cuda", "--gpu-memory-utilization", "0.8")
    assert (decode.wave, prefill.wave) == (0, 1)      # prefill starts once decode is ready
    assert decode.gpu_memory_utilization == pytest.approx(0.8 * 0.6)
    assert prefill.gpu_memory_utilization == pytest.approx(0.8)   # the whole budget, minus what decode holds
    assert float(flag(decode.argv, "--gpu-memory-utilization")) == pytest.approx(0.48)
    assert float(flag(prefill.argv, "--gpu-memory-utilization")) == pytest.approx(0.8)
    assert decode.argv[0] == "decode" and prefill.argv[0] == "prefill"
    assert flag(decode.argv, "--port") == "5001" and flag(prefill.argv, "--port") == "5002"


def test_serve_explicit_flags_and_other_modes():
    config, plan = serve_plan("--device", "cuda", "--enforce-eager", "--attention-backend", "torch")
    assert config.attention_backend == "torch" and not config.uses_cuda_graphs
    assert all("--enforce-eager" in w.argv and flag(w.argv, "--attention-backend") == "torch" for w in plan)
    config, plan = serve_plan("--device", "cpu")
    assert config.attention_backend == "torch" and config.attention_backend_reason == "auto -> torch on cpu"
    assert [w.wave for w in plan] == [0, 0]            # CPU: KV from --kv-cache-memory, no race
    _, plan = serve_plan("--device", "cuda", "--colocated")
    assert [(w.role, w.wave, w.gpu_memory_utilization) for w in plan] == [("decode", 0, 0.9)]
    assert "--kv-transfer-backend" not in plan[0].argv


def test_worker_roles_and_resolution():
    args = build_parser().parse_args(["prefill", "--model", "m", "--device", "cuda",
                                      "--kv-transfer-backend", "nixl"])
    c = engine_config_from_args(args)
    assert (c.role, c.attention_backend, c.kv_transfer_backend) == ("prefill", "triton", "nixl")
    assert not c.uses_cuda_graphs                      # a prefill worker never decodes
    c = engine_config_from_args(build_parser().parse_args(["decode", "--model", "m", "--device", "cuda"]))
    assert c.role == "decode" and c.uses_cuda_graphs
    assert EngineConfig(model="m").attention_backend == "torch"      # the engine's own default: auto
    assert resolve_attention_backend("triton", "cpu") == ("triton", "--attention-backend triton")
    with pytest.raises(ValueError):
        resolve_attention_backend("flash", "cuda")


@pytest.mark.parametrize("max_batch", [1, 3, 64, 256, 300, 512, 1000])
def test_graph_buckets_cover_every_batch_up_to_max_num_seqs(max_batch):
    buckets = graph_buckets(max_batch)
    assert buckets == tuple(sorted(set(buckets))) and buckets[-1] == max_batch
    assert all(any(b >= n for b in buckets) for n in range(1, max_batch + 1))
    if max_batch == 1000:
        assert buckets[-5:] == (512, 640, 768, 896, 1000)


def test_layouts_and_serve_share_one_rule():
    shared = LayoutConfig("pd", "m", "l", gpus=("0",), gpu_memory_utilization=0.9)
    starts = plan_starts(shared.workers(), 0.9)
    assert [(s.name, s.wave) for s in starts] == [("decode0", 0), ("prefill0", 1)]
    assert [s.gpu_memory_utilization for s in starts] == pytest.approx([0.54, 0.9])
    _, plan = serve_plan("--device", "cuda")
    assert [w.gpu_memory_utilization for w in plan] == pytest.approx([0.54, 0.9])
    # two GPUs: each worker alone, both at once, the whole budget each
    two = plan_starts(LayoutConfig("pd", "m", "l", gpus=("0", "1")).workers(), 0.9)
    assert [(s.wave, s.gpu_memory_utilization) for s in two] == [(0, 0.9), (0, 0.9)]
    # replicas sharing a GPU: equal cumulative shares, one after the other
    col = plan_starts([("c0", "decode", "0"), ("c1", "decode", "0"), ("c2", "decode", "0")], 0.9)
    assert [s.gpu_memory_utilization for s in col] == pytest.approx([0.3, 0.6, 0.9])
    assert [len(w) for w in waves(col)] == [1, 1, 1]


def test_triton_that_cannot_import_fails_the_worker_with_one_line(tmp_path):
    fake = tmp_path / "site" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('triton is broken on this machine')\n")
    from engine.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "m", arch="llama", seed=0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), ROOT]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", "decode", "--model", str(model), "--device", "cpu",
                        "--attention-backend", "triton", "--port", str(free_port()), "--log-level", "warning"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: decode worker cannot start:"), r.stderr
    assert "triton is broken" in lines[0] and "--attention-backend torch" in lines[0]
