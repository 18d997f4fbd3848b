"""NIXL KV transfer: real NIXL (UCX, DRAM to DRAM) between two real processes.

The receiver (and its grpc.aio server) lives in this process; senders run in child
processes (tests/nixl_harness.py). No mocks."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from nixl_harness import (DTYPE, HD, KVH, LAYERS, NIXL_ERROR, PAGE, Child, Side, assert_pools, bits,
                          expected, random_kv)

pytestmark = pytest.mark.skipif(NIXL_ERROR is not None, reason=f"nixl is not importable: {NIXL_ERROR}")


@pytest.fixture(scope="module")
def side():
    s = Side()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.stop()


def test_multilayer_ragged_offsets_land_exactly(side, child):
    before = side.snapshot()
    pages = [13, 2, 9, 4, 0, 11, 7]
    dst = side.open("ragged", pages)
    assert dst["backend"] == "nixl" and dst["address"] == side.receiver.address
    assert side.state("ragged") == "pending"
    assert child("start", h="a", dst=dst) == {"ok": True}
    # ragged splits per layer, out of order, one from another thread (the engine thread)
    plan = {0: [(0, 3), (3, 4)], 1: [(5, 2), (0, 5)], 2: [(0, 1), (1, 6)]}
    writes, seed = [], 50
    for layer, parts in plan.items():
        for off, n in parts:
            r = child("send", h="a", layer=layer, offset=off, n=n, seed=seed, shape=side.shape,
                      thread=(layer == 2))
            assert r == {"ok": True}, r
            writes.append((layer, pages[off:off + n], seed))
            seed += 1
        if layer == 0:
            side.wait_state("ragged", "in_progress")
    assert side.wait("ragged", 10) == "done"           # all pages in: DONE before finish()
    assert child("poll", h="a")["state"] == "in_progress"   # the sender waits for finish + ack
    assert child("send", h="a", layer=0, offset=1, n=1, seed=1, shape=side.shape)["error"].startswith(
        "ValueError")                                    # a page twice is refused before it leaves
    child("finish", h="a")
    r = child("wait", h="a", timeout=10)
    assert r.get("state") == "done", r
    page_bytes = PAGE * KVH * HD * 2
    assert r["bytes_sent"] == 2 * LAYERS * len(pages) * page_bytes and r["chunks"] == 6
    assert side.receiver.bytes_received >= r["bytes_sent"]
    assert_pools(side, expected(before, writes))
    side.call(side.receiver.close, "ragged")
    side.call(side.receiver.close, "ragged")           # twice: no error
    with pytest.raises(Exception, match="unknown transfer"):
        side.call(side.receiver.poll, "ragged")
    assert side.receiver._sessions == 0 and side.receiver.active_transfers == 0
    assert child("stats") == {"inflight": 0, "handles": 0, "streamed": r["bytes_sent"]}


def test_send_from_a_bound_pool(side, child):
    """One WRITE straight from the sender's registered pool: reservation page i gets the
    sender's pool page table[i], every layer, K and V, across runs that break on either side."""
    before = side.snapshot()
    assert child("pool", seed=300, n=12, layers=LAYERS, shape=side.shape) == {"ok": True, "bound": True}
    pages = [3, 4, 5, 14, 8, 9, 1]          # reservation: runs 3-5, 14, 8-9, 1
    table = [0, 1, 2, 3, 7, 10, 11]         # sender pool: runs 0-3, 7, 10-11
    dst = side.open("pool", pages)
    assert child("start", h="p", dst=dst) == {"ok": True}
    assert child("send_pool", h="p", table=table, layers=LAYERS) == {"ok": True}
    assert child("send", h="p", layer=0, offset=0, n=1, seed=1, shape=side.shape)["error"].startswith(
        "ValueError")                       # nothing more once the pool send is queued
    child("finish", h="p")
    r = child("wait", h="p", timeout=10)
    assert r.get("state") == "done", r
    page_bytes = PAGE * KVH * HD * 2
    assert r["bytes_sent"] == 2 * LAYERS * len(pages) * page_bytes and r["chunks"] == LAYERS
    assert r["written"] == [None]                       # told once, when the data left the pool
    ek, ev = [t.clone() for t in before[0]], [t.clone() for t in before[1]]
    shape = (12, PAGE, KVH, HD)
    for layer in range(LAYERS):
        ek[layer][pages] = random_kv(shape, DTYPE, 300 + layer)[table]
        ev[layer][pages] = random_kv(shape, DTYPE, 800 + layer)[table]
    assert_pools(side, (ek, ev))
    side.call(side.receiver.close, "pool")
    # a receiver that expects fewer layers than the pool sends: a clean failure, nothing lands
    before = side.snapshot()
    dst = side.open("pool-short", [6, 7], num_layers=LAYERS - 1)
    child("start", h="q", dst=dst)
    child("send_pool", h="q", table=[4, 5], layers=LAYERS)
    child("finish", h="q")
    r = child("wait", h="q", timeout=10)
    assert r["state"] == "failed" and "expects" in r["error"], r
    assert len(r["written"]) == 1 and "expects" in r["written"][0]
    assert_pools(side, before)
    side.call(side.receiver.abort, "pool-short")
    side.call(side.receiver.close, "pool-short")


