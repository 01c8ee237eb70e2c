"""The vLLM handlers, on the core bases (`dynamo_core.handlers`): one code base for every role.

- `WorkerHandler` (aggregated): `AsyncLLM.generate({"prompt_token_ids": [...]}, params, id)`
  with `RequestOutputKind.DELTA`, so each `RequestOutput` carries only the new tokens;
- `PrefillHandler`: the prompt only (`max_tokens=1`), with
  `extra_args={"kv_transfer_params": {"do_remote_decode": True}}`; vLLM's KV connector answers
  with the `kv_transfer_params` a decode engine needs, returned as
  `disaggregated_params={"kv_transfer_params": ...}` on the one output (vLLM sets them when the
  prefill finishes: that is as early as the engine allows);
- `DecodeHandler`: passes those parameters back to vLLM in `extra_args`, so its engine pulls the
  KV cache instead of computing it; without them it serves the request whole.

The request's sampling options, stop token ids, `min_tokens`, `ignore_eos`, seed, logprobs and
prompt logprobs become vLLM `SamplingParams` (the model's generation-config defaults below them, as vLLM's own
server does); detokenization is off (the frontend detokenizes). A `guided_decoding` constraint
becomes `SamplingParams.structured_outputs` (`StructuredOutputsParams` with the same field set:
json, json_object, regex, choice or grammar), compiled by the engine's structured-outputs backend
(`--structured-outputs-config`, xgrammar by default); a constraint vLLM refuses (a
`VLLMClientError`: a schema feature its backend lacks, a grammar that does not parse) reaches the
client as `InvalidRequestError`. vLLM's finish reasons map to
Dynamo's: `stop` with a `stop_reason` is `stop`, `stop` without one (an end-of-sequence token)
is `eos`, `length` is `length`, `abort` is `cancelled`. Cancellation calls `engine.abort(id)`;
usage, stop enforcement and error mapping come from the base class. The prompt's
log-probabilities (`RequestOutput.prompt_logprobs`, which vLLM sends as the prefill goes: in
pieces with chunked prefill) are gathered until they cover the prompt and sent with that output
(`prompt_logprobs`); a prefill worker sends them with its hand-off.

- `EmbeddingHandler` (`dynamo_vllm.embedding`, a pooling model): one
  `AsyncLLM.encode({"prompt_token_ids": [...]}, PoolingParams(task="embed", dimensions=...),
  id)` per input, all at once (vLLM's scheduler batches them); each `PoolingRequestOutput`'s
  `outputs.data` (a 1-D tensor, normalised by vLLM's embed pooler) is the vector. A cancelled
  request cancels every input's `encode`, which aborts it in vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from dynamo_core.errors import EngineError, InvalidRequestError
from dynamo_core.handlers import (
    BaseDecodeHandler,
    BaseEmbeddingHandler,
    BasePrefillHandler,
    BaseWorkerHandler,
)
from dynamo_core.llm.protocol import (
    EngineOutput,
    FinishReason,
    GuidedDecoding,
    PreprocessedEmbeddingRequest,
    PreprocessedRequest,
)
from dynamo_core.runtime import Context
from dynamo_vllm.protocols import AsyncLLMLike

__all__ = [
    "PARAMS_KEY",
    "DecodeHandler",
    "EmbeddingHandler",
    "PrefillHandler",
    "WorkerHandler",
    "finish_reason",
    "logprobs",
    "prompt_logprobs",
    "sampling_params",
    "structured_outputs",
]

#: The key of vLLM's transfer parameters inside `disaggregated_params` (vLLM's own name).
PARAMS_KEY = "kv_transfer_params"

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def sampling_params(
    request: PreprocessedRequest,
    defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """vLLM `SamplingParams` for `request`: new tokens only (DELTA), no detokenization."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    kwargs: dict[str, Any] = dict(defaults or {})
    options = request.sampling_options
    for name in _SAMPLING_FIELDS:
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    stop = request.stop_conditions
    kwargs.update(
        n=1,
        max_tokens=stop.max_tokens,  # >= 1 (the base class answers 0); None: vLLM's rule
        min_tokens=stop.min_tokens or 0,
        stop_token_ids=list(stop.stop_token_ids) if stop.stop_token_ids else None,
        ignore_eos=stop.ignore_eos,
        logprobs=request.output_options.logprobs,
        prompt_logprobs=request.output_options.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
    )
    if request.guided_decoding is not None:
        kwargs["structured_outputs"] = structured_outputs(request.guided_decoding)
    kwargs.update(overrides)
    return SamplingParams(**kwargs)


def structured_outputs(guided: GuidedDecoding) -> Any:
    """vLLM's `StructuredOutputsParams` for a constraint: the one field it sets, the others
    None (vLLM counts every field that is not None, `json_object=False` included)."""
    from vllm.sampling_params import StructuredOutputsParams

    kind = guided.kind
    value = True if kind == "json_object" else getattr(guided, kind)
    return StructuredOutputsParams(**{kind: value})


