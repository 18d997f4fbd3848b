"""Tool-call parsers (router/tools.py picks one per request): the model's output text, as it
comes, -> `Event`s (content text, the start of a call with its id and function name, fragments
of its arguments), and `ToolStream`, which turns events into OpenAI stream deltas.

`HermesParser` reads `<tool_call>{...}</tool_call>` (Qwen, Hermes); `Llama3JsonParser` reads an
answer that is one or more bare JSON calls joined by `;` (Llama 3; also the constrained output
of tool_choice "required" / named). Formats and rules: router/tools.py's docstring.
`feed(text)` / `finish()` return the events so far; the arguments fragments are the model's own
JSON text, so a stream's fragments concatenate to the non-streamed arguments; text a parser
cannot read as a call stays content. `collect(events)` gives a whole answer's (content,
tool_calls).
"""
from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

ARG_KEYS = ("arguments", "parameters")   # a call object's arguments key (Hermes: arguments; Llama 3: parameters)

class Event(NamedTuple):
    kind: Literal["content", "call", "args"]
    index: int = 0               # call: the call's index in the answer
    text: str = ""               # content text, the function name (call), an arguments fragment
    id: str = ""                 # call: its id


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def collect(events: list[Event]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of a whole answer; content None when empty or only spaces
    around calls."""
    content, calls = [], []
    for e in events:
        if e.kind == "content":
            content.append(e.text)
        elif e.kind == "call":
            calls.append({"id": e.id, "type": "function", "function": {"name": e.text, "arguments": ""}})
        else:
            calls[e.index]["function"]["arguments"] += e.text
    text = "".join(content)
    if not text or (calls and not text.strip()):
        return None, calls
    return text, calls


class _Bad(Exception):
    """The text is not (the start of) a call object."""


_WS = " \t\r\n"


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """s[i] is '"': the index after the closing quote, None when not there yet."""
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """The index after the JSON value starting at s[i]; None when it may go on."""
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(s):
            c = s[j]
            if c == '"':
                k = _string_end(s, j)
                if k is None:
                    return None
                j = k
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in _WS + ",}]":
        j += 1
    if j == len(s):
        return None                       # a number or literal that may go on
    if s[i:j] not in ("true", "false", "null"):
        try:
            float(s[i:j])
        except ValueError:
            raise _Bad from None
    return j


@dataclass
class _Scan:
    name: str | None = None
    args_start: int | None = None     # where the arguments value starts
    args_end: int | None = None
    name_first: bool = False          # the name came before the arguments
    end: int | None = None            # the index after the object's closing brace


def _scan_call(s: str) -> _Scan:
    """As much of the call object at the start of s as is there (raises _Bad)."""
    out = _Scan()
    i = _skip_ws(s, 0)
    if i == len(s):
        return out
    if s[i] != "{":
        raise _Bad
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i == len(s):
            return out
        if s[i] == "}":
            out.end = i + 1
            return out
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            raise _Bad
        k = _string_end(s, i)
        if k is None:
            return out
        key = json.loads(s[i:k])
        i = _skip_ws(s, k)
        if i == len(s):
            return out
        if s[i] != ":":
            raise _Bad
        i = _skip_ws(s, i + 1)
        if i == len(s):
            return out
        j = _value_end(s, i)
        if key == "name":
            if s[i] != '"':
                raise _Bad
            if j is None:
                return out
            out.name = json.loads(s[i:j])
            out.name_first = out.args_start is None
        elif key in ARG_KEYS and out.args_start is None:
            if s[i] not in '{"':
                raise _Bad
            out.args_start = i
            if j is None:
                return out
            out.args_end = j
        elif j is None:
            return out
        i = j


class _Call:
    """One call while its text comes in: emits the header when the name is known, then the
    arguments as they grow (or all at once when they came first or are a JSON string)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text = ""
        self.header = False
        self.sent = 0                  # characters of the arguments sent
        self.done = False

    def feed(self, text: str, events: list[Event]) -> int | None:
        """Add text; returns how many characters of `text` the object used when it closed."""
        before = len(self.text)
        self.text += text
        scan = _scan_call(self.text)
        self._emit(scan, events)
        if scan.end is not None:
            self.done = True
            if scan.name is None:
                raise _Bad
            self._finish_args(scan, events)
            used = scan.end - before
            self.text = self.text[:scan.end]
            return used
        return None

    def _emit(self, scan: _Scan, events: list[Event]) -> None:
        if scan.name is None:
            return
        if not self.header:
            self.header = True
            events.append(Event("call", self.index, scan.name, new_call_id()))
        if scan.args_start is None or not scan.name_first or self.text[scan.args_start] == '"':
            return
        stop = scan.args_end if scan.args_end is not None else len(self.text)
        frag = self.text[scan.args_start + self.sent:stop]
        if frag:
            self.sent += len(frag)
            events.append(Event("args", self.index, frag))

    def _finish_args(self, scan: _Scan, events: list[Event]) -> None:
        if scan.args_start is None:
            events.append(Event("args", self.index, "{}"))
            return
        raw = self.text[scan.args_start:scan.args_end]
        if raw.startswith('"'):
            events.append(Event("args", self.index, json.loads(raw)))
        elif self.sent < len(raw):
            events.append(Event("args", self.index, raw[self.sent:]))
            self.sent = len(raw)

    def flush(self, events: list[Event]) -> bool:
        """The answer ended inside this call: True when it still counts as a call."""
        try:
            scan = _scan_call(self.text)
            self._emit(scan, events)
        except _Bad:
            pass
        return self.header


class ToolCallParser(ABC):
    """Streaming parser base: feed(text) / finish() -> events (HermesParser, Llama3JsonParser)."""

    def __init__(self) -> None:
        self.calls = 0
        self.malformed = False        # a call broke off after its header went out

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Events for the text so far (text that may still become a call is held back)."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """Events for whatever was held back, at the end of the answer."""

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        return collect(self.feed(text) + self.finish())


def _held_prefix(s: str, tag: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of tag."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


class HermesParser(ToolCallParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""                 # text not handled yet
        self.call: _Call | None = None
        self.dead = False             # after a broken call: the rest of its region is dropped
        self.spaces = ""              # whitespace after a call, held

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while self.buf:
            if self.call is None and not self.dead:
                k = self.buf.find(self.OPEN)
                if k < 0:
                    keep = _held_prefix(self.buf, self.OPEN)
                    self._content(self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self._content(self.buf[:k], events)
                self.buf = self.buf[k + len(self.OPEN):]
                self.call = _Call(self.calls)
                self.calls += 1
                continue
            k = self.buf.find(self.CLOSE)
            inside = self.buf if k < 0 else self.buf[:k]
            if k < 0:
                keep = _held_prefix(inside, self.CLOSE)
                inside = inside[:len(inside) - keep]
            if self.call is not None and not self.dead and inside and not self.call.done:
                try:
                    self.call.feed(inside, events)      # text after the object, before the tag: dropped
                except _Bad:
                    call, self.call = self.call, None
                    if not call.header:                 # not a call: content from the tag on
                        self.calls -= 1
                        self._content(self.OPEN + call.text[:len(call.text) - len(inside)], events)
                        continue
                    self.malformed, self.dead = True, True
            if k < 0:
                self.buf = self.buf[len(inside):]
                return events
            if self.call is not None and not self.call.done and not self.call.flush(events):
                self.calls -= 1                         # <tool_call>...</tool_call> without a call in it
                self._content(self.OPEN + self.call.text + self.CLOSE, events)
            elif self.call is not None and not self.call.done:
                self.malformed = True
            self.buf = self.buf[k + len(self.CLOSE):]
            self.call, self.dead = None, False
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self.spaces += text        # spaces between / after calls: sent only if text follows
            return
        events.append(Event("content", text=self.spaces + text))
        self.spaces = ""

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.call is not None:
            call, self.call = self.call, None
            call.text += self.buf
            self.buf = ""
            if not call.done and not call.flush(events):
                self.calls -= 1
                self._content(self.OPEN + call.text, events)
            elif not call.done:
                self.malformed = True
        elif not self.dead:
            self._content(self.buf, events)
        self.buf = ""
        return events


class Llama3JsonParser(ToolCallParser):
    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.mode: Literal["start", "content", "calls", "between", "dead"] = "start"
        self.call: _Call | None = None

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while self.buf:
            if self.mode == "start":
                s = self.buf.lstrip(_WS)
                if s.startswith(self.TAG):
                    s = s[len(self.TAG):].lstrip(_WS)
                    if not s:
                        return events
                elif not s or self.TAG.startswith(s):
                    return events
                if s[0] == "{":
                    self.mode, self.buf = "calls", s
                    self.call = _Call(0)
                    self.calls = 1
                else:
                    self.mode = "content"
                continue
            if self.mode == "content":
                events.append(Event("content", text=self.buf))
                self.buf = ""
                return events
            if self.mode == "dead":
                self.buf = ""
                return events
            if self.mode == "between":
                s = self.buf.lstrip(_WS)
                if not s:
                    self.buf = ""
                    return events
                if s[0] != ";":
                    self.mode, self.buf = "dead", ""   # text after the calls: not a call, dropped
                    return events
                self.buf = s[1:]
                self.call = _Call(self.calls)
                self.calls += 1
                self.mode = "calls"
                continue
            assert self.call is not None
            chunk, self.buf = self.buf, ""
            try:
                used = self.call.feed(chunk, events)
            except _Bad:
                self._broken(events)
                return events
            if used is not None:
                self.buf = chunk[used:]
                self.mode = "between"
        return events

    def _broken(self, events: list[Event]) -> None:
        call = self.call
        if call is not None and not call.header and call.index == 0:
            self.calls = 0
            events.append(Event("content", text=call.text + self.buf))   # the answer is plain text
            self.mode = "content"
        else:
            self.malformed = self.malformed or (call is not None and call.header)
            if call is not None and not call.header:
                self.calls -= 1
            self.mode = "dead"
        self.buf, self.call = "", None

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.mode == "start" and self.buf:
            s = self.buf.lstrip(_WS)
            if s and not s.startswith(self.TAG):
                events.append(Event("content", text=self.buf))
        elif self.mode == "calls" and self.call is not None and not self.call.done:
            if not self.call.flush(events):
                self._broken(events)
            else:
                self.malformed = True
        self.buf = ""
        return events


@dataclass
class ToolStream:
    """Per-choice streaming state in router/generation.py: turns events into OpenAI deltas."""
    parser: ToolCallParser
    calls: int = 0

    def deltas_for(self, events: list[Event]) -> list[dict[str, Any]]:
        """One delta dict per event: {"content": ...} or {"tool_calls": [...]}."""
        out = []
        for e in events:
            if e.kind == "content":
                out.append({"content": e.text})
            elif e.kind == "call":
                self.calls += 1
                out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                            "function": {"name": e.text, "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
        return out
