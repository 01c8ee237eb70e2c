"""The OpenAI service: routes, preprocessing, routing, streaming, detokenizing, migration.

Per request: validate the body (OpenAI error shape on bad input), render the chat template,
tokenize, check the context, build the `PreprocessedRequest` (a struct the request plane encodes
once; its prefill leg, decode leg and migration continuation are its named derivations, and it is
never changed after), pass admission control (a queue, then 503 with Retry-After, when every
worker is busy), pick a worker (the model's router; a request carrying `X-Dynamo-Session-ID`
goes to its session's worker, `dynamo_core.router.affinity`), and stream its `EngineOutput` maps
back.

Large requests (bodies over `OFFLOAD_BODY_BYTES`) are templated and tokenized in a thread pool,
never on the event loop, and a prompt is only tokenized as far as the model's context can hold
(`Tokenizer.encode_within`): a 6 MB prompt for a 2k-token model is refused after a few KB. The first batch of output is awaited
before any HTTP header goes out, so errors a worker reports at once (bad request, no instance)
become proper HTTP errors; later failures end the stream with an error event.

Streaming cost per token is a dict lookup, an incremental detokenizer step and one bytes join:
items that arrive together (the request plane batches them) leave in one SSE write.

What the output goes through is decided once per request (`frontend.structured.plan_chat`): a
structured-output constraint for the engine, and the model's tool-call/reasoning parser (or a
forced-call parser) per choice; a request that needs none pays nothing for them. `n` choices are
`n` engine requests whose batches interleave (`frontend.choices`). Chat Completions, Completions
and the Responses API (`frontend.responses`) share this path; they differ in their formatter.
Embeddings (`frontend.embeddings`) are one unary request per OpenAI request, to a model whose
card has type `embedding`; a model is only served on the routes its card's type names.

Off the happy path (ARCHITECTURE.md, "Off the happy path"):

- *Migration*: when the worker's stream breaks mid-way (it died, stopped answering heartbeats,
  or shut down past its grace period), the request is re-sent to another instance with the
  tokens generated so far appended to the prompt (`generated_tokens` says how many, so an engine
  that seeds per request continues token-exactly), up to the migration limit: the smaller of
  `--migration-limit` (default 3) and the model card's. Streaming and whole responses alike;
  the client sees one unbroken answer.
- *Retry elsewhere*: a worker that fails before sending anything (unreachable, draining, its
  auth token differs) is skipped at once, without counting against that limit: nothing was
  generated, nothing reached the client.
- *Errors to clients* never carry internal addresses: failures of the request plane become a
  generic 503 (or an error event mid-stream), and the detail goes to the log. An auth mismatch
  between frontend and worker is the operator's problem: logged, 503, never 401.
- *Shutdown*: a stream still open when the HTTP server's grace runs out ends with an error
  event and `data: [DONE]` (`StreamingResponse.on_shutdown`), never a cut body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

import msgspec

from dynamo_core import errors
from dynamo_core._memory import Trimmer
from dynamo_core.args import DEFAULT_MIGRATION_LIMIT
from dynamo_core.frontend import embeddings
from dynamo_core.frontend.choices import RESTART, Batches, ChoiceOutput, Merged, Single
from dynamo_core.frontend.messages import check_messages
from dynamo_core.frontend.metrics import FrontendMetrics
from dynamo_core.frontend.models import ModelEntry, ModelManager, PrefillPool
from dynamo_core.frontend.openai import (
    ChatCompletionRequest,
    ChatStreamFormatter,
    ChoiceResult,
    CompletionRequest,
    CompletionStreamFormatter,
    ParamError,
    error_body,
    param_of,
    usage_dict,
)
from dynamo_core.frontend.responses import (
    ResponsesFormatter,
    ResponsesRequest,
    ResponseStore,
    prepare_responses,
)
from dynamo_core.frontend.structured import NO_PLAN, OutputPlan, plan_chat, plan_completion
from dynamo_core.http import Final, Request, Response, StreamingResponse
from dynamo_core.llm.model_card import ModelType
from dynamo_core.llm.parsers import Event
from dynamo_core.llm.protocol import (
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_core.llm.tokenizer import ASYNC_ENCODE_THRESHOLD
from dynamo_core.router import Route, RouterConfig
from dynamo_core.router.affinity import SESSION_HEADER
from dynamo_core.runtime import Context, DistributedRuntime

__all__ = ["OpenAIService"]

log = logging.getLogger("dynamo.frontend")

#: A worker's stream ended by one of these can be continued (or, if nothing came yet, retried)
#: on another instance.
_MIGRATABLE = (
    errors.ConnectionLostError,
    errors.InstanceNotFoundError,
    errors.EndpointNotFoundError,
    errors.CancelledError,  # the worker shut down before finishing
    errors.DrainingError,  # it refused the request: shutting down
    errors.AuthenticationError,  # our DYN_AUTH_TOKEN differs from its own
    errors.ProtocolError,
)
#: Failures of the request plane: the message names internal hosts and ports, for the log only.
_INTERNAL = (*_MIGRATABLE, errors.BackendUnavailableError)
_UNAVAILABLE = "no worker could serve the request right now; try again"
_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)
_Input = TypeVar("_Input")
_Prepared = TypeVar("_Prepared")
#: Requests with a body larger than this are templated and tokenized in the preprocessing pool
#: (a thread hop costs about what tokenizing this much text does).
OFFLOAD_BODY_BYTES = ASYNC_ENCODE_THRESHOLD


def _error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> Response:
    return Response(error_body(message, kind, code, param), status=status)


def _public(exc: errors.DynamoError) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) to show a client for `exc`: request-plane
    failures become a generic 503 (their messages name internal addresses: log them instead)."""
    if isinstance(exc, _INTERNAL):
        return 503, "service_unavailable", _UNAVAILABLE
    status = 500 if isinstance(exc, errors.HandlerError) else exc.http_status
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        503: "service_unavailable",
    }.get(status, "internal_error")
    return status, kind, str(exc)


