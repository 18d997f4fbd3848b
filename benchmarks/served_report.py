"""Numbers and tables of the served benchmark (`benchmarks/served.py`): pure functions over
plain dicts, no processes.

  1. `row_metrics(layout, wl, run)`: one (layout, workload) row from the client pool's
     per-request records (`benchmarks/served_client.py`);
  2. `inprocess_rows(bench_json, names)`: the in-process engine's figures from
     `python -m benchmarks.bench --modes colocated --json`, read defensively: a missing
     row or field raises ValueError naming what is there;
  3. `add_ratios(rows, inproc)`: served / in-process, and P+D / served colocated;
  4. `format_table(rows)`, `results_md(result)`.
"""
from __future__ import annotations

import json
import math
import statistics

# fields of a bench.py row we need, and those we use when present
INPROC_REQUIRED = ("output_tok_s", "ttft_mean_s")
INPROC_OPTIONAL = ("total_tok_s", "ttft_p50_s", "cached_ratio", "requests", "completed", "output_tokens")


def _nan() -> float:
    return float("nan")


def row_metrics(layout: str, wl, run: dict) -> dict:
    """wl: a benchmarks.workloads.Workload; run: ClientPool.run's answer."""
    recs = run["results"]
    errors = []
    for r in recs:
        if not r["error"] and r["output_tokens"] != wl.output_len:
            r["error"] = f"short: {r['output_tokens']} of {wl.output_len} tokens"
        if r["error"]:
            errors.append(r["error"])
    ok = [r for r in recs if not r["error"]]
    out_tokens = sum(r["output_tokens"] or 0 for r in recs)
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    lasts = [r["t_last_s"] for r in recs if r["t_last_s"] is not None]
    wall = max(lasts) if lasts else _nan()
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    procs = run["procs"]
    chunks = sum(p["chunks"] for p in procs)
    return {
        "layout": layout, "workload": wl.name, "requests": len(recs), "completed": len(ok),
        "failed": len(recs) - len(ok), "errors": sorted(set(errors))[:5],
        "output_tokens": out_tokens, "expected_output_tokens": len(recs) * wl.output_len,
        "prompt_tokens": prompt_tokens, "wall_s": wall,
        "output_tok_s": out_tokens / wall if wall > 0 else _nan(),
        "total_tok_s": (out_tokens + prompt_tokens) / wall if wall > 0 else _nan(),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else _nan(),
        "ttft_p50_s": statistics.median(ttfts) if ttfts else _nan(),
        "ttft_max_s": max(ttfts) if ttfts else _nan(),
        "cached_tokens": sum(r["cached_tokens"] for r in ok),
        "cached_ratio": sum(r["cached_tokens"] for r in ok) / prompt_tokens if prompt_tokens else _nan(),
        "client": {"procs": len(procs), "chunks": chunks,
                   "chunks_per_s": chunks / wall if wall > 0 else _nan(),
                   "cpu_s": sum(p["cpu_s"] for p in procs),
                   "max_proc_cpu_util": max((p["cpu_s"] / p["wall_s"] for p in procs if p["wall_s"] > 0),
                                            default=_nan())},
    }


def inprocess_rows(result: dict, names: list[str]) -> dict[str, dict]:
    """{workload: {field: value}} from bench.py's JSON; ValueError if anything is missing."""
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, list):
        keys = sorted(result) if isinstance(result, dict) else type(result).__name__
        raise ValueError(f"bench JSON has no 'rows' list (top-level keys: {keys})")
    found: dict[str, dict] = {}
    for r in rows:
        if isinstance(r, dict) and str(r.get("mode", "")).startswith("colocated") and r.get("workload") in names:
            found[r["workload"]] = r
    missing = [n for n in names if n not in found]
    if missing:
        seen = sorted({(str(r.get("mode")), str(r.get("workload"))) for r in rows if isinstance(r, dict)})
        raise ValueError(f"bench JSON has no colocated row for {missing} (rows: {seen})")
    out = {}
    for name, r in found.items():
        absent = [k for k in INPROC_REQUIRED if not isinstance(r.get(k), (int, float))]
        if absent:
            raise ValueError(f"bench JSON row colocated/{name} lacks {absent} (fields: {sorted(r)})")
        out[name] = {k: r[k] for k in INPROC_REQUIRED + INPROC_OPTIONAL if k in r}
        if r.get("completed") is not None and r.get("requests") and r["completed"] != r["requests"]:
            out[name]["note"] = f"in-process completed {r['completed']}/{r['requests']}"
    return out