def test_wrong_token_never_done(side, child):
    before = side.snapshot()
    rejected = side.receiver.chunks_rejected
    dst = side.open("tok", [3, 5])
    forged = dict(dst, token="00" * 16)
    child("start", h="f", dst=forged)
    child("send", h="f", layer=0, offset=0, n=2, seed=3, shape=side.shape)
    child("finish", h="f")
    r = child("wait", h="f", timeout=10)
    assert r["state"] == "failed" and r["error"].startswith("PERMISSION_DENIED"), r
    assert side.state("tok") == "pending"              # a forger cannot fail someone else's transfer
    assert_pools(side, before)                          # it never learned where the pages are
    # the real sender writes layers 0-1; an attacker who knows the layout (not the token)
    # writes the last layer's pages itself and notifies with a wrong token: never admitted
    child("start", h="real", dst=dst)
    for layer in range(LAYERS - 1):
        child("send", h="real", layer=layer, offset=0, n=2, seed=60 + layer, shape=side.shape)
    for off, pool_page in enumerate([3, 5]):
        assert child("forge", address=dst["address"], tid="tok", token="11" * 16, layer=LAYERS - 1,
                     offset=off, pool_page=pool_page)["state"] == "DONE"
    # a forger that somehow has the token but is not the session's agent is refused too
    assert child("forge", address=dst["address"], tid="tok", token=dst["token"], layer=LAYERS - 1,
                 offset=0, pool_page=3)["state"] == "DONE"
    deadline = time.monotonic() + 5   # the sender groups layers into one WRITE for up to max_group_wait_s
    while side.state("tok") != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert side.state("tok") == "in_progress"          # pages of layer 2 never admitted
    assert side.receiver.chunks_rejected >= rejected + 4
    side.call(side.receiver.close, "tok")              # the decode worker frees / reuses the pages
    r = child("wait", h="real", timeout=10)
    assert r["state"] == "failed" and "ABORTED" in r["error"], r


