"""Served benchmark (issue 9): W1-W4 through the OpenAI HTTP API of `tandem serve`, as users run it,
beside the in-process engine figure of the same call.

    python -m benchmarks.served --device cuda --json served.json --results-md benchmarks/RESULTS.md
    python -m benchmarks.served --device cpu --tiny --kv-transfer-backend grpc      # CPU (~1 min)
    python -m benchmarks.bench --modes served ...                                   # the same

Lifecycle of one call:
  1. write the model dir (`--model-config`, benchmarks/workloads.py: config.json for dummy
     weights + the word-level tokenizer over its vocabulary);
  2. in-process engine: `python -m benchmarks.bench --modes colocated --workloads <same>
     --model-config <same> --json X` with the same engine flags, as a subprocess, first (so the GPU is free
     again before any server starts); its rows are read defensively (served_report);
  3. per layout in --layouts (colocated, pd): start `python -m tandem_cli.main serve
     --model DIR --load-format dummy --port P [--colocated | --kv-transfer-backend B]
     <engine flags> <--serve-args>` in its own session, logs in --log-dir; wait for
     GET /health and the "serving" line; warm up (--warmup requests of every workload
     shape at once, fresh prompts, unmeasured); then per workload send every request at
     t=0 from the client pool (`benchmarks/served_client.py`) and compute its row
     (`benchmarks/served_report.py`); stop the server (SIGTERM, then SIGKILL of its
     whole session) after the layout, also on errors, SIGTERM and Ctrl-C;
  4. ratios (served / in-process; P+D / served colocated), write --json (also after
     every row), append to --results-md, print the table last. Exit 1 if any layout,
     request or the in-process run failed; SIGTERM / Ctrl-C stop the servers and clients
     and still report the rows measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import served_report as rep
from benchmarks.bench import git_commit
from benchmarks.pyspy import PySpy
from benchmarks.workloads import (DEFAULT_MODEL_CONFIG, MODEL_CONFIGS, describe_model_config, model_config_record,
                                  resolve_model_config, token_id_range, workloads, write_model_dir)
from tandem_cli.procs import free_port, stop_all, wait_http_ready

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tandem_cli.main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.served")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and workloads (CPU / CI)")
    p.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, metavar="NAME|PATH",
                   help=f"{', '.join(MODEL_CONFIGS)} (with --tiny: its CPU-sized twin) or a config.json path")
    p.add_argument("--layouts", default="colocated,pd", help="comma-separated: colocated, pd")
    p.add_argument("--workloads", default="W1,W2,W3,W4")
    p.add_argument("--kv-transfer-backend", default="grpc", choices=["grpc", "nixl"], help="P+D KV transport")
    g = p.add_argument_group("engine flags (passed to tandem serve and to the in-process bench)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=16384)
    g.add_argument("--max-model-len", type=int, default=None, help="default: longest workload + 16")
    g.add_argument("--dtype", default=None, help="default: the server's (auto)")
    p.add_argument("--serve-args", default="", help="more `tandem serve` flags, every layout, as one string "
                   "(a single flag: --serve-args=--enforce-eager)")
    p.add_argument("--colocated-serve-args", default="", help="more `tandem serve` flags, colocated only")
    p.add_argument("--pd-serve-args", default="", help="more `tandem serve` flags, P+D only")
    p.add_argument("--bench-args", default="", help="more flags for the in-process benchmarks.bench run")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process engine run")
    p.add_argument("--num-requests", type=int, default=None, help="cap on requests per workload")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests per workload shape")
    p.add_argument("--client-procs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--inprocess-timeout", type=float, default=1200.0)
    p.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                   help='more fields for every request body, e.g. \'{"guided_json": {...}}\' (structured '
                        'output on every request; warm-up requests get them too, so grammars compile there)')
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the served model's tokenizer, from this dir (padded with special tokens to the "
                        "vocabulary), instead of the word-level one over the vocabulary: e.g. benchmarks."
                        "grammar_mask's byte-level BPE, which can write JSON (structured output)")
    p.add_argument("--py-spy", default=None, metavar="DIR",
                   help="sample the served processes with py-spy (GIL holder) during --py-spy-workloads; "
                        "summaries land in DIR")
    p.add_argument("--py-spy-workloads", default="W3")
    p.add_argument("--json", default=None)
    p.add_argument("--results-md", default=None, help="append a markdown section here")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--commit", default=None)
    p.add_argument("--date", default=None)
    return p.parse_args(argv)


def forward_from_bench(argv: list[str] | None) -> int | None:
    """`python -m benchmarks.bench --modes served ...` runs this benchmark with the other flags;
    None when --modes does not ask for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--modes" and i + 1 < len(argv):
            modes, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        elif a.startswith("--modes="):
            modes, rest = a.split("=", 1)[1], argv[:i] + argv[i + 1:]
        else:
            continue
        if "served" not in modes.split(","):
            return None
        if modes != "served":
            print("--modes served runs on its own (its flags are benchmarks.served's)", file=sys.stderr)
            return 2
        return main(rest)
    return None


