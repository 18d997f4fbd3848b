"""`ray job submit ... python -m deploy.ray.launch` against a real local Ray head (CPU, tiny
model): the job serves a completion through the URL it prints, `ray job stop` leaves no Tandem
process, etcd, actor, placement group or temp dir behind, and neither does a driver killed with
SIGKILL (Ray's own clean-up of an actor's children is turned off on this head, so the launcher's
is what runs: with PR_SET_PDEATHSIG disabled, that test fails with the three Tandem processes
left). A worker that cannot start fails the job, and nothing is left either. Without Ray: a
process started by `ManagedProcess` dies with its parent (whichever thread started it), and the
launcher's user errors are one line and exit code 2."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import openai
import psutil
import pytest
from openai import OpenAI

from cluster import ROOT, free_port
from engine import cluster_auth
from etcd_server import find_etcd
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

RAY_DAEMONS = ("raylet", "gcs_server")


def _ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return dict(env, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own (ports picked free, a short temp dir: Ray's socket paths must fit
    in 107 bytes); the job API's address. `ray stop` at the end."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed (pip install 'ray[default]')")
    running = [p.info["name"] for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS]
    if running:
        pytest.skip(f"a Ray cluster already runs on this machine ({running[0]}): this test's `ray stop` "
                    "would stop it too")
    temp = tempfile.mkdtemp(prefix="tray-", dir="/tmp")
    dashboard = free_port()
    cmd = ["ray", "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp,
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--include-dashboard", "true"]
    # Ray's own clean-up of an actor's children is off, so what is tested is the launcher's
    # (its stop, and PR_SET_PDEATHSIG when the driver is killed), whatever a cluster sets
    ray_cleanup_off = {"RAY_kill_child_processes_on_worker_exit": "false", "RAY_process_group_cleanup_enabled": "false"}
    r = subprocess.run(cmd, env=dict(_ray_env(), **ray_cleanup_off), capture_output=True, text=True, timeout=120)
    try:
        if r.returncode != 0:
            pytest.skip(f"Ray cannot start here: `ray start --head` exited {r.returncode}: "
                        f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(lambda: _jobs_api_up(address), 60, "the Ray job API did not come up")
        yield address
    finally:
        subprocess.run(["ray", "stop"], env=_ray_env(), capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _jobs_api_up(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).list_jobs()
        return True
    except Exception:   # noqa: BLE001 - not up yet (connection refused, 5xx while starting)
        return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from engine.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("raymodel") / "llama", arch="llama", seed=0)


def _wait_for(check, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.2)


class Job:
    """One `ray job submit --no-wait` of the launcher, its log followed with `ray job logs -f`."""

    def __init__(self, address: str, model: Path, *launcher_flags: str) -> None:
        self.address, self.model = address, model
        self.id = f"tandem-test-{os.urandom(4).hex()}"
        submit = ["ray", "job", "submit", "--address", address, "--submission-id", self.id, "--working-dir", ".",
                  "--no-wait", "--", "python", "-m", "deploy.ray.launch", "--prefill", "1", "--decode", "1",
                  "--model", str(model), "--device", "cpu", "--port", "0", "--cpus-per-worker", "0.5",
                  "--router-cpus", "0.5", "--etcd-binary", find_etcd() or "etcd", *launcher_flags]
        r = subprocess.run(submit, cwd=ROOT, env=_ray_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        self.lines: list[str] = []
        self._follow = subprocess.Popen(["ray", "job", "logs", "--address", address, "--follow", self.id],
                                        env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._follow.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_url(self, timeout: float = 120) -> tuple[str, str]:
        """(the TANDEM_URL the launcher printed, its run id)."""
        def url():
            found = re.search(r"^TANDEM_URL=(\S+)$", self.log(), re.M)
            assert "error:" not in self.log(), self.log()
            return found and found.group(1)

        found = _wait_for(url, timeout, lambda: f"no TANDEM_URL line after {timeout} s:\n{self.log()}")
        return found, self.run_id()

    def run_id(self) -> str:
        run = re.search(r"tandem on ray, run (\w+): 1 prefill \+ 1 decode, .* device cpu, 0.5 CPU \+ 0 GPU per worker",
                        self.log())
        assert run, self.log()
        return run.group(1)

    def status(self) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.address).get_job_status(self.id).value)

    def close(self) -> None:
        if self._follow.poll() is None:
            self._follow.kill()
        self._follow.wait()


def _tandem_processes(model: Path) -> dict[str, psutil.Process]:
    """This module's Tandem processes by role (the model path is this module's own)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tandem_cli.main" in cmd and str(model) in cmd:
            found[cmd[cmd.index("tandem_cli.main") + 1]] = p
    return found


