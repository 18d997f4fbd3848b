"""OpenAI request models for `/v1/completions` and `/v1/chat/completions`.

Lifecycle of a request body:
  1. `parse_request(Model, raw_bytes)`: JSON decode (router/json_body.py) + pydantic validation;
     anything malformed, out of range or unsupported raises a 400 `OpenAIError`
     (never a 422). Unknown top-level (and stream_options) fields are accepted and
     ignored, as vLLM does: `unknown_fields(req)` names them and the server warns once
     per name and counts them (router/ignored.py). Fields that would change the output
     and that Tandem does not do (guided_grammar, min_tokens, ...) are not "unknown": they
     are 400s naming the parameter (`_UNSUPPORTED`).
  2. The server resolves `model`, tokenizes (`prompt` / chat template) and
     checks lengths and token ids against the tokenizer and max_model_len,
     which need state this module does not have.
  3. `req.sampling_params(max_tokens)` builds the `engine.SamplingParams`
     sent to the decode worker; stop *strings* stay in the router
     (`req.stop_strings()`).

Prompts: str, [int], or a batch [str, ...] / [[int], ...] (`prompts()`; the server runs
each as its own cluster request, one choice per prompt). Sampling features (engine side:
engine/sampling_params.py): presence/frequency penalties in [-2, 2], repetition_penalty > 0
(vLLM), logit_bias {"<token id>": bias in [-100, 100]} (ids checked against the vocabulary
by the server), completions `logprobs` 0..20 and `echo`, chat `logprobs` + `top_logprobs`
0..20. `n` (1..MAX_N) samples per prompt, and completions `best_of` (n..MAX_N, the n with the
highest cumulative logprob; not streamed unless equal to n): the server runs each sample as
its own cluster request (`num_samples()`). Chat `tools` / `tool_choice` (function tools;
router/tools.py plans them), assistant `tool_calls` and tool-role `tool_call_id` in the history.
Structured output (router/structured.py; one constraint per request, compiled at validation so
a bad one is a 400 naming its parameter): response_format json_object / json_schema, vLLM's
guided_json / guided_regex / guided_choice and structured_outputs {json, regex, choice,
json_object}. suffix and completions tools are rejected with 400. Accepted and ignored (OpenAI fields with
no effect here): metadata, store, service_tier, parallel_tool_calls, user.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from router.errors import bad_request, from_validation_error
from router.json_body import decode_body
from router.tools import ToolCall, ToolChoice, ToolDef

MAX_N = 128          # n and best_of: samples per prompt, each its own cluster request
_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
def _whole_number(v: Any) -> Any:
    """12.0 is 12, as OpenAI's API takes it; 12.5, "12" and true stay errors (strict int below)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    return v


StrictInt = Annotated[int, BeforeValidator(_whole_number), Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")          # vLLM's continuous_usage_stats, say: ignored
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    """text (free), json_object or json_schema (router/structured.py reads json_schema)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[StrictStr, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] not in (
                "text", "json_object", "json_schema"):
            raise ValueError(f"response_format of type {v['type']!r} is not supported "
                             "(text, json_object, json_schema)")
        return v

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("response_format.json_schema goes with type 'json_schema' (and it needs it)")
        return self


# Fields that change the output and that this server does not do: present with anything but
# their neutral values, they are a 400 naming the field instead of being ignored as unknown.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None,), "tool_choice": (None, "none"), "functions": (None,), "function_call": (None, "none"),
    "guided_grammar": (None,), "guided_decoding_backend": (None,), "use_beam_search": (None, False),
    "min_tokens": (None, 0), "bad_words": (None, []), "allowed_token_ids": (None,), "prompt_logprobs": (None,),
    "audio": (None,), "prediction": (None,), "modalities": (None, ["text"]), "length_penalty": (None, 1, 1.0),
    "truncate_prompt_tokens": (None,), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "chat_template": (None,), "chat_template_kwargs": (None,), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "add_special_tokens": (None,), "documents": (None,),
}


def _reject_unsupported(data: dict[str, Any], handled: frozenset[str] = frozenset()) -> None:
    for name in (_UNSUPPORTED.keys() - handled) & data.keys():
        if not any(data[name] == v and type(data[name]) is type(v) for v in _UNSUPPORTED[name]):
            raise bad_request(f"unsupported parameter: {name!r} is not supported by this server", param=name)


def unknown_fields(req: BaseModel) -> list[str]:
    """Names of the fields `req` took but does not know (ignored), stream_options' as
    "stream_options.<name>"."""
    names = list(req.model_extra or ())
    opts = getattr(req, "stream_options", None)
    if opts is not None and opts.model_extra:
        names.extend(f"stream_options.{k}" for k in opts.model_extra)
    return names


class BaseSamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")            # unknown fields: ignored (unknown_fields)

    model: StrictStr | None = None                      # None = the first served model name
    temperature: Annotated[StrictFloat | None, Field(ge=0.0)] = None   # None = 1.0; 0 = greedy
    top_p: Annotated[StrictFloat | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[StrictInt | None, Field(ge=-1, le=_INT32_MAX)] = None   # -1/0 = disabled
    min_p: Annotated[StrictFloat | None, Field(ge=0.0, le=1.0)] = None
    seed: Annotated[StrictInt | None, Field(ge=_INT64_MIN, le=_INT64_MAX)] = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False                # vLLM extension: choices[0].token_ids (non-streaming)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt | None, Field(ge=1, le=MAX_N)] = 1        # samples (choices) per prompt
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    frequency_penalty: Annotated[StrictFloat | None, Field(ge=-2.0, le=2.0)] = None
    presence_penalty: Annotated[StrictFloat | None, Field(ge=-2.0, le=2.0)] = None
    repetition_penalty: Annotated[StrictFloat | None, Field(gt=0.0)] = None     # vLLM extension; 1 = off
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                     Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]] | None = None
    # structured output (router/structured.py): vLLM's guided_* and structured_outputs
    guided_json: dict[StrictStr, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    structured_outputs: dict[StrictStr, Any] | None = None
    _grammar: Any = PrivateAttr(default=None)     # its GrammarSpec, set by _output_grammar

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream=true")
        return self

    @model_validator(mode="after")
    def _output_grammar(self):
        """The output constraint, compiled once here: a bad one is a 400 before any work."""
        from router.structured import grammar_of
        self._grammar = grammar_of(self)
        return self

    def grammar_spec(self):
        """engine.grammar.GrammarSpec of the request's output constraint, or None."""
        return self._grammar

    # ---- derived values -------------------------------------------------

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        """max_tokens the client asked for; None = fill the context."""
        raise NotImplementedError

    def logit_bias_ids(self) -> list[int]:
        return [int(k) for k in self.logit_bias or ()]

    def logprobs_k(self) -> int:
        """SamplingParams.logprobs: -1 none, else how many top alternatives."""
        raise NotImplementedError

    def echo_logprobs_k(self) -> int:
        """SamplingParams.prompt_logprobs (completions' echo with logprobs)."""
        return -1

    @property
    def num_choices(self) -> int:
        """Choices returned per prompt (n)."""
        return self.n or 1

    def num_samples(self) -> int:
        """Samples generated per prompt: n, or best_of (completions) when larger."""
        return self.num_choices

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            logprobs=self.logprobs_k(),
            prompt_logprobs=self.echo_logprobs_k(),
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=-1 if self.top_k is None else int(self.top_k),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            min_p=0.0 if self.min_p is None else float(self.min_p),
            seed=self.seed,
            max_tokens=max_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            grammar=self.grammar_spec(),
        )


