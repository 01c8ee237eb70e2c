"""OpenAI request types (validated once, at the edge) and response builders (bytes, per token).

Requests are decoded and validated in one step by msgspec, typed as OpenAI's published schema
types them: a wrong type or value is a 400 whose `param` names the field (`max_tokens`,
`tools[0].function`, `response_format.type`), as OpenAI's own errors do. What the schema allows
but the project cannot do (`logit_bias` values, `best_of` above `n`, `suffix`) is a 400 that says
so, never silently ignored; see the README's API table. Unknown fields are ignored, as OpenAI's
own clients send extras. Engine extensions are accepted at the top level and under `nvext`
(Dynamo's extension object): `ignore_eos`, `min_tokens`, `top_k`, `min_p`, `repetition_penalty`,
and vLLM's structured-output fields `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`; vLLM's `prompt_logprobs` at the top level (as vLLM takes it), checked by
vLLM's rules. Chat messages are checked by `dynamo_core.frontend.messages` (their content
varies by role, which a struct type cannot say).

Streaming events are built from bytes: per request, the JSON before and after the token text is
rendered once per choice, and each event is `prefix + json_string(text) + suffix`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from dynamo_core.llm.parsers import Content, Event, Reasoning, ToolCall, ToolCallStart

__all__ = [
    "ChatCompletionRequest",
    "ChatStreamFormatter",
    "ChoiceResult",
    "CompletionRequest",
    "CompletionStreamFormatter",
    "ParamError",
    "error_body",
    "finish_reason_for",
    "param_of",
]

_json = msgspec.json.Encoder()

# Every number is range-checked here, at the edge: what passes must be encodable on the request
# plane (msgpack: 64-bit integers) and within what every engine accepts (counts are int32 in
# vLLM, SGLang and TensorRT-LLM; a seed is 64-bit; SGLang caps the repetition penalty at 2).
# A value outside gets a 400 that names the field, never an error deep in a worker.
INT32_MAX = 2**31 - 1
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1, le=INT32_MAX)]
NonNegativeInt = Annotated[int, Meta(ge=0, le=INT32_MAX)]
TopK = Annotated[int, Meta(ge=-1, le=INT32_MAX)]
"""-1 (or 0) means no top-k limit."""
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Choices = Annotated[int, Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
CompletionLogprobs = Annotated[int, Meta(ge=0, le=5)]
"""OpenAI's completions `logprobs`: at most 5."""
LogitBias = Annotated[float, Meta(ge=-100.0, le=100.0)]
#: The most alternatives per prompt token `prompt_logprobs` may ask for (vLLM's default
#: `--max-logprobs`, and chat's `top_logprobs` limit).
MAX_PROMPT_LOGPROBS = 20