def _run_processes(model: Path, run: str) -> list[str]:
    """Every process of run `run` still alive: Tandem's, its etcd's, the launcher's."""
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and (str(model) in cmd or f"tandem-{run}" in cmd):
            left.append(cmd[:160])
    return left


def _actors(address: str, run: str) -> dict[str, str]:
    """The actors of run `run`: name -> state."""
    from ray.util.state import list_actors

    return {a.name: a.state for a in list_actors(address=address, limit=1000)
            if (a.name or "").startswith(f"tandem-{run}-")}


def _placement_groups(address: str, run: str) -> list[str]:
    from ray.util.state import list_placement_groups

    return [g.state for g in list_placement_groups(address=address, limit=1000) if g.name == f"tandem-{run}"]


def _left_dirs(run: str) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"tandem-ray-{run}-*"))


def _call_stats(address: str, token: str):
    """None if the worker answered Stats, else the gRPC status code."""
    with cluster_auth.channel(address, token=token) as ch:
        try:
            pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=10)
            return None
        except grpc.RpcError as exc:
            return exc.code()


def _assert_nothing_left(address: str, model: Path, run: str,
                         labels: tuple[str, ...] = ("etcd", "decode-0", "prefill-0", "router")) -> None:
    _wait_for(lambda: not _run_processes(model, run), 20,
              lambda: f"processes left: {_run_processes(model, run)}")
    _wait_for(lambda: not _left_dirs(run), 5, lambda: f"temp dirs left: {_left_dirs(run)}")
    actors = _wait_for(lambda: (lambda a: a if "ALIVE" not in a.values() else None)(_actors(address, run)), 30,
                       lambda: f"actors left alive: {_actors(address, run)}")
    assert set(actors) == {f"tandem-{run}-{x}" for x in labels}, actors
    assert _wait_for(lambda: _placement_groups(address, run) == ["REMOVED"], 10,
                     lambda: f"placement group: {_placement_groups(address, run)}")