def test_malformed_control_and_notifications_are_rejected(side, child):
    """Garbage NIXL notifications and malformed Session messages are counted and refused;
    they never crash the notification loop, and a real transfer still completes after them."""
    before = side.snapshot()
    dst = side.open("junk", [7, 9])
    # a Session that does not start with BEGIN, or whose BEGIN names no agent: refused up front
    assert child("session", address=dst["address"], first="end") == {"code": "INVALID_ARGUMENT"}
    assert child("session", address=dst["address"], first="begin", tid="junk", token=dst["token"],
                 agent="") == {"code": "INVALID_ARGUMENT"}
    assert child("session", address=dst["address"], first="begin", tid="nope", token="00" * 16) == {
        "code": "NOT_FOUND"}
    # notifications while a real session is open (the receiver polls only then)
    child("start", h="j", dst=dst)
    child("send", h="j", layer=0, offset=0, n=2, seed=40, shape=side.shape)
    side.wait_state("junk", "in_progress")
    rejected = side.receiver.chunks_rejected
    from proto import tandem_pb2 as pb
    junk = [b"\xff\xff\xff\xff", b"TKV1L" + bytes(range(40)), b"\x0a\x02\xff\xfe",   # not protobuf / bad UTF-8
            pb.NixlLayerNotif(transfer_id="junk", layer=0, num_pages=1).SerializeToString(),  # no token
            pb.NixlLayerNotif(transfer_id="junk", token=bytes.fromhex(dst["token"]), layer=1,
                              page_offset=0, num_pages=0).SerializeToString()]   # zero pages
    for payload in junk:
        assert child("forge", address=dst["address"], notif_hex=payload.hex(), layer=LAYERS - 1,
                     offset=0, pool_page=7)["state"] == "DONE"
    deadline = time.monotonic() + 5
    while side.receiver.chunks_rejected < rejected + len(junk):
        assert time.monotonic() < deadline, side.receiver.chunks_rejected - rejected
        time.sleep(0.01)
    assert side.state("junk") == "in_progress"         # nothing was admitted or failed
    writes = [(0, [7, 9], 40)]
    for layer in range(1, LAYERS):
        child("send", h="j", layer=layer, offset=0, n=2, seed=40 + layer, shape=side.shape)
        writes.append((layer, [7, 9], 40 + layer))
    child("finish", h="j")
    assert child("wait", h="j", timeout=10)["state"] == "done"
    assert side.wait("junk", 10) == "done"
    assert_pools(side, expected(before, writes))       # the real writes overwrote the forged page
    side.call(side.receiver.close, "junk")


def test_receiver_abort_stops_sender(side, child):
    before = side.snapshot()
    pages = [8, 1]
    dst = side.open("rab", pages)
    child("start", h="r", dst=dst)
    child("send", h="r", layer=0, offset=0, n=2, seed=70, shape=side.shape)
    side.wait_state("rab", "in_progress")
    side.call(side.receiver.abort, "rab")
    assert side.state("rab") == "aborted"
    deadline = time.monotonic() + 10
    while (r := child("poll", h="r"))["state"] != "failed":
        assert time.monotonic() < deadline, r
        time.sleep(0.01)
    assert "ABORTED" in r["error"]
    child("send", h="r", layer=1, offset=0, n=2, seed=71, shape=side.shape)  # dropped: handle is terminal
    child("send", h="r", layer=2, offset=0, n=2, seed=72, shape=side.shape)
    child("finish", h="r")
    assert child("wait", h="r", timeout=5)["state"] == "failed"
    time.sleep(0.2)
    assert side.state("rab") == "aborted"
    assert_pools(side, expected(before, [(0, pages, 70)]))   # layers 1, 2 never written
    side.call(side.receiver.close, "rab")


def test_drained_waits_for_the_session_then_a_grace(side, child):
    """Pages of an aborted transfer are handed back only once no WRITE can still land:
    after the sender's session ended plus drain_grace_s; at once when the sender never
    learnt the page ids, and at once for a DONE transfer."""
    side.open("never", [3])
    t0 = time.monotonic()
    side.call(side.receiver.abort, "never")
    side.run(side.receiver.drained("never"))
    assert time.monotonic() - t0 < side.receiver.drain_grace_s    # page ids never left
    side.call(side.receiver.close, "never")

    dst = side.open("drn", [4, 5])
    child("start", h="d", dst=dst)
    child("send", h="d", layer=0, offset=0, n=2, seed=90, shape=side.shape)
    side.wait_state("drn", "in_progress")
    side.call(side.receiver.abort, "drn")
    t0 = time.monotonic()
    side.run(side.receiver.drained("drn"))
    waited = time.monotonic() - t0
    t = side.receiver._transfers["drn"]
    assert t.session_closed.is_set()                                 # the sender is gone from it
    assert side.receiver.drain_grace_s <= waited + 0.05 < side.receiver.quarantine_s + 1
    side.call(side.receiver.close, "drn")
    child("wait", h="d", timeout=5)