class ParamError(Exception):
    """A request that breaks a rule of the API: a 400 naming the parameter (OpenAI's shape)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


_AT = re.compile(r"at `(?:key` in `)?\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def param_of(validation_message: str) -> str | None:
    """The `param` of a msgspec validation error (``... - at `$.tools[0].type```): the path
    without its ``$.`` (a missing field's name appended, a map's ``[...]`` dropped); None for
    the body itself."""
    m = _AT.search(validation_message)
    path = m.group(1).replace("[...]", "") if m else ""
    missing = _MISSING.match(validation_message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class NvExt(msgspec.Struct):
    ignore_eos: bool | None = None
    min_tokens: NonNegativeInt | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: str | list[str] | None = None
    n: Choices | None = None
    logit_bias: dict[int, LogitBias] | None = None
    ignore_eos: bool | None = None
    min_tokens: NonNegativeInt | None = None
    user: str | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = None
    """vLLM's extension: each prompt token's log-probability and this many alternatives, in
    the whole response (`prompt_logprobs` in each completions choice, at the top of a chat
    completion)."""
    nvext: NvExt | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        return self.n or 1

    def extension(self, name: str) -> Any:
        value = getattr(self, name, None)
        if value is None and self.nvext is not None:
            value = getattr(self.nvext, name, None)
        return value

    def check_unsupported(self) -> None:
        """What the schema allows and this server cannot do: a 400 that says so."""
        if self.logit_bias and any(self.logit_bias.values()):
            raise ParamError(
                "logit_bias is not supported by this server (the engines' wire request does "
                "not carry it)",
                "logit_bias",
                "unsupported_parameter",
            )
        self._check_prompt_logprobs()

    def _check_prompt_logprobs(self) -> None:
        """vLLM's rules and messages: not in a stream (0 is let through: it shows nothing),
        a count or -1 (the whole vocabulary), at most `MAX_PROMPT_LOGPROBS` (vLLM's
        default `--max-logprobs`, which the whole vocabulary exceeds)."""
        value = self.prompt_logprobs
        if value is None:
            return
        if self.stream and (value > 0 or value == -1):
            raise ParamError(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if value < -1:
            raise ParamError("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")
        if value == -1 or value > MAX_PROMPT_LOGPROBS:
            asked = "the whole vocabulary (-1)" if value == -1 else str(value)
            raise ParamError(
                f"Requested prompt logprobs of {asked}, which is greater than max allowed: "
                f"{MAX_PROMPT_LOGPROBS}",
                "prompt_logprobs",
            )


# -- tools and structured output: OpenAI's schema types --------------------------------------


class FunctionDefinition(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaSpec(msgspec.Struct, kw_only=True, rename={"schema_": "schema"}):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormatText(msgspec.Struct, tag_field="type", tag="text"):
    pass


class ResponseFormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class ResponseFormatJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[Any]
    """Checked by `dynamo_core.frontend.messages.check_messages` (the content rules vary by
    role); kept as the client sent them, for the chat template."""
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def prompt_logprobs_count(self) -> int | None:
        return self.prompt_logprobs

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template and the parsers read them."""
        if not self.tools:
            return None
        return msgspec.to_builtins(self.tools)  # type: ignore[no-any-return]


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    """A string, a list of token ids, or a one-element list of either."""
    max_tokens: NonNegativeInt | None = 16
    logprobs: CompletionLogprobs | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: PositiveInt | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        """vLLM's rule: `prompt_logprobs`, else with `echo` the `logprobs` count (the prompt's
        tokens then lead the choice's `logprobs`)."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of > self.choices():
            raise ParamError(
                "best_of larger than n is not supported (as in vLLM's V1 engine)",
                "best_of",
                "unsupported_parameter",
            )


def error_body(
    message: str, kind: str, code: str | int | None = None, param: str | None = None
) -> bytes:
    return _json.encode({"error": {"message": message, "type": kind, "param": param, "code": code}})


def finish_reason_for(engine_reason: str | None) -> str | None:
    """OpenAI's finish reason for an engine's."""
    if engine_reason in ("eos", "stop"):
        return "stop"
    if engine_reason == "length":
        return "length"
    if engine_reason is None:
        return None
    return "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


@dataclass
class ChoiceResult:
    """One choice of a whole (non-streamed) response."""

    index: int
    text: str
    finish_reason: str
    logprobs: Any = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    """vLLM's `prompt_logprobs`, when asked for (`ChoiceOutput.prompt_logprobs_json`)."""


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


