"""Tool calling: a chat request's `tools` -> the prompt and the output constraint; the model's
output -> OpenAI `tool_calls`.

Lifecycle of a chat request with `tools` (router/protocol.py validates the shapes):
  1. `plan_tools(tools, tool_choice, tokenizer, parser_flag)` -> a `ToolPlan`:
     - tool_choice "none": the tools still go to the chat template (when it takes them), the
       output is plain content (no parsing).
     - "required": the output is constrained to one call of one of the tools: the JSON schema
       `call_schema(tools)` (an anyOf of {"name": <that tool's name>, "parameters": <its
       parameters schema>}, one per tool; Llama 3's key, and "name" sorts first, so the grammar,
       which orders properties by name, writes the name before the arguments and they can
       stream); parsed with the bare-JSON parser. One call per answer (parallel_tool_calls is
       accepted and ignored).
     - a named function {"type": "function", "function": {"name": N}}: the same with tool N only.
     - "auto" (the default when tools are given): the output is free and parsed with the model
       family's parser. Needs a chat template that takes tools (its source mentions `tools`),
       else a 400.
     The parser for "auto" (`parser_for_template`): the router's --tool-call-parser
     (vLLM's names: `hermes`, `llama3_json`) when given; else a template that contains
     `<tool_call>` is Hermes/Qwen style, one that contains `<|python_tag|>` or the `ipython`
     role is Llama-3 style; any other template that takes tools is a 400 for "auto" that says
     to pass --tool-call-parser.
  2. The server renders the chat template with `tools=` (OpenAI's tool dicts, as HF templates
     take them); assistant tool calls and tool-role messages of the history go to the
     template too (arguments as a dict, as vLLM hands them).
  3. router/generation.py feeds the answer's text, as it comes, to `plan.parser()`, a
     `ToolCallParser`: `feed(text)` / `finish()` return `Event`s: content text, the start of a
     call (id "call_<random>", function name), fragments of its arguments (the model's own
     JSON text, so the fragments of a stream concatenate to the non-streamed arguments).
     A JSON answer collects the events with `collect`; a stream sends each as an OpenAI
     delta. Text the parser cannot read as a call stays content.

Formats:
  hermes       text <tool_call>{"name": N, "arguments": {...}}</tool_call> ... (Qwen 2/2.5/3,
               Hermes); text before and between calls is content (whitespace-only pieces after
               a call are dropped).
  llama3_json  an answer that starts (after whitespace and an optional <|python_tag|>) with
               `{` is one or more calls {"name": N, "parameters"|"arguments": {...}} joined
               by `;` (text after the calls is dropped); any other answer is content. The
               constrained output of "required" / named tool_choice is read with this parser
               whatever the model family.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from router.errors import bad_request

PARSERS = ("hermes", "llama3_json")
_ARG_KEYS = ("arguments", "parameters")


# ---- request shapes -------------------------------------------------------------------------

class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: Annotated[str | None, Field(strict=True)] = None
    parameters: dict[str, Any] | None = None
    strict: Annotated[bool | None, Field(strict=True)] = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class _Name(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(strict=True)]


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _Name


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(strict=True)]
    arguments: Annotated[str, Field(strict=True)]


class ToolCall(BaseModel):
    """An assistant message's tool call sent back as history."""
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(strict=True)]
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_template(self) -> dict[str, Any]:
        try:
            args: Any = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        if not isinstance(args, dict):
            args = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": args}}


# ---- the plan -------------------------------------------------------------------------------

def call_schema(tools: list[ToolDef]) -> dict[str, Any]:
    """The JSON schema of one call of one of `tools`: {"name": ..., "parameters": {...}}."""
    branches = []
    for t in tools:
        params = t.function.parameters or {"type": "object", "properties": {}}
        branches.append({"type": "object", "properties": {"name": {"const": t.function.name},
                                                           "parameters": params},
                         "required": ["name", "parameters"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def template_takes_tools(template: Any) -> bool:
    return isinstance(template, str) and "tools" in template


def parser_for_template(template: Any) -> str | None:
    """The auto parser for a chat template (see the module docstring); None = cannot tell."""
    if not isinstance(template, str):
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["none", "auto", "required", "named"]
    template_tools: list[dict[str, Any]] | None     # what the chat template gets as `tools`
    schema: dict[str, Any] | None = None             # the output's JSON schema (required / named)
    parser_name: str | None = None                   # None = no parsing (mode "none")

    def parser(self) -> "ToolCallParser | None":
        if self.parser_name is None:
            return None
        return HermesParser() if self.parser_name == "hermes" else Llama3JsonParser()

    @property
    def constrained(self) -> bool:
        return self.schema is not None


def plan_tools(tools: list[ToolDef] | None, tool_choice: Any, tokenizer: Any,
               parser_flag: str | None = None) -> ToolPlan | None:
    """None when the request has no tools. 400s name `tool_choice` or `tools`."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are specified", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise bad_request(f"tools: the function name {dup!r} is used twice", param="tools")
    template = getattr(tokenizer, "chat_template", None)
    rendered = [t.model_dump(exclude_none=True) for t in tools] if template_takes_tools(template) else None
    if tool_choice == "none":
        return ToolPlan("none", rendered)
    if tool_choice == "required":
        return ToolPlan("required", rendered, call_schema(tools), "llama3_json")
    if isinstance(tool_choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        if not chosen:
            raise bad_request(f"tool_choice names the function {tool_choice.function.name!r}, which is "
                              f"not among the tools ({', '.join(names)})", param="tool_choice")
        return ToolPlan("named", rendered, call_schema(chosen), "llama3_json")
    # auto
    if rendered is None:
        raise bad_request("tool_choice 'auto' needs a model whose chat template supports tools; this "
                          "model's does not (use tool_choice 'required' or a named function)",
                          param="tool_choice")
    parser = parser_flag or parser_for_template(template)
    if parser is None:
        raise bad_request("tool_choice 'auto': cannot tell this model's tool-call format from its chat "
                          f"template; start the router with --tool-call-parser ({' or '.join(PARSERS)})",
                          param="tool_choice")
    return ToolPlan("auto", rendered, None, parser)


# ---- parsing --------------------------------------------------------------------------------

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
        elif key in _ARG_KEYS and out.args_start is None:
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


class ToolCallParser:
    """Streaming parser base: feed(text) / finish() -> events."""

    def __init__(self) -> None:
        self.calls = 0
        self.malformed = False        # a call broke off after its header went out

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

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


def with_tools(work: Any, plan: ToolPlan | None) -> Any:
    """The router/generation.py Work with the plan on it and, for "required" / named
    tool_choice, every job's output constrained to the call schema (engine/grammar.py)."""
    if plan is None:
        return work
    from dataclasses import replace

    if plan.schema is None:
        return replace(work, tools=plan)
    from engine.grammar import GrammarError, check_grammar, grammar_for_json_schema

    try:
        spec = grammar_for_json_schema(plan.schema)
        check_grammar(spec)
    except GrammarError as exc:
        raise bad_request(f"tools: the functions' parameters do not make a usable JSON schema: {exc}",
                          param="tools") from None
    jobs = []
    for job in work.jobs:
        if getattr(job.params, "grammar", None) is not None:
            raise bad_request(f"tool_choice {plan.mode!r} constrains the output to a tool call; it cannot "
                              "be combined with a structured response_format", param="tool_choice")
        jobs.append(replace(job, params=replace(job.params, grammar=spec)))
    return replace(work, jobs=tuple(jobs), tools=plan)
