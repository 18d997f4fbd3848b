"""Chained hashes of full KV pages, shared by prefill workers and the router.

block_hashes(tokens, page_size)[i] identifies the first (i+1) * page_size tokens:
h[i] = blake2b-64(h[i-1] || tokens of page i). Stable across processes and
Python versions (no use of `hash()`), so a router can compare a request's
hashes with the cache events that prefill workers stream to it.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence


def block_hashes(tokens: Sequence[int], page_size: int, limit: int | None = None) -> list[int]:
    """Hashes of the leading full pages of `tokens` (at most `limit`)."""
    n = len(tokens) // page_size
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    prev = b"\0" * 8
    for i in range(n):
        page = tokens[i * page_size:(i + 1) * page_size]
        digest = hashlib.blake2b(prev + struct.pack(f"<{page_size}I", *page), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
        prev = digest
    return out
