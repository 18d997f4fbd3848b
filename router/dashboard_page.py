"""The operator dashboard's HTML (served by router/dashboard.py), self-contained: inline CSS and
JavaScript, no fonts, images or scripts from anywhere, no favicon request. The page fetches
`<its own path>/state` every 1.5 s (same origin; the dashboard cookie goes with it) and redraws
with textContent only. Every number it shows also sits, raw, in its element's `data-value`
(what tests/test_dashboard.py reads); member rows carry `data-address` and `data-role`.
"""

_STYLE = """
:root { --bg:#0f1419; --card:#1a2129; --line:#2a333d; --text:#d8dee6; --dim:#8a96a3; --ok:#3fb950;
        --bad:#f85149; --warn:#d29922; --accent:#58a6ff; }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px; background: var(--bg); color: var(--text);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { display: flex; gap: 18px; align-items: baseline; flex-wrap: wrap; margin-bottom: 14px; }
h1 { font-size: 20px; margin: 0; } h2 { font-size: 15px; margin: 18px 0 8px; color: var(--dim); }
.tag { color: var(--dim); } #status { margin-left: auto; } .live { color: var(--ok); } .down { color: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.card .label { color: var(--dim); font-size: 12px; } .card .big { font-size: 24px; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--dim); font-size: 12px; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap;
         font-variant-numeric: tabular-nums; }
th { color: var(--dim); font-weight: 500; font-size: 12px; }
th:first-child, td:first-child, td[data-field=address], td[data-field=state], th.l { text-align: left; }
tr.state-ejected td { color: var(--bad); } tr.state-unknown td { color: var(--warn); }
.why { display: block; font-size: 11px; color: var(--dim); white-space: normal; max-width: 320px; }
.bar { height: 4px; background: var(--line); border-radius: 2px; margin-top: 3px; }
.bar span { display: block; height: 100%; background: var(--accent); border-radius: 2px; }
canvas { width: 100%; height: 110px; background: var(--card); border: 1px solid var(--line); border-radius: 6px; }
"""

