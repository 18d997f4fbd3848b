"""CUDA MPS for P+D on one GPU: the control daemon's lifecycle, for `tandem serve` and the
benchmark layouts.

Without MPS two processes on one GPU are time-sliced (engine/gpu_turn.py makes the slices
whole steps). Under MPS their kernels run side by side, each client limited to
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the SMs, a variable the CUDA driver reads when the
client creates its context: the workers need no code for a static split.

Lifecycle of an `MpsDaemon`:
  1. `start_mps()`:
     a. `nvidia-cuda-mps-control` is looked up on PATH (missing: `MpsUnavailable`);
     b. daemons a killed launcher left behind (a private directory whose owner pid is gone)
        are told to quit and their directories removed;
     c. a daemon that already answers on the pipe directory of the environment
        (CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps) is used as it is: `owned` is False
        and `stop()` leaves it running;
     d. otherwise a private directory (mkdtemp, 0700: pipe/, log/ and an owner file with this
        pid) and `nvidia-cuda-mps-control -d` with CUDA_MPS_PIPE_DIRECTORY and
        CUDA_MPS_LOG_DIRECTORY pointing into it; ready once `get_server_list` answers. A
        daemon that fails to start or to answer within `answer_timeout` is stopped (the pid
        its control.log names), the directory removed, and `MpsUnavailable` raised;
     e. `check_clients()` (tandem serve, before any worker): a GEMM check against the host
        run as a client at each planned SM percentage; wrong products -> turns, reason
        "wrong_results" (see engine/gemm_check.py);
  2. `client_env(percentage)`: what a worker's environment needs to be an MPS client with
     that share of the SMs (the router needs nothing);
  3. `stop()`, after the clients exited (`quit` waits for them): `quit`, then SIGTERM to the
     daemon's pid if it is still there after `quit_timeout`; the directory is removed. Once.

`SharingMetrics` is what the launcher exports about it: the mode in force, each fallback
from MPS to turns by reason, and the prefill SM fraction.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
DIR_PREFIX = "tandem-mps-"
OWNER_FILE = "owner.pid"
# the control daemon's first log line: "[2026-02-06 09:34:17.770 Control   261] Starting control daemon ..."
_DAEMON_PID = re.compile(r"Control\s+(\d+)\]\s+Starting control daemon")


class MpsUnavailable(Exception):
    """MPS cannot be used here; `reason` is a short label (the metric's), str() says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class MpsDaemon:
    binary: str                 # the control binary used
    pipe_dir: str               # CUDA_MPS_PIPE_DIRECTORY of the clients
    log_dir: str                # CUDA_MPS_LOG_DIRECTORY
    owned: bool                 # started here (stop() quits it) or found running (left alone)
    root: str = ""              # the private directory holding pipe/ and log/ (owned only)
    quit_timeout: float = 10.0
    _stopped: bool = field(default=False, repr=False)

    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def client_env(self, percentage: int) -> dict[str, str]:
        if not 1 <= percentage <= 100:
            raise ValueError(f"an active thread percentage is 1..100, got {percentage}")
        return {**self.env(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percentage)}

    def ask(self, command: str, timeout: float = 5.0) -> str:
        """One control command's answer; raises MpsUnavailable when it fails or hangs."""
        return _ask(self.binary, self.env(), command, timeout)

    def daemon_pid(self) -> int | None:
        return _logged_pid(self.log_dir)

    def stop(self) -> str:
        """Quit a daemon started here and remove its directory; a daemon found running is left
        alone. Returns one line saying what happened ("" the second time)."""
        if self._stopped:
            return ""
        self._stopped = True
        if not self.owned:
            return f"left the MPS daemon on {self.pipe_dir} running (Tandem did not start it)"
        return _stop_owned(self.binary, self.env(), self.root, self.log_dir, self.quit_timeout)


def find_control(path: str | None = None) -> str:
    binary = shutil.which(CONTROL, path=path)
    if not binary:
        raise MpsUnavailable("binary_missing", f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    return binary


def start_mps(answer_timeout: float = 15.0, environ: dict[str, str] | None = None,
              say: Callable[[str], None] = lambda line: None) -> MpsDaemon:
    """Step 1 of the lifecycle. say(line): progress lines."""
    environ = dict(os.environ if environ is None else environ)
    binary = find_control(environ.get("PATH"))
    for line in reap_stale(binary):
        say(line)
    theirs = environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    if os.path.exists(os.path.join(theirs, "control")):
        log_dir = environ.get("CUDA_MPS_LOG_DIRECTORY") or "/var/log/nvidia-mps"
        try:
            _ask(binary, {"CUDA_MPS_PIPE_DIRECTORY": theirs, "CUDA_MPS_LOG_DIRECTORY": log_dir},
                 "get_server_list", timeout=5.0)
        except MpsUnavailable:
            pass   # a stale socket: start our own
        else:
            say(f"using the MPS control daemon already running on {theirs} (not started by Tandem: "
                "it is left running at exit)")
            return MpsDaemon(binary, theirs, log_dir, owned=False)
    root = tempfile.mkdtemp(prefix=DIR_PREFIX)
    Path(root, OWNER_FILE).write_text(f"{os.getpid()}\n")
    daemon = MpsDaemon(binary, os.path.join(root, "pipe"), os.path.join(root, "log"), owned=True, root=root)
    os.mkdir(daemon.pipe_dir, 0o700)
    os.mkdir(daemon.log_dir, 0o700)
    say(f"starting the CUDA MPS control daemon ({binary} -d, pipe directory {daemon.pipe_dir}) ...")
    try:
        r = subprocess.run([binary, "-d"], env={**environ, **daemon.env()}, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=answer_timeout)
        if r.returncode != 0:
            raise MpsUnavailable("daemon_failed", f"`{CONTROL} -d` exited with code {r.returncode}"
                                 + _tail(r.stderr or r.stdout) + _root_hint())
        deadline, last = time.monotonic() + answer_timeout, None
        while True:
            try:
                daemon.ask("get_server_list", timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                break
            except MpsUnavailable as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise MpsUnavailable("no_answer", f"the MPS control daemon did not answer within "
                                     f"{answer_timeout:g} s ({last})" + _root_hint())
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        _stop_owned(binary, daemon.env(), root, daemon.log_dir, 2.0)
        raise MpsUnavailable("daemon_failed", f"`{CONTROL} -d` did not return within {answer_timeout:g} s") from None
    except BaseException:
        _stop_owned(binary, daemon.env(), root, daemon.log_dir, 2.0)
        raise
    say(f"MPS control daemon ready (pid {daemon.daemon_pid() or '?'})")
    return daemon


GEMM_CHECK_ENV = "TANDEM_MPS_GEMM_CHECK"   # another check command (tests: a fake that fails)


def check_clients(daemon: MpsDaemon, percentages, device: str, timeout: float = 180.0,
                  say: Callable[[str], None] = lambda line: None) -> str | None:
    """Step 1e: run `python -m engine.gemm_check` as an MPS client at each SM percentage the
    workers will get (on the lent H200 a client limited to 40% got wrong matrix products).
    None when every client computes right, else one line saying where and how wrong."""
    import shlex
    import sys
    cmd = shlex.split(os.environ.get(GEMM_CHECK_ENV, "")) or [sys.executable, "-m", "engine.gemm_check"]
    for pct in sorted(set(percentages)):
        say(f"checking matrix products as an MPS client at {pct}% of the SMs ...")
        try:
            r = subprocess.run(cmd + ["--device", device], env={**os.environ, **daemon.client_env(pct)},
                               capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"at {pct}% of the SMs the check did not finish within {timeout:g} s"
        if r.returncode != 0:
            lines = [ln for ln in (r.stdout or "").splitlines() if ln.startswith("{")]
            try:
                msg = json.loads(lines[-1])["message"]
            except (IndexError, ValueError, KeyError, TypeError):
                msg = f"the check exited with code {r.returncode}" + _tail(r.stderr or r.stdout)
            return f"at {pct}% of the SMs: {msg}"
    return None


def reap_stale(binary: str, tmp: str | None = None) -> list[str]:
    """Quit the daemons of private directories whose owner process is gone (a launcher that
    was SIGKILLed cannot stop its own) and remove those directories; one line per each."""
    out = []
    for root in sorted(Path(tmp or tempfile.gettempdir()).glob(DIR_PREFIX + "*")):
        try:
            owner = int((root / OWNER_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _alive(owner):
            continue
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
        out.append(f"stopping a stale MPS daemon (its launcher, pid {owner}, is gone): "
                   + _stop_owned(binary, env, str(root), str(root / "log"), 5.0))
    return out


class SharingMetrics:
    """The launcher's /metrics about GPU sharing (a private registry, served by serve)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.mode = Gauge("tandem_gpu_sharing", "How the prefill and decode workers of one GPU share it "
                          "(1 for the mode in force: mps, turns or none).", ["mode"], registry=self.registry)
        self.fallbacks = Counter("tandem_gpu_sharing_fallbacks", "Times MPS was wanted but not available "
                                 "(or its clients computed wrong matrix products), so the workers took turns instead (each also said in one line), by reason.",
                                 ["reason"], registry=self.registry)
        self.fraction = Gauge("tandem_prefill_sm_fraction", "Share of the GPU's SMs given to the prefill "
                              "worker (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100; MPS only).",
                              registry=self.registry)
        for reason in ("binary_missing", "daemon_failed", "no_answer", "wrong_results"):
            self.fallbacks.labels(reason)

    def set_mode(self, mode: str, prefill_fraction: float | None = None) -> None:
        for m in ("mps", "turns", "none"):
            self.mode.labels(m).set(1 if m == mode else 0)
        if prefill_fraction is not None:
            self.fraction.set(prefill_fraction)


# ---- helpers ---------------------------------------------------------------------------------


def _ask(binary: str, env: dict[str, str], command: str, timeout: float) -> str:
    try:
        r = subprocess.run([binary], input=command + "\n", env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MpsUnavailable("no_answer", f"`{command}` got no answer within {timeout:g} s") from None
    except OSError as exc:
        raise MpsUnavailable("daemon_failed", f"cannot run {binary}: {exc}") from None
    if r.returncode != 0:
        raise MpsUnavailable("no_answer", f"`{command}` failed (code {r.returncode})" + _tail(r.stderr or r.stdout))
    return r.stdout


def _stop_owned(binary: str, env: dict[str, str], root: str, log_dir: str, timeout: float) -> str:
    pid = _logged_pid(log_dir)
    said = "quit"
    try:
        _ask(binary, env, "quit", timeout)
    except MpsUnavailable as exc:
        said = f"quit failed ({exc})"
    deadline = time.monotonic() + timeout
    while pid and _is_control(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid and _is_control(pid):
        os.kill(pid, signal.SIGTERM)
        said += f"; still running, sent SIGTERM to pid {pid}"
    shutil.rmtree(root, ignore_errors=True)
    return f"MPS control daemon stopped ({said}), {root} removed"


def _logged_pid(log_dir: str) -> int | None:
    try:
        m = _DAEMON_PID.search(Path(log_dir, "control.log").read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_control(pid: int) -> bool:
    """pid is a live control daemon (not a recycled pid of something else; not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return CONTROL.encode() in cmdline and state != "Z"


def _tail(text: str) -> str:
    text = " ".join((text or "").split())
    return f": {text[-200:]}" if text else ""


def _root_hint() -> str:
    return "" if os.geteuid() == 0 else " (not running as root; the MPS daemon may need it)"