_ID_PREFIXES = ("/v1/models/", "/v1/responses/")


def _split_id(path: str) -> tuple[str, str]:
    """``("/v1/models/", "org/model")`` for ``/v1/models/org%2Fmodel``; ``("", "")`` for a path
    that names no object."""
    for prefix in _ID_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix, unquote(path[len(prefix) :])
    return "", ""


def _error_for(exc: errors.DynamoError, request_id: str) -> Response:
    """The error response for `exc`; what the client is not shown is logged."""
    status, kind, message = _public(exc)
    if message != str(exc):
        log.warning("request %s failed: %s", request_id, exc)
    return _error(status, message, kind)


class OpenAIService:
    def __init__(
        self,
        runtime: DistributedRuntime,
        *,
        namespace: str,
        router: RouterConfig | None = None,
        migration_limit: int = DEFAULT_MIGRATION_LIMIT,
        metrics: FrontendMetrics | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        responses_store: ResponseStore | None = None,
    ) -> None:
        """`tool_call_parser`, `reasoning_parser`: override every model card's (``none``: no
        parsing; None: each card's own). `responses_store`: where `/v1/responses` keeps
        responses for `previous_response_id` (default: in memory, 1024 responses, 64 MiB)."""
        self.runtime = runtime
        self.models = ModelManager(
            runtime,
            namespace,
            router,
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
        )
        self.migration_limit = migration_limit
        self.metrics = metrics or FrontendMetrics()
        self.responses_store = ResponseStore() if responses_store is None else responses_store
        # large prompts are prepared here, off the event loop; the work per request is bounded
        # by the model's context length (`Tokenizer.encode_within`)
        self._preprocess = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="dynamo-preprocess"
        )
        self._trimmer = Trimmer()
        self._routes = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/health"): self.health,
            ("GET", "/live"): self.live,
            ("GET", "/metrics"): self.prometheus,
        }
        #: routes whose path ends with an id: (method, prefix) -> handler(request, id)
        self._id_routes: dict[tuple[str, str], Callable[[Request, str], Awaitable[Response]]] = {
            ("GET", "/v1/models/"): self.retrieve_model,
            ("GET", "/v1/responses/"): self.retrieve_response,
            ("DELETE", "/v1/responses/"): self.delete_response,
        }
        methods: dict[str, list[str]] = {}
        for m, path in [*self._routes, *self._id_routes]:
            methods.setdefault(path, []).extend([m, "HEAD"] if m == "GET" else [m])
        self._allowed = {path: ", ".join(ms) for path, ms in methods.items()}

    async def start(self) -> None:
        await self.models.start()

    async def close(self) -> None:
        self._preprocess.shutdown(wait=False, cancel_futures=True)
        await self.models.close()

    async def handle(self, request: Request) -> Response | StreamingResponse:
        path = request.path.rstrip("/") or "/"
        method = "GET" if request.method == "HEAD" else request.method  # the server drops the body
        route = self._routes.get((method, path))
        if route is not None:
            return await route(request)
        prefix, ident = _split_id(path)
        if prefix:
            id_route = self._id_routes.get((method, prefix))
            if id_route is not None:
                return await id_route(request, ident)
        allowed = self._allowed.get(prefix or path)
        if allowed is not None:
            response = _error(
                405, f"{request.method} is not allowed on {request.path}", "invalid_request_error"
            )
            response.headers.append(("allow", allowed))
            return response
        return _error(404, f"no route {request.method} {request.path}", "not_found_error")

    # -- simple routes --------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "dynamo"}
            for m in self.models.listed()
        ]
        return Response(msgspec.json.encode({"object": "list", "data": data}))

    async def retrieve_model(self, request: Request, model: str) -> Response:
        entry = self.models.get(model)
        if entry is None or not entry.live_instances():
            return _error(
                404,
                f"The model '{model}' does not exist",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return Response(
            msgspec.json.encode(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": entry.created,
                    "owned_by": "dynamo",
                }
            )
        )

    async def health(self, request: Request) -> Response:
        models = self.models.listed()
        return Response(
            msgspec.json.encode(
                {
                    "status": "healthy",
                    "models": [m.name for m in models],
                    "instances": {m.name: len(m.live_instances()) for m in models},
                }
            )
        )

    async def live(self, request: Request) -> Response:
        return Response(b'{"status":"live"}')

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), content_type="text/plain; version=0.0.4")

    # -- completions ----------------------------------------------------------------------

    def _check(self, request: Request, kind: type[_Body]) -> tuple[_Body, ModelEntry] | Response:
        """The validated body and its model, or the error response (what both routes share)."""
        body = _decode(request.body, kind)
        if isinstance(body, Response):
            return body
        try:
            body.check_unsupported()
        except ParamError as exc:
            return _param_error(exc)
        entry = self.models.get(body.model)
        if entry is None:
            return _model_not_found(body.model, self.models.retired)
        wanted: ModelType = "chat" if kind is ChatCompletionRequest else "completions"
        if not entry.card.serves(wanted):
            return _not_served(entry, wanted)
        return body, entry

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        checked = self._check(request, ChatCompletionRequest)
        if isinstance(checked, Response):
            return checked
        body, entry = checked
        try:
            check_messages(body.messages)
            plan = plan_chat(body, entry.parsers)
        except ParamError as exc:
            return _param_error(exc)
        token_ids = await self._off_loop_if_large(request, _chat_prompt, entry, body)
        if isinstance(token_ids, Response):
            return token_ids
        fmt = ChatStreamFormatter(body.model, body.choices())
        session = request.headers.get(SESSION_HEADER)
        return await self._generate(entry, body, token_ids, fmt, "chat_completions", plan, session)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        checked = self._check(request, CompletionRequest)
        if isinstance(checked, Response):
            return checked
        body, entry = checked
        try:
            plan = plan_completion(body)
        except ParamError as exc:
            return _param_error(exc)
        prepared = await self._off_loop_if_large(request, _completion_prompt, entry, body)
        if isinstance(prepared, Response):
            return prepared
        token_ids, echo = prepared
        fmt = CompletionStreamFormatter(body.model, echo, body.choices())
        session = request.headers.get(SESSION_HEADER)
        return await self._generate(entry, body, token_ids, fmt, "completions", plan, session)

    # -- the Responses API --------------------------------------------------------------

    async def responses(self, request: Request) -> Response | StreamingResponse:
        body = _decode(request.body, ResponsesRequest)
        if isinstance(body, Response):
            return body
        entry = self.models.get(body.model)
        if entry is None:
            return _model_not_found(body.model, self.models.retired)
        if not entry.card.serves("chat"):
            return _not_served(entry, "chat")
        earlier = None
        previous = body.previous_response_id
        if previous is not None:
            earlier = await self.responses_store.conversation(previous)
            if earlier is None:
                return _error(
                    404, f"Previous response with id '{previous}' not found.",
                    "invalid_request_error", "previous_response_not_found", "previous_response_id",
                )  # fmt: skip
        try:
            call = prepare_responses(body, entry.parsers, earlier)
        except ParamError as exc:
            return _param_error(exc)
        token_ids = await self._off_loop_if_large(request, _responses_prompt, entry, call)
        if isinstance(token_ids, Response):
            return token_ids
        fmt = ResponsesFormatter(body, call, self.responses_store)
        session = request.headers.get(SESSION_HEADER)
        return await self._generate(entry, body, token_ids, fmt, "responses", call.plan, session)

    # -- embeddings -----------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        body = _decode(request.body, embeddings.EmbeddingRequest)
        if isinstance(body, Response):
            return body
        entry = self.models.get(body.model)
        if entry is None:
            return _model_not_found(body.model, self.models.retired)
        if not entry.card.serves("embedding"):
            return _not_served(entry, "embedding")
        try:
            embeddings.check_model(body, entry.card)
            inputs = await self._off_loop_if_large(
                request, embeddings.embedding_inputs, entry, body
            )
        except ParamError as exc:
            return _param_error(exc)
        t0 = time.monotonic()
        model, m = entry.name, self.metrics
        try:
            await entry.router.admit()
        except errors.OverloadedError as exc:
            m.requests.labels(model, "embeddings", "unary", "overloaded").inc()
            return _overloaded(exc)
        wire = embeddings.wire_request(entry, body, inputs)
        prompt_tokens = wire.prompt_tokens()
        m.input_tokens.labels(model).observe(prompt_tokens)
        m.inflight.labels(model).inc()
        status = "cancelled"  # until it ends, one way or the other
        limit = min(self.migration_limit, entry.card.migration_limit)
        ctx = Context(wire.request_id)
        try:
            vectors = await embeddings.embed_on_workers(entry, wire, ctx, limit, _MIGRATABLE)
            status = "success"
        except errors.DynamoError as exc:
            status = "error"
            return _error_for(exc, ctx.id)
        finally:
            m.ended(model, "embeddings", "unary", status, 0, t0)
        return Response(
            embeddings.embeddings_body(body.model, vectors, body.encoding_format, prompt_tokens)
        )

    async def retrieve_response(self, request: Request, response_id: str) -> Response:
        stored = await self.responses_store.response(response_id)
        if stored is None:
            return _response_not_found(response_id)
        return Response(stored)

    async def delete_response(self, request: Request, response_id: str) -> Response:
        if not await self.responses_store.delete(response_id):
            return _response_not_found(response_id)
        return Response(
            msgspec.json.encode({"id": response_id, "object": "response", "deleted": True})
        )

    async def _off_loop_if_large(
        self,
        request: Request,
        prepare: Callable[[ModelEntry, _Input], _Prepared],
        entry: ModelEntry,
        body: _Input,
    ) -> _Prepared:
        """`prepare(entry, body)`: inline for a small request, in the preprocessing pool for a
        large one, so that templating and tokenizing a long prompt never stalls the loop."""
        if len(request.body) <= OFFLOAD_BODY_BYTES:
            return prepare(entry, body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._preprocess, self._prepare, prepare, entry, body)

    def _prepare(
        self, prepare: Callable[[ModelEntry, _Input], _Prepared], entry: ModelEntry, body: _Input
    ) -> _Prepared:
        """In the preprocessing pool: `prepare`, then give its memory back after a burst."""
        self._trimmer.started()
        try:
            return prepare(entry, body)
        finally:
            self._trimmer.ended()

    async def _generate(
        self,
        entry: ModelEntry,
        body: _Sampled,
        token_ids: list[int],
        fmt: _Format,
        endpoint: str,
        plan: OutputPlan = NO_PLAN,
        session: str | None = None,
    ) -> Response | StreamingResponse:
        t0 = time.monotonic()
        context_length = entry.card.context_length
        prompt_len = len(token_ids)
        requested = body.requested_max_tokens()
        if prompt_len >= context_length:
            return _context_error(context_length, prompt_len, requested)
        max_tokens = requested if requested is not None else context_length - prompt_len
        if prompt_len + max_tokens > context_length:
            return _context_error(context_length, prompt_len, max_tokens)
        logprobs = body.logprobs_count()
        prompt_logprobs = body.prompt_logprobs_count()
        preq = _preprocessed(entry, body, token_ids, max_tokens, logprobs, prompt_logprobs, fmt.id)
        if plan.guided is not None:
            preq = msgspec.structs.replace(preq, guided_decoding=plan.guided)
        n = body.choices()
        model = entry.name
        kind = "stream" if body.stream else "unary"
        try:
            await entry.router.admit()  # once per request: its choices go together
        except errors.OverloadedError as exc:
            self.metrics.requests.labels(model, endpoint, kind, "overloaded").inc()
            return _overloaded(exc)
        restartable = not body.stream
        gens = [
            self._engine_batches(entry, _choice_request(preq, i, n), Context(_choice_id(fmt.id, i, n)), session, restartable)
            for i in range(n)
        ]  # fmt: skip
        try:
            firsts = [await _first_batch(gens[0])] if n == 1 else await _first_batches(gens)
        except errors.DynamoError as exc:
            shed = isinstance(exc, errors.OverloadedError)  # by a router service
            self.metrics.requests.labels(
                model, endpoint, kind, "overloaded" if shed else "error"
            ).inc()
            if isinstance(exc, errors.OverloadedError):
                return _overloaded(exc)
            return _error_for(exc, fmt.id)
        source = Single(gens[0], firsts[0]) if n == 1 else Merged(gens, firsts)
        stops = body.stop_strings()
        min_tokens = body.extension("min_tokens") or 0
        echoed = len(fmt.echo) if isinstance(fmt, CompletionStreamFormatter) else 0
        # completions with echo and logprobs: the prompt's tokens lead the choice's logprobs,
        # and their offsets count from the prompt's first token
        echo_logprobs = bool(echoed) and logprobs is not None
        if echo_logprobs:
            echoed = 0
        new_parser = plan.new_parser

        def output(index: int) -> ChoiceOutput:
            return ChoiceOutput(
                entry,
                stops,
                logprobs,
                prompt=token_ids,
                min_tokens=min_tokens,
                text_offset=echoed,
                index=index,
                parser=new_parser() if new_parser is not None else None,
                skip_special_tokens=plan.skip_special_tokens,
                prompt_logprobs=prompt_logprobs,
                echo_logprobs=echo_logprobs,
            )

        m = self.metrics
        m.input_tokens.labels(model).observe(prompt_len)
        if plan.structured is not None:
            m.structured_requests.labels(model, plan.structured).inc()
        run = _Run(entry, fmt, source, output, prompt_len, t0, endpoint)
        if body.stream:
            stream = self._sse(run, body.include_usage())
            return StreamingResponse(stream, on_shutdown=lambda: _shutdown_event(fmt))
        return await self._whole(run)

    async def _engine_batches(
        self,
        entry: ModelEntry,
        preq: PreprocessedRequest,
        ctx: Context,
        session: str | None,
        restartable: bool = False,
    ) -> Batches:
        """Batches of engine output maps, moving to another instance if a worker breaks.

        A worker that fails before sending anything (it died, discovery has not noticed yet)
        is simply skipped: nothing reached the client. One that fails mid-stream is replaced
        up to the migration limit, continuing from the tokens generated so far; except under
        a structured-output constraint, which an engine would start again from its beginning
        after the prefix (invalid JSON): a `restartable` (whole) request starts again from
        scratch on another worker (`RESTART` tells the consumer), a stream fails with a
        retryable `NotResumableError`.
        """
        limit = min(self.migration_limit, entry.card.migration_limit)
        request = preq
        prefill: _PrefillLeg | None = None
        pool = self.models.prefill_pool(entry.name)
        if pool is not None:
            prefill = await _PrefillLeg.start(pool, preq, ctx)
            if prefill.params is not None:
                request = preq.with_transfer(prefill.params)
        decode = self._decode_batches(
            entry, request, preq, ctx, limit, prefill, session, restartable
        )
        # the prompt's log-probabilities come from the worker that ran the prompt: with a
        # prefill leg, from the prefill worker (the decode leg is not asked for them)
        from_prefill = None
        if prefill is not None and prefill.params is not None:
            if preq.output_options.prompt_logprobs is not None:
                from_prefill = prefill
        try:
            async for batch in decode:
                if from_prefill is not None and batch:
                    batch = await from_prefill.with_prompt_logprobs(batch)
                    from_prefill = None
                yield batch
        finally:
            await decode.aclose()  # now, not when collected: the router counts the request ended
            if prefill is not None:
                prefill.close()

    async def _decode_batches(
        self,
        entry: ModelEntry,
        request: PreprocessedRequest,
        preq: PreprocessedRequest,
        ctx: Context,
        limit: int,
        prefill: _PrefillLeg | None,
        session: str | None,
        restartable: bool,
    ) -> Batches:
        exclude: list[int] = []
        generated: list[int] = []
        prompt = preq.token_ids
        constrained = preq.guided_decoding is not None
        restart = False
        while True:
            if restart:
                restart = False
                yield RESTART
            route = await entry.route(prompt, exclude, ctx.id, session)
            iid = route.instance_id
            stream = None
            received = False
            try:
                stream = await entry.client.direct(request, iid, context=ctx)
                if prefill is not None:
                    prefill.watch(stream)
                async for item in stream:
                    if not received:
                        route.first_token()
                    received = True
                    batch = [item]
                    more = stream.take_ready()
                    if more:
                        batch += more
                    for it in batch:
                        ids = it.get("token_ids")
                        if ids:
                            generated += ids
                    yield batch
                if prefill is not None and prefill.error is not None:
                    raise prefill.error
                return
            except _MIGRATABLE as exc:
                if ctx.is_stopped():
                    raise
                exclude.append(iid)
                if received:
                    if limit <= 0:
                        log.warning(
                            "request %s: instance %x failed (%s); migration limit reached",
                            ctx.id,
                            iid,
                            exc,
                        )
                        raise
                    limit -= 1
                    if constrained:
                        restart = self._restart_constrained(ctx, iid, exc, restartable)
                        generated.clear()
                        request = preq
                        continue
                    log.warning(
                        "request %s: instance %x failed (%s); migrating with %d tokens generated",
                        ctx.id,
                        iid,
                        exc,
                        len(generated),
                    )
                    request = preq.continuation(generated)
                elif isinstance(exc, errors.AuthenticationError):
                    log.error(
                        "request %s: instance %x refused us (%s): the frontend's and the "
                        "worker's DYN_AUTH_TOKEN differ; trying another",
                        ctx.id,
                        iid,
                        exc,
                    )
                else:
                    # nothing was generated: not a migration, not counted against the limit
                    log.info(
                        "request %s: instance %x did not take it (%s); trying another",
                        ctx.id,
                        iid,
                        exc,
                    )
            finally:
                route.done()
                if stream is not None:
                    stream.cancel()

    @staticmethod
    def _restart_constrained(
        ctx: Context, iid: int, exc: errors.DynamoError, restartable: bool
    ) -> bool:
        """A constrained request's worker failed mid-way: True to start it again elsewhere; a
        stream (part of its answer already sent) fails instead, with a retryable error."""
        if not restartable:
            log.warning(
                "request %s: instance %x failed (%s) mid-way through a structured-output "
                "stream, which cannot be continued elsewhere",
                ctx.id,
                iid,
                exc,
            )
            raise errors.NotResumableError(
                "the worker serving this structured-output stream failed after part of the "
                "answer was sent, and a constrained answer cannot be continued on another "
                "worker: retry the request"
            ) from exc
        log.warning(
            "request %s: instance %x failed (%s) mid-way through a structured-output answer; "
            "starting it again on another instance",
            ctx.id,
            iid,
            exc,
        )
        return True

    async def _sse(self, run: _Run, include_usage: bool) -> AsyncIterator[bytes]:
        """The stream of one request: the choices' events as their batches arrive, each batch
        of engine outputs in one write."""
        entry, fmt, source = run.entry, run.fmt, run.source
        model = entry.name
        m = self.metrics
        m.inflight.labels(model).inc()
        status = "cancelled"  # until it ends, one way or the other
        outs = run.outputs()
        want_lp = outs[0].logprobs_wanted is not None
        is_chat = not isinstance(fmt, CompletionStreamFormatter)
        first_token_at: float | None = None
        remaining = len(outs)
        # with echo and logprobs, each choice's echo goes out with the prompt's logprobs
        head = b"" if outs[0].echo_logprobs else fmt.start()
        parts = [head] if head else []
        gen = source.gen if isinstance(source, Single) else None  # n = 1: no wrapper per batch
        index, batch = source.first()
        try:
            while True:
                out = outs[index]
                now = time.monotonic()
                new_tokens = 0
                if batch is None:  # the worker ended without a finish reason
                    out.check_prompt()
                    out.finish = "stop"
                    if out.parser is not None:
                        parts.append(fmt.events(out.events(""), index))
                for item in batch or ():
                    text = out.feed(item)
                    if out.echo_pending:
                        parts.append(_echo_event(fmt, out, index))
                    new_tokens += out.kept
                    lp: Any = None
                    if want_lp and out.kept:
                        lp = out.chat_logprobs(item) if is_chat else out.completion_logprobs(item)
                    if out.parser is not None:
                        events = out.events(text)
                        if events or lp is not None:
                            parts.append(fmt.events(events, index, lp))
                    elif lp is not None:
                        parts.append(fmt.text_with_logprobs(text, lp, index))
                    elif text:
                        parts.append(fmt.text(text, index))
                    if out.finish is not None:
                        break
                if new_tokens:
                    if first_token_at is None:
                        first_token_at = now
                        m.ttft.labels(model).observe(now - run.t0)
                    else:
                        gap = (now - (out.last_at or first_token_at)) / new_tokens
                        m.itl.labels(model).observe(gap, new_tokens)
                    out.last_at = now
                if out.finish is not None:
                    parts.append(fmt.finish(out.reason(), index))
                    remaining -= 1
                    if not remaining:
                        break
                    source.drop(index)
                elif parts:
                    yield b"".join(parts)
                    parts = []
                if gen is not None:
                    batch = await anext(gen, None)
                else:
                    index, batch = await source.next()
            if include_usage:
                parts.append(fmt.usage(run.usage(outs)))
            if isinstance(fmt, ResponsesFormatter):
                await fmt.keep()  # stored before the client sees `response.completed`
            parts.append(fmt.done)
            status = "success"
            yield Final(b"".join(parts))
        except errors.DynamoError as exc:
            status = "error"
            log.warning("request %s failed mid-stream: %s", fmt.id, exc)
            _, kind, message = _public(exc)
            yield Final(fmt.error(message, kind) + fmt.done)
        except Exception:  # a bug here (an output parser, a formatter): this stream alone ends
            status = "error"
            log.exception("request %s failed mid-stream in the frontend", fmt.id)
            yield Final(fmt.error("internal error in the frontend", "internal_error") + fmt.done)
        finally:
            await source.aclose()
            run.ended(m, "stream", status, outs)

    async def _whole(self, run: _Run) -> Response:
        """The whole response of one request, once every choice has finished."""
        m = self.metrics
        m.inflight.labels(run.entry.name).inc()
        outs = run.outputs()
        pieces: list[list[str]] = [[] for _ in outs]
        logprobs: list[Any] = [_no_logprobs(run.fmt) for _ in outs]
        want_lp = outs[0].logprobs_wanted is not None
        is_chat = not isinstance(run.fmt, CompletionStreamFormatter)
        status = "error"
        source = run.source
        try:
            remaining = len(outs)
            index, batch = source.first()
            while True:
                out = outs[index]
                if batch is RESTART:  # the worker failed; it starts again on another one
                    outs[index] = out = run.output(index)
                    pieces[index] = []
                    logprobs[index] = _no_logprobs(run.fmt)
                if batch is None:
                    out.check_prompt()
                    out.finish = out.finish or "stop"
                for item in batch or ():
                    pieces[index].append(out.feed(item))
                    if out.echo_pending:
                        for key, values in out.echo_completion_logprobs().items():
                            logprobs[index][key].extend(values)
                    if want_lp and out.kept:
                        if is_chat:
                            logprobs[index].extend(out.chat_logprobs(item))
                        else:
                            lp = out.completion_logprobs(item)
                            for key, values in logprobs[index].items():
                                values.extend(lp[key])
                    if out.finish is not None:
                        break
                if out.finish is not None:
                    remaining -= 1
                    if not remaining:
                        break
                    source.drop(index)
                index, batch = await source.next()
            status = "success"
        except errors.DynamoError as exc:
            return _error_for(exc, run.fmt.id)
        finally:
            await source.aclose()
            run.ended(m, "unary", status, outs)
        results = []
        for out, texts, lps in zip(outs, pieces, logprobs, strict=True):
            parsed = out.parsed("".join(texts))
            results.append(
                ChoiceResult(
                    index=out.index,
                    text=parsed.content,
                    finish_reason=out.reason(),
                    logprobs=lps if want_lp else None,
                    reasoning=parsed.reasoning,
                    tool_calls=parsed.tool_calls,
                    prompt_logprobs=(
                        out.prompt_logprobs_json() if out.prompt_wanted is not None else None
                    ),
                )
            )
        run.count_calls(m, outs)
        whole = run.fmt.whole(results, run.usage(outs))
        if isinstance(run.fmt, ResponsesFormatter):
            await run.fmt.keep()  # stored before the client has the body
        return Response(whole)


