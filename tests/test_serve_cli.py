"""`tandem serve` with no arguments: demo model, three processes, clean shutdown."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from openai import OpenAI

from cluster import ROOT, free_port


def test_serve_embedded_default_answers_chat_and_stops_children(tmp_path):
    port = free_port()
    env = dict(os.environ, TANDEM_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        start = time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            if "Tandem is serving" in line:
                break
            assert time.monotonic() - start < 60, "".join(lines)
        assert any("random" in ln and "noise" in ln for ln in lines), "the demo model must say it produces noise"
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 3  # router, prefill, decode

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
        assert time.monotonic() - start < 60

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"children still running after SIGTERM: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()


@pytest.mark.parametrize("argv,needle", [
    (["serve", "--tensor-parallel-size", "2"], "tensor-parallel-size"),
    (["decode", "--model", "/nonexistent/model/dir", "--port", "0"], "nonexistent"),
])
def test_cli_errors_are_clear(argv, needle):
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode != 0
    assert needle in (r.stdout + r.stderr)
