"""SGLang's worker handlers, on the core bases (`dynamo_core.handlers`).

- `WorkerHandler`: aggregated serving on one `sglang.Engine`.
- `PrefillHandler`: the prefill leg of a disaggregated request, the SGLang way. It picks a
  `bootstrap_room` (random 63-bit) and yields `disaggregated_params = {bootstrap_host,
  bootstrap_port, bootstrap_room}` *before* starting its own `async_generate`: SGLang's prefill
  engine waits for the decode engine to connect to its bootstrap server for that room, so the
  decode leg must start while the prefill leg runs (the frontend does that as soon as it sees
  the parameters, and cancels the decode leg at once if the prefill leg fails afterwards).
- `DecodeHandler`: runs `async_generate` with the same three values; SGLang's decode
  engine pulls the KV cache from the prefill engine and continues the sequence.

SGLang streams *cumulative* output: each item's `output_ids` holds every token so far (and the
list object is reused between items), unless the engine runs with
`--incremental-streaming-output`. `stream_new_tokens` turns either into new tokens only, at
once on receipt. `meta_info.finish_reason` (`{"type": "length", "length": n}`,
`{"type": "stop", "matched": id}`, `{"type": "abort", "message": ..., "status_code": ...}`),
`cached_tokens` and the log-probabilities are mapped to Dynamo's `EngineOutput` (the prompt's,
asked for with `logprob_start_len=0`, from `input_token_logprobs` / `input_top_logprobs`, once;
SGLang reports no ranks; `top_logprobs_num` is one count for both sides, the larger, each side
cut to its own); an abort from
the engine is an error (`InvalidRequestError` for status 400, `EngineError` otherwise).
Cancellation reaches `engine.tokenizer_manager.abort_request(rid)`; the Dynamo request id is
SGLang's `rid`.

A `guided_decoding` constraint becomes SGLang's own sampling params (`guided_params`):
`json_schema` (the schema as JSON text), `regex`, `ebnf` (a grammar); `json_object` is
`json_schema='{"type": "object"}'` and `choice` a regex alternation, as SGLang's OpenAI server
does. SGLang compiles them with its grammar backend (`--grammar-backend`, xgrammar by default);
with `--grammar-backend none` it refuses constrained requests itself, an abort with status 400
that reaches the client as `InvalidRequestError`.

- `EmbeddingHandler` (`dynamo_sglang.embedding`, an engine started with `--is-embedding`): every
  input of a request in one batch, `EmbeddingReqInput(input_ids=[[...], ...], rid=[...],
  dimensions=...)` through `engine.tokenizer_manager.generate_request(obj, None)`, the call
  SGLang's own `/v1/embeddings` makes for token ids (`Engine.async_encode` takes text only and
  is that same call with `text=`). Its one item is a list of `{"embedding": [...], "meta_info":
  {...}}`, one per input, in order. SGLang refuses an input (too long, `dimensions` the model
  cannot serve) with `ValueError`: the client's `InvalidRequestError`; anything else is an
  `EngineError` for this request only. A cancelled request cancels the batch, which SGLang
  aborts itself; `abort` also sends each input's `rid` to `abort_request`.

Written against SGLang 0.5.x (`sglang.srt.entrypoints.engine.Engine.async_generate`,
`sglang.srt.managers.tokenizer_manager.TokenizerManager`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dynamo_core.errors import EngineError, InvalidRequestError
from dynamo_core.handlers import (
    BaseDecodeHandler,
    BaseEmbeddingHandler,
    BasePrefillHandler,
    BaseWorkerHandler,
)
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.llm.protocol import (
    EngineOutput,
    FinishReason,
    GuidedDecoding,
    PreprocessedEmbeddingRequest,
    PreprocessedRequest,
)
from dynamo_core.runtime import Context
from dynamo_sglang.protocols import EngineLike

__all__ = [
    "BOOTSTRAP_KEYS",
    "DecodeHandler",
    "EmbeddingHandler",
    "PrefillHandler",
    "WorkerHandler",
    "embedding_request",
    "finish_reason",
    "guided_params",
    "prompt_logprobs",
    "sampling_params",
]

#: What a prefill worker hands to a decode worker (`disaggregated_params`).
BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def sampling_params(request: PreprocessedRequest) -> dict[str, Any]:
    """SGLang's `sampling_params` dict for a request (only what the request sets)."""
    stop = request.stop_conditions
    opts = request.sampling_options
    params: dict[str, Any] = {}
    if stop.max_tokens is not None:
        params["max_new_tokens"] = stop.max_tokens
    if stop.min_tokens:
        params["min_new_tokens"] = stop.min_tokens
    if stop.stop_token_ids:
        params["stop_token_ids"] = list(stop.stop_token_ids)
    if stop.ignore_eos:
        params["ignore_eos"] = True
    for name in _SAMPLING_FIELDS:
        value = getattr(opts, name)
        if value is not None:
            params[name] = value
    if opts.top_k is not None and opts.top_k > 0:
        params["top_k"] = opts.top_k
    if opts.seed is not None:
        params["sampling_seed"] = opts.seed
    if request.guided_decoding is not None:
        params.update(guided_params(request.guided_decoding))
    return params


