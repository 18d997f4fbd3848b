"""A request body's bytes -> a JSON object, before any schema (router/protocol.parse_request).

`decode_body(raw)` returns the decoded dict or raises a 400 `OpenAIError`: nesting deeper than
MAX_JSON_DEPTH (checked on the bytes, before the parser could recurse), invalid JSON or UTF-8,
NaN / Infinity / floats past the double range, a body that is not an object, and any string
(key or value) holding a lone UTF-16 surrogate, named by its path. Ordinary bodies take fast
paths: two byte counts for the depth, one regex search for surrogates.
"""
from __future__ import annotations

import json
import re
from typing import Any

from router.errors import bad_request

MAX_JSON_DEPTH = 64        # nesting a request may use; deeper is a 400 before the parser recurses


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# a JSON string (skipped) or one bracket; the unrolled form keeps long strings linear
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _json_depth_ok(body: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest at most `limit` deep (no recursion). Bodies with few
    brackets in all (every ordinary request) are answered by two C-speed counts."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(body):
        c = body[m.start()]
        if c in (0x5B, 0x7B):        # [ {
            depth += 1
            if depth > limit:
                return False
        elif c in (0x5D, 0x7D):      # ] }
            depth -= 1
    return True


def _finite_float(text: str) -> float:
    x = float(text)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


# what a surrogate can come from: a \\u escape, or (json.loads decodes bytes with
# "surrogatepass") a UTF-8-style encoded surrogate, ED A0..BF
_SURROGATE_SOURCE = re.compile(rb'\\u|\xed[\xa0-\xbf]')


def _may_hold_surrogate(body: bytes) -> bool:
    return _SURROGATE_SOURCE.search(body) is not None


def _lone_surrogate(data, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, which no tokenizer
    or UTF-8 encoder accepts; None if there is none."""
    stack = [(data, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str):
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        return f"{where}.<key>" if where else "<key>"
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item) if isinstance(v, (str, list, dict)))
    return None


def decode_body(body: bytes) -> dict[str, Any]:
    if body and not _json_depth_ok(body, MAX_JSON_DEPTH):
        raise bad_request(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:     # NaN / Infinity; a nesting the scan missed
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    where = _lone_surrogate(data) if _may_hold_surrogate(body) else None
    if where is not None:
        raise bad_request(f"{where} holds a lone UTF-16 surrogate, which is not valid text", param=where)
    return data
