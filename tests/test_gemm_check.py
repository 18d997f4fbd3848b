"""engine/gemm_check.py: the startup check that matrix products match the host's (on the lent
H200 an MPS client with an SM limit got wrong ones without any error)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cluster import ROOT
from engine.errors import EngineStartupError
from engine.gemm_check import TOLERANCE, GemmCheckError, check_matmuls, require_right_matmuls

SMALL = ((16, 256, 384), (64, 512, 128))


def test_right_products_pass():
    res = check_matmuls("cpu", SMALL)
    assert res.ok and res.worst_rel_err < 0.005 and res.worst_shape in SMALL


def wrong_in_one_k_block(x, w):
    """What the MPS client's cuBLAS did, roughly: part of the reduction missing."""
    k = x.shape[1]
    return torch.nn.functional.linear(x[:, : k // 2], w[:, : k // 2])


@pytest.mark.parametrize("linear, shape", [
    (wrong_in_one_k_block, None),
    (lambda x, w: torch.nn.functional.linear(x, w) * float("nan"), None),
    # right everywhere but on the second shape
    (lambda x, w: torch.nn.functional.linear(x, w) * (1.0 if x.shape[0] == 16 else 1.1), (64, 512, 128)),
])
def test_wrong_products_fail_and_name_the_shape(linear, shape):
    res = check_matmuls("cpu", SMALL, linear=linear)
    assert not res.ok and res.worst_rel_err >= TOLERANCE
    if shape:
        assert res.worst_shape == shape and res.worst_rel_err == pytest.approx(0.1, rel=0.05)
    assert "do not match" in res.describe()


def test_refusal_is_a_startup_error_that_names_the_mps_limit(monkeypatch):
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "40")
    with pytest.raises(GemmCheckError) as e:
        require_right_matmuls("cpu", shapes=SMALL, linear=wrong_in_one_k_block)
    assert isinstance(e.value, EngineStartupError)
    msg = str(e.value)
    assert msg.startswith("refusing to serve") and "40% of the SMs" in msg and "--gpu-sharing turns" in msg
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    assert require_right_matmuls("cpu", shapes=SMALL).ok


def test_the_command_prints_one_json_line():
    r = subprocess.run([sys.executable, "-m", "engine.gemm_check", "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["device"] == "cpu" and out["worst_rel_err"] < TOLERANCE
