"""The operator dashboard (router/dashboard.py) in a real browser against a real CPU cluster.

One P+D cluster (tests/cluster.py, cluster token on) with etcd membership, so the router knows
each worker's /metrics address and can show KV transfer bandwidth, and with --api-key, so the
page goes through the key-to-cookie login. Headless Debian `chromium` is driven over the
DevTools protocol (aiohttp's websocket client): every request the page makes is recorded, host
names other than 127.0.0.1 do not resolve, and the page must still render in full. The numbers
the page shows are read from the DOM before and after traffic, without a reload (it polls).
A second, colocated cluster with static members and no key checks the open page, the "unknown"
KV bandwidth of static members, and a stopped worker shown ejected, then up again.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from cluster import Cluster, stop_all
from engine.tiny_models import make_tiny_model
from etcd_server import EtcdServer, find_etcd
from router.dashboard import histogram_quantile
from router.dashboard_page import LOGIN_HTML, PAGE_HTML

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "dashboard-test-key"
WIDTH, HEIGHT = 1280, 900
MAX_TOKENS = 6

needs_cluster = pytest.mark.skipif(find_etcd() is None or not Path(CHROMIUM).exists(),
                                   reason="needs etcd (etcd-server) and chromium (.ci/run installs both)")


# ---------------------------------------------------------------------------- unit

def test_histogram_quantile_matches_prometheus_rules():
    inf = float("inf")
    assert histogram_quantile(0.5, [(0.1, 0), (0.2, 10), (inf, 10)]) == pytest.approx(0.15)
    assert histogram_quantile(0.5, [(0.1, 4), (inf, 4)]) == pytest.approx(0.05)    # first bucket: from 0
    assert histogram_quantile(0.99, [(0.1, 1), (1.0, 1), (inf, 100)]) == 1.0       # +Inf: highest bound
    assert histogram_quantile(0.9, [(0.1, 0), (inf, 0)]) is None


def test_page_needs_nothing_from_outside():
    for html in (PAGE_HTML, LOGIN_HTML):
        assert "://" not in html and "@import" not in html and "url(" not in html
        assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|/dashboard)""", html), "a resource not inline"


# ---------------------------------------------------------------------------- cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    model_dir = make_tiny_model(tmp / "llama", arch="llama", seed=9)
    etcd = EtcdServer(tmp / "etcd", log_path=tmp / "etcd.log").start()
    reg = ("--etcd", etcd.endpoint, "--etcd-prefix", "/dashboard-test")
    try:
        with Cluster(model_dir, api_key=KEY, log_dir=tmp, extra_worker_args=reg, router_args=reg) as c:
            c.url = f"http://127.0.0.1:{c.http_port}"
            deadline = time.monotonic() + 20       # etcd view: both workers listed
            while len(_state(c)["members"]) < 2:
                assert time.monotonic() < deadline, _state(c)
                time.sleep(0.2)
            yield c
    finally:
        etcd.stop()


