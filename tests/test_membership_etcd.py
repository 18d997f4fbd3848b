"""etcd membership end to end: a real etcd, real worker and router processes.

One cluster for the module (the tests run in order and each leaves it as the
next expects): etcd on free loopback ports; the router reaches etcd through a
TcpProxy (so a test can cut the router's watch while etcd stays up); decode
workers A, B, C and prefill worker P register directly, with a 2 s lease TTL.

  1. all four register with their MemberInfo, the router places work on them;
  2. SIGKILL B: B leaves the router's pool within TTL + 1 s;
  3. revoke A's lease behind its back: A registers again under a new lease and
     serves again (no restart);
  4. restart etcd (same data dir and port): the router's view recovers, follows
     later changes (C stops gracefully: its lease is revoked, it leaves at once),
     requests still work;
  5. cut the router's watch, P stops, compact etcd past the router's revision,
     heal: the router lists again (not a stale view) and ends with only A.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from etcd_server import EtcdServer, TcpProxy, find_etcd, free_port
from engine.sampling_params import SamplingParams
from engine.tiny_models import make_tiny_model
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parent.parent
TTL = 2
PREFIX = "/tandem-test"
NUM_PAGES, PAGE_SIZE, MAX_SEQS = 64, 4, 8

if find_etcd() is None:
    pytest.skip("no etcd binary on PATH or in /usr/bin (Debian: apt-get install etcd-server; .ci/run and "
                "`make test` install it when run as root)", allow_module_level=True)


class _Procs:
    """Tandem processes of this module, started like tests/cluster.py does."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        out = open(self.log_dir / f"{name}.log", "a")
        p = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *args], cwd=ROOT, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
        p.wait(15)

    def stop_all(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Env:
    def __init__(self, etcd: EtcdServer, proxy: TcpProxy, procs: _Procs, http_port: int,
                 addrs: dict[str, str], metrics_ports: dict[str, int]) -> None:
        self.etcd, self.proxy, self.procs = etcd, proxy, procs
        self.http = f"http://127.0.0.1:{http_port}"
        self.addrs, self.metrics_ports = addrs, metrics_ports

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.http}/health", timeout=2) as r:
            return json.loads(r.read())["membership"]

    def pool(self) -> dict[str, set[str]]:
        members = self.health()["members"]
        return {role: set(addrs) for role, addrs in members.items()}

    def wait_pool(self, decode: set[str], prefill: set[str], timeout: float) -> float:
        """Seconds until the router's pool is exactly decode + prefill."""
        t0 = time.monotonic()
        while True:
            pool = self.pool()
            if pool == {"decode": decode, "prefill": prefill}:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"pool {pool} after {timeout}s"
            time.sleep(0.05)

    def members_gauge(self) -> dict[str, float]:
        """The router's tandem_members{state="up"} by role, from its /metrics."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("tandem_members{") and 'state="up"' in line:
                role = line.split('role="', 1)[1].split('"', 1)[0]
                out[role] = float(line.rsplit(" ", 1)[1])
        return out

    def members_in_etcd(self) -> dict[str, pb.MemberInfo]:
        async def get(client):
            return [(kv.key.decode(), kv.value, kv.lease) for kv in await client.get_prefix(PREFIX.encode())]
        out = {}
        for key, value, lease in self.etcd.call(get):
            info = pb.MemberInfo.FromString(value)
            assert info.lease_id == lease, f"{key}: value lease {info.lease_id} != key lease {lease}"
            out[info.grpc_address] = info
        return out

    def complete(self, retry_s: float = 0.0) -> dict:
        body = json.dumps({"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}).encode()
        deadline = time.monotonic() + retry_s
        while True:
            req = urllib.request.Request(f"{self.http}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    out = json.loads(r.read())
                    assert out["usage"]["completion_tokens"] == 4
                    return out
            except urllib.error.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"completion failed: {exc.code} {exc.read()[:300]!r}") from None
                time.sleep(0.2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("membership")
    model_dir = make_tiny_model(tmp / "model", arch="llama", seed=7)
    logs = tmp / "logs"
    logs.mkdir()
    etcd = EtcdServer(tmp / "etcd-data", log_path=logs / "etcd.log").start()
    proxy = TcpProxy(etcd.port)
    procs = _Procs(logs)
    names = {"A": "decode", "B": "decode", "C": "decode", "P": "prefill"}
    addrs = {name: f"127.0.0.1:{free_port()}" for name in names}
    metrics_ports = {name: free_port() for name in names}
    http_port = free_port()
    try:
        for name, role in names.items():
            procs.spawn(name, [role, "--model", str(model_dir), "--port", addrs[name].split(":")[1],
                               "--device", "cpu", "--dtype", "float32", "--num-pages", str(NUM_PAGES),
                               "--block-size", str(PAGE_SIZE), "--max-num-seqs", str(MAX_SEQS),
                               "--etcd", etcd.endpoint, "--etcd-prefix", PREFIX, "--member-ttl", str(TTL),
                               "--metrics-port", str(metrics_ports[name])])
        procs.spawn("router", ["router", "--model", str(model_dir), "--port", str(http_port),
                               "--served-model-name", "tiny", "--etcd", proxy.endpoint, "--etcd-prefix", PREFIX])
        e = Env(etcd, proxy, procs, http_port, addrs, metrics_ports)
        deadline = time.monotonic() + 120
        while True:
            for name, p in procs.procs.items():
                assert p.poll() is None, f"{name} exited with {p.returncode}: see {logs}/{name}.log"
            try:
                if e.pool() == {"decode": {addrs["A"], addrs["B"], addrs["C"]}, "prefill": {addrs["P"]}}:
                    break
            except (OSError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, f"cluster not up; logs in {logs}"
            time.sleep(0.2)
        yield e
    finally:
        procs.stop_all()
        proxy.close()
        etcd.stop()


def test_workers_register_their_member_info_and_serve(env):
    members = env.members_in_etcd()
    assert set(members) == set(env.addrs.values())
    now_ms = time.time() * 1000
    for name, addr in env.addrs.items():
        m = members[addr]
        assert m.role == ("prefill" if name == "P" else "decode")
        assert m.grpc_address == m.kv_address == addr
        assert m.metrics_address == f"127.0.0.1:{env.metrics_ports[name]}"
        assert (m.num_pages, m.page_size, m.max_batch) == (NUM_PAGES, PAGE_SIZE, MAX_SEQS)
        assert now_ms - 300_000 < m.start_epoch_ms <= now_ms
        assert m.lease_id != 0 and m.model
    # The pool comes from the first list; the watch is established just after it.
    deadline = time.monotonic() + 10
    while not (h := env.health())["connected"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h["connected"] and h["lists"] == 1, h
    env.complete(retry_s=TTL + 1)  # on a loaded 2-CPU box a worker may just have lapsed and re-registered
    assert env.members_gauge() == {"decode": 3, "prefill": 1}


def test_killed_worker_leaves_the_pool_within_ttl_plus_1s(env):
    a, b, c, p = (env.addrs[n] for n in "ABCP")
    env.procs.stop("B", signal.SIGKILL)
    t0 = time.monotonic()
    env.wait_pool({a, c}, {p}, timeout=TTL + 3)
    took = time.monotonic() - t0
    assert took <= TTL + 1, f"killed worker left the pool after {took:.2f}s (TTL {TTL}s)"
    for _ in range(4):  # nothing is placed on the dead worker any more
        env.complete(retry_s=TTL + 1)
    assert env.members_gauge() == {"decode": 2, "prefill": 1}


def test_revoked_lease_reregisters_and_serves_again(env):
    a, c, p = (env.addrs[n] for n in "ACP")
    old = env.members_in_etcd()[a].lease_id

    async def revoke(client):
        await client.revoke_lease(old)
    env.etcd.call(revoke)
    deadline = time.monotonic() + TTL + 3
    while (m := env.members_in_etcd().get(a)) is None or m.lease_id == old:
        assert time.monotonic() < deadline, "worker did not register again after its lease was revoked"
        time.sleep(0.05)
    assert m.lease_id != 0
    env.wait_pool({a, c}, {p}, timeout=2)
    assert env.procs.procs["A"].poll() is None  # same process: no restart
    # A takes work again: a colocated Generate straight to it finishes.
    with grpc.insecure_channel(a) as ch:
        request = pb.GenerateRequest(request_id="after-revoke", prompt_token_ids=[5, 6, 7],
                                     sampling=SamplingParams(temperature=0, max_tokens=3).to_proto())
        responses = list(pbg.DecodeStub(ch).Generate(request, timeout=30))
    assert responses[-1].finish_reason == pb.FINISH_LENGTH
    env.complete()


def test_router_survives_an_etcd_restart(env):
    a, c, p = (env.addrs[n] for n in "ACP")
    before = env.health()["watches"]
    env.etcd.restart()
    deadline = time.monotonic() + 10
    while not ((h := env.health())["connected"] and h["watches"] > before):
        assert time.monotonic() < deadline, f"router's view did not reconnect: {h}"
        time.sleep(0.05)
    env.wait_pool({a, c}, {p}, timeout=TTL + 3)  # workers kept (or renewed) their registration
    # The watch is live again: a graceful stop revokes C's lease and C leaves at once (not after a TTL).
    env.procs.stop("C")
    env.wait_pool({a}, {p}, timeout=TTL + 3)
    assert env.procs.procs["C"].returncode == 0
    assert env.health()["lists"] == 1  # resumed from its revision, no re-list needed
    env.complete(retry_s=TTL + 1)  # a worker that lapsed during the restart registers again first


def test_etcd_down_for_30s_fails_no_request(env):
    """A control-plane outage is not a data-plane outage: with etcd stopped for 30 s (15 TTLs)
    every lease lapses, yet the router keeps its view and the workers keep serving (fencing rule
    in membership/registry.py); every request sent meanwhile completes at the first try."""
    a, p = env.addrs["A"], env.addrs["P"]      # B was killed and C stopped by the tests above
    env.wait_pool({a}, {p}, timeout=TTL + 3)
    env.etcd.stop()
    try:
        end = time.monotonic() + 30.0
        done = 0
        while time.monotonic() < end:
            env.complete()          # no retry: any failure fails the test
            done += 1
    finally:
        env.etcd.start()
    assert done >= 3
    env.wait_pool({a}, {p}, timeout=TTL + 5)   # registrations resume once etcd is back
    env.complete()


def test_compaction_while_the_watch_is_cut_leads_to_a_relist(env):
    a, p = env.addrs["A"], env.addrs["P"]
    h0 = env.health()
    env.proxy.cut()
    deadline = time.monotonic() + 5
    while env.health()["connected"]:
        assert time.monotonic() < deadline, "cutting the proxy did not break the router's watch"
        time.sleep(0.05)
    env.procs.stop("P")                      # P's key is deleted while the router cannot see it
    assert p not in env.members_in_etcd()
    compacted = env.etcd.compact()           # ... and that delete event is compacted away
    assert compacted > h0["revision"]
    assert env.pool() == {"decode": {a}, "prefill": {p}}  # still the old view while cut
    env.proxy.restore()
    env.wait_pool({a}, set(), timeout=5)
    h = env.health()
    assert h["compactions"] >= 1 and h["lists"] == h0["lists"] + 1 and h["revision"] >= compacted, h
    env.complete(retry_s=2)  # colocated on A now that no prefill worker is left