class _Sampled(Protocol):
    """What `_generate` reads of a request (chat, completions or responses)."""

    stream: bool | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    frequency_penalty: float | None
    presence_penalty: float | None

    def requested_max_tokens(self) -> int | None: ...

    def logprobs_count(self) -> int | None: ...

    def prompt_logprobs_count(self) -> int | None: ...

    def stop_strings(self) -> list[str]: ...

    def extension(self, name: str) -> Any: ...

    def include_usage(self) -> bool: ...

    def choices(self) -> int: ...


class _Format(Protocol):
    """What the stream and the whole response write with (chat, completions, responses)."""

    id: str
    done: bytes

    def start(self) -> bytes: ...

    def text(self, text: str, i: int = 0) -> bytes: ...

    def text_with_logprobs(self, text: str, logprobs: Any, i: int = 0) -> bytes: ...

    def events(self, events: list[Event], i: int = 0, logprobs: Any = None) -> bytes: ...

    def finish(self, reason: str, i: int = 0) -> bytes: ...

    def usage(self, usage: dict[str, Any]) -> bytes: ...

    def error(self, message: str, kind: str = ..., code: str | None = None) -> bytes: ...

    def whole(self, choices: list[ChoiceResult], usage: dict[str, Any]) -> bytes: ...


class _Run:
    """One admitted request on its way out: its model, formatter, batches and timing."""

    __slots__ = ("endpoint", "entry", "fmt", "output", "prompt_len", "source", "t0")

    def __init__(
        self,
        entry: ModelEntry,
        fmt: _Format,
        source: Single | Merged,
        output: Callable[[int], ChoiceOutput],
        prompt_len: int,
        t0: float,
        endpoint: str,
    ) -> None:
        self.entry = entry
        self.fmt = fmt
        self.source = source
        self.output = output
        """A fresh `ChoiceOutput` for choice `i`."""
        self.prompt_len = prompt_len
        self.t0 = t0
        self.endpoint = endpoint

    def outputs(self) -> list[ChoiceOutput]:
        n = getattr(self.fmt, "n", 1)
        return [self.output(i) for i in range(n)]

    def usage(self, outs: list[ChoiceOutput]) -> dict[str, Any]:
        """The prompt once, the completions of every choice summed (OpenAI's rule for `n`)."""
        completion = sum(out.completion_tokens for out in outs)
        return usage_dict(self.prompt_len, completion, outs[0].cached)

    def ended(self, m: FrontendMetrics, kind: str, status: str, outs: list[ChoiceOutput]) -> None:
        if len(outs) == 1:
            tokens = outs[0].completion_tokens
        else:
            tokens = sum(out.completion_tokens for out in outs)
        m.ended(self.entry.name, self.endpoint, kind, status, tokens, self.t0)
        if kind == "stream" and outs[0].parser is not None:
            self.count_calls(m, outs)

    def count_calls(self, m: FrontendMetrics, outs: list[ChoiceOutput]) -> None:
        calls = sum(out.calls for out in outs)
        if calls:
            m.tool_calls.labels(self.entry.name).inc(calls)


