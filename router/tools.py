"""Tool calling: a chat request's `tools` -> the prompt and the output constraint; the model's
output -> OpenAI `tool_calls`.

Lifecycle of a chat request with `tools` (router/protocol.py validates the shapes):
  1. `plan_tools(tools, tool_choice, tokenizer, parser_flag)` -> a `ToolPlan`:
     - tool_choice "none": the tools still go to the chat template (when it takes them), the
       output is plain content (no parsing).
     - "required": the output is constrained to one call of one of the tools: the JSON schema
       `call_schema(tools)` (an anyOf of {"name": <that tool's name>, "parameters": <its
       parameters schema>}, one per tool; Llama 3's key, and "name" is listed first, so the grammar,
       which keeps the schema's property order, writes the name before the arguments and they
       can stream); parsed with the bare-JSON parser. One call per answer (parallel_tool_calls is
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
     `ToolCallParser` (router/tool_parsers.py): `feed(text)` / `finish()` return `Event`s: content text, the start of a
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
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.errors import bad_request
from router.tool_parsers import HermesParser, Llama3JsonParser, ToolCallParser

PARSERS = ("hermes", "llama3_json")


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

    def parser(self) -> ToolCallParser | None:
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