def _device_name(args) -> str:
    if args.device == "cpu":
        return "cpu"
    try:       # not torch.cuda: this process must not hold a CUDA context beside the servers
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def engine_flags(args) -> list[tuple[str, str]]:
    flags = [("--device", args.device), ("--max-num-seqs", str(args.max_num_seqs)),
             ("--max-num-batched-tokens", str(args.max_num_batched_tokens)),
             ("--max-model-len", str(args.max_model_len))]
    return flags + ([("--dtype", args.dtype)] if args.dtype else [])


# ---- in-process engine ------------------------------------------------------------------

def run_inprocess(args, names: list[str], log_dir: Path, model_config: str) -> dict:
    """bench.py's colocated rows as {"command", "rows": {wl: {...}}, ...}; "error" on failure."""
    help_text = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300).stdout
    out_json = log_dir / "inprocess.json"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--modes", "colocated", "--workloads", ",".join(names),
           "--model-config", model_config, "--json", str(out_json), "--log-dir", str(log_dir / "inprocess-logs")] + (["--tiny"] if args.tiny else [])
    dropped = []
    for flag, value in engine_flags(args):
        if flag in help_text:
            cmd += [flag, value]
        else:
            dropped.append(f"{flag} {value}")
    cmd += shlex.split(args.bench_args)
    res = {"command": "python " + shlex.join(cmd[1:]),
           "flags_not_passed": dropped}
    print(f"in-process engine: {res['command']}", flush=True)
    t = time.monotonic()
    with open(log_dir / "inprocess.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.inprocess_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res["seconds"] = time.monotonic() - t
    try:
        if rc != 0:
            raise RuntimeError(f"benchmarks.bench exited with {rc}; see {log_dir / 'inprocess.log'}")
        data = json.loads(out_json.read_text())
        res["rows"] = rep.inprocess_rows(data, names)
        res["device"] = data.get("device")
    except (RuntimeError, ValueError, OSError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        print(f"IN-PROCESS RUN FAILED: {res['error']}", flush=True)
    return res


# ---- one served layout ------------------------------------------------------------------

class Server:
    """`tandem serve` for one layout: start() waits until it serves; stop() always cleans up."""

    def __init__(self, args, layout: str, model_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{layout}.log"
        extra = args.colocated_serve_args if layout == "colocated" else args.pd_serve_args
        self.cmd = CLI + ["serve", "--model", str(model_dir), "--load-format", "dummy", "--port", str(self.port)]
        self.cmd += ["--colocated"] if layout == "colocated" else ["--kv-transfer-backend", args.kv_transfer_backend]
        self.cmd += [x for f in engine_flags(args) for x in f] + shlex.split(args.serve_args) + shlex.split(extra)
        self.timeout = args.startup_timeout
        self.device = args.device
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> str:
        return "python " + shlex.join(self.cmd[1:])

    def start(self) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        t = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while True:
            try:
                wait_http_ready(f"{self.url}/health", self.proc, timeout=15)
                break
            except TimeoutError:
                if time.monotonic() - t > self.timeout:
                    raise TimeoutError(f"not serving after {self.timeout:.0f}s; see {self.log_path}") from None
                print(f"  starting ({time.monotonic() - t:.0f}s): {self._last_log_line()}", flush=True)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; see {self.log_path}") from None
        while "is serving" not in self.log_path.read_text(errors="replace"):
            if time.monotonic() - t > self.timeout or self.proc.poll() is not None:
                raise RuntimeError(f"/health answers but no 'serving' line; see {self.log_path}")
            time.sleep(0.2)
        return time.monotonic() - t

    def _last_log_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1][:160] if lines else "(no output yet)"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"tandem serve exited with code {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_all([self.proc], grace=30)     # serve stops its workers and router on SIGTERM
        try:                                # anything it left behind in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None


def _warmup_requests(wls, n: int, vocab_size: int) -> list[tuple[list[int], int]]:
    """n fresh prompts of every workload's shape (seed 2: nothing shared with the measured ones),
    ids in the workloads' range of the model's vocabulary."""
    import torch

    low, high = token_id_range(vocab_size)
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(low, high, (w.input_len,), generator=g).tolist(), min(w.output_len, 32))
            for w in wls for _ in range(n)]


