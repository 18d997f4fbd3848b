"""Sample the served cluster's processes with py-spy while a benchmark workload runs.

    with PySpy(out_dir, "colocated-W3", serve_pid, gil=True):
        ...drive the workload...

Lifecycle: on entry, one `py-spy record --nonblocking --threads` per process of the
`tandem serve` tree (router, decode, prefill; found by their command lines); on
exit, SIGINT (py-spy then writes its raw folded stacks) and one summary text per
label: for each process, the share of samples per thread and the top frames by
inclusive samples. With `gil=True` only the thread holding the GIL is sampled, so
the thread shares say who holds a process's GIL. Without py-spy on PATH it logs
once and records nothing.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def serve_children(serve_pid: int) -> dict[str, int]:
    """{"router" | "decode" | "prefill": pid} of a `tandem serve` process tree."""
    import psutil

    out: dict[str, int] = {}
    for child in psutil.Process(serve_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        for role in ("router", "decode", "prefill"):
            if role in cmd[:5] and role not in out:
                out[role] = child.pid
    return out


def summarize(raw: Path, top: int = 30) -> str:
    threads: Counter[str] = Counter()
    frames: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        parts = stack.split(";")
        threads[parts[0]] += count
        for f in set(parts[1:]):
            frames[f] += count
    if not total:
        return "  (no samples)\n"
    lines = [f"  {total} samples"]
    lines += [f"  {100 * c / total:5.1f}% thread {t[:80]}" for t, c in threads.most_common(8)]
    lines += [f"  {100 * c / total:5.1f}% incl {f[:150]}" for f, c in frames.most_common(top)]
    return "\n".join(lines) + "\n"


class PySpy:
    def __init__(self, out_dir: Path, label: str, serve_pid: int, gil: bool = True, rate: int = 100) -> None:
        self.out_dir, self.label, self.serve_pid, self.gil, self.rate = Path(out_dir), label, serve_pid, gil, rate
        self._procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def __enter__(self) -> "PySpy":
        exe = shutil.which("py-spy")
        if exe is None:
            log.warning("py-spy is not on PATH: no profile for %s", self.label)
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pid in serve_children(self.serve_pid).items():
            raw = Path("/tmp") / f"pyspy-{self.label}-{role}.txt"
            cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
                   "--rate", str(self.rate), "--threads", "--nonblocking"] + (["--gil"] if self.gil else [])
            self._procs[role] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
        return self

    def __exit__(self, *exc) -> None:
        parts = []
        for role, (proc, raw) in self._procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            body = summarize(raw) if raw.exists() else "  (py-spy wrote nothing)\n"
            parts.append(f"== {role} ({'GIL holder' if self.gil else 'all threads'})\n{body}")
        if parts:
            (self.out_dir / f"pyspy-{self.label}.txt").write_text("".join(parts))
