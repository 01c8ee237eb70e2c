"""Worker handlers on TensorRT-LLM's LLM API, built on the core bases (`dynamo_core.handlers`).

One code base for the three roles:

- `TrtllmHandler` (aggregated): `llm.generate_async(token_ids, sampling_params=SamplingParams(...),
  streaming=True)`, read with `async for` over the returned `RequestOutput`;
- `TrtllmPrefillHandler`: the same with `DisaggregatedParams(request_type="context_only")`; the
  output carrying `outputs[0].disaggregated_params` is yielded at once, serialised as a
  msgpack-able map under the `"trtllm"` key (bytes as base64);
- `TrtllmDecodeHandler`: rebuilds `DisaggregatedParams(request_type="generation_only", ...)` from
  that map and generates; a request without it is served aggregated.

How engine outputs become `EngineOutput`s:

- `outputs[0].token_ids` is cumulative: each chunk carries the ids past the last count seen
  (what `token_ids_diff` holds; the count is kept here so that a chunk the loop coalesced is
  never lost), with the matching `logprobs` (TokenLogprobs: one `{token_id: Logprob}` map per
  token, or plain floats in older releases);
- finish reasons: `length` -> length; `stop` with a `stop_reason` among the request's stop ids
  (or a stop string) -> stop; `stop` at the end id or another eos id -> eos, and the eos token
  is appended when the engine left it out (TensorRT-LLM does not return the end token; Dynamo's
  contract, as vLLM's, includes it); `cancelled` and `timeout` -> cancelled;
- cancellation (`abort(request_id)`) calls `RequestOutput.abort()`; a finished request is no
  longer tracked, so a context-only request is never aborted after its hand-off (that would free
  the KV cache before the decode worker pulls it);
- usage: the base class counts tokens; cached prompt tokens come from `RequestOutput.cached_tokens`
  where the release reports it.

The prompt's log-probabilities (`prompt_logprobs`, echo with logprobs) are refused with
`InvalidRequestError` (a 400): TensorRT-LLM's `SamplingParams.prompt_logprobs` return, per
position, the top-k of the context logits (`compute_logprobs` in `tensorrt_llm.executor.result`
is given no prompt tokens), so the prompt token's own log-probability is missing wherever it is
not among them; answering without it would be silently wrong.

A `guided_decoding` constraint becomes `SamplingParams.guided_decoding`, a `GuidedDecodingParams`
(json: the schema, json_object, regex, grammar; `choice` as a regex alternation, TensorRT-LLM
having no choice constraint). TensorRT-LLM enforces it only when the LLM was built with a
`guided_decoding_backend` (xgrammar or llguidance, in `--extra-engine-args`); without one it
would silently generate unconstrained text, so the handler refuses such a request with
`InvalidRequestError` saying how to turn it on.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from dynamo_core.errors import InvalidRequestError
from dynamo_core.handlers import BaseDecodeHandler, BasePrefillHandler, BaseWorkerHandler
from dynamo_core.llm.protocol import (
    EngineOutput,
    FinishReason,
    GuidedDecoding,
    PreprocessedRequest,
)
from dynamo_core.runtime import Context
from dynamo_trtllm.protocols import LLMLike, RequestOutputLike

__all__ = [
    "PARAMS_KEY",
    "TrtllmDecodeHandler",
    "TrtllmHandler",
    "TrtllmPrefillHandler",
    "decode_disaggregated_params",
    "encode_disaggregated_params",
]

#: The key of TensorRT-LLM's transfer parameters inside `disaggregated_params`.
PARAMS_KEY = "trtllm"

#: `DisaggregatedParams` fields that cross the wire (tensors and multimodal handles do not).
_WIRE_FIELDS = (
    "first_gen_tokens",
    "ctx_request_id",
    "opaque_state",
    "draft_tokens",
    "disagg_request_id",
    "ctx_dp_rank",
    "ctx_info_endpoint",
    "schedule_style",
)

log = logging.getLogger("dynamo.trtllm")


def encode_disaggregated_params(params: Any) -> dict[str, Any]:
    """A context-only request's `DisaggregatedParams` as a msgpack-able map."""
    out: dict[str, Any] = {}
    for name in _WIRE_FIELDS:
        value = getattr(params, name, None)
        if value is None:
            continue
        if isinstance(value, bytes | bytearray):
            out[name] = {"b64": base64.b64encode(bytes(value)).decode("ascii")}
        elif isinstance(value, int | str | float):
            out[name] = int(value) if isinstance(value, int) else value  # IntEnum -> int
        else:
            out[name] = list(value)
    return out