def _progress(label: str):
    state = {"t0": time.monotonic(), "last": 0.0}

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - state["last"] >= 5.0:
            state["last"] = now
            print(f"  {label}: {done}/{total} requests done ({now - state['t0']:.0f}s)", flush=True)
    return show


def run_layout(args, layout: str, wls, model_dir: Path, log_dir: Path, pool, result: dict, save,
               vocab_size: int) -> None:
    srv = Server(args, layout, model_dir, log_dir)
    info = result["layouts"][layout] = {"command": srv.command, "log": str(srv.log_path)}
    print(f"[{layout}] {srv.command}", flush=True)
    model = str(model_dir)
    try:
        info["startup_s"] = srv.start()
        print(f"[{layout}] serving after {info['startup_s']:.0f}s", flush=True)
        if args.warmup > 0:
            t = time.monotonic()
            warm = pool.run(f"{srv.url}/v1/completions", model, _warmup_requests(wls, args.warmup, vocab_size),
                            args.request_timeout, extra=args.extra_body)
            bad = [r["error"] for r in warm["results"] if r["error"]]
            info["warmup_s"] = time.monotonic() - t
            print(f"[{layout}] warm-up: {len(warm['results'])} requests in {info['warmup_s']:.1f}s"
                  + (f", {len(bad)} failed: {bad[0]}" if bad else ""), flush=True)
        for wl in wls:
            prompts = wl.prompts(args.num_requests and min(args.num_requests, wl.num_requests), vocab_size)
            srv.check_alive()

            def progress(done, total, _show=_progress(f"{layout} {wl.name}")):
                srv.check_alive()
                _show(done, total)
            spy = (PySpy(Path(args.py_spy), f"{layout}-{wl.name}", srv.proc.pid)
                   if args.py_spy and wl.name in args.py_spy_workloads.split(",") else contextlib.nullcontext())
            with spy:
                run = pool.run(f"{srv.url}/v1/completions", model, [(p, wl.output_len) for p in prompts],
                               args.request_timeout, progress, extra=args.extra_body)
            row = rep.row_metrics(layout, wl, run)
            result["rows"].append(row)
            save()
            print(f"[{layout}] {wl.name}: {row['completed']}/{row['requests']} ok, "
                  f"{row['output_tok_s']:,.0f} out tok/s, TTFT mean {row['ttft_mean_s']:.3f}s, cached "
                  f"{row['cached_ratio']:.3f}, client {row['client']['chunks_per_s']:,.0f} chunks/s"
                  + (f"; errors: {row['errors']}" if row["errors"] else ""), flush=True)
    except Exception as exc:  # noqa: BLE001 - record it, go on with the next layout
        info["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{layout}] FAILED: {info['error']}", flush=True)
    finally:
        srv.stop()