def _state(c) -> dict:
    r = httpx.get(f"{c.url}/dashboard/state", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    r.raise_for_status()
    return r.json()


@needs_cluster
def test_api_key_guards_page_and_state(cluster):
    url = cluster.url
    html, js = {"Accept": "text/html"}, {"Accept": "application/json"}
    r = httpx.get(f"{url}/dashboard", headers=html)
    assert r.status_code == 401 and '<form method="post" action="/dashboard">' in r.text
    for path in ("/dashboard", "/dashboard/state", "/dashboard?key=wrong"):
        r = httpx.get(url + path, headers=js)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{url}/dashboard/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/dashboard", content="key=wrong", headers=html).status_code == 401

    r = httpx.get(f"{url}/dashboard?key={KEY}")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    set_cookie = r.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Path=/dashboard" in set_cookie
    cookie = r.cookies["tandem_dashboard"]
    assert KEY not in cookie
    jar = {"tandem_dashboard": cookie}
    assert httpx.get(f"{url}/dashboard", cookies=jar).text == PAGE_HTML
    assert httpx.get(f"{url}/dashboard/state", cookies=jar).json()["mode"] == "disaggregated"
    assert httpx.get(f"{url}/v1/models", cookies=jar).status_code == 401      # the cookie is not the key
    r = httpx.post(f"{url}/dashboard", content=f"key={KEY}", headers=html)   # the login form
    assert r.status_code == 303 and r.cookies["tandem_dashboard"] == cookie
    assert httpx.get(f"{url}/dashboard", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert not any(p.startswith("/dashboard") for p in paths)


class DevTools:
    """A minimal DevTools-protocol client for one page: commands, and every event kept."""

    def __init__(self, ws) -> None:
        self.ws, self.events, self._next, self._waiting = ws, [], 0, {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self._waiting.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def call(self, method: str, **params):
        self._next += 1
        done = self._waiting[self._next] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        answer = await asyncio.wait_for(done, 30)
        assert "error" not in answer, answer
        return answer["result"]

    async def js(self, expression: str):
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in out, out
        return out["result"].get("value")

    async def until(self, expression: str, timeout: float = 15.0):
        """Poll `expression` in the page until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.js(expression)):
            assert time.monotonic() < deadline, f"page never satisfied: {expression}"
            await asyncio.sleep(0.2)
        return value


async def _open_chromium(profile: Path):
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         f"--window-size={WIDTH},{HEIGHT}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
        await asyncio.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def _value(field: str) -> str:
    return f"document.getElementById('{field}').dataset.value"


def _row(address: str, field: str) -> str:
    return f"document.querySelector('tr[data-address=\"{address}\"] [data-field={field}]').dataset.value"


async def _drive(cluster, tmp_path: Path) -> None:
    import aiohttp

    proc, port = await _open_chromium(tmp_path / "profile")
    try:
        async with aiohttp.ClientSession() as http:
            pages = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            target = next(p for p in pages if p["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                await _check_page(DevTools(ws), cluster, tmp_path)
    finally:
        stop_all([proc])


async def _check_page(dt: DevTools, cluster, tmp_path: Path) -> None:
    await dt.call("Network.enable")
    await dt.call("Page.enable")
    # headless Chromium's window keeps room for a toolbar it does not draw: the viewport is the window
    await dt.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
    await dt.call("Page.navigate", url=f"{cluster.url}/dashboard?key={KEY}")
    await dt.until("document.body && document.body.dataset.loaded === '1'")

    # member rows: one per worker, by role, up, Stats known
    rows = await dt.js("[...document.querySelectorAll('#members-body tr')].map("
                       "r => [r.dataset.role, r.dataset.address, r.querySelector('[data-field=state]').dataset.value])")
    assert sorted(rows) == sorted([["decode", a, "up"] for a in cluster.decode_addrs]
                                  + [["prefill", a, "up"] for a in cluster.prefill_addrs])
    assert await dt.js(_row(cluster.decode_addr, "kv_pages")) == "0"   # idle: no page in use
    before = {f: int(await dt.js(_value(f)) or 0) for f in ("requests-served", "tokens-generated")}
    ttft_before = int(await dt.js("document.querySelector('tr[data-metric=ttft] [data-field=count]').dataset.value"))
    placed_before = int(await dt.js(_row(cluster.decode_addr, "placed")))

    # traffic, while the page stays open
    client = OpenAI(base_url=cluster.base_url, api_key=KEY, max_retries=0)
    n = 4
    kw = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    shared = "operators like numbers that move " * 3
    for i in range(n - 1):
        client.completions.create(prompt=shared + str(i), **kw)
    for _ in client.completions.create(prompt=shared, stream=True, **kw):
        pass

    served = before["requests-served"] + n
    await dt.until(f"Number({_value('requests-served')}) === {served}")
    assert int(await dt.js(_value("tokens-generated"))) == before["tokens-generated"] + n * MAX_TOKENS
    ttft = int(await dt.js("document.querySelector('tr[data-metric=ttft] [data-field=count]').dataset.value"))
    assert ttft == ttft_before + n
    assert int(await dt.js(_row(cluster.decode_addr, "placed"))) == placed_before + n
    assert float(await dt.js(_row(cluster.prefill_addr, "prefix_cache_hit_ratio"))) > 0   # shared prefix

    # KV bytes: what the prefill worker's own /metrics says it sent, and a rate above zero
    text = httpx.get(cluster.metrics_urls["prefill"], timeout=5).text
    sent = float(re.search(r'^tandem_kv_transfer_bytes_total\{direction="send"\} (\S+)$', text, re.M).group(1))
    assert sent > 0
    await dt.until(f"Number({_row(cluster.prefill_addr, 'kv_bytes_total')}) === {sent}")
    assert float(await dt.js(_row(cluster.prefill_addr, "kv_bytes_per_s"))) > 0
    assert await dt.js("document.getElementById('status').className") == "live"

    shot = base64.b64decode((await dt.call("Page.captureScreenshot", format="png"))["data"])
    (tmp_path / "dashboard.png").write_bytes(shot)
    assert len(shot) > 10_000 and _png_size(shot) == (WIDTH, HEIGHT)

    # every request the page made went to the router (no CDN, no fonts, nothing else)
    urls = [e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"]
    assert any(u.endswith("/dashboard/state") for u in urls)
    outside = [u for u in urls if not u.startswith(cluster.url + "/") and not u.startswith("data:")]
    assert outside == [], outside
    failed = [e["params"] for e in dt.events if e.get("method") == "Network.loadingFailed"]
    assert failed == [], failed


@needs_cluster
def test_page_in_headless_chromium(cluster, tmp_path):
    asyncio.run(_drive(cluster, tmp_path))


def test_static_colocated_router_without_key_shows_ejection(tmp_path):
    """No --api-key: the page and state are open. Static members: no /metrics address, so KV
    bandwidth is said to be unknown. A decode worker that stops answering (SIGSTOP) is shown
    ejected with the reason, and up again once its Stats answer."""
    import signal

    model_dir = make_tiny_model(tmp_path / "llama", arch="llama", seed=9)
    with Cluster(model_dir, colocated=True, log_dir=tmp_path) as c:
        url = f"http://127.0.0.1:{c.http_port}"
        assert httpx.get(f"{url}/dashboard").text == PAGE_HTML
        s = httpx.get(f"{url}/dashboard/state").json()
        assert (s["mode"], s["membership"]) == ("colocated", "static")
        [member] = s["members"]
        assert member["address"] == c.decode_addr and member["state"] == "up"
        assert member["kv_transfer"]["metrics_address"] is None and "unknown" in member["kv_transfer"]["error"]
        assert s["totals"]["kv_bytes_per_s"] is None

        proc = c.decode_procs[0]
        proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while (member := httpx.get(f"{url}/dashboard/state").json()["members"][0])["state"] != "ejected":
                assert time.monotonic() < deadline, member
                time.sleep(0.2)
            assert "Stats failed" in member["ejected_reason"]
        finally:
            proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while (s := httpx.get(f"{url}/dashboard/state").json())["members"][0]["state"] != "up":
            assert time.monotonic() < deadline, s["members"]
            time.sleep(0.2)
        assert s["router"]["ejections"] == 1