_SCRIPT = r"""
"use strict";
const STATE_URL = location.pathname.replace(/\/+$/, "") + "/state";
const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);
const samples = [];            // [seconds, generated tokens, requests served] for the chart

function put(el, text, value) {
  el.textContent = text;
  el.dataset.value = value === null || value === undefined ? "" : String(value);
}
const num = (n) => (n === null || n === undefined ? "\u2014" : String(n));
const pct = (r) => (r === null || r === undefined ? "\u2014" : (100 * r).toFixed(1) + " %");
function dur(s) {
  if (s === null || s === undefined) return "\u2014";
  return s < 1 ? (1000 * s).toFixed(s < 0.01 ? 2 : 1) + " ms" : s.toFixed(2) + " s";
}
function bytes(b, suffix) {
  if (b === null || b === undefined) return "\u2014";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
  return (i ? b.toFixed(1) : String(Math.round(b))) + " " + units[i] + (suffix || "");
}
function cell(tr, field, text, value) {
  const td = document.createElement("td");
  td.dataset.field = field;
  put(td, text, value);
  tr.appendChild(td);
  return td;
}
function bar(el, used, total) {
  const b = document.createElement("div"), f = document.createElement("span");
  b.className = "bar";
  f.style.width = (total ? Math.min(100, (100 * used) / total) : 0) + "%";
  b.appendChild(f);
  el.appendChild(b);
}

function renderCards(s) {
  const r = s.router, t = s.totals, st = r.generation_requests_by_status;
  put($("requests-served"), num(r.requests_served), r.requests_served);
  put($("requests-errors"), `4xx ${st["4xx"] || 0} \u00b7 5xx ${st["5xx"] || 0}`, (st["4xx"] || 0) + (st["5xx"] || 0));
  put($("in-flight"), num(r.in_flight), r.in_flight);
  put($("load"), `running ${t.running} \u00b7 waiting ${t.waiting}`, t.running + t.waiting);
  put($("tokens-generated"), num(r.generated_tokens), r.generated_tokens);
  put($("prompt-tokens"), `prompt ${r.prompt_tokens} \u00b7 cached ${r.cached_prompt_tokens}`, r.prompt_tokens);
  put($("cache-hit"), pct(r.prefix_cache_hit_ratio), r.prefix_cache_hit_ratio);
  const kv = $("kv-pages");
  put(kv, `${t.kv_pages_held} / ${t.kv_pages_total}`, t.kv_pages_held);
  bar(kv, t.kv_pages_held, t.kv_pages_total);
  put($("kv-bandwidth"), t.kv_bytes_per_s === null ? "unknown" : bytes(t.kv_bytes_per_s, "/s"), t.kv_bytes_per_s);
  put($("kv-active"), `${t.kv_transfers_active} active`, t.kv_transfers_active);
  put($("stream-errors"), num(r.stream_errors), r.stream_errors);
  put($("ejections"), `ejections ${r.ejections} \u00b7 retries ${r.retries} \u00b7 migrations ${r.migrations}`,
      r.ejections);
}

function renderLatency(lat) {
  const body = $("latency-body");
  body.replaceChildren();
  const names = { ttft: "time to first token", itl: "inter-token latency", e2e: "end to end" };
  for (const key of ["ttft", "itl", "e2e"]) {
    const l = lat[key], w = l.window, tr = document.createElement("tr");
    tr.dataset.metric = key;
    cell(tr, "name", names[key]);
    cell(tr, "count", num(l.count), l.count);
    cell(tr, "mean", dur(l.mean_s), l.mean_s);
    for (const q of ["p50", "p90", "p99"]) cell(tr, q, dur(l[q + "_s"]), l[q + "_s"]);
    cell(tr, "window_count", num(w.count), w.count);
    for (const q of ["p50", "p90", "p99"]) cell(tr, "window_" + q, dur(w[q + "_s"]), w[q + "_s"]);
    body.appendChild(tr);
  }
  $("window-s").textContent = String(Math.round(lat.ttft.window.seconds));
}

function renderMembers(members) {
  const body = $("members-body");
  body.replaceChildren();
  for (const m of members) {
    const tr = document.createElement("tr");
    tr.dataset.address = m.address;
    tr.dataset.role = m.role;
    tr.className = "state-" + m.state;
    cell(tr, "role", m.role);
    cell(tr, "address", m.address);
    const state = cell(tr, "state", m.state, m.state);
    if (m.ejected_reason) {
      const why = document.createElement("span");
      why.className = "why";
      why.textContent = m.ejected_reason;
      state.appendChild(why);
    }
    cell(tr, "running", m.running === undefined ? "\u2014" : num(m.running) + (m.max_running ? " / " + m.max_running : ""), m.running);
    cell(tr, "waiting", num(m.waiting), m.waiting);
    cell(tr, "router_in_flight", num(m.router_in_flight), m.router_in_flight);
    cell(tr, "placed", num(m.placed), m.placed);
    const kv = cell(tr, "kv_pages", m.kv_pages_total === undefined ? "\u2014" : `${m.kv_pages_held} / ${m.kv_pages_total}`, m.kv_pages_held);
    if (m.kv_pages_total !== undefined) bar(kv, m.kv_pages_held, m.kv_pages_total);
    cell(tr, "prefix_cache_hit_ratio", pct(m.prefix_cache_hit_ratio), m.prefix_cache_hit_ratio);
    cell(tr, "kv_transfers_active", num(m.kv_transfers_active), m.kv_transfers_active);
    const x = m.kv_transfer || {};
    const rate = cell(tr, "kv_bytes_per_s", x.error ? (x.metrics_address ? "scrape failed" : "unknown")
                      : x.bytes_per_s === null || x.bytes_per_s === undefined ? "measuring" : bytes(x.bytes_per_s, "/s"), x.bytes_per_s);
    if (x.error) rate.title = x.error;
    cell(tr, "kv_bytes_total", bytes(x.bytes_total), x.bytes_total);
    cell(tr, "stats_age", m.stats_age_s === null ? "\u2014" : m.stats_age_s.toFixed(1) + " s", m.stats_age_s);
    body.appendChild(tr);
  }
}

function renderChart(s) {
  samples.push([s.time_unix, s.router.generated_tokens, s.router.requests_served]);
  while (samples.length > 120) samples.shift();
  const c = $("chart"), g = c.getContext("2d");
  c.width = c.clientWidth; c.height = c.clientHeight;
  g.clearRect(0, 0, c.width, c.height);
  const rates = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i][0] - samples[i - 1][0];
    rates.push(dt > 0 ? (samples[i][1] - samples[i - 1][1]) / dt : 0);
  }
  const top = Math.max(1, ...rates);
  g.strokeStyle = "#58a6ff"; g.lineWidth = 2; g.beginPath();
  rates.forEach((r, i) => {
    const x = (c.width * (i + 1)) / 120, y = c.height - 6 - ((c.height - 24) * r) / top;
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#58a6ff";
  rates.forEach((r, i) => g.fillRect((c.width * (i + 1)) / 120 - 2, c.height - 8 - ((c.height - 24) * r) / top, 4, 4));
  g.fillStyle = "#8a96a3"; g.font = "12px sans-serif";
  const last = rates.length ? rates[rates.length - 1] : 0;
  g.fillText(`generated tokens/s: ${last.toFixed(1)} (max ${top.toFixed(1)}, last ${samples.length} polls)`, 8, 16);
  put($("tokens-per-s"), last.toFixed(1), last);
}

function render(s) {
  put($("model"), s.model);
  put($("mode"), `${s.mode} \u00b7 ${s.membership} members`);
  put($("uptime"), `up ${Math.round(s.uptime_s)} s`, s.uptime_s);
  renderCards(s);
  renderLatency(s.latency);
  renderMembers(s.members);
  renderChart(s);
}

async function tick() {
  const status = $("status");
  try {
    const r = await fetch(STATE_URL, { cache: "no-store", credentials: "same-origin" });
    if (r.status === 401) {
      status.className = "down";
      status.textContent = "not logged in: reload /dashboard with ?key=";
    } else if (!r.ok) {
      throw new Error("HTTP " + r.status);
    } else {
      render(await r.json());
      status.className = "live";
      status.textContent = "live \u00b7 " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "1";
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    }
  } catch (e) {
    status.className = "down";
    status.textContent = "router unreachable: " + e.message;
  }
  setTimeout(tick, POLL_MS);
}
tick();
"""

