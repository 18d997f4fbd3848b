"""Malformed request bodies against a real router + colocated worker (issue 11): every one
gets a 4xx in the OpenAI error shape, never a 5xx, and the next request on the same pooled
connection still works. The router runs with --max-request-bytes 1 MiB."""
from __future__ import annotations

import json

import httpx
import pytest

from cluster import Cluster
from engine.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=6)
    with Cluster(model_dir, colocated=True, num_pages=128, page_size=4,
                 router_args=("--max-request-bytes", str(1 << 20)),
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


def _raw(text: str) -> bytes:
    return text.encode("utf-8")


CASES = [
    # (name, path, raw body, expected status, param named in the error or None)
    ("deep nesting", "/completions", b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("surrogate in prompt", "/completions", _raw('{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'), 400, "prompt"),
    ("surrogate in model", "/completions", _raw('{"model": "ti\\udc00ny", "prompt": "ab", "max_tokens": 2}'), 400, "model"),
    ("surrogate in a chat message", "/chat/completions",
     _raw('{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud83dy"}], "max_tokens": 2}'), 400,
     "messages[0].content"),
    ("surrogate in a key", "/completions", _raw('{"model": "tiny", "prompt": "ab", "\\ud800": 1}'), 400, None),
    ("surrogate in stop", "/completions", _raw('{"model": "tiny", "prompt": "ab", "stop": ["x", "\\udfff"]}'), 400, "stop[1]"),
    ("surrogate in user", "/completions", _raw('{"model": "tiny", "prompt": "ab", "user": "\\ud800"}'), 400, "user"),
    ("surrogate in a chat role", "/chat/completions",
     _raw('{"model": "tiny", "messages": [{"role": "us\\ud800er", "content": "hi"}]}'), 400, "messages[0].role"),
    ("surrogate in a content part", "/chat/completions",
     _raw('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
     400, "messages[0].content[0].text"),
    ("surrogate in a chat name", "/chat/completions",
     _raw('{"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "\\udc00"}]}'), 400,
     "messages[0].name"),
    ("5 MB prompt", "/completions", json.dumps({"model": "tiny", "prompt": "ab " * 1_700_000}).encode(), 413, None),
    ("prompt of the wrong type", "/completions", _raw('{"model": "tiny", "prompt": {"x": 1}}'), 400, None),
    ("max_tokens not a number", "/completions", _raw('{"model": "tiny", "prompt": "ab", "max_tokens": "ten"}'), 400, None),
    ("NaN", "/completions", _raw('{"model": "tiny", "prompt": "ab", "temperature": NaN}'), 400, None),
    ("Infinity", "/completions", _raw('{"model": "tiny", "prompt": "ab", "top_p": -Infinity}'), 400, None),
    ("a float past the double range", "/completions", _raw('{"model": "tiny", "prompt": "ab", "temperature": 1e999}'), 400, None),
    ("an integer of 5,000 digits", "/completions", _raw('{"model": "tiny", "prompt": "ab", "max_tokens": ' + "9" * 5000 + "}"), 400, None),
    ("invalid UTF-8", "/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("not an object", "/completions", b"[1, 2, 3]", 400, None),
    ("empty body", "/completions", b"", 400, None),
    ("a surrogate as raw bytes", "/completions", b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}', 400, "prompt"),
    ("deep nesting after a string with quotes", "/completions",
     b'{"model": "tiny", "x": "a\\"", "prompt": ' + b"[" * 70 + b"]" * 70 + b"}", 400, None),
]

# bodies the fast paths must still accept: brackets inside strings, escaped surrogate pairs
GOOD = [
    ("brackets inside a string", {"model": "tiny", "prompt": "[" * 200 + "{" * 100, "max_tokens": 2}),
    ("an escaped surrogate pair", _raw('{"model": "tiny", "prompt": "a\\ud83d\\ude00b", "max_tokens": 2}')),
    ("an escaped quote before brackets", _raw('{"model": "tiny", "prompt": "a\\"' + "[" * 70 + '", "max_tokens": 2}')),
]


def test_malformed_bodies_get_4xx_and_the_connection_stays_usable(cluster):
    ok_body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=cluster.base_url, timeout=60) as c:
        assert c.post("/completions", json=ok_body).status_code == 200
        for name, path, raw, status, param in CASES:
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", (name, err)
            if param is not None:
                assert err["param"] == param, (name, err)
            after = c.post("/completions", json=ok_body)      # the same pooled connection
            assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None, name
        for name, body in GOOD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post("/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 200, (name, r.status_code, r.text[:300])
        r = c.get("/completions")
        assert r.status_code == 405 and "POST" in r.headers.get("allow", ""), r.headers
        assert r.json()["error"]["code"] == "method_not_allowed"