def test_ray_job_serves_through_the_printed_url_and_ray_job_stop_leaves_nothing(ray_head, tiny_model):
    key = "k-" + os.urandom(8).hex()
    t0 = time.monotonic()
    job = Job(ray_head, tiny_model, "--served-model-name", "tiny", "--api-key", key)
    try:
        url, run = job.wait_url()
        started = time.monotonic() - t0
        procs = _tandem_processes(tiny_model)
        assert set(procs) == {"router", "prefill", "decode"}, procs
        etcd = [p for p in psutil.process_iter(["cmdline"]) if f"tandem-{run}" in " ".join(p.info["cmdline"] or [])
                and os.path.basename((p.info["cmdline"] or [""])[0]) == "etcd"]
        assert len(etcd) == 1
        assert set(_actors(ray_head, run).values()) == {"ALIVE"} and len(_actors(ray_head, run)) == 4

        client = OpenAI(base_url=url, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].text
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4)
        assert chat.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):   # --api-key reached the router
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()

        # one token per run, in every process's environment, on no command line; the workers want it
        tokens = {p.environ().get(cluster_auth.TOKEN_ENV) for p in procs.values()}
        assert len(tokens) == 1 and len(token := tokens.pop() or "") >= 16
        assert not any(token in " ".join(p.cmdline()) for p in procs.values())
        decode_cmd = procs["decode"].cmdline()
        decode_addr = f"{decode_cmd[decode_cmd.index('--host') + 1]}:{decode_cmd[decode_cmd.index('--port') + 1]}"
        assert _call_stats(decode_addr, "") == grpc.StatusCode.UNAUTHENTICATED
        assert _call_stats(decode_addr, token) is None

        t_stop = time.monotonic()
        r = subprocess.run(["ray", "job", "stop", "--address", ray_head, job.id], env=_ray_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        _assert_nothing_left(ray_head, tiny_model, run)
        stopped = time.monotonic() - t_stop
        assert job.status() == "STOPPED"
        # the driver's own stop ran to the end within Ray's SIGTERM -> SIGKILL window
        took = _wait_for(lambda: re.search(r"stopped: 4 processes and their actors, the placement group "
                                           r"\(([\d.]+) s\)", job.log()), 10, job.log).group(1)
        print(f"\nray job: serving {started:.1f} s after submit; the driver's stop took {took} s; "
              f"everything gone {stopped:.1f} s after `ray job stop`")
    finally:
        job.close()


def test_a_driver_killed_with_sigkill_takes_every_process_with_it(ray_head, tiny_model):
    job = Job(ray_head, tiny_model)
    try:
        url, run = job.wait_url()
        assert set(_tandem_processes(tiny_model)) == {"router", "prefill", "decode"}
        drivers = [p for p in psutil.process_iter(["cmdline"])
                   if (p.info["cmdline"] or [])[:3] == ["python", "-m", "deploy.ray.launch"]
                   and str(tiny_model) in p.info["cmdline"]]
        assert len(drivers) == 1, drivers
        drivers[0].kill()   # no stop of its own: Ray's owner-death cleanup and PR_SET_PDEATHSIG only
        _assert_nothing_left(ray_head, tiny_model, run)
        _wait_for(lambda: job.status() == "FAILED", 30, lambda: job.status())
        assert "stopped:" not in job.log()
    finally:
        job.close()


def test_a_worker_that_cannot_start_fails_the_job_and_leaves_nothing(ray_head, tmp_path):
    job = Job(ray_head, tmp_path / "no-such-model")   # each worker's --model check: one line, exit 2
    try:
        _wait_for(lambda: job.status() == "FAILED", 90, job.log)
        _wait_for(lambda: re.search(r"error: the (decode|prefill)-0 process exited with code 2 while starting "
                                    r"\(its log is above\); stopping", job.log()), 10, job.log)
        assert "TANDEM_URL=" not in job.log()
        _assert_nothing_left(ray_head, tmp_path / "no-such-model", job.run_id(), ("etcd", "decode-0", "prefill-0"))
    finally:
        job.close()


# ---- without Ray -----------------------------------------------------------------


_HOLDER = """
import sys, threading, time
from deploy.ray.actors import ManagedProcess
m = ManagedProcess("holder")
pids = []
t = threading.Thread(target=lambda: pids.append(m.start(["sleep", "600"], token=sys.argv[1])))
t.start(); t.join()   # the calling thread ends; the child must not die with it
print(pids[0], m.temp_dir("tandem-ray-holdertest"), flush=True)
time.sleep(600)
"""


def test_a_managed_process_dies_with_its_parent_and_gets_the_token_by_environment():
    token = "t" * 32
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, token], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid, directory = holder.stdout.readline().split()
        child = psutil.Process(int(pid))
        time.sleep(0.5)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE   # outlived the thread
        assert child.cmdline() == [shutil.which("sleep"), "600"]             # exec'd, no wrapper left
        assert child.environ()[cluster_auth.TOKEN_ENV] == token
        assert os.path.isdir(directory) and (os.stat(directory).st_mode & 0o777) == 0o700
        holder.send_signal(signal.SIGKILL)
        holder.wait()   # reaped, as the raylet reaps its workers (a zombie still answers kill -0)
        child.wait(5)   # raises psutil.TimeoutExpired if it outlives its parent
        _wait_for(lambda: not os.path.exists(directory), 5, f"{directory} left after its actor died")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("flags, needle", [
    (["--worker-args", "--bogus 1"], "the decode-0 command line: unrecognized arguments: --bogus 1"),
    (["--decode-args", "--port 5"], "--decode-args --port: the launcher sets it"),
    (["--etcd", "nohostport"], "--etcd nohostport: not host:port"),
    (["--device", "cuda", "--gpus-per-worker", "0"], "Ray shows no GPU to an actor that reserves none"),
    (["--prefill", "0"], "--prefill: must be > 0"),
    (["--cluster-token-file", "/nonexistent/token"], "cannot read --cluster-token-file /nonexistent/token"),
])
def test_launcher_user_errors_are_one_line_exit_2_before_ray(flags, needle):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "deploy.ray.launch", "--model", "/m", *flags], cwd=ROOT,
                       env=dict(_ray_env(), RAY_ADDRESS="127.0.0.1:1"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10
