"""Worker processes set the GIL switch interval (engine/worker_thread.apply_switch_interval):
0.5 ms unless $TANDEM_GIL_SWITCH_MS says otherwise; checked in a fresh interpreter each."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "import sys; from engine.worker_thread import apply_switch_interval as a; a(); print(sys.getswitchinterval())"


@pytest.mark.parametrize("env, expected", [(None, 0.0005), ("2", 0.002), ("0.25", 0.00025)])
def test_switch_interval(env, expected):
    e = {k: v for k, v in os.environ.items() if k != "TANDEM_GIL_SWITCH_MS"}
    if env is not None:
        e["TANDEM_GIL_SWITCH_MS"] = env
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env={**e, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert float(out) == pytest.approx(expected)