def _echo_event(fmt: _Format, out: ChoiceOutput, index: int) -> bytes:
    """A completions stream's echo with the prompt's logprobs (the choice's first event)."""
    assert isinstance(fmt, CompletionStreamFormatter)
    return fmt.text_with_logprobs(fmt.echo, out.echo_completion_logprobs(), index)


def _no_logprobs(fmt: _Format) -> Any:
    """An empty collection of a choice's log-probabilities, as the format shows them."""
    if isinstance(fmt, CompletionStreamFormatter):
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return []


async def _first_batch(gen: Batches) -> list[dict[str, Any]]:
    """The first batch of a choice (awaited before any HTTP header goes out, so that an error
    a worker reports at once becomes a proper HTTP error); on an error the request is stopped."""
    try:
        batch = await anext(gen, None)
    except BaseException:
        await gen.aclose()
        raise
    return [] if batch is None else batch


async def _first_batches(gens: list[Batches]) -> list[list[dict[str, Any]]]:
    """`_first_batch` of every choice, together; on an error every choice is stopped."""
    tasks = [asyncio.ensure_future(_first_batch(g)) for g in gens]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)  # a generator still running cannot be closed
        for gen in gens:
            await gen.aclose()
        raise


def _choice_request(preq: PreprocessedRequest, index: int, n: int) -> PreprocessedRequest:
    """Choice `index` of `n`: its own request id and, with a seed, its own seed (seed +
    index, so choice 0 is what the request with `n` = 1 gets)."""
    if n == 1:
        return preq
    sampling = preq.sampling_options
    if sampling.seed is not None:
        seed = (sampling.seed + index + 2**63) % 2**64 - 2**63  # stays a signed 64-bit integer
        sampling = msgspec.structs.replace(sampling, seed=seed)
    return msgspec.structs.replace(
        preq,
        request_id=_choice_id(preq.request_id or "", index, n),
        sampling_options=sampling,
    )