def test_sender_abort_fails_receiver(side, child):
    dst = side.open("sab", [6, 10])
    child("start", h="s", dst=dst)
    child("send", h="s", layer=0, offset=0, n=2, seed=80, shape=side.shape)
    side.wait_state("sab", "in_progress")
    assert child("abort", h="s")["state"] == "aborted"
    assert side.wait("sab", 10) == "failed"
    assert "session" in side.call(side.receiver.error, "sab")
    assert child("wait", h="s", timeout=5)["state"] == "aborted"
    side.call(side.receiver.close, "sab")
    assert child("stats")["inflight"] == 0


def test_killed_sender_fails_receiver_fast(side):
    proc = Child()
    try:
        dst = side.open("kill", [12, 14, 15])
        proc("start", h="k", dst=dst)
        proc("send", h="k", layer=0, offset=0, n=3, seed=90, shape=side.shape)
        side.wait_state("kill", "in_progress", timeout=20)
        t0 = time.monotonic()
        proc.proc.kill()
        proc.proc.wait()
        assert side.wait("kill", 15) == "failed"          # not a hang, not the 120 s timeout
        assert time.monotonic() - t0 < 15
        assert side.receiver._sessions == 0
        side.call(side.receiver.close, "kill")
    finally:
        proc.stop()


def test_close_twice_and_registry(side, child):
    from kvtransfer import TransferError, get_backend
    from kvtransfer.nixl_backend import NixlKVReceiver, NixlKVSender
    b = get_backend("nixl")
    assert b.receiver_cls is NixlKVReceiver and b.sender_cls is NixlKVSender
    dst = side.open("last", [1, 2])
    child("start", h="z", dst=dst)
    for layer in range(LAYERS):
        child("send", h="z", layer=layer, offset=0, n=2, seed=99 + layer, shape=side.shape)
    child("finish", h="z")
    assert child("wait", h="z", timeout=10)["state"] == "done"
    assert side.state("last") == "done"
    r = child("close")
    assert r == {"ok": True, "worker_alive": False}
    side.call(side.receiver.close, "last")
    side.call(side.receiver.close, "last")
    with pytest.raises(TransferError):
        side.call(side.receiver.poll, "last")
    with pytest.raises(TransferError):  # a grpc destination is refused by the nixl sender
        async def bad():
            s = NixlKVSender()
            try:
                s.start(type("D", (), {"address": "x", "transfer_id": "t", "num_pages": 1, "page_size": 4,
                                           "backend": "grpc", "token": b""})())
            finally:
                await s.close()
        side.run(bad())


def test_registry_error_without_nixl():
    code = ("import sys; sys.modules['nixl'] = None\n"
            "from kvtransfer import get_backend, TransferError\n"
            "try:\n    get_backend('nixl')\nexcept TransferError as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.startswith("ok "), out.stderr[-2000:]


def test_throughput_32_layers(capsys):
    """32 layers x 64 pages x 16 tokens x 8 heads x 128 dim, fp16 (128 MiB of K+V)."""
    s = Side(layers=32, pool_pages=64, page=16, kvh=8, hd=128, dtype=torch.float16)
    c = Child()
    try:
        results = []
        for i in range(2):  # the first includes Hello + connection set-up
            dst = s.open(f"bench{i}", list(range(64))[::-1])
            r = c("bench", dst=dst, layers=32, shape=s.shape, io_timeout=90)
            assert r["state"] == "done", r
            assert s.wait(f"bench{i}", 10) == "done"
            results.append(r)
        nbytes = results[-1]["bytes"]
        assert nbytes == 32 * 2 * 64 * 16 * 8 * 128 * 2
        mbps = nbytes / results[-1]["seconds"] / 1e6
        with capsys.disabled():
            print(f"\nnixl DRAM->DRAM: {nbytes / 2**20:.0f} MiB in {results[-1]['seconds'] * 1e3:.1f} ms "
                  f"= {mbps:.0f} MB/s (first, with connect: {results[0]['seconds'] * 1e3:.1f} ms)")
        # spot-check bytes: layer 5's K for reservation page 0 (pool page 63)
        exp = random_kv((64, 16, 8, 128), torch.float16, 5)
        assert torch.equal(bits(s.k[5][63]), bits(exp[0]))
    finally:
        c.stop()
        s.stop()
