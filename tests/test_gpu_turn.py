"""engine/gpu_turn.py: two real processes sharing one lock file take turns, never overlap,
alternate when both want the GPU, and a killed holder never blocks the survivor. Plus the
`tandem serve` plan: P and D on one CUDA device get the same turn file; nothing else does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from engine.gpu_turn import GpuTurn
from test_defaults import flag, serve_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import os, sys, time
    from engine.gpu_turn import GpuTurn
    path, role, n, hold_s, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    turn = GpuTurn(path, role)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    open(log + "." + role + ".ready", "w").close()
    while not os.path.exists(log + ".go"):
        time.sleep(0.001)
    for i in range(n):
        with turn:
            t0 = time.monotonic_ns()
            time.sleep(hold_s)            # "GPU work"
            t1 = time.monotonic_ns()
        os.write(fd, f"{role} {t0} {t1}\\n".encode())
        time.sleep(0.0002)                # host work between steps, as an engine has
    print(turn.turns, round(turn.wait_s, 3))
""")


def _spawn(tmp_path, role, n, hold_s):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "gpu.lock"), role, str(n), str(hold_s),
                             str(tmp_path / "log")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})


def test_two_processes_take_turns_without_overlap_and_alternate(tmp_path):
    procs = [_spawn(tmp_path, "decode", 60, 0.002), _spawn(tmp_path, "prefill", 15, 0.01)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"log.{r}.ready").exists() for r in ("decode", "prefill")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "log.go").write_text("")
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = sorted((int(t0), int(t1), role) for role, t0, t1 in
                  (line.split() for line in (tmp_path / "log").read_text().splitlines()))
    assert [r[2] for r in rows].count("decode") == 60 and [r[2] for r in rows].count("prefill") == 15
    for (a0, a1, _), (b0, b1, _) in zip(rows, rows[1:]):
        assert a1 <= b0, "two turns overlapped"
    # while the prefill process still had work, the decode loop never took more than a couple of
    # turns in a row: the handoff lets a waiting peer in
    last_prefill = max(i for i, r in enumerate(rows) if r[2] == "prefill")
    run = longest = 0
    for r in rows[:last_prefill]:
        run = run + 1 if r[2] == "decode" else 0
        longest = max(longest, run)
    assert longest <= 3, [r[2] for r in rows]
    assert int(outs[0].split()[0]) == 60 and float(outs[0].split()[1]) > 0.0     # decode waited for prefill


def test_a_killed_holder_releases_the_gpu(tmp_path):
    path = tmp_path / "gpu.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from engine.gpu_turn import GpuTurn
        t = GpuTurn({str(path)!r}, "prefill")
        t.acquire()
        print("held", flush=True)
        time.sleep(600)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert holder.stdout.readline().strip() == "held"
    me = GpuTurn(str(path), "decode")
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    t = time.monotonic()
    with me:
        pass
    assert time.monotonic() - t < 5 and me.turns == 1
    me.close()


def test_serve_gives_p_and_d_on_one_gpu_the_same_turn_file():
    _, (decode, prefill) = serve_plan("--device", "cuda")
    assert flag(decode.argv, "--gpu-turn-file") and flag(decode.argv, "--gpu-turn-file") == flag(
        prefill.argv, "--gpu-turn-file")
    _, plan = serve_plan("--device", "cuda", "--gpu-turns", "off")
    assert all("--gpu-turn-file" not in w.argv for w in plan)
    _, plan = serve_plan("--device", "cuda", "--colocated")
    assert "--gpu-turn-file" not in plan[0].argv
    _, plan = serve_plan("--device", "cpu")
    assert all("--gpu-turn-file" not in w.argv for w in plan)
    _, plan = serve_plan("--device", "cpu", "--gpu-turns", "on")
    assert all(flag(w.argv, "--gpu-turn-file") for w in plan)


def test_the_decode_engine_keeps_its_turn_across_steps_and_yields_to_a_waiting_prefill(tmp_path):
    """Async scheduling keeps a pass queued at all times, so the decode engine holds its turn
    across steps, and gives it up (its queue read first) once the prefill worker waits."""
    import threading

    from decode_worker.main import make_decode_engine
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    from engine.tiny_models import make_tiny_model
    from hand_stepped import InlineLoop, Sink

    model = make_tiny_model(tmp_path / "llama", arch="llama", seed=4)
    engine = make_decode_engine(EngineConfig(model=str(model), dtype="float32", device="cpu", page_size=4,
                                             num_pages=200, max_num_seqs=8), InlineLoop())
    engine.gpu_turn = GpuTurn(str(tmp_path / "gpu.lock"), "decode")
    sink = Sink()
    engine.submit(Sequence("r", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)), sink)
    engine._drain(block=False)
    engine.step()
    engine.step()
    assert engine.gpu_turn.held and engine._inflight        # kept across steps, a pass queued
    peer = GpuTurn(str(tmp_path / "gpu.lock"), "prefill")
    got = []

    def prefill_batch():
        with peer:
            got.append((len(sink.tokens), bool(engine._inflight)))
    t = threading.Thread(target=prefill_batch)
    t.start()
    deadline = time.monotonic() + 10
    while not peer.peer_waiting() and not engine.gpu_turn.peer_waiting():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    engine.step()                                            # sees the waiting peer: drains, releases
    t.join(10)
    assert got and got[0][1] is False, "the prefill got the GPU while a decode pass was still queued"
    assert not engine.gpu_turn.held
    while engine.has_work():
        engine.step()
        engine.flush()
    assert len(sink.tokens) == 40 and got[0][0] < 40         # it ran in the middle of the stream
    assert not engine.gpu_turn.held and engine.gpu_turn.turns >= 2