def _client_error(exc: BaseException) -> InvalidRequestError | None:
    """vLLM's own "the request is at fault" errors (`VLLMClientError`), as Dynamo's."""
    for cls in type(exc).__mro__:
        if cls.__name__ == "VLLMClientError":
            return InvalidRequestError(f"vLLM rejected the request: {exc}")
    return None


def finish_reason(output: Any) -> FinishReason | None:
    """Dynamo's finish reason for a vLLM `CompletionOutput`."""
    reason = output.finish_reason
    if reason is None:
        return None
    if reason == "stop":
        return "eos" if output.stop_reason is None else "stop"
    if reason == "length":
        return "length"
    if reason == "abort":
        return "cancelled"
    return "error"


def logprobs(
    output: Any, top: int | None
) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """Per new token: its log-probability and the top alternatives, from vLLM's
    `CompletionOutput.logprobs` (one `{token_id: Logprob(logprob, rank, ...)}` per token).

    vLLM's map holds the chosen token, then the `top` most likely; the alternatives are all of
    them, most likely first and the chosen one first among equals (bf16 logits tie often, and
    vLLM's server lists the chosen token first), so `top` + 1 when the chosen token is not among
    the most likely: the frontend shows the first `top` in chat and the chosen one plus the
    `top` others in completions, as vLLM's own server does (greedy: the same lists).
    """
    entries = output.logprobs
    if entries is None or top is None:
        return None, None
    chosen: list[float] = []
    alternatives: list[list[tuple[int, float]]] = []
    for token, entry in zip(output.token_ids, entries, strict=False):
        mine = entry.get(token)
        chosen.append(mine.logprob if mine is not None else float("-inf"))
        # most likely first; among equals the chosen token first (vLLM lists it first, its
        # top-k may list an equal one before it), the others in vLLM's order
        ranked = sorted(entry.items(), key=lambda item: (-item[1].logprob, item[0] != token))
        alternatives.append([(tid, lp.logprob) for tid, lp in ranked] if top else [])
    return chosen, alternatives


def prompt_logprobs(
    entries: Sequence[Any], prompt: Sequence[int], top: int
) -> tuple[list[float | None], list[list[tuple[int, float]]], list[int | None]]:
    """The prompt's log-probabilities as `EngineOutput` carries them, from vLLM's
    `RequestOutput.prompt_logprobs` (None for the first token, then per token a map of the
    prompt token, then the `top` most likely, each a `Logprob(logprob, rank, ...)`).

    The alternatives are vLLM's top `top` in rank order: the prompt token is among them when
    the map has no more than `top` entries (vLLM's map then holds it once, with its rank
    among them).
    """
    values: list[float | None] = [None]
    alternatives: list[list[tuple[int, float]]] = [[]]
    ranks: list[int | None] = [None]
    for token, entry in zip(prompt[1:], entries[1:], strict=True):
        mine = entry.get(token)
        values.append(mine.logprob if mine is not None else float("-inf"))
        ranks.append(mine.rank if mine is not None else None)
        among = len(entry) <= top
        ranked = sorted(
            ((tid, lp) for tid, lp in entry.items() if tid != token or among),
            key=lambda item: item[1].rank if item[1].rank is not None else 1 << 62,
        )
        alternatives.append([(tid, lp.logprob) for tid, lp in ranked])
    return values, alternatives, ranks


class _PromptLogprobs:
    """vLLM's `prompt_logprobs` of one request, gathered until whole: with chunked prefill
    each chunk's come with their own `RequestOutput` (DELTA)."""

    __slots__ = ("entries", "prompt", "top")

    def __init__(self, prompt: Sequence[int], top: int) -> None:
        self.prompt = prompt
        self.top = top
        self.entries: list[Any] = []

    def add(self, result: Any, out: EngineOutput) -> bool:
        """Gather `result`'s; once they cover the prompt, put them on `out` (True)."""
        if result.prompt_logprobs:
            self.entries.extend(result.prompt_logprobs)
        if len(self.entries) < len(self.prompt):
            return False
        values, alternatives, ranks = prompt_logprobs(self.entries, self.prompt, self.top)
        out.prompt_log_probs = values
        out.prompt_top_logprobs = alternatives
        out.prompt_ranks = ranks
        return True


