"""The mocker's worker handlers, on the core bases (`dynamo_core.handlers`).

- `MockerHandler`: aggregated serving (prefill and decode on one simulated engine).
- `MockerPrefillHandler`: runs the prompt only and yields one `EngineOutput` with the first token
  and `disaggregated_params={"mocker": {...}}`, what a decode worker needs to "receive" the KV
  (and the prompt's log-probabilities, when asked for).
- `MockerDecodeHandler`: given those parameters, treats the prompt's KV as transferred (a small
  per-block transfer cost instead of prefill time); without them it serves aggregated.

Every handler also serves `stats` (a unary endpoint): the engine's counters, the handler's,
and on request one request's metrics (`{"request_id": ...}`) or the cached block hashes
(`{"cached_block_hashes": true}`). Stop conditions, usage and error mapping come from the base
class; cancellation reaches `MockerEngine.abort`, which frees the request's blocks at once.

What a request says is decided before it runs (`replies`, a `dynamo_core.mocker.replies.Replies`
built from the model's tokenizer): a reply script's text, the text of its `guided_decoding`
constraint, or (neither) the engine's random tokens. A handler built without `replies` refuses a
constrained request with `InvalidRequestError` rather than ignore the constraint.

- `MockerEmbeddingHandler` (`--embedding-worker`): each input is prefilled on the simulated
  engine (its time, its KV blocks and events, its cancellation), then answered with the
  deterministic unit vector of its token ids (`dynamo_core.mocker.embedding`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from dynamo_core.errors import InvalidRequestError
from dynamo_core.handlers import (
    BaseDecodeHandler,
    BaseEmbeddingHandler,
    BasePrefillHandler,
    BaseWorkerHandler,
    HandlerMetrics,
)
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.llm.protocol import EngineOutput, PreprocessedEmbeddingRequest, PreprocessedRequest
from dynamo_core.mocker.embedding import mock_embedding
from dynamo_core.mocker.engine import MockerEngine, StepOutput
from dynamo_core.mocker.replies import Replies
from dynamo_core.runtime import Context

__all__ = [
    "MockerDecodeHandler",
    "MockerEmbeddingHandler",
    "MockerHandler",
    "MockerPrefillHandler",
]

#: The key of the mocker's transfer parameters inside `disaggregated_params`.
PARAMS_KEY = "mocker"


def _engine_output(out: StepOutput) -> EngineOutput:
    return EngineOutput(
        token_ids=out.token_ids,
        finish_reason=out.finish_reason,
        log_probs=out.log_probs,
        top_logprobs=out.top_logprobs,
        prompt_log_probs=out.prompt_log_probs,
        prompt_top_logprobs=out.prompt_top_logprobs,
        prompt_ranks=out.prompt_ranks,
    )


class MockerHandler(BaseWorkerHandler):
    """Aggregated worker on a `MockerEngine`."""

    engine: MockerEngine
    supports_prompt_logprobs = True

    def __init__(
        self, engine: MockerEngine, *, replies: Replies | None = None, name: str | None = None
    ) -> None:
        super().__init__(engine, name=name, context_length=engine.args.context_length)
        self.replies = replies

    def reply_tokens(self, request: PreprocessedRequest) -> list[int] | None:
        """The tokens this request is to get, or None for the engine's random ones. A migrated
        request gets what is left of the original request's reply (token-exact)."""
        done = request.generated_tokens
        if done and self.replies is not None:
            original = msgspec.structs.replace(
                request, token_ids=request.token_ids[:-done], generated_tokens=0
            )
            whole = self.reply_tokens(original)
            return None if whole is None else whole[done:]
        if self.replies is not None:
            return self.replies.tokens(request)
        if request.guided_decoding is not None:
            raise InvalidRequestError(
                "this mocker has no tokenizer to write structured output with "
                "(build its handler with `replies=`)"
            )
        return None

    def _run_engine(
        self, request: PreprocessedRequest, *, transferred: bool = False
    ) -> AsyncIterator[StepOutput]:
        assert request.request_id is not None  # set by `generate`
        stop = request.stop_conditions
        output = self.reply_tokens(request)
        return self.engine.generate(
            request.request_id,
            request.token_ids,
            max_tokens=request.stop_conditions.max_tokens,
            seed=request.sampling_options.seed,
            logprobs=request.output_options.logprobs,
            prefill_only=request.prefill_only,
            transferred=transferred,
            eos_token_ids=() if stop.ignore_eos else request.eos_token_ids,
            min_tokens=stop.min_tokens or 0,
            output=output,
            generated=request.generated_tokens,
            prompt_logprobs=request.output_options.prompt_logprobs,
        )

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        async for out in self._run_engine(request):
            yield _engine_output(out)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def cached_tokens(self, request: PreprocessedRequest) -> int | None:
        if request.request_id is None:
            return None
        return self.engine.cached_tokens(request.request_id)

    async def stats(self, request: Any = None, context: Context | None = None) -> dict[str, Any]:
        """The `stats` endpoint: engine and handler counters (see the module docstring)."""
        return _stats(self.engine, self.role, self.metrics, request)