def decode_disaggregated_params(data: dict[str, Any], params_class: Any) -> Any:
    """`DisaggregatedParams(request_type="generation_only", ...)` from `encode_...`'s map."""
    accepted = (
        {f.name for f in dataclasses.fields(params_class)}
        if dataclasses.is_dataclass(params_class)
        else set(_WIRE_FIELDS)
    )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in accepted or name == "request_type":
            continue
        if isinstance(value, dict) and set(value) == {"b64"}:
            value = base64.b64decode(value["b64"])
        kwargs[name] = value
    return params_class(request_type="generation_only", **kwargs)


def _logprob_of(entry: Any, token: int) -> tuple[float | None, list[tuple[int, float]]]:
    """One token's log-probability and top alternatives from a TokenLogprobs entry."""
    if isinstance(entry, int | float):
        return float(entry), [(token, float(entry))]
    if isinstance(entry, dict):
        ranked = sorted(
            entry.items(),
            key=lambda kv: (getattr(kv[1], "rank", None) or 1 << 30, -_value(kv[1])),
        )
        top = [(int(tid), _value(lp)) for tid, lp in ranked]
        chosen = entry.get(token)
        return (_value(chosen) if chosen is not None else None), top
    return None, []


def _value(lp: Any) -> float:
    return float(getattr(lp, "logprob", lp))


class TrtllmHandler(BaseWorkerHandler):
    """Aggregated worker on a `tensorrt_llm.LLM`."""

    engine: LLMLike
    prompt_logprobs_refusal = (
        "TensorRT-LLM's prompt logprobs (SamplingParams.prompt_logprobs, the top-k of its "
        "context logits) list each position's most likely tokens, not the prompt token's own "
        "log-probability, which echo and prompt_logprobs show; use a vLLM or SGLang worker"
    )

    def __init__(self, llm: LLMLike, *, name: str | None = None) -> None:
        seq = getattr(getattr(llm, "args", None), "max_seq_len", None)
        # the base class fills a missing max_tokens from the context the LLM was built with
        super().__init__(llm, name=name, context_length=seq if isinstance(seq, int) else None)
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.llmapi import DisaggregatedParams, GuidedDecodingParams

        self._sampling_class = SamplingParams
        self._params_class = DisaggregatedParams
        self._guided_class = GuidedDecodingParams
        #: request id -> the engine's RequestOutput, while the engine works on it
        self.active: dict[str, RequestOutputLike] = {}
        self._cached: dict[str, int] = {}

    # -- request -> engine ------------------------------------------------------------------

    def sampling_params(self, request: PreprocessedRequest) -> Any:
        """`SamplingParams` for a request (stop conditions the base class enforces too)."""
        stop = request.stop_conditions
        opts = request.sampling_options
        kwargs: dict[str, Any] = {
            "max_tokens": self._max_tokens(request),
            "detokenize": False,  # the frontend detokenizes
        }
        for name in ("temperature", "top_p", "top_k", "seed", "min_p"):
            value = getattr(opts, name)
            if value is not None:
                kwargs[name] = value
        for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
            value = getattr(opts, name)
            if value is not None:
                kwargs[name] = value
        if stop.min_tokens:
            kwargs["min_tokens"] = stop.min_tokens
        stop_ids = list(stop.stop_token_ids or ())
        if stop.ignore_eos:
            kwargs["ignore_eos"] = True
        elif request.eos_token_ids:
            kwargs["end_id"] = request.eos_token_ids[0]
            stop_ids += [t for t in request.eos_token_ids[1:] if t not in stop_ids]
        if stop_ids:
            kwargs["stop_token_ids"] = stop_ids
        if request.output_options.logprobs is not None:
            kwargs["logprobs"] = max(1, request.output_options.logprobs)
        if request.guided_decoding is not None:
            kwargs["guided_decoding"] = self.guided_params(request.guided_decoding)
        return self._sampling_class(**kwargs)

    def guided_params(self, guided: GuidedDecoding) -> Any:
        """`GuidedDecodingParams` for a constraint; refused when the LLM cannot enforce it."""
        args = getattr(self.engine, "args", None)
        if getattr(args, "guided_decoding_backend", None) is None:
            raise InvalidRequestError(
                "structured output is off on this TensorRT-LLM worker: start it with "
                "'guided_decoding_backend: xgrammar' in --extra-engine-args"
            )
        kind = guided.kind
        if kind == "json_object":
            return self._guided_class(json_object=True)
        if kind == "choice":
            return self._guided_class(regex=guided.choice_regex())
        return self._guided_class(**{kind: getattr(guided, kind)})

    @staticmethod
    def _max_tokens(request: PreprocessedRequest) -> int:
        """The base class's budget (>= 1), or 4096 when neither the request nor the LLM's
        `max_seq_len` says (the LLM API needs a number)."""
        limit = request.stop_conditions.max_tokens
        return 4096 if limit is None else limit

    # -- engine -> EngineOutput -------------------------------------------------------------

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        async for out in self._generate(request, None):
            yield out

    async def _generate(
        self, request: PreprocessedRequest, disaggregated_params: Any
    ) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        assert rid is not None  # set by `generate`
        result = self.engine.generate_async(
            request.token_ids,
            sampling_params=self.sampling_params(request),
            streaming=True,
            disaggregated_params=disaggregated_params,
        )
        self.active[rid] = result
        seen = 0
        try:
            async for res in result:
                seq = res.outputs[0]
                ids = list(seq.token_ids or ())
                new = ids[seen:]
                out = EngineOutput(token_ids=new)
                if request.output_options.logprobs is not None:
                    self._add_logprobs(out, seq, seen, new, request.output_options.logprobs)
                seen = len(ids)
                cached = getattr(res, "cached_tokens", None)
                if isinstance(cached, int):
                    self._cached[rid] = cached
                params = getattr(seq, "disaggregated_params", None)
                if params is not None and request.prefill_only:
                    out.disaggregated_params = {PARAMS_KEY: encode_disaggregated_params(params)}
                if res.finished or seq.finish_reason is not None:
                    out.finish_reason = self._finish_reason(request, seq, out)
                if res.finished:
                    self.active.pop(rid, None)  # nothing left to abort
                yield out
                if res.finished:
                    return
        finally:
            # still tracked: the engine is still working on it (cancelled or failed here)
            unfinished = self.active.pop(rid, None)
            if unfinished is not None:
                unfinished.abort()
            self._cached.pop(rid, None)

    def _finish_reason(
        self, request: PreprocessedRequest, seq: Any, out: EngineOutput
    ) -> FinishReason:
        reason = seq.finish_reason
        if reason == "length" or reason is None:
            return "length"
        if reason in ("cancelled", "timeout"):
            return "cancelled"
        if reason != "stop":
            log.warning("request %s: unknown finish reason %r", request.request_id, reason)
            return "stop"
        stop_reason = getattr(seq, "stop_reason", None)
        stop_ids = set(request.stop_conditions.stop_token_ids or ())
        if isinstance(stop_reason, str) or (stop_reason is not None and stop_reason in stop_ids):
            return "stop"
        if request.stop_conditions.ignore_eos and stop_reason is None:
            return "stop"
        if stop_reason is not None:
            eos = int(stop_reason)
        elif request.eos_token_ids:
            eos = request.eos_token_ids[0]
        else:
            return "stop"
        if not out.token_ids or out.token_ids[-1] != eos:
            out.token_ids = [*out.token_ids, eos]  # the end token, which the engine left out
            if out.log_probs is not None:
                out.log_probs.append(0.0)
            if out.top_logprobs is not None:
                out.top_logprobs.append([(eos, 0.0)])
        return "eos"

    @staticmethod
    def _add_logprobs(out: EngineOutput, seq: Any, seen: int, new: list[int], top_n: int) -> None:
        """The chosen tokens' log-probabilities and, when asked for (`top_n` > 0), the
        alternatives (the LLM API is asked for at least one, to get the chosen token's)."""
        entries = list(seq.logprobs or ())[seen : seen + len(new)]
        if len(entries) != len(new):
            return
        chosen: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        for token, entry in zip(new, entries, strict=True):
            value, top = _logprob_of(entry, token)
            chosen.append(value if value is not None else 0.0)
            tops.append(top if top_n else [])
        out.log_probs = chosen
        out.top_logprobs = tops

    async def abort(self, request_id: str) -> None:
        result = self.active.pop(request_id, None)
        if result is not None:
            result.abort()

    def cached_tokens(self, request: PreprocessedRequest) -> int | None:
        return self._cached.get(request.request_id or "")


