"""The Grafana dashboards (deploy/grafana/*.json) query only what Tandem exports.

Every panel's PromQL (and every template variable's `label_values(...)`) is read with a small
PromQL scanner: selectors and their label matchers, `by`/`without`/`on`/`ignoring`/`group_*`
label lists, ranges, strings, Grafana variables, function calls. What it finds is compared with
the `/metrics` of a real CPU cluster (router, decode, prefill; tests/cluster.py, cluster token
on, NIXL KV transport and a shared-GPU turn file so the fallback and GPU-turn families exist)
after completions, a stream, a chat and one bad request:
  - each metric name is a series of an exported family (a counter as `x_total`, a histogram as
    `x_bucket`/`x_sum`/`x_count`, a gauge or info as itself);
  - `rate`/`increase`/`irate` take counters or histogram series, never gauges; a counter is
    never shown raw; `histogram_quantile` takes `_bucket` series;
  - every label a matcher or a grouping names exists on those series (or is a target label).
"""
from __future__ import annotations

import importlib.util
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from openai import OpenAI

from cluster import ROOT, Cluster
from engine.tiny_models import make_tiny_model

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = ("router.json", "workers.json")
TARGET_LABELS = {"instance", "job"}         # Prometheus adds these to every scraped series

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_sum",
    "histogram_stddev", "histogram_stdvar", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time"}
COUNTER_FUNCTIONS = {"rate", "increase", "irate", "resets"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "offset", "and", "or", "unless", "atan2"}

_TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+) | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?(?![\w:]))
  | (?P<ident>[A-Za-z_:][\w:]*) | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
""", re.X)


@dataclass
class Selector:
    metric: str
    matchers: dict[str, str] = field(default_factory=dict)   # label -> operator
    inside: tuple[str, ...] = ()                             # enclosing function calls, outermost first


@dataclass
class Query:
    selectors: list[Selector]
    grouping: set[str]                                       # labels named in by/without/on/... lists


def scan(expr: str) -> Query:
    """The selectors and grouping labels of one PromQL expression (raises on what it cannot read)."""
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    selectors, grouping, calls = [], set(), []   # calls: stack of the name that opened each "("
    i = 0

    def label_list(j: int) -> int:
        assert tokens[j] == ("op", "("), expr
        j += 1
        while tokens[j] != ("op", ")"):
            if tokens[j][0] == "ident":
                grouping.add(tokens[j][1])
            j += 1
        return j + 1

    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in LABEL_LISTS:
            i = label_list(i + 1) if nxt == ("op", "(") else i + 1      # group_left without labels
            continue
        if kind == "ident" and (text in AGGREGATIONS or text in FUNCTIONS):
            calls.append(text)
            i += 1
            while tokens[i][1] in LABEL_LISTS:                           # sum by (le) (...)
                i = label_list(i + 1)
            assert tokens[i] == ("op", "("), f"{text} without arguments in {expr!r}"
            i += 1
            continue
        if kind == "ident" and text not in KEYWORDS:
            assert nxt != ("op", "("), f"unknown function {text}() in {expr!r}"
            sel = Selector(text, inside=tuple(c for c in calls if c))
            i += 1
            if tokens[i:i + 1] == [("op", "{")]:
                i += 1
                while tokens[i] != ("op", "}"):
                    if tokens[i][0] == "ident":
                        sel.matchers[tokens[i][1]] = tokens[i + 1][1]
                        assert tokens[i + 2][0] in ("string", "var"), expr
                        i += 3
                    else:
                        i += 1                                           # the comma
                i += 1
            selectors.append(sel)
            continue
        if (kind, text) == ("op", "("):
            calls.append("")                                             # a plain parenthesis
        elif (kind, text) == ("op", ")"):
            calls.pop()
        i += 1
    assert not calls, f"unbalanced parentheses in {expr!r}"
    return Query(selectors, grouping)


def test_scanner_reads_what_the_dashboards_use():
    q = scan('histogram_quantile(0.9, sum by (le, stage) (rate(x_bucket{a="1", b=~"$v"}[$__rate_interval])))')
    assert [(s.metric, s.matchers, s.inside) for s in q.selectors] == [
        ("x_bucket", {"a": "=", "b": "=~"}, ("histogram_quantile", "sum", "rate"))]
    assert q.grouping == {"le", "stage"}
    q = scan('(sum by (instance) (rate(a_total[5m])) / (b + c{d!="x"})) * on (instance) group_left (role) info{r=~"$r"}')
    assert [s.metric for s in q.selectors] == ["a_total", "b", "c", "info"]
    assert q.selectors[1].inside == () and q.grouping == {"instance", "role"}
    assert [s.metric for s in scan("sum(x_total offset 5m) > bool 2").selectors] == ["x_total"]
    with pytest.raises(AssertionError):
        scan("rates(x_total[5m])")
    with pytest.raises(AssertionError):
        scan("sum(rate(x_total[5m])")


# ---------------------------------------------------------------------------- the dashboards

def _load(name: str) -> dict:
    return json.loads((GRAFANA / name).read_text())


def _queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable."""
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{board['uid']}: {panel['title']} [{target['refId']}]", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m, var
            out.append((f"{board['uid']}: variable {var['name']}", m.group(1)))
    return out