def guided_params(guided: GuidedDecoding) -> dict[str, str]:
    """SGLang's sampling params for a constraint (exactly one of json_schema, regex, ebnf)."""
    kind = guided.kind
    if kind == "json":
        return {"json_schema": json.dumps(guided.json)}
    if kind == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if kind == "regex":
        assert guided.regex is not None
        return {"regex": guided.regex}
    if kind == "choice":
        return {"regex": guided.choice_regex()}
    assert guided.grammar is not None
    return {"ebnf": guided.grammar}


def finish_reason(reason: Any, eos_token_ids: list[int]) -> FinishReason | None:
    """SGLang's `meta_info["finish_reason"]` as Dynamo's; an abort raises."""
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind == "length":
        return "length"
    if kind == "abort":
        message = reason.get("message") if isinstance(reason, dict) else None
        status = reason.get("status_code") if isinstance(reason, dict) else None
        text = f"SGLang aborted the request: {message or 'no reason given'}"
        if status == 400:
            raise InvalidRequestError(text)
        raise EngineError(text)
    matched = reason.get("matched") if isinstance(reason, dict) else None
    if isinstance(matched, int) and matched in eos_token_ids:
        return "eos"
    return "stop"


def _pairs(top: Any) -> list[tuple[int, float]]:
    """One position's top log-probabilities, SGLang's `(logprob, token_id, text)` triples."""
    return [(int(t[1]), float(t[0])) for t in (top or []) if t is not None]


def prompt_logprobs(
    meta: dict[str, Any], prompt_len: int, top: int
) -> tuple[list[float | None], list[list[tuple[int, float]]]] | None:
    """The prompt's log-probabilities as `EngineOutput` carries them, from SGLang's
    `meta_info` (`input_token_logprobs`: a `(logprob, token_id, text)` per prompt token, the
    first's logprob None, with `logprob_start_len=0`; `input_top_logprobs`: None for the first
    token, then the `top` most likely as triples); None until they cover the prompt."""
    inputs = meta.get("input_token_logprobs") or ()
    tops = (meta.get("input_top_logprobs") or ()) if top else [None] * prompt_len
    if len(inputs) < prompt_len or len(tops) < prompt_len:
        return None
    values: list[float | None] = [None]
    values += [None if t[0] is None else float(t[0]) for t in inputs[1:prompt_len]]
    alternatives = [[], *(_pairs(t)[:top] for t in tops[1:prompt_len])]
    return values, alternatives