def _choice_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


#: What an engine output says about the prompt (`EngineOutput.prompt_log_probs` and its kin).
_PROMPT_FIELDS = ("prompt_log_probs", "prompt_top_logprobs", "prompt_ranks")


class _PrefillLeg:
    """The prefill half of a disaggregated request.

    The prefill worker's first output with `disaggregated_params` starts the decode leg; the
    rest of the prefill stream keeps running (sglang transfers the KV cache while both legs are
    live). If the prefill leg fails after that, the decode leg is cancelled at once and the
    request fails; if it fails before, the request is served aggregated by a decode worker.

    The prompt's log-probabilities, when asked for, are the prefill worker's (it ran the
    prompt; the decode leg does not ask for them): they come with its hand-off or later in its
    stream, and join the decode leg's first batch (`with_prompt_logprobs`), which waits for
    them; a prefill leg that ends without them fails the request.
    """

    def __init__(self, pool: PrefillPool, ctx: Context) -> None:
        self.pool = pool
        self.ctx = Context(ctx.id)
        self.parent = ctx
        self.params: dict[str, Any] | None = None
        self.error: errors.DynamoError | None = None
        self.task: asyncio.Task[None] | None = None
        self.route: Route | None = None
        self._decode: Any = None
        self._prompt: dict[str, Any] | None = None
        self._prompt_done = asyncio.Event()
        """Set when the prompt's log-probabilities came, or the prefill stream ended."""
        ctx.add_stop_callback(self.ctx.stop_generating)

    def _keep_prompt(self, item: dict[str, Any]) -> None:
        if self._prompt is None and item.get("prompt_log_probs") is not None:
            self._prompt = {k: item[k] for k in _PROMPT_FIELDS if item.get(k) is not None}
            self._prompt_done.set()

    async def with_prompt_logprobs(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The decode leg's first batch, its first item with the prompt's log-probabilities
        from the prefill leg (awaited: they may come after the hand-off)."""
        if batch[0].get("prompt_log_probs") is not None:
            return batch  # served without the prefill leg after all
        await self._prompt_done.wait()
        if self._prompt is None:
            raise self.error or errors.EngineError(
                "the prefill worker returned no log-probabilities for the prompt"
            )
        return [{**batch[0], **self._prompt}, *batch[1:]]

    @classmethod
    async def start(cls, pool: PrefillPool, preq: PreprocessedRequest, ctx: Context) -> _PrefillLeg:
        leg = cls(pool, ctx)
        request = preq.prefill_leg()
        try:
            route = await pool.router.route(request.token_ids, pool.live_instances())
        except errors.NoInstancesError:
            return leg
        leg.route = route
        iid = route.instance_id
        try:
            stream = await pool.client.direct(request, iid, context=leg.ctx)
            async for item in stream:
                leg._keep_prompt(item)
                params = item.get("disaggregated_params")
                if params is not None:
                    leg.params = params
                    break
        except errors.DynamoError as exc:
            log.warning(
                "request %s: prefill on %x failed (%s); serving it aggregated", ctx.id, iid, exc
            )
            route.done()
            return leg
        except BaseException:  # cancelled: the client left
            route.done()
            raise
        if leg.params is None:
            route.done()
            return leg
        leg.task = asyncio.get_running_loop().create_task(leg._drain(stream))
        return leg

    async def _drain(self, stream: Any) -> None:
        try:
            async for item in stream:
                if self._prompt is None:
                    self._keep_prompt(item)
        except errors.DynamoError as exc:
            self.error = errors.EngineError(f"prefill failed: {_public(exc)[2]}")
            log.warning("request %s: prefill failed after hand-off: %s", self.ctx.id, exc)
            if self._decode is not None:
                self._decode.cancel()  # stop the decode leg now, not after a transfer timeout
        finally:
            self._prompt_done.set()
            if self.route is not None:
                self.route.done()

    def watch(self, decode_stream: Any) -> None:
        self._decode = decode_stream
        if self.error is not None:
            decode_stream.cancel()

    def close(self) -> None:
        self.parent.remove_stop_callback(self.ctx.stop_generating)
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _shutdown_event(fmt: _Format) -> bytes:
    """How a stream ends when the frontend stops before it finished."""
    return (
        fmt.error("the server is shutting down; retry the request", "service_unavailable")
        + fmt.done
    )


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        return _error(
            400, f"invalid request: {exc}", "invalid_request_error", param=param_of(str(exc))
        )
    except msgspec.DecodeError as exc:
        return _error(400, f"invalid JSON body: {exc}", "invalid_request_error")


def _param_error(exc: ParamError) -> Response:
    return _error(400, exc.message, "invalid_request_error", exc.code, exc.param)


def _response_not_found(response_id: str) -> Response:
    return _error(
        404,
        f"Response with id '{response_id}' not found.",
        "invalid_request_error",
        "response_not_found",
    )


def _render_prompt(
    entry: ModelEntry,
    messages: list[Any],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> list[int] | Response:
    """The prompt's token ids (template applied), or the error; work bounded by the context."""
    messages = _developer_as_system(entry, messages)
    try:
        prompt = entry.template.render(
            messages, add_generation_prompt=True, tools=tools, **(template_kwargs or {})
        )
    except errors.InvalidRequestError as exc:
        return _error(400, str(exc), "invalid_request_error", param="messages")
    context_length = entry.card.context_length
    encoded = entry.tokenizer.encode_within(prompt, context_length, add_special_tokens=False)
    if not encoded.complete:
        return _context_error(context_length, len(encoded.ids), None, at_least=True)
    return encoded.ids


def _developer_as_system(entry: ModelEntry, messages: list[Any]) -> list[Any]:
    """OpenAI's `developer` role is the `system` role of models whose template does not know
    it (most of them: their templates refuse a role they do not know)."""
    for message in messages:
        if message.get("role") == "developer":
            break
    else:
        return messages
    template = entry.template
    if "developer" in template.source or "developer" in (template.tool_use_source or ""):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def _chat_prompt(entry: ModelEntry, body: ChatCompletionRequest) -> list[int] | Response:
    return _render_prompt(entry, body.messages, body.tool_dicts(), body.chat_template_kwargs)


def _responses_prompt(entry: ModelEntry, call: Any) -> list[int] | Response:
    return _render_prompt(entry, call.messages, call.template_tools, None)


def _completion_prompt(
    entry: ModelEntry, body: CompletionRequest
) -> tuple[list[int], str] | Response:
    """The prompt's token ids and the text `echo` repeats, or the error."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            return _error(
                400,
                "batched prompts are not supported: send one prompt per request",
                "invalid_request_error",
                param="prompt",
            )
        prompt = prompt[0]
    context_length = entry.card.context_length
    if isinstance(prompt, str):
        encoded = entry.tokenizer.encode_within(prompt, context_length, add_special_tokens=True)
        if not encoded.complete:
            return _context_error(context_length, len(encoded.ids), None, at_least=True)
        token_ids = encoded.ids
    else:
        if len(prompt) > context_length:  # before looking at every id of a huge list
            return _context_error(context_length, len(prompt), None)
        vocab = entry.tokenizer.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in prompt):
            return _error(
                400,
                f"prompt must be a string or a list of token ids in [0, {vocab})",
                "invalid_request_error",
                param="prompt",
            )
        token_ids = list(prompt)
    if not token_ids:
        return _error(400, "prompt must not be empty", "invalid_request_error", param="prompt")
    if body.suffix:
        return _error(400, "suffix is not supported", "invalid_request_error", param="suffix")
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else entry.tokenizer.decode(token_ids)
    return token_ids, echo


def _overloaded(exc: errors.OverloadedError) -> Response:
    response = _error(503, str(exc), "service_unavailable", "overloaded")
    response.headers.append(("retry-after", str(exc.retry_after)))
    return response


#: What each model type is served on (the error for a route its card does not list names it).
_ROUTES_OF = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embedding": "/v1/embeddings",
}


def _not_served(entry: ModelEntry, wanted: ModelType) -> Response:
    """A 400 for a model on a route its card's type does not list (an embedding model asked to
    chat, a chat model asked for embeddings), saying where it is served."""
    types = entry.card.model_type
    kind = "an embedding model" if "embedding" in types else "a text-generation model"
    routes = " and ".join(_ROUTES_OF[t] for t in types if t in _ROUTES_OF) or "no route"
    return _error(
        400,
        f"The model `{entry.name}` is {kind}, served on {routes}; it does not serve "
        f"{_ROUTES_OF[wanted]}.",
        "invalid_request_error",
        "model_not_supported",
        "model",
    )


def _model_not_found(model: str, retired: set[str]) -> Response:
    if model in retired:
        return _error(
            503, f"The model `{model}` has no live instances.", "service_unavailable", param="model"
        )
    return _error(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def _context_error(
    context_length: int, prompt_len: int, max_tokens: int | None, *, at_least: bool = False
) -> Response:
    """`at_least`: `prompt_len` counts a prefix only (the prompt was not tokenized to its end)."""
    if max_tokens is None or prompt_len >= context_length:
        msg = (
            f"This model's maximum context length is {context_length} tokens. "
            f"However, your prompt has {'more than ' if at_least else ''}"
            f"{context_length if at_least else prompt_len} tokens."
        )
    else:
        msg = (
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the prompt or max_tokens."
        )
    return _error(400, msg, "invalid_request_error", "context_length_exceeded", "messages")


def _preprocessed(
    entry: ModelEntry,
    body: _Sampled,
    token_ids: list[int],
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    request_id: str,
) -> PreprocessedRequest:
    """The wire request for a validated OpenAI body (the request plane encodes it once)."""
    return PreprocessedRequest(
        token_ids=token_ids,
        model=entry.name,
        stop_conditions=StopConditions(
            max_tokens=max_tokens,
            min_tokens=body.extension("min_tokens") or None,
            stop=body.stop_strings() or None,
            ignore_eos=bool(body.extension("ignore_eos")),
        ),
        sampling_options=SamplingOptions(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.extension("top_k"),
            min_p=body.extension("min_p"),
            seed=body.seed,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            repetition_penalty=body.extension("repetition_penalty"),
        ),
        output_options=OutputOptions(logprobs=logprobs, prompt_logprobs=prompt_logprobs),
        eos_token_ids=entry.eos_token_ids,
        request_id=request_id,
    )