class TrtllmPrefillHandler(TrtllmHandler, BasePrefillHandler):
    """Prefill worker: context-only requests; yields the transfer parameters at once."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        params = self._params_class(request_type="context_only")
        handed_off = False
        async for out in self._generate(request, params):
            if out.disaggregated_params is not None:
                handed_off = True
                # the hand-off ends this leg for Dynamo, not for the engine: the KV cache must
                # stay until the decode worker has pulled it, so the request is never aborted
                self.active.pop(request.request_id or "", None)
                if out.finish_reason is None:
                    out.finish_reason = "length"
            elif out.finish_reason is not None and not handed_off:
                log.warning(
                    "request %s: the context-only request ended (%s) without transfer "
                    "parameters; the frontend serves it aggregated",
                    request.request_id,
                    out.finish_reason,
                )
            yield out


class TrtllmDecodeHandler(TrtllmHandler, BaseDecodeHandler):
    """Decode worker: generation-only requests with the prefill worker's parameters."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        data = (request.disaggregated_params or {}).get(PARAMS_KEY)
        params = None
        if data is not None:
            if not isinstance(data, dict):
                raise InvalidRequestError("disaggregated_params.trtllm must be a map")
            try:
                params = decode_disaggregated_params(data, self._params_class)
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(f"invalid disaggregated_params.trtllm: {exc}") from None
        async for out in self._generate(request, params):
            yield out