def test_dashboards_are_what_build_py_writes_and_well_formed():
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main(["--check"]) == 0, "run python deploy/grafana/build.py"
    uids = set()
    for name in DASHBOARDS:
        board = _load(name)
        uids.add(board["uid"])
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[0] == "datasource" and board["templating"]["list"][0]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        cells = set()
        for p in board["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
            covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not covered & cells, f"{p['title']} overlaps another panel"
            cells |= covered
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
                used = set(re.findall(r"\$(\w+)|\$\{(\w+)\}", t["expr"]))
                assert {a or b for a, b in used} <= set(names) | {"__rate_interval"}, t["expr"]
    assert len(uids) == len(DASHBOARDS)


# ---------------------------------------------------------------------------- against a cluster

@dataclass
class Exported:
    series: dict[str, str] = field(default_factory=dict)               # series name -> family type
    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sampled: set[str] = field(default_factory=set)                     # series with at least one sample

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if m := re.match(r"# TYPE (\S+) (\S+)", line):
                name, kind = m.groups()
                if kind == "counter":
                    self.series[name if name.endswith("_total") else name + "_total"] = "counter"
                elif kind == "histogram":
                    for suffix in ("_bucket", "_sum", "_count"):
                        self.series[name + suffix] = "histogram"
                else:
                    self.series[name] = kind                            # gauge (an info is a gauge here)
            elif line and not line.startswith("#"):
                m = re.match(r"([\w:]+)(?:\{(.*)\})? ", line)
                self.sampled.add(m.group(1))
                self.labels[m.group(1)] |= set(re.findall(r'(\w+)="', m.group(2) or ""))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    tmp = tmp_path_factory.mktemp("grafana")
    model_dir = make_tiny_model(tmp / "llama", arch="llama", seed=4)
    with Cluster(model_dir, log_dir=tmp, kv_transfer_backend="nixl",
                 extra_worker_args=("--gpu-turn-file", str(tmp / "gpu.turn"))) as c:
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        kw = dict(model="tiny", max_tokens=4, temperature=0)
        client.completions.create(prompt="dashboards want numbers", **kw)
        for _ in client.completions.create(prompt="dashboards want numbers too", stream=True, **kw):
            pass
        client.chat.completions.create(messages=[{"role": "user", "content": "hello"}], **kw)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(prompt="bad", model="tiny", max_tokens=4, temperature=-1)
        out = Exported()
        for role, url in c.metrics_urls.items():
            out.add(httpx.get(url, timeout=5).text)
        assert set(c.metrics_urls) == {"router", "decode", "prefill"}
    return out


def test_every_query_names_an_exported_family(exported):
    problems, used = [], set()
    for name in DASHBOARDS:
        for where, expr in _queries(_load(name)):
            q = scan(expr)
            assert q.selectors, f"{where}: no metric in {expr!r}"
            known_labels = set(TARGET_LABELS)
            for s in q.selectors:
                used.add(s.metric)
                kind = exported.series.get(s.metric)
                if kind is None:
                    problems.append(f"{where}: {s.metric} is not exported")
                    continue
                known_labels |= exported.labels[s.metric]
                over_range = COUNTER_FUNCTIONS & set(s.inside)
                if kind == "gauge" and over_range:
                    problems.append(f"{where}: {sorted(over_range)} of the gauge {s.metric}")
                if kind in ("counter", "histogram") and not over_range and "variable" not in where:
                    problems.append(f"{where}: the {kind} series {s.metric} shown raw (no rate/increase)")
                if "histogram_quantile" in s.inside and not (kind == "histogram" and s.metric.endswith("_bucket")):
                    problems.append(f"{where}: histogram_quantile over {s.metric}")
                if s.metric in exported.sampled:          # labels known only from samples
                    for label in set(s.matchers) - exported.labels[s.metric] - TARGET_LABELS:
                        problems.append(f"{where}: {s.metric} has no label {label!r}")
            if all(s.metric in exported.sampled for s in q.selectors):
                for label in q.grouping - known_labels:
                    problems.append(f"{where}: grouping by {label!r}, which none of its series has")
    assert problems == [], "\n".join(problems)
    # the boards cover what the issue asks for (a family dropped from a board fails here)
    for family in ("tandem_router_requests_total", "tandem_router_stream_errors_total",
                   "tandem_router_time_to_first_token_seconds_bucket", "tandem_router_inter_token_latency_seconds_bucket",
                   "tandem_router_e2e_request_latency_seconds_bucket", "tandem_router_requests_in_flight",
                   "tandem_router_placements_total", "tandem_router_worker_ejections_total",
                   "tandem_running_requests", "tandem_waiting_requests", "tandem_kv_pages_used", "tandem_kv_pages_free",
                   "tandem_prompt_tokens_cached_total", "tandem_prompt_tokens_computed_total",
                   "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_failures_total",
                   "tandem_request_stage_seconds_bucket", "tandem_gpu_turns_total", "tandem_worker_fallbacks_total"):
        assert family in used, family
