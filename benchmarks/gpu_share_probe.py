"""What two processes on one GPU cost each other (P+D sharing a device): a probe.

Measures, each in fresh processes on the same GPU:
  nixl   NIXL WRITE bandwidth from one process's VRAM into another's, for one large
         descriptor, 64 descriptors and 1,024 small ones per WRITE (UCX_PROTO_INFO=y
         prints the transport UCX picked to the sender's log).
  share  a prefill-like batch (32 bf16 [16384 x 4096] @ [4096 x 14336] matmuls) alone, and
         while another process loops decode-like CUDA-graph steps, free-running and
         taking turns through a file lock (see tandem_cli/gpu_turn.py).

    python -m benchmarks.gpu_share_probe --out DIR        # writes DIR/gpu_share_probe.json

Nothing here is a copy of a serving path: it asks the device what the serving paths pay.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _role_nixl_recv(args) -> None:
    import torch
    from kvtransfer.nixl_common import make_agent

    buf = torch.empty(args.nbytes, dtype=torch.uint8, device="cuda")
    agent = make_agent("probe-recv")
    agent.register_memory([buf])
    meta = agent.get_agent_metadata()
    Path(args.dir, "recv.meta").write_bytes(meta)
    Path(args.dir, "recv.json").write_text(json.dumps({"name": agent.name, "ptr": buf.data_ptr(),
                                                       "dev": buf.get_device()}))
    stop = Path(args.dir, "stop")
    while not stop.exists():
        agent.get_new_notifs()
        time.sleep(0.01)


def _role_nixl_send(args) -> None:
    import numpy as np
    import torch
    from kvtransfer.nixl_common import make_agent

    d = Path(args.dir)
    while not (d / "recv.json").exists():
        time.sleep(0.05)
    time.sleep(0.2)
    info = json.loads((d / "recv.json").read_text())
    buf = torch.empty(args.nbytes, dtype=torch.uint8, device="cuda")
    buf.fill_(7)
    torch.cuda.synchronize()
    agent = make_agent("probe-send")
    agent.register_memory([buf])
    name = agent.add_remote_agent((d / "recv.meta").read_bytes())
    name = name.decode() if isinstance(name, bytes) else name
    try:
        agent.make_connection(name)
    except Exception:  # noqa: BLE001
        pass
    results = []
    total = 128 << 20
    for ndesc in (1, 64, 1024, 8192):
        size = total // ndesc
        offs = np.arange(ndesc, dtype=np.uint64) * np.uint64(size)
        loc = np.stack([np.uint64(buf.data_ptr()) + offs, np.full(ndesc, size, np.uint64),
                        np.full(ndesc, buf.get_device(), np.uint64)], 1)
        rem = np.stack([np.uint64(info["ptr"]) + offs, np.full(ndesc, size, np.uint64),
                        np.full(ndesc, info["dev"], np.uint64)], 1)
        times = []
        for it in range(8):
            t = time.perf_counter()
            x = agent.initialize_xfer("WRITE", agent.get_xfer_descs(loc, "VRAM"),
                                      agent.get_xfer_descs(rem, "VRAM"), name, b"p")
            agent.transfer(x)
            while (st := agent.check_xfer_state(x)) == "PROC":
                pass
            x.release()
            times.append(time.perf_counter() - t)
            assert st == "DONE", st
        times = sorted(times[2:])
        med = times[len(times) // 2]
        results.append({"descriptors": ndesc, "bytes": total, "median_s": med,
                        "GB_per_s": total / med / 1e9})
        print(f"nixl WRITE 128 MiB in {ndesc} descriptors: {med * 1e3:.2f} ms, "
              f"{total / med / 1e9:.1f} GB/s", flush=True)
    # many small WRITEs back to back (one per layer-run of a prompt), 16 MiB each, 32 in flight
    n, size = 64, 16 << 20
    t = time.perf_counter()
    xs = []
    for i in range(n):
        off = np.uint64((i % 8) * size)
        loc = np.array([[np.uint64(buf.data_ptr()) + off, size, buf.get_device()]], np.uint64)
        rem = np.array([[np.uint64(info["ptr"]) + off, size, info["dev"]]], np.uint64)
        x = agent.initialize_xfer("WRITE", agent.get_xfer_descs(loc, "VRAM"),
                                  agent.get_xfer_descs(rem, "VRAM"), name, b"p")
        agent.transfer(x)
        xs.append(x)
    for x in xs:
        while agent.check_xfer_state(x) == "PROC":
            pass
        x.release()
    el = time.perf_counter() - t
    results.append({"writes": n, "bytes_each": size, "total_s": el, "GB_per_s": n * size / el / 1e9})
    print(f"nixl {n} WRITEs of 16 MiB posted together: {el * 1e3:.1f} ms, {n * size / el / 1e9:.1f} GB/s",
          flush=True)
    Path(args.dir, "send.json").write_text(json.dumps(results))


class Turn:
    """Take turns on the GPU through one flock'd file (see tandem_cli/gpu_turn.py for the real one)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _role_decode(args) -> None:
    import torch
    ws = [torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
    x = torch.randn(128, 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(128, 14336, dtype=torch.bfloat16, device="cuda")

    def step():
        for i in range(96):
            torch.matmul(x, ws[i % 8], out=out)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    turn = Turn(args.lock) if args.lock else None
    stop = Path(args.dir, "stop-decode")
    Path(args.dir, "decode-ready").write_text("1")
    n, t0 = 0, time.perf_counter()
    while not stop.exists():
        if turn:
            with turn:
                g.replay()
                torch.cuda.synchronize()
            time.sleep(0)   # let a waiting prefill in
        else:
            g.replay()
            torch.cuda.synchronize()
        n += 1
    el = time.perf_counter() - t0
    Path(args.dir, "decode.json").write_text(json.dumps({"steps": n, "seconds": el, "step_ms": el / n * 1e3}))


def _role_prefill(args) -> None:
    import torch
    x = torch.randn(16384, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(16384, 14336, dtype=torch.bfloat16, device="cuda")
    for _ in range(8):
        torch.matmul(x, w, out=out)
    torch.cuda.synchronize()
    while args.wait_decode and not Path(args.dir, "decode-ready").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    turn = Turn(args.lock) if args.lock else None
    times = []
    for _ in range(6):
        t = time.perf_counter()
        if turn:
            with turn:
                for _ in range(32):
                    torch.matmul(x, w, out=out)
                torch.cuda.synchronize()
        else:
            for _ in range(32):
                torch.matmul(x, w, out=out)
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        time.sleep(0.05)
    times.sort()
    Path(args.dir, "prefill.json").write_text(json.dumps({"median_s": times[len(times) // 2], "all": times}))


def _spawn(role: str, d: Path, *extra: str, env=None) -> subprocess.Popen:
    log = open(d / f"{role}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_share_probe", "--role", role,
                             "--dir", str(d), *extra], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def _share(out: Path, mode: str) -> dict:
    d = out / f"share-{mode}"
    d.mkdir(parents=True, exist_ok=True)
    lock = [] if mode in ("alone", "free") else ["--lock", str(d / "gpu.lock")]
    dec = None
    if mode != "alone":
        dec = _spawn("decode", d, *lock)
    pre = _spawn("prefill", d, *lock, *(["--wait-decode"] if dec else []))
    pre.wait(timeout=300)
    (d / "stop-decode").write_text("1")
    if dec:
        dec.wait(timeout=60)
    r = {"prefill": json.loads((d / "prefill.json").read_text())}
    if dec:
        r["decode"] = json.loads((d / "decode.json").read_text())
    print(f"share {mode}: prefill batch {r['prefill']['median_s'] * 1e3:.1f} ms"
          + (f", decode step {r['decode']['step_ms']:.2f} ms" if dec else ""), flush=True)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--role", default="")
    p.add_argument("--dir", default="")
    p.add_argument("--lock", default="")
    p.add_argument("--wait-decode", action="store_true")
    p.add_argument("--nbytes", type=int, default=1 << 30)
    p.add_argument("--out", default="/tmp/gpu-share-probe")
    p.add_argument("--parts", default="nixl,share")
    args = p.parse_args(argv)
    roles = {"nixl_recv": _role_nixl_recv, "nixl_send": _role_nixl_send, "decode": _role_decode,
             "prefill": _role_prefill}
    if args.role:
        roles[args.role](args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for cmd in (["nvidia-smi", "--query-gpu=name,compute_mode", "--format=csv"],
                ["sh", "-c", "command -v nvidia-cuda-mps-control || echo no-mps-binary"]):
        try:
            result.setdefault("env", []).append(subprocess.run(cmd, capture_output=True, text=True).stdout)
        except OSError as e:
            result.setdefault("env", []).append(repr(e))
    print(result["env"], flush=True)
    if "nixl" in args.parts:
        d = out / "nixl"
        d.mkdir(exist_ok=True)
        env = {"UCX_PROTO_INFO": "y"}
        r = _spawn("nixl_recv", d, env=env)
        s = _spawn("nixl_send", d, env=env)
        try:
            s.wait(timeout=240)
        finally:
            (d / "stop").write_text("1")
            r.wait(timeout=30)
        if (d / "send.json").exists():
            result["nixl"] = json.loads((d / "send.json").read_text())
    if "share" in args.parts:
        result["share"] = {m: _share(out, m) for m in ("alone", "free", "turns")}
    (out / "gpu_share_probe.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
