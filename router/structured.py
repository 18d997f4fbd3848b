"""Structured output on the OpenAI surface: request fields -> one engine GrammarSpec.

Lifecycle: router/protocol.py validates a request body, then (a model validator) calls
`grammar_of(req)`, which reads the request's constraint, builds its `GrammarSpec`
(engine/grammar.py) and compiles it once (`check_grammar`, cached), so a malformed or
uncompilable grammar is a 400 naming the parameter before anything is tokenized or queued.
The spec rides `SamplingParams.grammar` to the workers.

Accepted, at most one per request:
  - `response_format`: {"type": "json_object"}; {"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}} (no "schema": any JSON object);
  - vLLM's `guided_json` (a schema, dict or JSON text), `guided_regex`, `guided_choice`;
  - vLLM's `structured_outputs`: {"json" | "regex" | "choice" | "json_object": true}.
"""
from __future__ import annotations

from typing import Any

from engine.grammar import (GrammarError, GrammarSpec, check_grammar, grammar_for_choice,
                            grammar_for_json_object, grammar_for_json_schema, grammar_for_regex)
from router.errors import bad_request

_SO_KEYS = ("json", "regex", "choice", "json_object")


def _constraints(req) -> list[tuple[str, Any]]:
    """(parameter name, how to build its spec) for each constraint the request sets."""
    found: list[tuple[str, Any]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", grammar_for_json_object))
    elif rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not js["name"]:
            raise bad_request("response_format.json_schema needs a 'name' (a non-empty string)",
                              param="response_format.json_schema")
        unknown = set(js) - {"name", "schema", "strict", "description"}
        if unknown:
            raise bad_request(f"response_format.json_schema: unknown field(s) {', '.join(sorted(unknown))}",
                              param="response_format.json_schema")
        if js.get("strict") not in (None, True, False):
            raise bad_request("response_format.json_schema.strict must be a boolean",
                              param="response_format.json_schema.strict")
        schema = js.get("schema")
        if schema is None:
            found.append(("response_format.json_schema", grammar_for_json_object))
        else:
            found.append(("response_format.json_schema.schema",
                          lambda: grammar_for_json_schema(schema, strict=bool(js.get("strict")))))
    gj = getattr(req, "guided_json", None)
    if gj is not None:
        found.append(("guided_json", lambda: grammar_for_json_schema(gj)))
    gr = getattr(req, "guided_regex", None)
    if gr is not None:
        found.append(("guided_regex", lambda: grammar_for_regex(gr)))
    gc = getattr(req, "guided_choice", None)
    if gc is not None:
        found.append(("guided_choice", lambda: grammar_for_choice(gc)))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object", param="structured_outputs")
        keys = [k for k, v in so.items() if v is not None and v is not False]
        other = [k for k in keys if k not in _SO_KEYS]
        if other:
            raise bad_request(f"structured_outputs.{other[0]} is not supported (only {', '.join(_SO_KEYS)})",
                              param=f"structured_outputs.{other[0]}")
        for k in keys:
            v = so[k]
            build = {"json": lambda v=v: grammar_for_json_schema(v), "regex": lambda v=v: grammar_for_regex(v),
                     "choice": lambda v=v: grammar_for_choice(v), "json_object": grammar_for_json_object}[k]
            if k == "json_object" and v is not True:
                raise bad_request("structured_outputs.json_object must be true", param="structured_outputs.json_object")
            found.append((f"structured_outputs.{k}", build))
    return found


def grammar_of(req) -> GrammarSpec | None:
    """The request's grammar (compiled once to check it), or None; a 400 naming the parameter."""
    found = _constraints(req)
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"only one output constraint per request, got {' and '.join(n for n, _ in found)}",
                          param=found[1][0])
    param, build = found[0]
    try:
        spec = build()
        check_grammar(spec)
    except GrammarError as exc:
        raise bad_request(f"{param}: {exc}", param=param) from None
    return spec
