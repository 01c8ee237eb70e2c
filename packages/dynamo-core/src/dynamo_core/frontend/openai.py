"""OpenAI request types (validated once, at the edge) and response builders (bytes, per token).

Requests are decoded and validated in one step by msgspec; a bad field gives a message naming it
(`Expected `int`, got `str` - at `$.max_tokens``). Unknown fields are ignored, as OpenAI's own
clients send extras. Engine extensions that benchmark clients send are accepted at the top level
and under `nvext` (Dynamo's extension object): `ignore_eos`, `min_tokens`, `top_k`, `min_p`,
`repetition_penalty`.

Streaming events are built from bytes: per request, the JSON before and after the token text is
rendered once, and each event is `prefix + json_string(text) + suffix`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = [
    "ChatCompletionRequest",
    "ChatStreamFormatter",
    "CompletionRequest",
    "CompletionStreamFormatter",
    "error_body",
    "finish_reason_for",
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


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class NvExt(msgspec.Struct):
    ignore_eos: bool | None = None
    min_tokens: NonNegativeInt | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
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
    ignore_eos: bool | None = None
    min_tokens: NonNegativeInt | None = None
    user: str | None = None
    nvext: NvExt | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def extension(self, name: str) -> Any:
        value = getattr(self, name, None)
        if value is None and self.nvext is not None:
            value = getattr(self.nvext, name, None)
        return value


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[dict[str, Any]]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    """A string, a list of token ids, or a one-element list of either."""
    max_tokens: NonNegativeInt | None = 16
    logprobs: TopLogprobs | None = None
    echo: bool = False
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        return self.logprobs


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


class ChatStreamFormatter:
    """SSE events of one streamed chat completion."""

    __slots__ = ("_base", "_prefix", "_role_prefix", "_suffix", "created", "id", "model")

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            self.id.encode(),
            self.created,
            _json.encode(model),
        )
        self._base = head
        self._prefix = head + b'"choices":[{"index":0,"delta":{"content":'
        self._role_prefix = head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":'
        self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        return self._role_prefix + b'""' + self._suffix

    def text(self, text: str) -> bytes:
        return self._prefix + _json.encode(text) + self._suffix

    def text_with_logprobs(self, text: str, logprobs: list[dict[str, Any]]) -> bytes:
        return (
            self._prefix
            + _json.encode(text)
            + b'},"logprobs":{"content":'
            + _json.encode(logprobs)
            + b'},"finish_reason":null}]}\n\n'
        )

    def finish(self, reason: str) -> bytes:
        return (
            self._base
            + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]}\n\n'
            % (reason.encode())
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._base + b'"choices":[],"usage":' + _json.encode(usage) + b"}\n\n"

    def error(self, message: str, kind: str = "internal_error") -> bytes:
        return b"data: " + error_body(message, kind) + b"\n\n"

    def whole(
        self,
        text: str,
        reason: str,
        usage: dict[str, Any],
        logprobs: list[dict[str, Any]] | None,
    ) -> bytes:
        return _json.encode(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": {"content": logprobs} if logprobs is not None else None,
                        "finish_reason": reason,
                    }
                ],
                "usage": usage,
            }
        )


class CompletionStreamFormatter:
    """SSE events of one streamed text completion (`echo`: the prompt text, sent first)."""

    __slots__ = ("_base", "_prefix", "_suffix", "created", "echo", "id", "model")

    def __init__(self, model: str, echo: str = "") -> None:
        self.echo = echo
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self._base = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,' % (
            self.id.encode(),
            self.created,
            _json.encode(model),
        )
        self._prefix = self._base + b'"choices":[{"index":0,"text":'
        self._suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        return self.text(self.echo) if self.echo else b""

    def text(self, text: str) -> bytes:
        return self._prefix + _json.encode(text) + self._suffix

    def text_with_logprobs(self, text: str, logprobs: dict[str, Any]) -> bytes:
        return (
            self._prefix
            + _json.encode(text)
            + b',"logprobs":'
            + _json.encode(logprobs)
            + b',"finish_reason":null}]}\n\n'
        )

    def finish(self, reason: str) -> bytes:
        return self._prefix + b'"","logprobs":null,"finish_reason":"%s"}]}\n\n' % reason.encode()

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._base + b'"choices":[],"usage":' + _json.encode(usage) + b"}\n\n"

    def error(self, message: str, kind: str = "internal_error") -> bytes:
        return b"data: " + error_body(message, kind) + b"\n\n"

    def whole(
        self, text: str, reason: str, usage: dict[str, Any], logprobs: dict[str, Any] | None
    ) -> bytes:
        return _json.encode(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "text": self.echo + text,
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }
                ],
                "usage": usage,
            }
        )