_BODY = """
<header>
  <h1>Tandem router</h1><span id="model" class="tag"></span><span id="mode" class="tag"></span>
  <span id="uptime" class="tag"></span><span id="status">connecting&hellip;</span>
</header>
<section class="cards">
  <div class="card"><div class="label">requests served</div><div class="big" id="requests-served">&mdash;</div>
    <div class="sub" id="requests-errors"></div></div>
  <div class="card"><div class="label">in flight</div><div class="big" id="in-flight">&mdash;</div>
    <div class="sub" id="load"></div></div>
  <div class="card"><div class="label">tokens generated</div><div class="big" id="tokens-generated">&mdash;</div>
    <div class="sub" id="prompt-tokens"></div></div>
  <div class="card"><div class="label">generated tokens/s</div><div class="big" id="tokens-per-s">&mdash;</div>
    <div class="sub">between the last two polls</div></div>
  <div class="card"><div class="label">prefix cache hit</div><div class="big" id="cache-hit">&mdash;</div>
    <div class="sub">cached / prompt tokens</div></div>
  <div class="card"><div class="label">KV pages held</div><div class="big" id="kv-pages">&mdash;</div></div>
  <div class="card"><div class="label">KV transfer</div><div class="big" id="kv-bandwidth">&mdash;</div>
    <div class="sub" id="kv-active"></div></div>
  <div class="card"><div class="label">stream errors</div><div class="big" id="stream-errors">&mdash;</div>
    <div class="sub" id="ejections"></div></div>
</section>
<h2>Throughput</h2>
<canvas id="chart"></canvas>
<h2>Latency (router's histograms: since start, and the last <span id="window-s">0</span> s)</h2>
<table><thead><tr><th>metric</th><th>count</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th>
  <th>window count</th><th>window p50</th><th>window p90</th><th>window p99</th></tr></thead>
  <tbody id="latency-body"></tbody></table>
<h2>Members</h2>
<table><thead><tr><th>role</th><th class="l">address</th><th class="l">state</th><th>running</th><th>waiting</th>
  <th>router in flight</th><th>placed</th><th>KV pages held</th><th>prefix hit</th><th>KV transfers</th>
  <th>KV bytes/s</th><th>KV bytes</th><th>stats age</th></tr></thead>
  <tbody id="members-body"></tbody></table>
"""

PAGE_HTML = (
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    "<title>Tandem router dashboard</title><link rel=\"icon\" href=\"data:,\">"
    f"<style>{_STYLE}</style></head>\n<body data-loaded=\"0\">{_BODY}<script>{_SCRIPT}</script></body></html>\n"
)

LOGIN_HTML = (
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tandem router dashboard: log in</title>"
    f"<link rel=\"icon\" href=\"data:,\"><style>{_STYLE} form {{ margin-top: 40px; }} input {{ padding: 6px; }}</style>"
    "</head>\n<body><h1>Tandem router dashboard</h1>"
    "<p>This router needs its API key (<code>--api-key</code>). It is kept in a session cookie for the "
    "dashboard only.</p>"
    "<form method=\"post\" action=\"/dashboard\"><input type=\"password\" name=\"key\" autofocus "
    "placeholder=\"API key\" autocomplete=\"current-password\"> <button type=\"submit\">Open</button></form>"
    "</body></html>\n"
)