class ChatStreamFormatter:
    """SSE events of one streamed chat completion (`n` choices, indexed from 0)."""

    __slots__ = ("_base", "_choice", "_prefix", "_suffix", "created", "id", "model", "n")

    done = b"data: [DONE]\n\n"

    def __init__(self, model: str, n: int = 1) -> None:
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.n = n
        head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            self.id.encode(),
            self.created,
            _json.encode(model),
        )
        self._base = head
        self._choice = [head + b'"choices":[{"index":%d,"delta":{' % i for i in range(n)]
        self._prefix = [c + b'"content":' for c in self._choice]
        self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def start(self) -> bytes:
        """The first event of each choice: its role."""
        return b"".join(
            c + b'"role":"assistant","content":"","refusal":null' + self._suffix
            for c in self._choice
        )

    def text(self, text: str, i: int = 0) -> bytes:
        return self._prefix[i] + _json.encode(text) + self._suffix

    def text_with_logprobs(self, text: str, logprobs: list[dict[str, Any]], i: int = 0) -> bytes:
        return (
            self._prefix[i]
            + _json.encode(text)
            + b'},"logprobs":{"content":'
            + _json.encode(logprobs)
            + b'},"finish_reason":null}]}\n\n'
        )

    def events(self, events: list[Event], i: int = 0, logprobs: Any = None) -> bytes:
        """Parsed output (content, reasoning, tool-call deltas) as chunks; `logprobs` ride on
        the last content chunk (or an empty one)."""
        choice = self._choice[i]
        suffix = self._suffix
        parts = []
        for event in events:
            if isinstance(event, Content):
                parts.append(self._prefix[i] + _json.encode(event.text) + suffix)
            elif isinstance(event, Reasoning):
                parts.append(choice + b'"reasoning_content":' + _json.encode(event.text) + suffix)
            elif isinstance(event, ToolCallStart):
                call = b'"tool_calls":[{"index":%d,"id":%s,"type":"function","function":{' % (
                    event.index,
                    _json.encode(event.id),
                )
                name = b'"name":%s,"arguments":""}}]' % _json.encode(event.name)
                parts.append(choice + call + name + suffix)
            else:
                arguments = b'"tool_calls":[{"index":%d,"function":{"arguments":%s}}]' % (
                    event.index,
                    _json.encode(event.text),
                )
                parts.append(choice + arguments + suffix)
        if logprobs is not None:
            last = events[-1] if events else None
            if isinstance(last, Content):
                parts[-1] = self.text_with_logprobs(last.text, logprobs, i)
            else:
                parts.append(self.text_with_logprobs("", logprobs, i))
        return b"".join(parts)

    def finish(self, reason: str, i: int = 0) -> bytes:
        return self._choice[i] + b'},"logprobs":null,"finish_reason":"%s"}]}\n\n' % (
            reason.encode()
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._base + b'"choices":[],"usage":' + _json.encode(usage) + b"}\n\n"

    def error(self, message: str, kind: str = "internal_error", code: str | None = None) -> bytes:
        return b"data: " + error_body(message, kind, code) + b"\n\n"

    def whole(self, choices: list[ChoiceResult], usage: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [_chat_choice(c) for c in choices],
            "usage": usage,
        }
        if choices and choices[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = choices[0].prompt_logprobs  # vLLM's: one per response
        return _json.encode(body)


def _chat_choice(c: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": c.text if c.text or not c.tool_calls else None,
        "refusal": None,
    }
    if c.reasoning:
        message["reasoning_content"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = tool_calls_json(c.tool_calls)
    return {
        "index": c.index,
        "message": message,
        "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
        "finish_reason": c.finish_reason,
    }


class CompletionStreamFormatter:
    """SSE events of one streamed text completion (`echo`: the prompt text, sent first)."""

    __slots__ = ("_base", "_prefix", "_suffix", "created", "echo", "id", "model", "n")

    done = b"data: [DONE]\n\n"

    def __init__(self, model: str, echo: str = "", n: int = 1) -> None:
        self.echo = echo
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.n = n
        self._base = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,' % (
            self.id.encode(),
            self.created,
            _json.encode(model),
        )
        self._prefix = [self._base + b'"choices":[{"index":%d,"text":' % i for i in range(n)]
        self._suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def start(self) -> bytes:
        return b"".join(self.text(self.echo, i) for i in range(self.n)) if self.echo else b""

    def text(self, text: str, i: int = 0) -> bytes:
        return self._prefix[i] + _json.encode(text) + self._suffix

    def text_with_logprobs(self, text: str, logprobs: dict[str, Any], i: int = 0) -> bytes:
        return (
            self._prefix[i]
            + _json.encode(text)
            + b',"logprobs":'
            + _json.encode(logprobs)
            + b',"finish_reason":null}]}\n\n'
        )

    def events(self, events: list[Event], i: int = 0, logprobs: Any = None) -> bytes:
        """Completions have no parsers: only content."""
        text = "".join(e.text for e in events if isinstance(e, Content))
        if logprobs is not None:
            return self.text_with_logprobs(text, logprobs, i)
        return self.text(text, i) if text else b""

    def finish(self, reason: str, i: int = 0) -> bytes:
        return self._prefix[i] + b'"","logprobs":null,"finish_reason":"%s"}]}\n\n' % (
            reason.encode()
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._base + b'"choices":[],"usage":' + _json.encode(usage) + b"}\n\n"

    def error(self, message: str, kind: str = "internal_error", code: str | None = None) -> bytes:
        return b"data: " + error_body(message, kind, code) + b"\n\n"

    def whole(self, choices: list[ChoiceResult], usage: dict[str, Any]) -> bytes:
        return _json.encode(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [self._choice(c) for c in choices],
                "usage": usage,
            }
        )

    def _choice(self, c: ChoiceResult) -> dict[str, Any]:
        choice = {
            "index": c.index,
            "text": self.echo + c.text,
            "logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
        }
        if c.prompt_logprobs is not None:
            choice["prompt_logprobs"] = c.prompt_logprobs  # vLLM's, in each choice
        return choice
