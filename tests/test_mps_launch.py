"""`tandem serve --gpu-sharing mps` (tandem_cli/mps.py) with a fake `nvidia-cuda-mps-control`
that the test writes and puts first on PATH: real processes throughout (serve, its workers,
the fake daemon), nothing of Tandem mocked. The fake behaves as the real one does where serve
depends on it: `-d` forks a daemon and returns at once; the daemon listens on the pipe
directory's `control` socket, logs "[... Control PID] Starting control daemon" to
$CUDA_MPS_LOG_DIRECTORY/control.log and answers one command per connection (`quit` stops it);
the client mode sends stdin's command and prints the answer, or fails when no daemon listens.
Variants fail the way MPS fails: -d exits 1 (`fail_start`), or the daemon never answers
(`mute`); with no fake on PATH the binary is missing. On the CPU the workers ignore the MPS
variables: what is checked is what each process was given and what is left at the end."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster import ROOT, free_port
from tandem_cli.args import build_parser, engine_config_from_args
from tandem_cli.checks import UsageError
from tandem_cli.mps import MpsDaemon, reap_stale, start_mps
from tandem_cli.serve import gpu_sharing, plan_workers

FAKE = r'''#!{python}
import os, socket, sys, time
mode = os.environ.get("FAKE_MPS_MODE", "ok")
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
logdir = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
path = os.path.join(pipe, "control")

def log(line):
    with open(os.path.join(logdir, "control.log"), "a") as f:
        f.write("[%s Control %d] %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), os.getpid(), line))

def daemon():
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    log("Starting control daemon using socket " + path)
    held = []
    while True:
        conn, _ = srv.accept()
        cmd = conn.makefile().readline().strip()
        log("Cmd:" + cmd)
        if mode == "mute":
            held.append(conn)
            continue
        if cmd == "quit":
            conn.close()
            os.unlink(path)
            log("Exit")
            return
        conn.sendall(b"\n" if cmd == "get_server_list" else b"100.0\n")
        conn.close()

if sys.argv[1:] == ["-d"]:
    if mode == "fail_start":
        print("An instance of this daemon is already running", file=sys.stderr)
        sys.exit(1)
    if os.fork():
        os.wait()
        sys.exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    daemon()
    os._exit(0)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(path)
except OSError:
    print("Cannot find MPS control daemon process", file=sys.stderr)
    sys.exit(1)
s.sendall(sys.stdin.read().encode())
s.shutdown(socket.SHUT_WR)
sys.stdout.write(s.makefile().read())
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from engine.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=0)


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    (d / "nvidia-cuda-mps-control").write_text(FAKE.replace("{python}", sys.executable))
    (d / "nvidia-cuda-mps-control").chmod(0o755)
    return d


def env_with(fake_bin: Path | None, mode: str = "ok", **extra) -> dict[str, str]:
    path = os.environ["PATH"] if fake_bin is None else f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    # no daemon on the default pipe directory: an empty one of the test's
    env.update(PATH=path, FAKE_MPS_MODE=mode, PYTHONUNBUFFERED="1",
               CUDA_MPS_PIPE_DIRECTORY=tempfile.mkdtemp(prefix="no-mps-"))
    env.update(extra)
    return env


def our_mps_dirs() -> set[Path]:
    return {p for p in Path(tempfile.gettempdir()).glob("tandem-mps-*")
            if (p / "owner.pid").exists()}


def control_daemons() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any("nvidia-cuda-mps-control" in part for part in (p.info["cmdline"] or [])):
            out.append(p)
    return out


class Serve:
    """`tandem serve` on the CPU, stdout and stderr in one pipe."""

    def __init__(self, model: Path, env: dict[str, str], *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem_cli.main", "serve", "--model", str(model), "--device", "cpu",
             "--port", str(self.port), "--serve-metrics-port", str(self.metrics_port), *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def until_serving(self, timeout: float = 120) -> list[str]:
        start = time.monotonic()
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Tandem is serving" in line:
                return self.lines
            assert time.monotonic() - start < timeout, "".join(self.lines)
        raise AssertionError("serve ended before serving:\n" + "".join(self.lines))

    def workers(self) -> dict[str, psutil.Process]:
        out = {}
        for c in psutil.Process(self.proc.pid).children():
            cmd = c.cmdline()
            role = cmd[cmd.index("tandem_cli.main") + 1]
            out[role] = c
        return out

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.lines += self.proc.stdout.readlines()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()


def sample(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


# ---- MPS up: the workers run as clients with their share, the daemon stops with serve --------


@pytest.mark.parametrize("end", ["sigterm", "a worker dies"])
def test_serve_runs_its_own_mps_daemon_and_stops_it(tiny_model, fake_bin, end):
    before = our_mps_dirs()
    s = Serve(tiny_model, env_with(fake_bin), "--gpu-sharing", "mps", "--prefill-sm-fraction", "0.7")
    try:
        out = "".join(s.until_serving())
        assert "starting the CUDA MPS control daemon" in out and "MPS control daemon ready" in out
        assert "prefill 70% of the SMs, decode 30%" in out
        (root,) = our_mps_dirs() - before
        assert (root / "pipe" / "control").exists() and oct((root).stat().st_mode & 0o777) == "0o700"
        pid = int(re.search(r"Control (\d+)\]", (root / "log" / "control.log").read_text()).group(1))
        daemon = psutil.Process(pid)
        workers = s.workers()
        assert set(workers) == {"router", "prefill", "decode"}
        for role, want in (("prefill", "70"), ("decode", "30")):
            env = workers[role].environ()
            assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == want, role
            assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(root / "pipe")
            assert env["CUDA_MPS_LOG_DIRECTORY"] == str(root / "log")
            assert "--gpu-turn-file" not in workers[role].cmdline(), "no turns: the workers run side by side"
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in workers["router"].environ()
        m = s.metrics()
        assert sample(m, 'tandem_gpu_sharing{mode="mps"}') == 1 and sample(m, 'tandem_gpu_sharing{mode="turns"}') == 0
        assert sample(m, "tandem_prefill_sm_fraction") == pytest.approx(0.7)
        assert sample(m, 'tandem_gpu_sharing_fallbacks_total{reason="no_answer"}') == 0
        if end == "sigterm":
            s.proc.send_signal(signal.SIGTERM)
            assert s.finish() == 0
        else:
            workers["decode"].kill()
            assert s.finish() == 1
        psutil.wait_procs([daemon], timeout=10)
        assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE, "the daemon outlived serve"
        assert not root.exists(), "the private MPS directory is removed"
        assert "MPS control daemon stopped (quit)" in "".join(s.lines)
    finally:
        s.kill()


def test_a_daemon_tandem_did_not_start_is_used_and_left_running(tiny_model, fake_bin, tmp_path):
    pipe, logs = tmp_path / "pipe", tmp_path / "log"
    pipe.mkdir(), logs.mkdir()
    env = env_with(fake_bin, CUDA_MPS_PIPE_DIRECTORY=str(pipe), CUDA_MPS_LOG_DIRECTORY=str(logs))
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=10)
    deadline = time.monotonic() + 10
    while not (pipe / "control").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = our_mps_dirs()
    s = Serve(tiny_model, env, "--gpu-sharing", "mps")
    try:
        out = "".join(s.until_serving())
        assert f"using the MPS control daemon already running on {pipe}" in out and "left running" in out
        assert our_mps_dirs() == before, "no daemon of its own"
        assert s.workers()["prefill"].environ()["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
        assert s.workers()["prefill"].environ()["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
        s.proc.send_signal(signal.SIGTERM)
        assert s.finish() == 0
        assert "left the MPS daemon on" in "".join(s.lines)
        r = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", env=env, timeout=10, text=True)
        assert r.returncode == 0, "the user's daemon still answers"
        assert "Cmd:quit" not in (logs / "control.log").read_text()
    finally:
        s.kill()
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, timeout=10, text=True)


# ---- MPS not available: one line, a metric, GPU turns ------------------------------------------


@pytest.mark.parametrize("variant, reason", [("missing", "binary_missing"), ("fail_start", "daemon_failed"),
                                             ("mute", "no_answer")])
def test_without_mps_serve_says_so_once_counts_it_and_takes_turns(tiny_model, fake_bin, variant, reason):
    if variant == "missing" and shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this machine has a real nvidia-cuda-mps-control on PATH")
    before, daemons = our_mps_dirs(), {p.pid for p in control_daemons()}
    env = env_with(None if variant == "missing" else fake_bin, variant)
    s = Serve(tiny_model, env, "--gpu-sharing", "mps")
    try:
        out = s.until_serving(180)
        said = [ln for ln in out if "MPS is not available" in ln]
        assert len(said) == 1 and "falling back to GPU turns" in said[0], "".join(out)
        workers = s.workers()
        for role in ("prefill", "decode"):
            assert "--gpu-turn-file" in workers[role].cmdline()
            assert not any(k.startswith("CUDA_MPS_") and k != "CUDA_MPS_PIPE_DIRECTORY"
                           for k in workers[role].environ())
        m = s.metrics()
        assert sample(m, f'tandem_gpu_sharing_fallbacks_total{{reason="{reason}"}}') == 1
        assert sample(m, 'tandem_gpu_sharing{mode="turns"}') == 1
        assert our_mps_dirs() == before, "a daemon that failed leaves no directory"
        left = [p for p in control_daemons() if p.pid not in daemons and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"a daemon that never answered is stopped: {left}"
        s.proc.send_signal(signal.SIGTERM)
        assert s.finish() == 0
    finally:
        s.kill()


FAKE_CHECK = r'''#!{python}
import json, os, sys
with open(os.environ["FAKE_CHECK_LOG"], "a") as f:
    f.write("%s %s %s\n" % (os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                             os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), " ".join(sys.argv[1:])))
pct = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
wrong = pct == os.environ.get("FAKE_CHECK_WRONG_AT")
print(json.dumps({"ok": not wrong, "message": "matrix products on cpu do not match the host's (worst "
                  "relative error 0.93 on [256x4096] @ [4096x6144], tolerance 0.02)" if wrong else "fine"}))
sys.exit(1 if wrong else 0)
'''


def test_mps_clients_that_compute_wrong_products_fall_back_to_turns(tiny_model, fake_bin, tmp_path):
    """serve runs the GEMM check as an MPS client at each worker's percentage before any
    worker (smallest share first); a client that gets wrong products (what the H200 did at
    40% and 60%) sends serve to GPU turns: one line, fallback reason wrong_results, its
    daemon stopped."""
    check, log = fake_bin / "fake-gemm-check", tmp_path / "checks.log"
    check.write_text(FAKE_CHECK.replace("{python}", sys.executable))
    check.chmod(0o755)
    before = our_mps_dirs()
    env = env_with(fake_bin, TANDEM_MPS_GEMM_CHECK=str(check), FAKE_CHECK_LOG=str(log), FAKE_CHECK_WRONG_AT="60")
    s = Serve(tiny_model, env, "--gpu-sharing", "mps", "--prefill-sm-fraction", "0.6")
    try:
        out = s.until_serving(180)
        ran = [ln.split() for ln in log.read_text().splitlines()]
        assert sorted(r[0] for r in ran) == ["40", "60"], ran
        assert all(r[1].startswith(tempfile.gettempdir()) and r[2:] == ["--device", "cpu"] for r in ran), ran
        said = [ln for ln in out if "computes wrong matrix products" in ln]
        assert len(said) == 1 and "at 60% of the SMs" in said[0] and "0.93" in said[0], "".join(out)
        assert "falling back to GPU turns" in said[0]
        assert any("MPS control daemon stopped (quit)" in ln for ln in out)
        assert our_mps_dirs() == before
        workers = s.workers()
        for role in ("prefill", "decode"):
            assert "--gpu-turn-file" in workers[role].cmdline()
            assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in workers[role].environ()
        m = s.metrics()
        assert sample(m, 'tandem_gpu_sharing_fallbacks_total{reason="wrong_results"}') == 1
        assert sample(m, 'tandem_gpu_sharing{mode="turns"}') == 1
        s.proc.send_signal(signal.SIGTERM)
        assert s.finish() == 0
    finally:
        s.kill()


# ---- the pieces, without serve ----------------------------------------------------------------


def test_a_stale_daemon_of_a_killed_launcher_is_stopped(fake_bin):
    env = env_with(fake_bin)
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()    # a pid that is gone
    daemon = start_mps(environ=env)
    Path(daemon.root, "owner.pid").write_text(f"{owner.pid}\n")
    pid = daemon.daemon_pid()
    lines = reap_stale(daemon.binary)
    assert len(lines) == 1 and f"pid {owner.pid}" in lines[0] and "(quit)" in lines[0]
    assert not Path(daemon.root).exists()
    psutil.wait_procs([psutil.Process(pid)], timeout=10) if psutil.pid_exists(pid) else None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # a live owner's daemon is not touched
    mine = start_mps(environ=env)
    assert reap_stale(mine.binary) == [] and Path(mine.root).exists()
    assert mine.stop().startswith("MPS control daemon stopped (quit)") and mine.stop() == ""


def test_contradicting_sharing_flags_are_a_usage_error(tiny_model):
    def sharing(*argv):
        args = build_parser().parse_args(["serve", *argv])
        return gpu_sharing(args, engine_config_from_args(args).device)

    assert sharing("--device", "cuda") == "turns" and sharing("--device", "cpu") == "none"
    assert sharing("--device", "cuda", "--gpu-turns", "off") == "none"
    assert sharing("--device", "cpu", "--gpu-turns", "on") == "turns" == sharing("--gpu-sharing", "turns")
    assert sharing("--device", "cuda", "--colocated", "--gpu-sharing", "mps") == "none"
    with pytest.raises(UsageError, match="contradicts"):
        sharing("--gpu-sharing", "mps", "--gpu-turns", "on")
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", "serve", "--model", str(tiny_model),
                        "--device", "cpu", "--port", str(free_port()), "--gpu-sharing", "none", "--gpu-turns", "on"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "contradicts" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", "serve", "--prefill-sm-fraction", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "(0, 1)" in r.stderr


def test_the_plan_gives_each_worker_its_share_under_mps():
    args = build_parser().parse_args(["serve", "--device", "cuda", "--gpu-sharing", "mps",
                                      "--prefill-sm-fraction", "0.55"])
    config = engine_config_from_args(args)
    daemon = MpsDaemon("nvidia-cuda-mps-control", "/run/p", "/run/l", owned=True)
    plan = {w.role: w for w in plan_workers(config, args, "M", (5001, 5002), mps=daemon)}
    assert [w.role for w in plan_workers(config, args, "M", (5001, 5002), mps=daemon)] == ["decode", "prefill"]
    assert dict(plan["prefill"].env)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "55"
    assert dict(plan["decode"].env)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "45"
    assert all(dict(w.env)["CUDA_MPS_PIPE_DIRECTORY"] == "/run/p" and "--gpu-turn-file" not in w.argv
               for w in plan.values())
    # the memory plan is unchanged: decode first with 0.6 of the budget
    assert plan["decode"].wave == 0 and plan["prefill"].wave == 1
    # MPS wanted but not up: the fallback plan takes turns
    fallback = plan_workers(config, args, "M", (5001, 5002))
    assert all("--gpu-turn-file" in w.argv and not w.env for w in fallback)


def test_the_benchmark_layout_runs_pd_under_mps_and_quits_the_daemon(fake_bin, tmp_path, monkeypatch):
    """benchmarks/layouts.py's gpu_sharing="mps" (what benchmarks/goodput_1gpu.sh measured on
    the GPU) on the CPU: the same daemon lifecycle, each worker with its share."""
    from benchmarks.layouts import Layout, LayoutConfig, write_model_dir

    for k, v in env_with(fake_bin).items():
        monkeypatch.setenv(k, v)
    before = our_mps_dirs()
    cfg = LayoutConfig(layout="pd", model_dir=write_model_dir(tmp_path / "m", tiny=True), log_dir=tmp_path / "logs",
                       max_model_len=256, max_num_seqs=4, prefill_pages=64, decode_pages=64,
                       gpu_sharing="mps", prefill_sm_fraction=0.65)
    with Layout(cfg) as lay:
        (root,) = our_mps_dirs() - before
        shares = {}
        for p in lay.procs:
            proc = psutil.Process(p.pid)
            cmd = proc.cmdline()
            role = cmd[cmd.index("tandem_cli.main") + 1]
            shares[role] = proc.environ().get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
            if role != "router":
                assert proc.environ()["CUDA_MPS_PIPE_DIRECTORY"] == str(root / "pipe")
        assert shares == {"prefill": "65", "decode": "35", "router": None}
    assert not root.exists()
    with pytest.raises(ValueError):
        LayoutConfig(layout="pd", model_dir=tmp_path, log_dir=tmp_path, gpu_sharing="mps", prefill_sm_fraction=1.0)