class WorkerHandler(BaseWorkerHandler):
    """Aggregated worker on an `sglang.Engine`."""

    engine: EngineLike
    supports_prompt_logprobs = True

    def __init__(
        self, engine: EngineLike, *, incremental_output: bool = False, name: str | None = None
    ) -> None:
        context = getattr(getattr(engine, "tokenizer_manager", None), "context_len", None)
        # the base class fills a missing max_tokens from the engine's context (SGLang's own
        # default would be 128 new tokens)
        super().__init__(
            engine, name=name, context_length=context if isinstance(context, int) else None
        )
        #: The engine streams deltas (`--incremental-streaming-output`), not cumulative output.
        self.incremental_output = incremental_output
        self._cached: dict[str, int] = {}

    def transfer_args(self, request: PreprocessedRequest) -> dict[str, Any]:
        """The bootstrap arguments of `async_generate` (none when aggregated)."""
        return {}

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        async for out in self.stream_new_tokens(request, self.transfer_args(request)):
            yield out

    async def stream_new_tokens(
        self, request: PreprocessedRequest, transfer: dict[str, Any]
    ) -> AsyncIterator[EngineOutput]:
        """Run `async_generate` and yield what each streamed item adds."""
        rid = request.request_id
        assert rid is not None  # set by `generate`
        logprobs = request.output_options.logprobs
        prompt_top = request.output_options.prompt_logprobs
        kwargs: dict[str, Any] = {}
        if logprobs is not None or prompt_top is not None:
            # one count for both sides in SGLang: each is cut to its own below
            kwargs["return_logprob"] = True
            kwargs["top_logprobs_num"] = max(logprobs or 0, prompt_top or 0)
        if prompt_top is not None:
            kwargs["logprob_start_len"] = 0  # from the first prompt token on
        seen = 0
        stream: Any = None
        try:
            stream = await self.engine.async_generate(
                input_ids=request.token_ids,
                sampling_params=sampling_params(request),
                stream=True,
                rid=rid,
                **transfer,
                **kwargs,
            )
            async for item in stream:
                ids = item.get("output_ids") or []
                meta = item.get("meta_info") or {}
                # slice now: SGLang mutates the list it streamed once the next step lands
                new = list(ids) if self.incremental_output else list(ids[seen:])
                start = 0 if self.incremental_output else seen
                seen += len(new)
                cached = meta.get("cached_tokens")
                if isinstance(cached, int):
                    self._cached[rid] = cached
                out = EngineOutput(
                    token_ids=new,
                    finish_reason=finish_reason(meta.get("finish_reason"), request.eos_token_ids),
                )
                if logprobs is not None and new:
                    chosen = (meta.get("output_token_logprobs") or [])[start : start + len(new)]
                    out.log_probs = [float(t[0]) for t in chosen]
                    if logprobs > 0:
                        tops = (meta.get("output_top_logprobs") or [])[start : start + len(new)]
                        out.top_logprobs = [
                            _pairs(top)[:logprobs] or [(int(c[1]), float(c[0]))]
                            for top, c in zip(tops, chosen, strict=False)
                        ]
                if prompt_top is not None:
                    found = prompt_logprobs(meta, len(request.token_ids), prompt_top)
                    if found is not None:
                        out.prompt_log_probs, out.prompt_top_logprobs = found
                        prompt_top = None
                yield out
        except ValueError as exc:  # SGLang's way of rejecting a request's input
            raise InvalidRequestError(f"SGLang rejected the request: {exc}") from exc
        finally:
            self._cached.pop(rid, None)
            if stream is not None:
                await stream.aclose()  # SGLang's generator ends (and cleans up) now, not at GC

    async def abort(self, request_id: str) -> None:
        self.engine.tokenizer_manager.abort_request(request_id)

    def cached_tokens(self, request: PreprocessedRequest) -> int | None:
        if request.request_id is None:
            return None
        return self._cached.get(request.request_id)


