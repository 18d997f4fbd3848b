"""One Ray actor per Tandem process: `ManagedProcess` runs a command on its node and makes it
share the actor's fate.

Lifecycle (each step is one actor call from deploy.ray.launch):
  1. created (by `ray.remote(ManagedProcess).options(...)`, with the CPUs/GPUs and the placement
     group bundle of its process; Ray sets CUDA_VISIBLE_DEVICES for the GPUs it reserved);
  2. `node_ip()`, `free_port(pair_offset)`, `temp_dir(name)`: where it runs, a port free on
     that node (with port + pair_offset free too: a worker's metrics port), a private 0700
     directory (etcd's data), removed by `stop` or, should the actor be killed first, by a
     watcher within a second;
  3. `start(argv, token)`: spawns argv (argv[0] looked up on PATH) with the cluster token in its
     environment ($TANDEM_CLUSTER_TOKEN, read by engine/cluster_auth.py: no file to leave
     behind if the actor is killed) and PR_SET_PDEATHSIG = SIGKILL, so the process dies when
     the actor's process does, however that happens (`ray job stop`, the driver's death, a node
     drain). The process writes to the actor's stdout/stderr, which Ray streams to the job log
     under the actor's label;
  4. `probe(kind, target, timeout_s)` until "ready" (gRPC channel ready, or HTTP 200 whose body
     holds a given text), `poll()` while it serves;
  5. `stop(grace_s)`: SIGTERM, SIGKILL after grace_s, temp dir removed. Then the driver kills
     the actor.

Every argument and result is a str, int, float, list of str or dict of those: Ray pickles actor
calls, so nothing richer crosses them (no Tandem object is ever pickled).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TOKEN_ENV = "TANDEM_CLUSTER_TOKEN"   # engine.cluster_auth.TOKEN_ENV (not imported: keeps this light)

# Run in the child between fork and exec, as its own tiny program rather than a preexec_fn (not
# safe in a threaded process such as a Ray worker): arm PR_SET_PDEATHSIG, give up if the parent
# is already gone (it may die before prctl), then exec the real command. The setting survives
# execve. Linux only, as Ray clusters are.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)) != 0:\n"   # 1 = PR_SET_PDEATHSIG
    "    sys.exit('error: prctl(PR_SET_PDEATHSIG) failed: errno %d' % ctypes.get_errno())\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ManagedProcess:
    """A Ray actor class (wrapped with ray.remote by the driver): one process and its fate."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._proc: subprocess.Popen | None = None
        self._dirs: list[str] = []
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: fork from one
        # thread that lives as long as the actor's process, whichever thread runs actor calls.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spawn-{label}")

    def __repr__(self) -> str:   # Ray prefixes the actor's log lines with this
        return self.label

    # ---- where ----------------------------------------------------------------------

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self, pair_offset: int = 0) -> int:
        """A port free on this node's IP (and port + pair_offset too, when > 0)."""
        ip = self.node_ip()
        for _ in range(200):
            with socket.socket() as s:
                s.bind((ip, 0))
                port = s.getsockname()[1]
            if not pair_offset:
                return port
            if port + pair_offset <= 65535 and _bindable(ip, port + pair_offset):
                return port
        raise RuntimeError(f"no free port pair (port, port + {pair_offset}) on {ip}")

    def temp_dir(self, name: str) -> str:
        """A new 0700 directory $TMPDIR/<name>-XXXX, removed by `stop`, or within a second of
        this actor's death if it never gets to (a detached watcher, as Ray's job supervisor
        watches its driver)."""
        path = tempfile.mkdtemp(prefix=f"{name}-")
        self._dirs.append(path)
        # backgrounded by a shell that exits at once: not this process's child, which Ray kills
        # with the actor, nor in its process group
        subprocess.run(["sh", "-c", '(while kill -0 "$0" 2>/dev/null; do sleep 1; done; rm -rf -- "$1") &',
                        str(os.getpid()), path], start_new_session=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return path

    # ---- the process ----------------------------------------------------------------

    def start(self, argv: list[str], token: str = "") -> int:
        """Spawn argv (argv[0]: a path, or a name looked up on PATH; "python": this
        interpreter); its pid. token: put in $TANDEM_CLUSTER_TOKEN ("" = none)."""
        if self._proc is not None:
            raise RuntimeError(f"{self.label} already started")
        exe = sys.executable if argv[0] == "python" else shutil.which(argv[0])
        if exe is None:
            raise FileNotFoundError(f"{argv[0]} not found on PATH on {self.node_ip()}")
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)
        if token:
            env[TOKEN_ENV] = token
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), exe, *argv[1:]]
        sys.stdout.flush()
        self._proc = self._spawner.submit(subprocess.Popen, cmd, env=env).result()
        return self._proc.pid

    def poll(self) -> int | None:
        """None while the process runs, else its exit code (negative: killed by that signal)."""
        if self._proc is None:
            raise RuntimeError(f"{self.label} was not started")
        return self._proc.poll()

    def probe(self, kind: str, target: str, timeout_s: float = 1.0, expect: str = "") -> dict:
        """{"state": "ready" | "starting" | "exited", "code": exit code or 0}. kind "grpc":
        target host:port accepts a channel; kind "http": GET target answers 200 (and its body
        contains `expect`)."""
        code = self.poll()
        if code is not None:
            return {"state": "exited", "code": code}
        ok = _grpc_ready(target, timeout_s) if kind == "grpc" else _http_ready(target, timeout_s, expect)
        code = self.poll()
        if code is not None:
            return {"state": "exited", "code": code}
        return {"state": "ready" if ok else "starting", "code": 0}

    def stop(self, grace_s: float = 2.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s; the exit code (None: never started)."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            code = self._proc.returncode
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()
        return code


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
            return True
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise


def _grpc_ready(address: str, timeout_s: float) -> bool:
    import grpc

    with grpc.insecure_channel(address) as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout_s)
            return True
        except grpc.FutureTimeoutError:
            return False


def _http_ready(url: str, timeout_s: float, expect: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200 and expect.encode() in r.read()
    except (OSError, ValueError):
        time.sleep(min(timeout_s, 0.25))   # a refused connection returns at once: do not spin
        return False