class CompletionRequest(BaseSamplingRequest):
    """POST /v1/completions. After validation `prompt` is a str or a list[int]."""

    prompt: str | list[int] | list[str] | list[list[int]]     # see prompts()
    max_tokens: Annotated[StrictInt | None, Field(ge=1)] = 16   # None = fill the context
    echo: StrictBool | None = False
    logprobs: Annotated[StrictInt | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    best_of: Annotated[StrictInt | None, Field(ge=1, le=MAX_N)] = None   # >= n; the n best of these
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        def all_ints(xs: list) -> bool:     # C speed; json.loads gives plain ints (bool is its own type)
            return set(map(type, xs)) == {int}

        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if not isinstance(v, list) or not v:
            if isinstance(v, list):
                raise ValueError("prompt must not be empty")
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                             "or a list of lists of token ids")
        if all_ints(v):
            return v
        if all(isinstance(x, str) for x in v):
            if not all(v):
                raise ValueError(f"prompt {[bool(x) for x in v].index(False)} is empty")
            return v
        if all(isinstance(x, list) for x in v):
            for i, x in enumerate(v):
                if not x:
                    raise ValueError(f"prompt {i} is empty")
                if not all_ints(x):
                    raise ValueError(f"prompt {i}: a token-id prompt must be a list of integers")
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                         "or a list of lists of token ids (not a mix)")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch, in choice-index order (one for a str or a token-id list)."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]
        return list(p)

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> "CompletionRequest":
        if self.best_of is not None:
            if self.best_of < self.num_choices:
                raise bad_request(f"best_of ({self.best_of}) must be at least n ({self.num_choices})",
                                  param="best_of")
            if self.best_of > self.num_choices and self.stream:
                raise bad_request("best_of larger than n cannot be streamed (the best samples are known "
                                  "only at the end)", param="best_of")
        return self

    def num_samples(self) -> int:
        return max(self.best_of or 1, self.num_choices)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int:
        return -1 if self.logprobs is None else self.logprobs

    def echo_logprobs_k(self) -> int:
        return self.logprobs_k() if self.echo else -1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") != "text":
            raise ValueError(f"only text content parts are supported, got type {v.get('type')!r}")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    # what an SDK's own response message carries when sent back as history: accepted empty
    refusal: Annotated[None, Field(json_schema_extra={"type": "null"})] = None
    annotations: Annotated[list[None] | None, Field(max_length=0)] = None
    audio: None = None
    function_call: None = None
    tool_calls: list[ToolCall] | None = None            # assistant: the calls it made (router/tools.py)
    tool_call_id: StrictStr | None = None               # tool: the call this message answers

    @model_validator(mode="after")
    def _tool_calls_from_assistant(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages can have tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template(self) -> dict[str, Any]:
        """The dict handed to `tokenizer.apply_chat_template` (content flattened to a string;
        tool calls' arguments as dicts, as HF templates take them)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.to_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(BaseSamplingRequest):
    """POST /v1/chat/completions."""

    HANDLED_FIELDS: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice"})   # not _UNSUPPORTED here

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[ToolDef] | None, Field(min_length=1)] = None      # router/tools.py
    tool_choice: ToolChoice | None = None                                  # None = auto with tools
    max_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    # OpenAI fields accepted and ignored (no effect on what this server generates)
    metadata: dict[StrictStr, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    echo: StrictBool | None = None                      # vLLM's chat echo: not done

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("echo is not supported for chat completions")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true when top_logprobs is set")
        return v

    def logprobs_k(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else -1

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], body: bytes) -> M:
    """Decode and validate a request body; every failure is a 400 OpenAIError."""
    data = decode_body(body)
    if issubclass(model, BaseSamplingRequest):
        _reject_unsupported(data, getattr(model, "HANDLED_FIELDS", frozenset()))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