# ---- CLI --------------------------------------------------------------------------------

def _results_md(result: dict) -> str:
    """served_report.results_md plus the model config line after the command."""
    lines = rep.results_md(result).split("\n")
    at = next((i + 1 for i, x in enumerate(lines) if x.startswith("- command:")), 2)
    mc = result["model_config"]
    lines.insert(at, f"- model config: {describe_model_config(mc['name'], mc['config'])}")
    return "\n".join(lines)


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a second one must not cut the clean-up short
    raise SystemExit(128 + signum)      # unwinds through every finally: servers and clients stop


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv=None) -> int:
    from benchmarks.served_client import ClientPool

    args = parse_args(argv)
    try:
        model_name, model_cfg = resolve_model_config(args.model_config, args.tiny)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    wanted = [w for w in args.workloads.split(",") if w]
    by_name = {w.name: w for w in workloads(args.tiny)}
    wls = [by_name[w] for w in wanted if w in by_name]      # in the order asked (see served_1gpu.sh)
    layouts = [x for x in args.layouts.split(",") if x]
    if len(wls) != len(wanted) or not wls or set(layouts) - {"colocated", "pd"}:
        print(f"unknown workload or layout in {args.workloads!r} / {args.layouts!r}", file=sys.stderr)
        return 2
    if args.max_model_len is None:
        args.max_model_len = max(w.input_len + w.output_len for w in wls) + 16
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-served-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    names = [w.name for w in wls]
    result = {"device": None, "date": args.date or datetime.date.today().isoformat(),
              "commit": args.commit or git_commit(),
              "command": "python -m benchmarks.served " + shlex.join(sys.argv[1:] if argv is None else argv),
              "tiny": args.tiny, "model_config": model_config_record(model_name, model_cfg),
              "workloads": names, "client_procs": args.client_procs, "extra_body": args.extra_body,
              "tokenizer": args.tokenizer or "word-level",
              "engine_flags": dict(engine_flags(args)), "inprocess": {}, "layouts": {}, "rows": [],
              "log_dir": str(log_dir)}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    t_all = time.monotonic()
    try:
        model_dir = write_model_dir(log_dir / "model", args.tiny, model_cfg, tokenizer=args.tokenizer or True)
        print(f"model config: {describe_model_config(model_name, model_cfg)}", flush=True)
        if not args.no_inprocess:
            result["inprocess"] = run_inprocess(args, names, log_dir, model_name)
            save()
        with ClientPool(args.client_procs) as pool:
            for layout in layouts:
                run_layout(args, layout, wls, model_dir, log_dir, pool, result, save, model_cfg["vocab_size"])
    except (KeyboardInterrupt, SystemExit) as exc:     # servers and clients are stopped: report what ran
        result["interrupted"] = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"signal (exit {exc.code})"
        print(f"\nINTERRUPTED ({result['interrupted']}): reporting the rows measured so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    result["device"] = result["inprocess"].get("device") or _device_name(args)
    rep.add_ratios(result["rows"], result["inprocess"].get("rows"))
    result["total_s"] = time.monotonic() - t_all
    save()
    if args.results_md:
        with open(args.results_md, "a") as f:
            f.write("\n" + _results_md(result))
    failed = [f"{k}: {v['error']}" for k, v in result["layouts"].items() if v.get("error")]
    failed += [f"{r['layout']} {r['workload']}: {r['failed']} failed requests ({r['errors'][0]})"
               for r in result["rows"] if r["failed"]]
    if result.get("interrupted"):
        failed.append(f"run interrupted ({result['interrupted']})")
    if result["inprocess"].get("error"):
        failed.append(f"in-process: {result['inprocess']['error']}")
    print()
    print(f"device {result['device']}; commit {result['commit']}; logs in {log_dir}; total {result['total_s']:.0f}s")
    for k, v in result["layouts"].items():
        print(f"{k}: {v['command']}")
    for line in failed:
        print(f"FAILED {line}")
    print(rep.format_table(result["rows"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
