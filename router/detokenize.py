"""Streaming token -> text for one request, and stop-string cutting.

Per request, the router keeps one `IncrementalDetokenizer` and (when the
request has stop strings) one `StopStringMatcher`:

1. Tokens arrive from the decode worker -> `IncrementalDetokenizer.push(ids)`
   returns the newly finalised text (possibly "", e.g. while a multi-byte
   character is split across byte-level tokens).
2. That delta -> `StopStringMatcher.feed(delta)` returns the part safe to send
   to the client and whether a stop string was hit (then the request is aborted
   on the workers and the stream ends).
3. At the natural end of generation (EOS / max_tokens) the router sends
   `IncrementalDetokenizer.flush()` through the matcher and then
   `StopStringMatcher.flush()`.
"""
from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Detokenises a growing token sequence by decoding a small window.

    The window is `ids[prefix_offset:]`; `ids[prefix_offset:read_offset]` is
    text already emitted (kept as context so that decode's space handling and
    byte merging see the same neighbours they would in a full decode). A push
    emits `decode(window) - decode(prefix)` unless it ends in U+FFFD, i.e. a
    character still incomplete, in which case it waits for more tokens.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # A fast tokenizer that does no clean-up decodes exactly as its Rust backend does:
        # call that directly (the Python wrapper costs as much as the decode itself).
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend_decode = (backend.decode if backend is not None and hasattr(backend, "decode")
                                and not getattr(tokenizer, "clean_up_tokenization_spaces", True) else None)
        self._ids: list[int] = []
        self._prefix_offset = 0          # window start
        self._read_offset = 0            # ids before this are emitted
        self._prefix_text = ""           # decode(ids[prefix_offset:read_offset])
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; return only the text finalised by them."""
        if not token_ids:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new (e.g. a skipped special token) or a character in flight
        return self._advance(new_text)

    def flush(self) -> str:
        """At the end of generation: emit whatever is still held back (may contain
        U+FFFD if the sequence really ends in an incomplete character)."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text):
            return ""
        return self._advance(new_text)

    def _advance(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text):]
        # The emitted tokens become the next window's prefix (context only).
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._chunks.append(delta)
        return delta


class StopStringMatcher:
    """Cuts a streamed text at the first stop string, holding back possible starts.

    "First" means the stop occurrence that completes earliest in the text (the
    one a streaming server sees first); among those ending at the same place,
    the longest. The stop string itself is never emitted. Any tail of the text
    that is a proper prefix of some stop string is held back until the next
    feed rules it in or out, or until `flush()`.
    """

    def __init__(self, stop: list[str]):
        self._stops = sorted({s for s in stop if s}, key=len, reverse=True)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped)."""
        if self._stopped:
            return "", True
        buf = self._held + delta
        hit = self._first_stop(buf)
        if hit is not None:
            self._stopped = True
            self._held = ""
            return buf[:hit], True
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """End of generation without a stop: release the held-back tail."""
        if self._stopped:
            return ""
        out, self._held = self._held, ""
        return out

    def _first_stop(self, buf: str) -> int | None:
        """Start index of the earliest-ending stop occurrence in `buf` (ties: longest)."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        return None if best is None else best[1]

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop."""
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest
