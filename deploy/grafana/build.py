"""Writes the Grafana dashboards router.json and workers.json next to this file.

    python deploy/grafana/build.py          # rewrite both
    python deploy/grafana/build.py --check  # exit 1 if a committed file differs from what this builds

The panels are data below (title, PromQL, unit); this file lays them out on Grafana's 24-column
grid and adds the `${datasource}` template variable (any Prometheus data source) plus an
`instance` filter (and on the workers' board a `role` filter). tests/test_grafana.py checks that
the committed JSON is what this builds and that every query names a metric family a real CPU
cluster exports. Edit here, not in the JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

# ---- the router -----------------------------------------------------------------------------

R = 'instance=~"$instance"'


def _router_quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{R}}}[{RATE}])))", name)
            for name, q in QUANTILES] + [
        (f"sum(rate({metric}_sum{{{R}}}[{RATE}])) / sum(rate({metric}_count{{{R}}}[{RATE}]))", "mean")]


ROUTER = {
    "uid": "tandem-router", "title": "Tandem router",
    "instance_from": "tandem_router_requests_total",
    "rows": [
        ("Overview", [
            ("stat", "Requests/s", "reqps", 4, [(f"sum(rate(tandem_router_requests_total{{{R}}}[{RATE}]))", "")]),
            ("stat", "Error ratio (5xx)", "percentunit", 4, [(
                f'sum(rate(tandem_router_requests_total{{{R}, status=~"5.."}}[{RATE}])) / '
                f'sum(rate(tandem_router_requests_total{{{R}}}[{RATE}]))', "")]),
            ("stat", "TTFT p90", "s", 4, [(
                f"histogram_quantile(0.9, sum by (le) (rate(tandem_router_time_to_first_token_seconds_bucket"
                f"{{{R}}}[{RATE}])))", "")]),
            ("stat", "In flight", "short", 4, [(f"sum(tandem_router_requests_in_flight{{{R}}})", "")]),
            ("stat", "Output tokens/s", "short", 4, [(
                f"sum(rate(tandem_router_generation_tokens_total{{{R}}}[{RATE}]))", "")]),
            ("stat", "Members", "short", 4, [('sum by (role) (tandem_members{%s, state=~"up|static"})' % R,
                                              "{{role}}")]),
        ]),
        ("Requests and errors", [
            ("timeseries", "Requests/s by route and status", "reqps", 12, [(
                f"sum by (route, status) (rate(tandem_router_requests_total{{{R}}}[{RATE}]))", "{{route}} {{status}}")]),
            ("timeseries", "Errors/s: 4xx, 5xx, client gone (499), stream errors", "reqps", 12, [
                (f'sum(rate(tandem_router_requests_total{{{R}, status=~"4..", status!="499"}}[{RATE}]))', "4xx"),
                (f'sum(rate(tandem_router_requests_total{{{R}, status=~"5.."}}[{RATE}]))', "5xx"),
                (f'sum(rate(tandem_router_requests_total{{{R}, status="499"}}[{RATE}]))', "499 client gone"),
                (f"sum by (code) (rate(tandem_router_stream_errors_total{{{R}}}[{RATE}]))",
                 "stream error {{code}}")]),
        ]),
        ("Latency (as the client sees it, from arrival at the router)", [
            ("timeseries", "Time to first token", "s", 8,
             _router_quantiles("tandem_router_time_to_first_token_seconds")),
            ("timeseries", "Inter-token latency", "s", 8,
             _router_quantiles("tandem_router_inter_token_latency_seconds")),
            ("timeseries", "End-to-end request latency", "s", 8,
             _router_quantiles("tandem_router_e2e_request_latency_seconds")),
        ]),
        ("Load and tokens", [
            ("timeseries", "In flight at the router, queued and running on the workers", "short", 12, [
                (f"sum(tandem_router_requests_in_flight{{{R}}})", "router in flight"),
                ("sum(tandem_waiting_requests)", "waiting on workers"),
                ("sum(tandem_running_requests)", "running on decode workers")]),
            ("timeseries", "Tokens/s", "short", 12, [
                (f"sum(rate(tandem_router_prompt_tokens_total{{{R}}}[{RATE}]))", "prompt"),
                (f"sum(rate(tandem_router_prompt_tokens_cached_total{{{R}}}[{RATE}]))", "prompt, from a prefix cache"),
                (f"sum(rate(tandem_router_generation_tokens_total{{{R}}}[{RATE}]))", "generated")]),
        ]),
        ("Placement and failures", [
            ("timeseries", "Placements/s by worker", "ops", 8, [(
                f"sum by (worker) (rate(tandem_router_placements_total{{{R}}}[{RATE}]))", "{{worker}}")]),
            ("timeseries", "Ejections and readmissions", "short", 8, [
                (f"sum by (worker) (increase(tandem_router_worker_ejections_total{{{R}}}[{RATE}]))",
                 "ejected {{worker}}"),
                (f"sum by (worker) (increase(tandem_router_worker_readmissions_total{{{R}}}[{RATE}]))",
                 "readmitted {{worker}}")]),
            ("timeseries", "Retries, migrations, fallbacks", "short", 8, [
                (f"sum(increase(tandem_router_request_retries_total{{{R}}}[{RATE}]))", "retries"),
                (f"sum(increase(tandem_router_request_migrations_total{{{R}}}[{RATE}]))", "migrations"),
                (f"sum by (what) (increase(tandem_router_fallbacks_total{{{R}}}[{RATE}]))", "fallback {{what}}")]),
            ("timeseries", "Members by role and state", "short", 24, [(
                f"sum by (role, state) (tandem_members{{{R}}})", "{{role}} {{state}}")]),
        ]),
    ],
}

# ---- the workers ------------------------------------------------------------------------------

W = 'instance=~"$instance"'
ROLE = f'tandem_worker_info{{{W}, role=~"$role"}}'


def by_worker(expr: str) -> str:
    """`expr` (a vector with an `instance` label) kept to the chosen roles, labelled with its role."""
    return f"({expr}) * on (instance) group_left (role) {ROLE}"


def _worker_quantiles(metric: str, by: str = "instance") -> list[tuple[str, str]]:
    legend = " ".join("{{%s}}" % label for label in by.split(", "))
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{W}}}[{RATE}])))",
             f"{name} {legend}") for name, q in QUANTILES]


WORKERS = {
    "uid": "tandem-workers", "title": "Tandem workers",
    "instance_from": "tandem_worker_info",
    "rows": [
        ("Batch and queue", [
            ("timeseries", "Running batch (decode)", "short", 8, [(
                by_worker(f"tandem_running_requests{{{W}}}"), "{{role}} {{instance}}")]),
            ("timeseries", "Waiting requests", "short", 8, [(
                by_worker(f"tandem_waiting_requests{{{W}}}"), "{{role}} {{instance}}")]),
            ("timeseries", "Preemptions/s (decode)", "ops", 8, [(
                by_worker(f"sum by (instance) (rate(tandem_preemptions_total{{{W}}}[{RATE}]))"),
                "{{role}} {{instance}}")]),
        ]),
        ("KV cache", [
            ("timeseries", "KV pages used / free", "short", 8, [
                (by_worker(f"tandem_kv_pages_used{{{W}}}"), "used {{role}} {{instance}}"),
                (by_worker(f"tandem_kv_pages_free{{{W}}}"), "free {{role}} {{instance}}")]),
            ("timeseries", "KV pool in use", "percentunit", 8, [(
                by_worker(f"tandem_kv_pages_used{{{W}}} / tandem_kv_pages_total{{{W}}}"), "{{role}} {{instance}}")]),
            ("timeseries", "Prefix cache pages (evictable of them)", "short", 8, [
                (by_worker(f"tandem_prefix_cache_pages{{{W}}}"), "cache {{role}} {{instance}}"),
                (by_worker(f"tandem_prefix_cache_evictable_pages{{{W}}}"), "evictable {{role}} {{instance}}")]),
            ("timeseries", "Prefix cache hit ratio (cached / all prompt tokens)", "percentunit", 12, [(
                by_worker(f"sum by (instance) (rate(tandem_prompt_tokens_cached_total{{{W}}}[{RATE}])) / "
                          f"(sum by (instance) (rate(tandem_prompt_tokens_cached_total{{{W}}}[{RATE}])) + "
                          f"sum by (instance) (rate(tandem_prompt_tokens_computed_total{{{W}}}[{RATE}])))"),
                "{{role}} {{instance}}")]),
            ("timeseries", "Prompt tokens/s computed and from the cache; generated tokens/s", "short", 12, [
                (by_worker(f"sum by (instance) (rate(tandem_prompt_tokens_computed_total{{{W}}}[{RATE}]))"),
                 "computed {{role}} {{instance}}"),
                (by_worker(f"sum by (instance) (rate(tandem_prompt_tokens_cached_total{{{W}}}[{RATE}]))"),
                 "cached {{role}} {{instance}}"),
                (by_worker(f"sum by (instance) (rate(tandem_generation_tokens_total{{{W}}}[{RATE}]))"),
                 "generated {{role}} {{instance}}")]),
        ]),
        ("KV transfer (prefill sends, decode receives)", [
            ("timeseries", "KV transfer bytes/s", "Bps", 8, [(
                f"sum by (instance, direction) (rate(tandem_kv_transfer_bytes_total{{{W}}}[{RATE}]))",
                "{{direction}} {{instance}}")]),
            ("timeseries", "KV transfers/s by end state; in progress", "short", 8, [
                (f"sum by (direction, state) (rate(tandem_kv_transfers_total{{{W}}}[{RATE}]))",
                 "{{direction}} {{state}}/s"),
                (f"sum by (direction) (tandem_kv_transfers_active{{{W}}})", "{{direction}} in progress")]),
            ("timeseries", "KV transfer failures by reason", "short", 8, [(
                f"sum by (direction, reason) (increase(tandem_kv_transfer_failures_total{{{W}}}[{RATE}]))",
                "{{direction}} {{reason}}")]),
            ("timeseries", "KV transfer time (open to done)", "s", 12,
             _worker_quantiles("tandem_kv_transfer_seconds", "direction")),
            ("timeseries", "KV chunks/s", "ops", 12, [(
                f"sum by (instance, direction) (rate(tandem_kv_transfer_chunks_total{{{W}}}[{RATE}]))",
                "{{direction}} {{instance}}")]),
        ]),
        ("Request timeline on the decode worker (seconds from the router receiving it)", [
            ("timeseries", "Stage reached, p50", "s", 12, [(
                f"histogram_quantile(0.5, sum by (stage, le) (rate(tandem_request_stage_seconds_bucket{{{W}}}"
                f"[{RATE}])))", "{{stage}}")]),
            ("timeseries", "Stage reached, p90", "s", 12, [(
                f"histogram_quantile(0.9, sum by (stage, le) (rate(tandem_request_stage_seconds_bucket{{{W}}}"
                f"[{RATE}])))", "{{stage}}")]),
            ("bargauge", "Mean time to each stage", "s", 24, [(
                f"sum by (stage) (rate(tandem_request_stage_seconds_sum{{{W}}}[{RATE}])) / "
                f"sum by (stage) (rate(tandem_request_stage_seconds_count{{{W}}}[{RATE}]))", "{{stage}}")]),
        ]),
        ("Engine steps", [
            ("timeseries", "Decode step time", "s", 12, _worker_quantiles("tandem_decode_step_seconds")),
            ("timeseries", "Prefill batch time", "s", 12, _worker_quantiles("tandem_prefill_batch_seconds")),
        ]),
        ("Shared GPU, fallbacks, refused calls", [
            ("timeseries", "GPU turns/s and share of time waiting for the other worker", "short", 8, [
                (by_worker(f"sum by (instance) (rate(tandem_gpu_turns_total{{{W}}}[{RATE}]))"),
                 "turns/s {{role}} {{instance}}"),
                (by_worker(f"sum by (instance) (rate(tandem_gpu_turn_wait_seconds_total{{{W}}}[{RATE}]))"),
                 "waiting (s/s) {{role}} {{instance}}")]),
            ("timeseries", "Fallbacks (slower paths taken), by what", "short", 8, [(
                f"sum by (instance, what) (increase(tandem_worker_fallbacks_total{{{W}}}[1h]))",
                "{{what}} {{instance}}")]),
            ("timeseries", "Calls refused for their cluster token", "short", 8, [(
                f"sum by (instance, method) (increase(tandem_worker_unauthenticated_calls_total{{{W}}}[{RATE}]))",
                "{{method}} {{instance}}")]),
        ]),
    ],
}


# ---- layout ---------------------------------------------------------------------------------------

def _panel(pid: int, kind: str, title: str, unit: str, width: int, x: int, y: int,
           targets: list[tuple[str, str]]) -> dict:
    height = 4 if kind == "stat" else 8
    panel = {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"h": height, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        panel["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                      "showPoints": "never"}
    elif kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif kind == "bargauge":
        panel["options"] = {"orientation": "horizontal", "displayMode": "basic",
                            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return panel


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-variable"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0}


def build(spec: dict) -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in spec["rows"]:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for kind, title, unit, width, targets in row:
            if x + width > 24:
                x, y, row_h = 0, y + row_h, 0
            panel = _panel(pid, kind, title, unit, width, x, y, targets)
            panels.append(panel)
            pid, x, row_h = pid + 1, x + width, max(row_h, panel["gridPos"]["h"])
        y += row_h
    variables = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
                 _variable("instance", "Instance", f"label_values({spec['instance_from']}, instance)")]
    if spec["uid"] == "tandem-workers":
        variables.append(_variable("role", "Role", "label_values(tandem_worker_info, role)"))
    return {
        "uid": spec["uid"], "title": spec["title"], "tags": ["tandem"], "editable": True,
        "schemaVersion": 39, "version": 1, "graphTooltip": 1, "refresh": "10s", "timezone": "",
        "time": {"from": "now-1h", "to": "now"}, "annotations": {"list": []}, "links": [],
        "templating": {"list": variables}, "panels": panels,
    }


DASHBOARDS = {"router.json": ROUTER, "workers.json": WORKERS}


def render(spec: dict) -> str:
    return json.dumps(build(spec), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, spec in DASHBOARDS.items():
        path, text = HERE / name, render(spec)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python deploy/grafana/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