def _ratio(a, b) -> float:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or math.isnan(b):
        return _nan()
    return a / b


def add_ratios(rows: list[dict], inproc: dict[str, dict] | None) -> None:
    """In place: served / in-process (tok/s, mean TTFT) and, for P+D, P+D / served colocated."""
    col = {r["workload"]: r for r in rows if r["layout"] == "colocated"}
    for r in rows:
        ip = (inproc or {}).get(r["workload"], {})
        r["inproc_output_tok_s"] = ip.get("output_tok_s", _nan())
        r["inproc_ttft_mean_s"] = ip.get("ttft_mean_s", _nan())
        r["vs_inproc_tok_s"] = _ratio(r["output_tok_s"], r["inproc_output_tok_s"])
        r["vs_inproc_ttft"] = _ratio(r["ttft_mean_s"], r["inproc_ttft_mean_s"])
        c = col.get(r["workload"]) if r["layout"] != "colocated" else None
        r["vs_colocated_tok_s"] = _ratio(r["output_tok_s"], c["output_tok_s"]) if c else _nan()
        r["vs_colocated_ttft"] = _ratio(r["ttft_mean_s"], c["ttft_mean_s"]) if c else _nan()


def _f(x, spec: str = ",.0f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


COLUMNS = ("layout", "wl", "ok/req", "out tok/s", "total tok/s", "TTFT mean s", "TTFT p50 s", "cached",
           "in-proc tok/s", "served/in-proc tok/s", "in-proc TTFT s", "served/in-proc TTFT",
           "vs colocated tok/s", "vs colocated TTFT", "client CPU")


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["layout"], r["workload"], f"{r['completed']}/{r['requests']}", _f(r["output_tok_s"]),
                 _f(r["total_tok_s"]), _f(r["ttft_mean_s"], ".3f"), _f(r["ttft_p50_s"], ".3f"),
                 _f(r["cached_ratio"], ".3f"), _f(r.get("inproc_output_tok_s")),
                 _f(r.get("vs_inproc_tok_s"), ".2f"), _f(r.get("inproc_ttft_mean_s"), ".3f"),
                 _f(r.get("vs_inproc_ttft"), ".2f"), _f(r.get("vs_colocated_tok_s"), ".2f"),
                 _f(r.get("vs_colocated_ttft"), ".2f"), _f(r["client"]["max_proc_cpu_util"], ".0%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_md(r: dict) -> str:
    lines = [f"## Served benchmark: {r['device']}, {r['date']}", "",
             f"- commit: {r['commit']}", f"- command: `{r['command']}`"]
    if r.get("interrupted"):
        lines.append(f"- INTERRUPTED ({r['interrupted']}): only the rows below were measured")
    for name, lay in r["layouts"].items():
        lines.append(f"- {name}: `{lay['command']}`" + (f" (started in {lay['startup_s']:.0f} s)"
                                                        if lay.get("startup_s") else ""))
        if lay.get("error"):
            lines.append(f"  - FAILED: {lay['error']}")
    ip = r["inprocess"]
    lines.append(f"- in-process: `{ip.get('command', 'not run')}`" + (f" - FAILED: {ip['error']}" if ip.get("error") else ""))
    if ip.get("flags_not_passed"):
        lines.append(f"  - engine flags bench.py does not take (in-process ran its defaults): {ip['flags_not_passed']}")
    lines.append(f"- client: {r['client_procs']} processes (aiohttp); the client CPU column is the busiest "
                 "process's CPU time / its wall time")
    if r.get("extra_body"):
        lines.append(f"- every request body also had: `{json.dumps(r['extra_body'], separators=(',', ':'))}`")
    lines += ["", format_table(r["rows"]), ""]
    return "\n".join(lines)