class WorkerHandler(BaseWorkerHandler):
    """Aggregated serving on a vLLM `AsyncLLM`."""

    engine: AsyncLLMLike
    supports_prompt_logprobs = True

    def __init__(
        self,
        engine: AsyncLLMLike,
        *,
        default_sampling: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(engine, name=name)
        self.default_sampling = dict(default_sampling or {})
        self._cached: dict[str, int] = {}

    def sampling_params(self, request: PreprocessedRequest, **overrides: Any) -> Any:
        return sampling_params(request, self.default_sampling, **overrides)

    async def run_engine(
        self, request: PreprocessedRequest, params: Any
    ) -> AsyncGenerator[tuple[Any, EngineOutput], None]:
        """vLLM's outputs for `request`, each with its `EngineOutput`."""
        request_id = request.request_id
        assert request_id is not None  # set by `generate`
        prompt = {"prompt_token_ids": request.token_ids}
        # closed explicitly (not left to the garbage collector) when the caller stops early:
        # vLLM's generator then aborts the request itself
        stream = self.engine.generate(prompt, params, request_id)
        top = request.output_options.prompt_logprobs
        pending = None if top is None else _PromptLogprobs(request.token_ids, top)
        try:
            async for result in stream:
                if result.num_cached_tokens is not None:
                    self._cached[request_id] = result.num_cached_tokens
                out = result.outputs[0]
                lps, tops = logprobs(out, request.output_options.logprobs)
                engine_out = EngineOutput(
                    token_ids=list(out.token_ids),
                    finish_reason=finish_reason(out),
                    log_probs=lps,
                    top_logprobs=tops,
                )
                if pending is not None and pending.add(result, engine_out):
                    pending = None
                yield result, engine_out
        except Exception as exc:
            error = _client_error(exc)
            if error is None:
                raise
            raise error from exc
        finally:
            self._cached.pop(request_id, None)
            await stream.aclose()

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncGenerator[EngineOutput, None]:
        async with aclosing(self.run_engine(request, self.sampling_params(request))) as outputs:
            async for _, out in outputs:
                yield out

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def cached_tokens(self, request: PreprocessedRequest) -> int | None:
        if request.request_id is None:
            return None
        return self._cached.get(request.request_id)


class PrefillHandler(WorkerHandler, BasePrefillHandler):
    """Prefill worker: the prompt only, then vLLM's `kv_transfer_params` for a decode worker."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncGenerator[EngineOutput, None]:
        params = self.sampling_params(
            request,
            max_tokens=1,
            min_tokens=1,
            extra_args={PARAMS_KEY: {"do_remote_decode": True}},
        )
        tokens: list[int] = []
        prompt: EngineOutput | None = None  # the output with the prompt's log-probabilities
        async with aclosing(self.run_engine(request, params)) as outputs:
            async for result, out in outputs:
                tokens.extend(out.token_ids)
                if out.prompt_log_probs is not None:
                    prompt = out
                if out.finish_reason in ("cancelled", "error"):
                    yield out  # no hand-off
                    return
                if out.finish_reason is None:
                    continue
                transfer = result.kv_transfer_params
                if transfer is None:
                    raise EngineError(
                        "vLLM returned no kv_transfer_params: start the prefill worker with "
                        "--kv-transfer-config (a KV connector, e.g. NixlConnector)"
                    )
                handoff = EngineOutput(
                    token_ids=tokens[:1],
                    finish_reason="length",
                    disaggregated_params={PARAMS_KEY: dict(transfer)},
                )
                if prompt is not None:
                    handoff.prompt_log_probs = prompt.prompt_log_probs
                    handoff.prompt_top_logprobs = prompt.prompt_top_logprobs
                    handoff.prompt_ranks = prompt.prompt_ranks
                yield handoff
                return


class DecodeHandler(WorkerHandler, BaseDecodeHandler):
    """Decode worker: continues requests prefilled elsewhere (or serves them whole)."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncGenerator[EngineOutput, None]:
        transfer = (request.disaggregated_params or {}).get(PARAMS_KEY)
        if transfer is None:
            async with aclosing(super().engine_generate(request, context)) as outputs:
                async for out in outputs:
                    yield out
            return
        params = self.sampling_params(request, extra_args={PARAMS_KEY: transfer})
        async with aclosing(self.run_engine(request, params)) as outputs:
            async for _, out in outputs:
                yield out


class EmbeddingHandler(BaseEmbeddingHandler):
    """Embedding worker on a vLLM `AsyncLLM` started with `--runner pooling`."""

    engine: AsyncLLMLike

    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        from vllm.pooling_params import PoolingParams

        rid = request.request_id or context.id
        try:
            async with asyncio.TaskGroup() as tg:  # one failing input stops the others
                tasks = [
                    tg.create_task(
                        self._encode(
                            f"{rid}-{i}",
                            ids,
                            PoolingParams(task="embed", dimensions=request.dimensions),
                        )
                    )
                    for i, ids in enumerate(request.token_ids)
                ]
        except* Exception as group:
            first = group.exceptions[0]
            raise _client_error(first) or first from None
        return [task.result() for task in tasks]

    async def _encode(self, request_id: str, token_ids: list[int], params: Any) -> list[float]:
        stream = self.engine.encode({"prompt_token_ids": token_ids}, params, request_id)
        try:
            async for result in stream:
                if result.finished:
                    vector: list[float] = result.outputs.data.tolist()
                    return vector
        finally:
            await stream.aclose()
        raise EngineError(f"vLLM ended embedding request {request_id} without a result")
