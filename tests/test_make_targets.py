"""`make serve` installs what serving needs and no more (issue 12): no test tools, and the gpu
extra (triton, nixl) only where nvidia-smi lists a GPU; `make test` adds the test extra.
The size and time of a real fresh `make serve`: benchmarks/make_serve_fresh.sh."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dry(target: str, path: str) -> str:
    env = dict(os.environ, PATH=path)
    return subprocess.run(["make", "-n", target], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout


def _pip_installs(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "pip install" in ln and "torch==" not in ln]


def test_serve_installs_no_test_tools_and_no_gpu_wheels_without_a_gpu(tmp_path):
    no_gpu = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                             if not (Path(p) / "nvidia-smi").exists())
    serve = _pip_installs(_dry("serve", no_gpu))
    assert serve == ["python3 -m pip install -q -e '.'"], serve
    test = _pip_installs(_dry("test", no_gpu))
    assert "python3 -m pip install -q -e '.[test]'" in test, test
    fake = tmp_path / "bin"                       # a machine whose nvidia-smi lists a GPU
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    (fake / "nvidia-smi").chmod(0o755)
    gpu = _pip_installs(_dry("serve", f"{fake}{os.pathsep}{no_gpu}"))
    assert gpu == ["python3 -m pip install -q -e '.[gpu]'"], gpu