class PrefillHandler(WorkerHandler, BasePrefillHandler):
    """Prefill worker: hands out bootstrap parameters first, then prefills."""

    def __init__(
        self,
        engine: EngineLike,
        *,
        bootstrap_host: str,
        bootstrap_port: int,
        incremental_output: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(engine, incremental_output=incremental_output, name=name)
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port

    def new_transfer(self) -> dict[str, Any]:
        return {
            "bootstrap_host": self.bootstrap_host,
            "bootstrap_port": self.bootstrap_port,
            "bootstrap_room": secrets.randbits(63),
        }

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        transfer = self.new_transfer()
        # first, so that the decode leg starts now: SGLang's prefill waits for it
        yield EngineOutput(disaggregated_params=dict(transfer))
        async for out in self.stream_new_tokens(request, transfer):
            yield out


class DecodeHandler(WorkerHandler, BaseDecodeHandler):
    """Decode worker: continues requests prefilled by an SGLang prefill worker."""

    def __init__(
        self,
        engine: EngineLike,
        *,
        needs_bootstrap: bool = True,
        incremental_output: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(engine, incremental_output=incremental_output, name=name)
        #: A decode-mode engine cannot prefill: requests must carry bootstrap parameters.
        self.needs_bootstrap = needs_bootstrap

    def transfer_args(self, request: PreprocessedRequest) -> dict[str, Any]:
        params = request.disaggregated_params or {}
        if "bootstrap_room" not in params:
            if self.needs_bootstrap:
                raise InvalidRequestError(
                    "this SGLang decode worker serves only requests prefilled by an SGLang "
                    "prefill worker (the request has no bootstrap parameters)"
                )
            return {}
        host, port, room = (params.get(k) for k in BOOTSTRAP_KEYS)
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(room, int):
            raise InvalidRequestError(f"invalid SGLang bootstrap parameters: {params!r}")
        return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}


class EmbeddingHandler(BaseEmbeddingHandler):
    """Embedding worker on an `sglang.Engine` started with `--is-embedding`."""

    engine: EngineLike

    def __init__(
        self,
        engine: EngineLike,
        *,
        spec: EmbeddingSpec,
        name: str | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__(engine, spec=spec, name=name, context_length=context_length)
        #: Each request's per-input SGLang `rid`s, while SGLang may hold them (for `abort`).
        self._rids: dict[str, list[str]] = {}

    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        rid = request.request_id or context.id
        obj = embedding_request(request, rid)
        self._rids[rid] = list(obj.rid)
        results = self.engine.tokenizer_manager.generate_request(obj, None)
        try:
            answer = await anext(results, None)
        except ValueError as exc:  # SGLang's way of rejecting a request's input
            self._rids.pop(rid, None)
            raise InvalidRequestError(f"SGLang rejected the request: {exc}") from exc
        finally:
            await results.aclose()  # done (or failed): ends SGLang's generator now, not at GC
        # kept on a cancellation or an engine failure: the base class then calls `abort`
        self._rids.pop(rid, None)
        if answer is None:
            raise EngineError(f"SGLang ended embedding request {rid} without a result")
        items = answer if isinstance(answer, list) else [answer]
        return [_vector(item) for item in items]

    async def abort(self, request_id: str) -> None:
        for rid in self._rids.pop(request_id, ()):
            self.engine.tokenizer_manager.abort_request(rid)


def embedding_request(request: PreprocessedEmbeddingRequest, rid: str) -> Any:
    """SGLang's `EmbeddingReqInput` for every input of `request`: a batch (a list of lists, even
    of one, which SGLang answers with a list), one `rid` per input (`{rid}-{i}`), and
    `dimensions` when asked (a field only of the SGLang versions that shorten vectors)."""
    from sglang.srt.managers.io_struct import EmbeddingReqInput

    extra: dict[str, Any] = {}
    if request.dimensions is not None:
        extra["dimensions"] = request.dimensions
    return EmbeddingReqInput(
        input_ids=[list(ids) for ids in request.token_ids],
        rid=[f"{rid}-{i}" for i in range(len(request.token_ids))],
        **extra,
    )


def _vector(item: Any) -> list[float]:
    """The dense vector of one of SGLang's embedding outputs."""
    vector = item.get("embedding") if isinstance(item, dict) else None
    if not isinstance(vector, list):
        raise EngineError(
            f"SGLang returned no dense vector ({type(vector).__name__}): is the model an "
            "embedding model (not a reward, classification or sparse one)?"
        )
    return vector
