"""Wire types between the frontend (or router) and engine workers.

They are `msgspec` structs: encoded once per request on the way in, and as plain maps on the way
out, so the hot path reads responses as dicts with no per-token validation. A worker turns the
request map into a `PreprocessedRequest` with `PreprocessedRequest.from_wire(...)` (one
validation per request) and yields `EngineOutput`s (or equivalent dicts).

Finish reasons an engine reports: `eos` (an end-of-sequence token), `stop` (a stop token id or
stop string), `length` (max_tokens or the context), `cancelled`, `error`. The frontend shows
`eos` and `stop` to OpenAI clients as "stop".

Structured output travels as one `GuidedDecoding` per request (`PreprocessedRequest.guided_decoding`):
a JSON schema, any JSON object, a regex, a choice of strings or an EBNF grammar. Each engine turns
it into its own constraint (vLLM's `StructuredOutputsParams`, SGLang's `json_schema`/`regex`/`ebnf`
sampling params, TensorRT-LLM's `GuidedDecodingParams`; the mocker generates conforming text); an
engine that cannot honour it refuses the request with `InvalidRequestError`, never ignores it.
The frontend builds it from an OpenAI request with `GuidedDecoding.from_response_format(...)` and
`GuidedDecoding.from_guided_fields(...)` (vLLM's `guided_json`/`guided_regex`/... extensions).

A request is never changed once built: the `inproc` request plane hands the caller's own object
to the worker, and the frontend derives its other legs from it. The derivations are named, each a
new struct sharing what did not change (`msgspec.structs.replace`): `prefill_leg()` (the prompt
only, for a prefill worker), `with_transfer(params)` (the decode leg, with the prefill worker's
transfer parameters) and `continuation(generated)` (a migrated stream, resent to another worker
with what the first one generated). Who decides `max_tokens`: the frontend sets it from the
client's request (or what the context leaves); a worker's `BaseWorkerHandler` answers 0 without
the engine and fills a missing one from its context (`dynamo_core.handlers`); the two legs'
values come from the derivations here. Engines only translate it.

Embeddings have their own pair: `PreprocessedEmbeddingRequest` (every input of one OpenAI
request, as token ids, in one request to one worker: the engine batches them itself) and
`EmbeddingOutput` (one answer with every vector). Vectors travel as little-endian float32 bytes
(`pack_embedding` / `unpack_embedding`): a quarter of what msgpack floats take, and exactly what
OpenAI's `encoding_format: base64` sends, so the frontend only base64-encodes them.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from msgspec.structs import replace

__all__ = [
    "EmbeddingOutput",
    "EngineOutput",
    "FinishReason",
    "GuidedDecoding",
    "GuidedKind",
    "OutputOptions",
    "PreprocessedEmbeddingRequest",
    "PreprocessedRequest",
    "SamplingOptions",
    "StopConditions",
    "Usage",
    "pack_embedding",
    "unpack_embedding",
]

FinishReason = Literal["eos", "stop", "length", "cancelled", "error"]
GuidedKind = Literal["json", "json_object", "regex", "choice", "grammar"]

#: Characters a regex must escape to stand for themselves (the subset every engine's dialect
#: shares: Python `re`, xgrammar, outlines), and control characters as escapes.
_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")
_REGEX_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f", "\v": "\\v"}


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else _REGEX_CONTROL.get(c, c) for c in text)


class GuidedDecoding(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=True):
    """A structured-output constraint: the engine may only generate text that it accepts.

    Exactly one field is set (the names are vLLM's, which NVIDIA Dynamo's wire type shares):

    - `json`: a JSON Schema (a map); the output is one JSON value valid against it;
    - `json_object`: the output is one JSON object, any (OpenAI's ``json_object`` mode);
    - `regex`: the whole output matches the regular expression (the dialect engines share:
      literals, classes, groups, alternation, quantifiers; no look-around or back-references);
    - `choice`: the output is exactly one of these strings;
    - `grammar`: the output is derived from the EBNF grammar's ``root`` rule, in the GBNF syntax
      xgrammar reads (the grammar backend vLLM, SGLang and TensorRT-LLM have in common).

    The output ends where the constraint is satisfied: the engine then emits end-of-sequence (a
    `max_tokens` reached first cuts it, with finish reason `length`). Unknown fields are refused
    (`forbid_unknown_fields`): a worker that does not know a kind of constraint must not drop it.
    It is validated once, when the request is decoded (`__post_init__`).
    """

    json: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise ValueError(
                f"guided_decoding needs exactly one of json, json_object, regex, choice, "
                f"grammar (found: {found})"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("guided_decoding.choice must list at least one string")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("guided_decoding.grammar must not be empty")

    def kinds(self) -> list[GuidedKind]:
        """The kinds set on this constraint (exactly one once validated)."""
        found: list[GuidedKind] = []
        if self.json is not None:
            found.append("json")
        if self.json_object:
            found.append("json_object")
        if self.regex is not None:
            found.append("regex")
        if self.choice is not None:
            found.append("choice")
        if self.grammar is not None:
            found.append("grammar")
        return found

    @property
    def kind(self) -> GuidedKind:
        return self.kinds()[0]

    def choice_regex(self) -> str:
        """`choice` as a regex (``(a|b|c)``, each choice escaped), for engines without a
        choice constraint of their own (SGLang, TensorRT-LLM)."""
        return "(" + "|".join(_regex_literal(c) for c in self.choice or ()) + ")"

    @classmethod
    def from_response_format(cls, response_format: Any) -> GuidedDecoding | None:
        """The constraint of an OpenAI ``response_format`` (None for ``{"type": "text"}``).

        ``{"type": "json_object"}`` is `json_object`; ``{"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}, "strict": ...}}`` is `json` (without a ``schema``, any
        JSON object). Raises `ValueError` with a message for the client on anything else.
        """
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format.json_schema must be an object")
            schema = spec.get("schema")
            if schema is None:
                return cls(json_object=True)
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be an object")
            return cls(json=schema)
        raise ValueError(
            f"response_format.type must be one of 'text', 'json_object', 'json_schema'; "
            f"got {kind!r}"
        )

    @classmethod
    def from_guided_fields(
        cls,
        *,
        guided_json: Any = None,
        guided_regex: str | None = None,
        guided_choice: list[str] | None = None,
        guided_grammar: str | None = None,
    ) -> GuidedDecoding | None:
        """The constraint of vLLM's request extensions (None when none is set).

        `guided_json` is a schema map or its JSON text. Raises `ValueError` when several are
        set or a value has the wrong shape.
        """
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except ValueError as exc:
                raise ValueError(f"guided_json is not valid JSON: {exc}") from None
        if guided_json is not None and not isinstance(guided_json, dict):
            raise ValueError("guided_json must be a JSON schema object")
        if all(v is None for v in (guided_json, guided_regex, guided_choice, guided_grammar)):
            return None
        try:
            return msgspec.convert(
                {
                    "json": guided_json,
                    "regex": guided_regex,
                    "choice": guided_choice,
                    "grammar": guided_grammar,
                },
                cls,
            )
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None


class StopConditions(msgspec.Struct, omit_defaults=True, kw_only=True):
    max_tokens: int | None = None
    """Most tokens to generate (the frontend always sets it, capped by the context)."""
    min_tokens: int | None = None
    """Fewest tokens to generate before eos or stop tokens may end the sequence."""
    stop: list[str] | None = None
    """Stop strings; the frontend applies them on detokenized text, engines may too."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the sequence (finish reason `stop`); not included in the output."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""


class SamplingOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None


class OutputOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    logprobs: int | None = None
    """Return the chosen token's log-probability plus this many top alternatives (0: none)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability (given the tokens before it) plus this many
    top alternatives (0: none), once, with the first output (`EngineOutput.prompt_log_probs`).
    An engine that cannot refuses the request (`InvalidRequestError`), never leaves them out."""
    skip_special_tokens: bool = True


class PreprocessedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    token_ids: list[int]
    model: str = ""
    stop_conditions: StopConditions = msgspec.field(default_factory=StopConditions)
    sampling_options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output_options: OutputOptions = msgspec.field(default_factory=OutputOptions)
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    request_id: str | None = None
    annotations: list[str] = msgspec.field(default_factory=list)
    disaggregated_params: dict[str, Any] | None = None
    """Engine transfer parameters from a prefill worker, handed to the decode worker."""
    prefill_only: bool = False
    """Set by the frontend on the prefill leg of a disaggregated request."""
    guided_decoding: GuidedDecoding | None = None
    """Structured output: the constraint the output must satisfy (see `GuidedDecoding`)."""
    generated_tokens: int = 0
    """On a migration continuation: how many of the last `token_ids` an earlier worker generated
    (the original prompt is the rest). An engine that seeds sampling per request seeds from the
    original prompt, so that the continuation is the sequence the first worker would have made."""

    @classmethod
    def from_wire(cls, data: Any) -> PreprocessedRequest:
        """Validate a request map received from the request plane (one check per request)."""
        if isinstance(data, cls):
            return data
        return msgspec.convert(data, cls)

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    # -- derivations: each a new request, this one unchanged ------------------------------

    def prefill_leg(self) -> PreprocessedRequest:
        """The prefill half of a disaggregated request: the prompt only (`max_tokens` 1),
        flagged `prefill_only` for the prefill worker."""
        stop = self.stop_conditions
        if self.prefill_only and stop.max_tokens == 1:
            return self
        return replace(self, prefill_only=True, stop_conditions=replace(stop, max_tokens=1))

    def with_transfer(self, params: dict[str, Any]) -> PreprocessedRequest:
        """The decode half: this request, with the transfer parameters a prefill worker handed
        out (the decode worker pulls the prompt's KV cache instead of computing it). The
        prompt's log-probabilities are the prefill worker's to return (it runs the prompt):
        the decode leg does not ask for them."""
        return replace(
            self, disaggregated_params=params, output_options=self._without_prompt_logprobs()
        )

    def _without_prompt_logprobs(self) -> OutputOptions:
        options = self.output_options
        if options.prompt_logprobs is None:
            return options
        return replace(options, prompt_logprobs=None)

    def continuation(self, generated: Sequence[int]) -> PreprocessedRequest:
        """The request that continues this one on another worker after `generated` tokens.

        They are appended to the prompt and counted in `generated_tokens` (an engine that
        seeds per request seeds from the original prompt, and goes on token-exactly);
        `max_tokens` and `min_tokens` shrink by as many (`max_tokens` stays at least 1). It is
        served whole: transfer parameters were for the first worker, and are dropped; so are
        `prompt_logprobs` (the first worker sent them with its first output, and the prompt
        is now longer).
        """
        n = len(generated)
        stop = self.stop_conditions
        if stop.max_tokens is not None:
            stop = replace(stop, max_tokens=max(1, stop.max_tokens - n))
        if stop.min_tokens:
            stop = replace(stop, min_tokens=max(0, stop.min_tokens - n))
        return replace(
            self,
            token_ids=[*self.token_ids, *generated],
            generated_tokens=self.generated_tokens + n,
            stop_conditions=stop,
            disaggregated_params=None,
            prefill_only=False,
            output_options=self._without_prompt_logprobs(),
        )


class Usage(msgspec.Struct, omit_defaults=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


class EngineOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    token_ids: list[int] = msgspec.field(default_factory=list)
    """Tokens new in this chunk (never the cumulative sequence)."""
    text: str | None = None
    finish_reason: FinishReason | None = None
    log_probs: list[float] | None = None
    """Log-probability of each new token."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per new token: the most likely tokens as (token id, log-probability), most likely first
    (the chosen one may be among them). At least `logprobs` of them, one more allowed (vLLM
    lists the chosen token besides the top `logprobs`); none when `logprobs` is 0. The frontend
    shows the first `logprobs` in chat, and the chosen token then the others, up to
    `logprobs` + 1, in completions."""
    prompt_log_probs: list[float | None] | None = None
    """Asked for with `OutputOptions.prompt_logprobs`, on the first output only (before or with
    its first token): per prompt token, its log-probability given the tokens before it; None
    for the first token, which has none (vLLM's and SGLang's convention)."""
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    """With `prompt_log_probs`: per prompt token, the `prompt_logprobs` most likely tokens at
    its place as (token id, log-probability), most likely first (the engine's top-k: the prompt
    token itself only where it is among them); empty for the first token and when
    `prompt_logprobs` is 0."""
    prompt_ranks: list[int | None] | None = None
    """With `prompt_log_probs`, when the engine reports it: per prompt token, its rank among
    the vocabulary at its place (1: the most likely); None for the first token, and where the
    engine does not say (SGLang)."""
    usage: Usage | None = None
    """Set on the last chunk."""
    disaggregated_params: dict[str, Any] | None = None
    """Set by a prefill worker: what the decode worker needs to pull the KV cache."""
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


# -- embeddings -------------------------------------------------------------------------------

_BIG_ENDIAN = sys.byteorder == "big"


def pack_embedding(vector: Sequence[float]) -> bytes:
    """`vector` as little-endian float32 bytes (the wire form, and OpenAI's base64 payload)."""
    values = array("f", vector)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tobytes()


def unpack_embedding(data: bytes) -> list[float]:
    """The floats of `pack_embedding`'s bytes (each a float32 value, widened)."""
    if len(data) % 4:
        raise ValueError(f"an embedding of {len(data)} bytes is not a float32 vector")
    values = array("f")
    values.frombytes(data)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


class PreprocessedEmbeddingRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Every input of one embeddings request, tokenized by the frontend (in the client's order).

    Idempotent: the frontend may send it again to another worker whenever one fails it."""

    token_ids: list[list[int]]
    model: str = ""
    dimensions: int | None = None
    """Shorten every vector to this many values (Matryoshka models; the card says which can)."""
    request_id: str | None = None
    annotations: list[str] = msgspec.field(default_factory=list)

    @classmethod
    def from_wire(cls, data: Any) -> PreprocessedEmbeddingRequest:
        """Validate a request map received from the request plane (one check per request)."""
        if isinstance(data, cls):
            return data
        return msgspec.convert(data, cls)

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


class EmbeddingOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A worker's answer to a `PreprocessedEmbeddingRequest`: one vector per input, in order."""

    embeddings: list[bytes]
    """Each vector as `pack_embedding` bytes."""
    prompt_tokens: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings, "prompt_tokens": self.prompt_tokens}
