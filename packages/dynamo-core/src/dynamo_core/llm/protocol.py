"""Wire types between the frontend (or router) and engine workers.

They are `msgspec` structs: encoded once per request on the way in, and as plain maps on the way
out, so the hot path reads responses as dicts with no per-token validation. A worker turns the
request map into a `PreprocessedRequest` with `PreprocessedRequest.from_wire(...)` (one
validation per request) and yields `EngineOutput`s (or equivalent dicts).

Finish reasons an engine reports: `eos` (an end-of-sequence token), `stop` (a stop token id or
stop string), `length` (max_tokens or the context), `cancelled`, `error`. The frontend shows
`eos` and `stop` to OpenAI clients as "stop".
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "EngineOutput",
    "FinishReason",
    "OutputOptions",
    "PreprocessedRequest",
    "SamplingOptions",
    "StopConditions",
    "Usage",
]

FinishReason = Literal["eos", "stop", "length", "cancelled", "error"]


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
    estimated_prefix_hit_blocks: int | None = None
    """The router's estimate of cached prefix blocks on the chosen worker."""

    @classmethod
    def from_wire(cls, data: Any) -> PreprocessedRequest:
        """Validate a request map received from the request plane (one check per request)."""
        if isinstance(data, cls):
            return data
        return msgspec.convert(data, cls)

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


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
    usage: Usage | None = None
    """Set on the last chunk."""
    disaggregated_params: dict[str, Any] | None = None
    """Set by a prefill worker: what the decode worker needs to pull the KV cache."""
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]