def _stats(
    engine: MockerEngine, role: str, metrics: HandlerMetrics, request: Any
) -> dict[str, Any]:
    result: dict[str, Any] = {"role": role, **engine.stats(), "handler": metrics.snapshot()}
    if isinstance(request, dict):
        rid = request.get("request_id")
        if isinstance(rid, str):
            found = engine.request_metrics(rid)
            result["request"] = None if found is None else found.to_dict()
        if request.get("cached_block_hashes"):
            result["cached_block_hashes"] = sorted(engine.cache.cached_hashes())
    return result


class MockerPrefillHandler(MockerHandler, BasePrefillHandler):
    """Prefill worker: the prompt only; one output with the first token and transfer params."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        first: list[int] = []
        cached = 0
        prefill_ms = 0.0
        prompt: StepOutput | None = None  # the output with the prompt's log-probabilities
        async for out in self._run_engine(request):
            first.extend(out.token_ids)
            cached = out.cached_tokens
            if out.prompt_log_probs is not None:
                prompt = out
            if out.metrics is not None:
                prefill_ms = out.metrics.prefill_time_ms
            if out.finish_reason in ("cancelled", "error"):
                yield _engine_output(out)  # no hand-off
                return
        params = {
            PARAMS_KEY: {
                "request_id": request.request_id,
                "prompt_tokens": len(request.token_ids),
                "cached_tokens": cached,
                "block_size": self.engine.args.block_size,
                "first_token": first[0] if first else None,
                "prefill_time_ms": round(prefill_ms, 3),
            }
        }
        handoff = EngineOutput(
            token_ids=first[:1], finish_reason="length", disaggregated_params=params
        )
        if prompt is not None:
            handoff.prompt_log_probs = prompt.prompt_log_probs
            handoff.prompt_top_logprobs = prompt.prompt_top_logprobs
            handoff.prompt_ranks = prompt.prompt_ranks
        yield handoff


class MockerDecodeHandler(MockerHandler, BaseDecodeHandler):
    """Decode worker: continues requests prefilled elsewhere (or serves them whole)."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        params = (request.disaggregated_params or {}).get(PARAMS_KEY)
        transferred = isinstance(params, dict)
        if isinstance(params, dict):
            expected = params.get("prompt_tokens")
            if expected is not None and expected != len(request.token_ids):
                raise InvalidRequestError(
                    f"disaggregated_params are for a {expected}-token prompt, "
                    f"this request has {len(request.token_ids)} tokens"
                )
        async for out in self._run_engine(request, transferred=transferred):
            yield _engine_output(out)


class MockerEmbeddingHandler(BaseEmbeddingHandler):
    """Embedding worker on a `MockerEngine`: simulated prefill time, deterministic vectors."""

    engine: MockerEngine

    def __init__(
        self,
        engine: MockerEngine,
        *,
        spec: EmbeddingSpec,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(engine, spec=spec, name=name, context_length=engine.args.context_length)
        self.seed = seed

    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        rid = request.request_id or context.id
        # the engine refuses a prompt that fills its context (it must leave room for a token):
        # one that long is timed as one token shorter
        room = self.engine.args.context_length - 1
        async with asyncio.TaskGroup() as tg:  # a cancelled request aborts every input's run
            for i, ids in enumerate(request.token_ids):
                tg.create_task(self._prefill(f"{rid}-{i}", ids[:room]))
        size, dims = self.spec.size, request.dimensions
        return [mock_embedding(ids, size, dims, self.seed) for ids in request.token_ids]

    async def _prefill(self, request_id: str, token_ids: list[int]) -> None:
        async for _ in self.engine.generate(request_id, token_ids, max_tokens=1, prefill_only=True):
            pass

    async def stats(self, request: Any = None, context: Context | None = None) -> dict[str, Any]:
        """The `stats` endpoint, as the generating handlers serve it."""
        return _stats(self.engine, self.role, self.metrics, request)
