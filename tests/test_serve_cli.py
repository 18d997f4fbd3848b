"""The `tandem` command: `serve` with no arguments (demo model, three processes, clean
shutdown); user errors that fail in one line, fast; Ctrl-C during start-up; flags that
reach the processes that use them."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from cluster import ROOT, free_port


def _until_serving(proc: subprocess.Popen, timeout: float) -> list[str]:
    """`tandem serve`'s output lines up to and including "Tandem is serving" (its stdout piped)."""
    lines: list[str] = []
    start = time.monotonic()
    for line in proc.stdout:
        lines.append(line)
        if "Tandem is serving" in line:
            return lines
        assert time.monotonic() - start < timeout and proc.poll() is None, "".join(lines)
    raise AssertionError("tandem serve ended before serving:\n" + "".join(lines))


def test_serve_embedded_default_answers_chat_and_stops_children(tmp_path):
    port = free_port()
    env = dict(os.environ, TANDEM_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        start = time.monotonic()
        lines = _until_serving(proc, 60)
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
        # a clean stop says nothing alarming (no traceback, no interpreter-exit leak reports)
        rest = proc.stdout.read()
        assert "Traceback" not in rest and "leaked" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()




# ---- user errors: one line, exit code 2, within 2 s (tandem_cli/checks.py) -------------------

def _run_cli(argv: list[str], **env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    return r, time.monotonic() - t0


def _assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from engine.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=0)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _user_errors(tiny: Path, busy: int, free: int, not_a_model: Path) -> list[tuple[list[str], str]]:
    """(argv, what its one error line must contain): every case exits 2 within 2 s."""
    cases = [
        (["serve", "--port", "80000"], "--port 80000 is out of range"),
        (["serve", "--model", "/nonexistent"], "--model /nonexistent: no such directory"),
        (["serve", "--placement", "bogus"], "invalid choice: 'bogus'"),
        (["serve", "--port", str(busy)], f"127.0.0.1:{busy} is already in use"),
        (["serve", "--worker-base-port", str(busy)], "already in use"),
        (["serve", "--model", str(not_a_model)], "not a model directory (no config.json"),
        (["serve", "--tensor-parallel-size", "2"], "--tensor-parallel-size 2"),
        (["serve", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization: must be in (0, 1]"),
        (["serve", "--max-num-seqs", "0"], "--max-num-seqs: must be > 0"),
        (["serve", "--etcd", "nohostport"], "is not host:port"),
        (["serve", "--log-level", "loud"], "--log-level: invalid choice"),
        (["decode", "--model", "/nonexistent/model/dir", "--port", str(free)], "no such directory"),
        (["prefill", "--model", str(tiny), "--port", "70000"], "--port 70000 is out of range"),
        (["decode", "--model", str(tiny), "--port", str(free), "--metrics-port", "70000"], "--metrics-port 70000"),
        (["decode", "--model", str(tiny), "--port", "65000"], "--metrics-port (default: --port + 1000) 66000"),
        (["router", "--model", str(tiny), "--port", str(free)], "--decode"),
        (["router", "--model", str(not_a_model), "--decode", "127.0.0.1:1", "--port", str(free)],
         "not a model directory"),
        ([], "required: command"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases += [(["serve", "--device", "cuda"], "--device cuda"),
                  (["decode", "--model", str(tiny), "--device", "cuda", "--port", str(free)], "--device cuda")]
    return cases


def test_user_errors_are_one_line_exit_2_within_2s(tiny_model, busy_port, tmp_path):
    free = free_port()
    for argv, needle in _user_errors(tiny_model, busy_port, free, tmp_path):
        r, elapsed = _run_cli(argv)
        _assert_one_line_error(r, needle)
        assert elapsed < 2.0, f"{argv}: {elapsed:.2f} s"
        assert "starting the" not in r.stdout, f"{argv} started a worker: {r.stdout}"


def test_offline_hub_id_is_one_line():
    r, _ = _run_cli(["serve", "--model", "no-such-org/no-such-model"])
    _assert_one_line_error(r, "--model no-such-org/no-such-model: no such directory, and not fetchable")


# ---- flags reach the processes that use them --------------------------------------------------

def _serve_child(children: list[psutil.Process], command: str) -> list[str]:
    """argv after `-m tandem_cli.main` of serve's child running `command`."""
    for c in children:
        cmd = c.cmdline()
        if "tandem_cli.main" in cmd and cmd[cmd.index("tandem_cli.main") + 1] == command:
            return cmd[cmd.index("tandem_cli.main") + 1:]
    raise AssertionError(f"no {command} child in {[c.cmdline() for c in children]}")


def test_serve_placement_and_load_format_reach_the_router_and_workers(tiny_model):
    from router.backend import DecodeClient
    from tandem_cli.args import build_parser, router_config_from_args

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "serve", "--model", str(tiny_model),
                             "--port", str(port), "--placement", "least_load", "--load-format", "safetensors"],
                            cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _until_serving(proc, 90)
        children = psutil.Process(proc.pid).children(recursive=True)
        router_argv = _serve_child(children, "router")
        # the running router's own flags, parsed as it parsed them: its placement is least_load
        config = router_config_from_args(build_parser().parse_args(router_argv), str(tiny_model))
        assert config.placement == "least_load"
        assert DecodeClient.from_config(config).placement.config.policy == "least_load"
        # safetensors is what "auto" reads: the workers got it and loaded the checkpoint's weights
        for role in ("decode", "prefill"):
            argv = _serve_child(children, role)
            assert argv[argv.index("--load-format") + 1] == "auto"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(tiny_model)]
        r = client.completions.create(model=str(tiny_model), prompt="Hello", max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for c in psutil.Process().children(recursive=True):
            c.kill()


def test_serve_passes_every_flag_its_children_share():
    """Each serve flag that the router or a worker also has reaches it with serve's value (so a
    flag like --placement cannot be parsed and dropped again). Every one is given a value that
    differs from its default, or the comparison would prove nothing."""
    from tandem_cli.args import build_parser, engine_config_from_args
    from tandem_cli.serve import plan_workers, router_argv

    argv = ["serve", "--model", "m", "--load-format", "dummy", "--dtype", "float16", "--device", "cuda",
            "--block-size", "32", "--num-pages", "100", "--gpu-memory-utilization", "0.5",
            "--kv-cache-memory", "1000000", "--max-model-len", "300", "--max-num-seqs", "7",
            "--max-num-batched-tokens", "999", "--attention-backend", "torch", "--seed", "5", "--enforce-eager",
            "--no-enable-prefix-caching", "--no-async-scheduling", "--no-mixed-batches", "--disable-cascade-attn", "--host", "0.0.0.0", "--port", "9001",
            "--log-level", "debug", "--served-model-name", "a", "--served-model-name", "b", "--api-key", "k",
            "--kv-transfer-backend", "nixl", "--etcd", "etcd-0:2379", "--etcd-prefix", "/p", "--member-ttl", "3",
            "--placement", "least_load", "--max-request-bytes", "123", "--max-queued-requests", "5",
            "--tool-call-parser", "hermes",
            "--queue-timeout", "4", "--migration-limit", "1", "--request-trace-file", "rt",
            "--step-trace-file", "st", "--gpu-turns", "on", "--sm-partition", "0.3", "--sm-partition-adaptive",
            "--slo-ttft", "2", "--slo-tpot-ms", "40"]
    parser = build_parser()
    serve = parser.parse_args(argv)
    if hasattr(serve, "cluster_token_file"):
        serve = parser.parse_args(argv + ["--cluster-token-file", "tok"])
    defaults = parser.parse_args(["serve"])
    token_file = getattr(serve, "cluster_token_file", "")
    plan = plan_workers(engine_config_from_args(serve), serve, "/resolved/m", (7001, 7002), token_file)
    children = {"router": parser.parse_args(router_argv(serve, "/resolved/m", "", "", token_file))}
    children.update({w.role: parser.parse_args(list(w.argv)) for w in plan})
    assert set(children) == {"router", "decode", "prefill"}
    # serve's own (not passed as is): the model is resolved, workers bind loopback ports and get
    # their share of the GPU budget (tandem_cli/gpu_share.py)
    own = {"command", "model", "gpu_memory_utilization", "tensor_parallel_size"}
    worker_own = own | {"host", "port"}
    checked = set()
    for role, child in children.items():
        for dest, value in vars(child).items():
            if dest in (own if role == "router" else worker_own) or not hasattr(serve, dest):
                continue
            assert getattr(serve, dest) != getattr(defaults, dest), f"give --{dest} a non-default value here"
            assert value == getattr(serve, dest), f"{role} got {dest}={value!r}, serve has {getattr(serve, dest)!r}"
            checked.add(dest)
    assert {"placement", "load_format", "etcd_prefix", "member_ttl", "max_request_bytes"} <= checked


# ---- Ctrl-C while the workers load ------------------------------------------------------------

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (decode|prefill|router) (DEBUG|INFO|WARNING) ")


@pytest.mark.parametrize("to", ["process group", "serve alone"])
def test_ctrl_c_during_startup_stops_children_quietly(tiny_model, tmp_path, to):
    """A terminal's Ctrl-C reaches serve and its children (the process group); `kill -INT`
    reaches serve alone. Either way: exit code 130, one line from serve, no traceback from
    anyone, no child left."""
    err = tmp_path / "stderr"
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "serve", "--model", str(tiny_model),
                                 "--port", str(free_port())], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                stdout=subprocess.PIPE, stderr=err_file, text=True, start_new_session=True)
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if "starting the prefill worker" in line:
                break
        time.sleep(1.5)   # the workers are importing torch / loading the model now
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 2, out
        if to == "process group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
        out += proc.stdout.readlines()
        assert not any("worker ready" in ln or "Tandem is serving" in ln for ln in out), "not during start-up"
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"children left running: {alive}"
        stderr = err.read_text()
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        own = [ln for ln in stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
        assert len(own) == 1 and own[0].startswith("interrupted while starting (SIGINT)"), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()


# ---- the README's flag table ------------------------------------------------------------------

def _readme_flag_rows() -> list[tuple[list[str], list[str]]]:
    """(flags, commands) of each row of README.md's flag table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| flag | commands | meaning |"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) >= 3, f"a README flag row without its commands: {line}"
        flags = re.findall(r"`(--[a-z0-9-]+)`", cells[0])
        commands = ["serve", "router", "prefill", "decode"] if cells[1] == "all" else \
            [c.strip() for c in cells[1].split(",")]
        rows.append((flags, commands))
    return rows


def test_every_readme_flag_works_on_the_commands_it_lists():
    from tandem_cli.args import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    rows = _readme_flag_rows()
    assert len(rows) > 30
    for flags, commands in rows:
        assert flags and commands
        for command in commands:
            options = sub[command]._option_string_actions
            for flag in flags:
                assert flag in options, f"README lists {flag} for `tandem {command}`, which does not take it"
    # and the other way round: each serve flag is in the table (or serve-internal by design)
    listed = {f for flags, commands in rows if "serve" in commands for f in flags}
    serve_flags = {o for a in sub["serve"]._actions for o in a.option_strings if o.startswith("--")}
    unlisted = serve_flags - listed - {"--help", "-tp", "--cluster-token-file"}
    assert not unlisted, f"serve flags missing from the README table: {sorted(unlisted)}"
