"""Base handler classes: the engine-agnostic half of every worker.

An engine package writes a small subclass:

    class DecodeHandler(BaseDecodeHandler):
        async def engine_generate(self, request, context):
            async for out in self.engine.async_generate(...):   # the engine's own API
                yield EngineOutput(token_ids=new_tokens(out), finish_reason=...)

        async def abort(self, request_id):
            self.engine.abort_request(request_id)

and serves `handler.generate` on its endpoint. The base class turns that into the behaviour every
engine must share (and that `dynamo_core.testing.conformance` checks):

- the request map is validated once into a `PreprocessedRequest` (bad input: `InvalidRequestError`);
  the request is never changed in place (with the `inproc` request plane it is the caller's own
  object): what the handler adds (its request id, the token budget) makes a new one;
- `max_tokens` is decided here, once for every engine: 0 is answered at once (finish reason
  `length`, no output) without calling the engine, unless the request asks for the prompt's
  log-probabilities (`prompt_logprobs`: the engine then prefills and its one token is not
  output); a missing one becomes what the engine's
  context leaves after the prompt (`context_length`, when the handler knows it; otherwise the
  engine's own rule applies); a prefill worker generates one token (`prefill_leg()`). So an
  engine's `engine_generate` gets `max_tokens` >= 1 or, with no context known, None;
- a cancelled request (caller gone, `context.stop_generating()`) ends the engine's generator and
  calls `abort(request_id)`, so the engine frees the sequence;
- `max_tokens`, `stop_token_ids`, end-of-sequence tokens (unless `ignore_eos`, and not before
  `min_tokens`) end the stream even when an engine over-generates, with the right finish reason;
- the last chunk always carries `finish_reason` and `usage` (prompt, completion, cached tokens);
- a request with `prompt_logprobs` gets them once, on or before the first output with tokens,
  one entry per prompt token (`EngineOutput.prompt_log_probs`); an engine that sends none, or
  the wrong number, fails the request with `EngineError` rather than leave them out;
- an engine exception reaches the caller as `EngineError` with the original type and message;
- per-request debug logs and counters (`metrics`).

An embedding worker's handler is a `BaseEmbeddingHandler`: its engine implements
`engine_embed` (one vector per input of a `PreprocessedEmbeddingRequest`), and the base checks
the request (inputs, `dimensions` against the model's `EmbeddingSpec`), the engine's answer (one
vector per input, of the promised length, finite) and packs it into one `EmbeddingOutput`. It
is served as `handler.generate`, as every other role, so the role module reads the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from msgspec.structs import replace

from dynamo_core.errors import DynamoError, EngineError, InvalidRequestError
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.llm.protocol import (
    EmbeddingOutput,
    EngineOutput,
    PreprocessedEmbeddingRequest,
    PreprocessedRequest,
    Usage,
    pack_embedding,
)
from dynamo_core.runtime import Context

__all__ = [
    "BaseDecodeHandler",
    "BaseEmbeddingHandler",
    "BasePrefillHandler",
    "BaseWorkerHandler",
    "HandlerMetrics",
]


@dataclass
class HandlerMetrics:
    requests_total: int = 0
    inflight: int = 0
    output_tokens_total: int = 0
    prompt_tokens_total: int = 0
    cancelled_total: int = 0
    errors_total: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class BaseWorkerHandler(ABC):
    """An aggregated worker: prefill and decode in one engine."""

    #: The role shown in logs and metrics.
    role = "worker"
    #: Whether the engine returns the prompt's log-probabilities (`prompt_logprobs`); a request
    #: for them to a handler that does not is refused (`InvalidRequestError`, a 400 for the
    #: client), never answered without them. `prompt_logprobs_refusal` says why.
    supports_prompt_logprobs: ClassVar[bool] = False
    prompt_logprobs_refusal: ClassVar[str] = "this engine does not return them"

    def __init__(
        self, engine: Any = None, *, name: str | None = None, context_length: int | None = None
    ) -> None:
        self.engine = engine
        self.metrics = HandlerMetrics()
        self.log = logging.getLogger(name or f"dynamo.{type(self).__module__}.{self.role}")
        self.context_length = context_length
        """The engine's context (prompt and output tokens), when known: what a request without
        `max_tokens` may generate is what it leaves after the prompt (`token_budget`)."""

    # -- what an engine implements ---------------------------------------------------------

    @abstractmethod
    def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        """Run `request` on the engine, yielding new tokens per chunk (never cumulative)."""

    async def abort(self, request_id: str) -> None:  # noqa: B027 - engines override when they can
        """Tell the engine to drop `request_id` (called when the caller cancels)."""

    def cached_tokens(self, request: PreprocessedRequest) -> int | None:
        """Prompt tokens served from the engine's prefix cache, when the engine reports it."""
        return None

    # -- what the endpoint serves ----------------------------------------------------------

    async def generate(
        self, request: Any, context: Context
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The endpoint handler: `PreprocessedRequest` map in, `EngineOutput` maps out."""
        req = self.parse_request(request)
        if req.request_id is None:
            req = replace(req, request_id=context.id)
        budget = self.token_budget(req)
        if budget != req.stop_conditions.max_tokens:
            req = replace(req, stop_conditions=replace(req.stop_conditions, max_tokens=budget))
        # close the inner generator with ours, so a caller's early close aborts the engine
        # request now, not when the event loop gets round to finalizing it
        async with contextlib.aclosing(self._run(req, context)) as outputs:
            async for out in outputs:
                yield out

    def parse_request(self, request: Any) -> PreprocessedRequest:
        try:
            req = PreprocessedRequest.from_wire(request)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid request: {exc}") from None
        if not req.token_ids:
            raise InvalidRequestError("invalid request: token_ids is empty")
        max_tokens = req.stop_conditions.max_tokens
        if max_tokens is not None and max_tokens < 0:
            raise InvalidRequestError("invalid request: max_tokens must be >= 0")
        if req.output_options.prompt_logprobs is not None and not self.supports_prompt_logprobs:
            raise InvalidRequestError(
                "the prompt's log-probabilities (prompt_logprobs, or echo with logprobs) are "
                f"not served by this worker: {self.prompt_logprobs_refusal}"
            )
        return req

    def token_budget(self, req: PreprocessedRequest) -> int | None:
        """The most tokens `req` may generate: its `max_tokens`, else what the context leaves
        after the prompt (None when the context is unknown, or the prompt fills it: the engine's
        own rule, or its refusal, applies)."""
        max_tokens = req.stop_conditions.max_tokens
        if max_tokens is not None or self.context_length is None:
            return max_tokens
        room = self.context_length - len(req.token_ids)
        return room if room > 0 else None

    async def _run(
        self, req: PreprocessedRequest, context: Context
    ) -> AsyncGenerator[dict[str, Any], None]:
        m = self.metrics
        m.requests_total += 1
        m.prompt_tokens_total += len(req.token_ids)
        stop = req.stop_conditions
        max_tokens = stop.max_tokens
        prompt_pending = req.output_options.prompt_logprobs is not None
        engine_req = req
        if max_tokens == 0:
            if not prompt_pending:  # nothing to generate: the engine is not asked (some refuse 0)
                yield EngineOutput(finish_reason="length", usage=self._usage(req, 0)).to_wire()
                return
            # the prompt's log-probabilities come from the engine's prefill: it runs for one
            # token, which is not output (vLLM's server does the same for echo with 0 tokens)
            engine_req = replace(req, stop_conditions=replace(stop, max_tokens=1))
        m.inflight += 1
        request_id = req.request_id or context.id
        min_tokens = stop.min_tokens or 0
        stop_ids = set(stop.stop_token_ids or ())
        eos_ids = set() if stop.ignore_eos else set(req.eos_token_ids)
        emitted = 0
        finished = False
        t0 = time.monotonic()
        ttft: float | None = None
        gen = self.engine_generate(engine_req, context)
        try:
            async for out in gen:
                if context.is_stopped():
                    raise asyncio.CancelledError
                if prompt_pending:
                    if out.prompt_log_probs is not None:
                        _check_prompt_logprobs(out, len(req.token_ids))
                        prompt_pending = False
                    elif not out.token_ids and out.finish_reason is None:
                        if out.disaggregated_params is not None or out.text:
                            yield out.to_wire()  # an early output (transfer parameters)
                        continue
                    elif out.finish_reason not in ("cancelled", "error"):
                        raise EngineError(
                            "the engine returned no log-probabilities for the prompt "
                            "(prompt_logprobs was asked for)"
                        )
                reason = out.finish_reason
                tokens = out.token_ids
                # engine-agnostic stop conditions, in token order
                for i, tok in enumerate(tokens):
                    if emitted + i + 1 > min_tokens and (tok in stop_ids or tok in eos_ids):
                        # a stop token is not part of the output; an eos token is (as in vLLM)
                        tokens = tokens[:i] if tok in stop_ids else tokens[: i + 1]
                        reason = "stop" if tok in stop_ids else "eos"
                        break
                if max_tokens is not None:
                    room = max_tokens - emitted
                    if len(tokens) > room:
                        tokens, reason = tokens[:room], "length"
                    elif len(tokens) == room and reason is None:
                        reason = "length"
                if len(tokens) != len(out.token_ids):
                    _truncate_logprobs(out, len(tokens))
                out.token_ids = tokens
                emitted += len(tokens)
                if ttft is None and tokens:
                    ttft = time.monotonic() - t0
                if reason is not None:
                    out.usage = self._usage(req, emitted)
                    finished = True
                    if out.finish_reason is None:
                        # we stopped the sequence, not the engine: free it there too
                        await self._abort_quietly(request_id)
                    out.finish_reason = reason
                    yield out.to_wire()
                    break
                if (
                    tokens
                    or out.disaggregated_params is not None
                    or out.text
                    or out.prompt_log_probs is not None
                ):
                    yield out.to_wire()
            if not finished:
                # the engine ended without saying why
                reason = "length" if max_tokens is not None and emitted >= max_tokens else "stop"
                yield EngineOutput(finish_reason=reason, usage=self._usage(req, emitted)).to_wire()
        except (asyncio.CancelledError, GeneratorExit):
            m.cancelled_total += 1
            self.log.debug("request %s cancelled after %d tokens", request_id, emitted)
            await self._abort_quietly(request_id)
            raise
        except DynamoError:
            m.errors_total += 1
            await self._abort_quietly(request_id)
            raise
        except Exception as exc:
            m.errors_total += 1
            await self._abort_quietly(request_id)
            self.log.exception("engine failed on request %s", request_id)
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            m.inflight -= 1
            m.output_tokens_total += emitted
            await _aclose(gen)
            self.log.debug(
                "request %s: %d prompt, %d output tokens, ttft %s, %.3fs",
                request_id,
                len(req.token_ids),
                emitted,
                f"{ttft:.3f}s" if ttft is not None else "-",
                time.monotonic() - t0,
            )

    def _usage(self, req: PreprocessedRequest, completion: int) -> Usage:
        return Usage(
            prompt_tokens=len(req.token_ids),
            completion_tokens=completion,
            cached_tokens=self.cached_tokens(req),
        )

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self.abort(request_id))
        except Exception:
            self.log.exception("aborting request %s failed", request_id)


class BaseDecodeHandler(BaseWorkerHandler):
    """The decode role: continues a request whose prompt a prefill worker processed.

    The request carries `disaggregated_params` (from the prefill worker's first output); an
    engine's `engine_generate` passes them to the engine. A request without them is served
    aggregated, so a decode worker also works alone.
    """

    role = "decode"


class BasePrefillHandler(BaseWorkerHandler):
    """The prefill role: processes the prompt and hands the KV cache over.

    `engine_generate` yields, as early as the engine allows, an `EngineOutput` whose
    `disaggregated_params` tell a decode worker how to fetch the KV cache (sglang's bootstrap
    host/port/room, vllm's `kv_transfer_params`, tensorrt-llm's `DisaggregatedParams`). The
    frontend starts the decode leg as soon as it has them.
    """

    role = "prefill"

    def parse_request(self, request: Any) -> PreprocessedRequest:
        """Whatever the request says, a prefill worker computes the prompt and one token."""
        return super().parse_request(request).prefill_leg()


class BaseEmbeddingHandler(ABC):
    """An embedding worker: vectors for token ids, one answer per request."""

    role = "embedding"

    def __init__(
        self,
        engine: Any = None,
        *,
        spec: EmbeddingSpec,
        name: str | None = None,
        context_length: int | None = None,
    ) -> None:
        self.engine = engine
        self.spec = spec
        """What the engine makes (the card's): vector size, whether `dimensions` may shorten."""
        self.metrics = HandlerMetrics()
        self.log = logging.getLogger(name or f"dynamo.{type(self).__module__}.{self.role}")
        self.context_length = context_length

    # -- what an engine implements ---------------------------------------------------------

    @abstractmethod
    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        """One vector per input of `request`, in order, each `request.dimensions` long (when
        set) or `spec.size`. Cancelled when the caller goes away."""

    async def abort(self, request_id: str) -> None:  # noqa: B027 - engines override when they can
        """Tell the engine to drop `request_id` (called when the caller cancels)."""

    # -- what the endpoint serves ----------------------------------------------------------

    async def generate(
        self, request: Any, context: Context
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The endpoint handler: `PreprocessedEmbeddingRequest` map in, one `EmbeddingOutput`
        map out."""
        req = self.parse_request(request)
        if req.request_id is None:
            req = replace(req, request_id=context.id)
        request_id = req.request_id or context.id
        m = self.metrics
        m.requests_total += 1
        m.prompt_tokens_total += req.prompt_tokens()
        m.inflight += 1
        t0 = time.monotonic()
        try:
            vectors = await self.engine_embed(req, context)
            output = self._output(req, vectors)
        except (asyncio.CancelledError, GeneratorExit):
            m.cancelled_total += 1
            await _abort_quietly(self, request_id)
            raise
        except DynamoError:
            m.errors_total += 1
            raise
        except Exception as exc:
            m.errors_total += 1
            await _abort_quietly(self, request_id)
            self.log.exception("engine failed on embedding request %s", request_id)
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            m.inflight -= 1
        self.log.debug(
            "request %s: %d inputs, %d tokens, %.3fs",
            request_id,
            len(req.token_ids),
            req.prompt_tokens(),
            time.monotonic() - t0,
        )
        yield output.to_wire()

    def parse_request(self, request: Any) -> PreprocessedEmbeddingRequest:
        try:
            req = PreprocessedEmbeddingRequest.from_wire(request)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid request: {exc}") from None
        if not req.token_ids or not all(req.token_ids):
            raise InvalidRequestError("invalid request: an input has no token ids")
        limit = self.context_length
        if limit is not None:
            longest = max(len(ids) for ids in req.token_ids)
            if longest > limit:
                raise InvalidRequestError(
                    f"an input has {longest} tokens; this model takes at most {limit}"
                )
        if req.dimensions is not None:
            why = self.spec.check_dimensions(req.dimensions)
            if why is not None:
                raise InvalidRequestError(why)
        return req

    def _output(
        self, req: PreprocessedEmbeddingRequest, vectors: list[Sequence[float]]
    ) -> EmbeddingOutput:
        """The engine's vectors, checked against what was asked, packed for the wire."""
        if len(vectors) != len(req.token_ids):
            raise EngineError(
                f"the engine returned {len(vectors)} vectors for {len(req.token_ids)} inputs"
            )
        size = req.dimensions or self.spec.size
        packed = []
        for vector in vectors:
            if len(vector) != size:
                raise EngineError(f"the engine returned a vector of {len(vector)}, not {size}")
            if not math.isfinite(sum(vector)):  # a NaN or infinity anywhere makes the sum one
                raise EngineError("the engine returned a vector with a NaN or infinite value")
            packed.append(pack_embedding(vector))
        return EmbeddingOutput(embeddings=packed, prompt_tokens=req.prompt_tokens())


async def _abort_quietly(handler: BaseEmbeddingHandler, request_id: str) -> None:
    try:
        await asyncio.shield(handler.abort(request_id))
    except Exception:
        handler.log.exception("aborting request %s failed", request_id)


def _check_prompt_logprobs(out: EngineOutput, prompt_len: int) -> None:
    """The prompt's log-probabilities an engine returned: one entry per prompt token."""
    for name in ("prompt_log_probs", "prompt_top_logprobs", "prompt_ranks"):
        values = getattr(out, name)
        if values is not None and len(values) != prompt_len:
            raise EngineError(
                f"the engine returned {len(values)} {name} for a {prompt_len}-token prompt"
            )


def _truncate_logprobs(out: EngineOutput, n: int) -> None:
    if out.log_probs is not None:
        out.log_probs = out.log_probs[:n]
    if out.top_logprobs is not None:
        out.top_logprobs = out.top_logprobs[:n]


async def _aclose(gen: AsyncIterator[Any]) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # an engine generator that fails while closing
            logging.getLogger("dynamo.handlers").debug(
                "closing engine stream failed", exc_info=True
            )
