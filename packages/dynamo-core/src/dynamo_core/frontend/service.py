"""The OpenAI service: routes, preprocessing, routing, streaming, detokenizing, migration.

Per request: validate the body (OpenAI error shape on bad input), render the chat template,
tokenize, check the context, build the `PreprocessedRequest` (a struct the request plane encodes
once; its prefill leg, decode leg and migration continuation are its named derivations, and it is
never changed after), pass admission control (a queue, then 503 with Retry-After, when every
worker is busy), pick a worker (the model's routing policy), and stream its `EngineOutput` maps
back.

Large requests (bodies over `OFFLOAD_BODY_BYTES`) are templated and tokenized in a thread pool,
never on the event loop, and a prompt is only tokenized as far as the model's context can hold
(`Tokenizer.encode_within`): a 6 MB prompt for a 2k-token model is refused after a few KB. The first batch of output is awaited
before any HTTP header goes out, so errors a worker reports at once (bad request, no instance)
become proper HTTP errors; later failures end the stream with an error event.

Streaming cost per token is a dict lookup, an incremental detokenizer step and one bytes join:
items that arrive together (the request plane batches them) leave in one SSE write.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from dynamo_core import errors
from dynamo_core._memory import Trimmer
from dynamo_core.args import DEFAULT_MIGRATION_LIMIT
from dynamo_core.frontend.metrics import FrontendMetrics
from dynamo_core.frontend.models import ModelEntry, ModelManager, PrefillPool
from dynamo_core.frontend.openai import (
    ChatCompletionRequest,
    ChatStreamFormatter,
    CompletionRequest,
    CompletionStreamFormatter,
    error_body,
    finish_reason_for,
    usage_dict,
)
from dynamo_core.http import Final, Request, Response, StreamingResponse
from dynamo_core.llm.detokenizer import IncrementalDetokenizer, LogprobTokens, StopStringMatcher
from dynamo_core.llm.protocol import (
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_core.llm.tokenizer import ASYNC_ENCODE_THRESHOLD
from dynamo_core.router import Route, RouterConfig
from dynamo_core.runtime import Context, DistributedRuntime

__all__ = ["OpenAIService"]

log = logging.getLogger("dynamo.frontend")

_DONE = b"data: [DONE]\n\n"
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
Batches = AsyncGenerator[list[dict[str, Any]], None]
_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)
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


def _error_for(exc: errors.DynamoError, request_id: str) -> Response:
    """The error response for `exc`; what the client is not shown is logged."""
    status, kind, message = _public(exc)
    if message != str(exc):
        log.warning("request %s failed: %s", request_id, exc)
    return _error(status, message, kind)


#: Prompt ids the detokenizer keeps as left context for the first generated ones.
_PROMPT_CONTEXT = 6


class _Output:
    """Turns engine output maps into text and log-probabilities, applying stop strings.

    `feed` sets `kept`, how many of the item's tokens belong to the output: a stop string ends
    it after the token that completes the stop string (vLLM's rule), also when that token came
    with others in one engine output; the tokens after it are neither counted nor shown.
    """

    __slots__ = (
        "cached",
        "completion_tokens",
        "detok",
        "finish",
        "kept",
        "logprobs_wanted",
        "lp_tokens",
        "matcher",
        "min_tokens",
        "text_offset",
    )

    def __init__(
        self,
        entry: ModelEntry,
        stops: list[str],
        logprobs: int | None,
        *,
        prompt: list[int] | None = None,
        min_tokens: int = 0,
        text_offset: int = 0,
    ) -> None:
        self.detok = IncrementalDetokenizer(
            entry.tokenizer,
            skip_special_tokens=True,
            prompt_tail=prompt[-_PROMPT_CONTEXT:] if prompt else None,
        )
        self.matcher = StopStringMatcher(stops) if stops else None
        self.min_tokens = min_tokens
        self.logprobs_wanted = logprobs
        self.lp_tokens = LogprobTokens(entry.tokenizer) if logprobs is not None else None
        self.text_offset = text_offset
        """Completions: where the next token's text starts in the choice's text (echo first)."""
        self.completion_tokens = 0
        self.kept = 0
        self.finish: str | None = None
        self.cached: int | None = None

    def feed(self, item: dict[str, Any]) -> str:
        """The text `item` adds; sets `kept`, and `finish` when the sequence ends.

        Text still held back at the end (part of a character) is dropped, as vLLM drops it.
        """
        ids = item.get("token_ids") or ()
        self.kept = len(ids)
        matcher = self.matcher
        if matcher is None:
            text = self.detok.push(ids) if ids else ""
        else:
            text = self._feed_stops(matcher, ids)
        self.completion_tokens += self.kept
        usage = item.get("usage")
        if usage:
            self.cached = usage.get("cached_tokens")
        if self.finish is not None:
            return text
        reason = item.get("finish_reason")
        if reason is not None:
            if reason == "error":
                raise errors.EngineError(item.get("error") or "the engine failed")
            if matcher is not None:
                text += matcher.flush()
            self.finish = finish_reason_for(reason) or "stop"
        return text

    def _feed_stops(self, matcher: StopStringMatcher, ids: Any) -> str:
        """Token by token, so that a stop string is cut after the token that completes it."""
        parts = []
        for i, token in enumerate(ids):
            counted = self.completion_tokens + i + 1
            text, hit = matcher.feed(self.detok.push((token,)), counted > self.min_tokens)
            parts.append(text)
            if hit:
                self.kept = i + 1
                self.finish = "stop"
                break
        return "".join(parts)

    def chat_logprobs(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The `logprobs.content` entries of the item's kept tokens."""
        texts = self.lp_tokens
        assert texts is not None
        top_n = self.logprobs_wanted or 0
        content = []
        for token, lp, top in self._positions(item):
            text, raw = texts.entry(token)
            alternatives = []
            for alt, alt_lp in top[:top_n]:
                alt_text, alt_raw = texts.entry(alt)
                alternatives.append(
                    {"token": alt_text, "logprob": _clamp(alt_lp), "bytes": list(alt_raw)}
                )
            content.append(
                {
                    "token": text,
                    "logprob": _clamp(lp),
                    "bytes": list(raw),
                    "top_logprobs": alternatives,
                }
            )
            texts.advance(token)
        return content

    def completion_logprobs(self, item: dict[str, Any]) -> dict[str, list[Any]]:
        """The completions `logprobs` lists of the item's kept tokens.

        `top_logprobs` holds the chosen token first, then the most likely others, up to
        `logprobs` + 1 entries (OpenAI's and vLLM's rule); `text_offset` is where each token's
        text starts in the choice's text (the sum of the token strings before it, as vLLM
        counts). With `echo` the prompt's tokens get no entries (vLLM adds them from prompt
        log-probabilities, which the wire does not carry yet): offsets start after the prompt.
        """
        texts = self.lp_tokens
        assert texts is not None
        top_n = self.logprobs_wanted or 0
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for token, lp, top in self._positions(item):
            text, _ = texts.entry(token)
            shown = {text: _clamp(lp)}
            ids = [token]
            for alt, alt_lp in top:
                if len(ids) > top_n:
                    break
                if alt == token:
                    shown[text] = _clamp(alt_lp)
                    continue
                ids.append(alt)
                shown[texts.entry(alt)[0]] = _clamp(alt_lp)
            tokens.append(text)
            values.append(_clamp(lp))
            tops.append(shown)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
            texts.advance(token)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _positions(self, item: dict[str, Any]) -> Any:
        ids = (item.get("token_ids") or ())[: self.kept]
        lps = item.get("log_probs") or ()
        tops = item.get("top_logprobs") or ()
        for i, (token, lp) in enumerate(zip(ids, lps, strict=False)):
            yield token, lp, tops[i] if i < len(tops) else ()


def _clamp(logprob: float) -> float:
    """-inf is not JSON: OpenAI and vLLM send -9999.0."""
    return logprob if logprob > -9999.0 else -9999.0


class OpenAIService:
    def __init__(
        self,
        runtime: DistributedRuntime,
        *,
        namespace: str,
        router: RouterConfig | None = None,
        migration_limit: int = DEFAULT_MIGRATION_LIMIT,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.models = ModelManager(runtime, namespace, router)
        self.migration_limit = migration_limit
        self.metrics = metrics or FrontendMetrics()
        # large prompts are prepared here, off the event loop; the work per request is bounded
        # by the model's context length (`Tokenizer.encode_within`)
        self._preprocess = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="dynamo-preprocess"
        )
        self._trimmer = Trimmer()
        self._routes = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/health"): self.health,
            ("GET", "/live"): self.live,
            ("GET", "/metrics"): self.prometheus,
        }
        methods: dict[str, list[str]] = {}
        for m, path in self._routes:
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
        allowed = self._allowed.get(path)
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
        entry = self.models.get(body.model)
        if entry is None:
            return _model_not_found(body.model, self.models.retired)
        if (body.n or 1) > 1:
            return _error(400, "n > 1 is not supported", "invalid_request_error", param="n")
        return body, entry

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        checked = self._check(request, ChatCompletionRequest)
        if isinstance(checked, Response):
            return checked
        body, entry = checked
        token_ids = await self._off_loop_if_large(request, _chat_prompt, entry, body)
        if isinstance(token_ids, Response):
            return token_ids
        return await self._generate(
            entry, body, token_ids, ChatStreamFormatter(body.model), "chat_completions"
        )

    async def completions(self, request: Request) -> Response | StreamingResponse:
        checked = self._check(request, CompletionRequest)
        if isinstance(checked, Response):
            return checked
        body, entry = checked
        prepared = await self._off_loop_if_large(request, _completion_prompt, entry, body)
        if isinstance(prepared, Response):
            return prepared
        token_ids, echo = prepared
        return await self._generate(
            entry, body, token_ids, CompletionStreamFormatter(body.model, echo), "completions"
        )

    async def _off_loop_if_large(
        self,
        request: Request,
        prepare: Callable[[ModelEntry, _Body], _Prepared],
        entry: ModelEntry,
        body: _Body,
    ) -> _Prepared:
        """`prepare(entry, body)`: inline for a small request, in the preprocessing pool for a
        large one, so that templating and tokenizing a long prompt never stalls the loop."""
        if len(request.body) <= OFFLOAD_BODY_BYTES:
            return prepare(entry, body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._preprocess, self._prepare, prepare, entry, body)

    def _prepare(
        self, prepare: Callable[[ModelEntry, _Body], _Prepared], entry: ModelEntry, body: _Body
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
        body: ChatCompletionRequest | CompletionRequest,
        token_ids: list[int],
        fmt: ChatStreamFormatter | CompletionStreamFormatter,
        endpoint: str,
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
        preq = _preprocessed(entry, body, token_ids, max_tokens, logprobs, fmt.id)
        model = entry.name
        try:
            await entry.router.admit()
        except errors.OverloadedError as exc:
            kind = "stream" if body.stream else "unary"
            self.metrics.requests.labels(model, endpoint, kind, "overloaded").inc()
            return _overloaded(exc)
        ctx = Context(fmt.id)
        batches = self._engine_batches(entry, preq, ctx)
        try:
            first = await batches.__anext__()
        except StopAsyncIteration:
            first = []
        except errors.DynamoError as exc:
            await batches.aclose()
            self.metrics.requests.labels(
                model, endpoint, "stream" if body.stream else "unary", "error"
            ).inc()
            return _error_for(exc, fmt.id)
        out = _Output(
            entry,
            body.stop_strings(),
            logprobs,
            prompt=token_ids,
            min_tokens=body.extension("min_tokens") or 0,
            text_offset=len(fmt.echo) if isinstance(fmt, CompletionStreamFormatter) else 0,
        )
        self.metrics.input_tokens.labels(model).observe(prompt_len)
        if body.stream:
            stream = self._sse(
                entry, fmt, out, first, batches, body.include_usage(), prompt_len, t0, endpoint
            )
            return StreamingResponse(stream, on_shutdown=lambda: _shutdown_event(fmt))
        return await self._whole(entry, fmt, out, first, batches, prompt_len, t0, endpoint)

    async def _engine_batches(
        self, entry: ModelEntry, preq: PreprocessedRequest, ctx: Context
    ) -> Batches:
        """Batches of engine output maps, moving to another instance if a worker breaks.

        A worker that fails before sending anything (it died, discovery has not noticed yet)
        is simply skipped: nothing reached the client. One that fails mid-stream is replaced
        up to the migration limit, continuing from the tokens generated so far.
        """
        limit = min(self.migration_limit, entry.card.migration_limit)
        request = preq
        prefill: _PrefillLeg | None = None
        pool = self.models.prefill_pool(entry.name)
        if pool is not None:
            prefill = await _PrefillLeg.start(pool, preq, ctx)
            if prefill.params is not None:
                request = preq.with_transfer(prefill.params)
        decode = self._decode_batches(entry, request, preq, ctx, limit, prefill)
        try:
            async for batch in decode:
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
    ) -> Batches:
        exclude: list[int] = []
        generated: list[int] = []
        router = entry.router
        prompt = preq.token_ids
        while True:
            try:
                route = await router.route(prompt, entry.live_instances(), exclude, ctx.id)
            except errors.NoInstancesError:
                raise errors.NoInstancesError(
                    f"The model `{entry.name}` has no live instances."
                ) from None
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

    async def _sse(
        self,
        entry: ModelEntry,
        fmt: ChatStreamFormatter | CompletionStreamFormatter,
        out: _Output,
        first: list[dict[str, Any]],
        batches: Batches,
        include_usage: bool,
        prompt_len: int,
        t0: float,
        endpoint: str,
    ) -> AsyncIterator[bytes]:
        model = entry.name
        m = self.metrics
        m.inflight.labels(model).inc()
        status = "success"
        want_lp = out.logprobs_wanted is not None
        is_chat = isinstance(fmt, ChatStreamFormatter)
        first_token_at: float | None = None
        last_at = t0
        try:
            head = fmt.role()
            batch: list[dict[str, Any]] | None = first
            while batch is not None:
                parts = [head] if head else []
                head = b""
                now = time.monotonic()
                new_tokens = 0
                for item in batch:
                    text = out.feed(item)
                    new_tokens += out.kept
                    if want_lp and out.kept:
                        if is_chat:
                            lp: Any = out.chat_logprobs(item)
                        else:
                            lp = out.completion_logprobs(item)
                        parts.append(fmt.text_with_logprobs(text, lp))
                    elif text:
                        parts.append(fmt.text(text))
                    if out.finish is not None:
                        break
                if new_tokens:
                    if first_token_at is None:
                        first_token_at = now
                        m.ttft.labels(model).observe(now - t0)
                    else:
                        gap = (now - last_at) / new_tokens
                        itl = m.itl.labels(model)
                        for _ in range(new_tokens):
                            itl.observe(gap)
                    last_at = now
                if out.finish is not None:
                    parts.append(fmt.finish(out.finish))
                    if include_usage:
                        parts.append(
                            fmt.usage(usage_dict(prompt_len, out.completion_tokens, out.cached))
                        )
                    parts.append(_DONE)
                    yield Final(b"".join(parts))
                    return
                if parts:
                    yield b"".join(parts)
                batch = await anext(batches, None)
            # the worker ended without a finish reason
            yield Final(fmt.finish("stop") + _DONE)
        except errors.DynamoError as exc:
            status = "error"
            log.warning("request %s failed mid-stream: %s", fmt.id, exc)
            _, kind, message = _public(exc)
            yield Final(fmt.error(message, kind) + _DONE)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            await batches.aclose()
            m.ended(model, endpoint, "stream", status, out.completion_tokens, t0)

    async def _whole(
        self,
        entry: ModelEntry,
        fmt: ChatStreamFormatter | CompletionStreamFormatter,
        out: _Output,
        first: list[dict[str, Any]],
        batches: Batches,
        prompt_len: int,
        t0: float,
        endpoint: str,
    ) -> Response:
        model = entry.name
        m = self.metrics
        m.inflight.labels(model).inc()
        pieces: list[str] = []
        is_chat = isinstance(fmt, ChatStreamFormatter)
        chat_lp: list[dict[str, Any]] = []
        cmpl_lp: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        want_lp = out.logprobs_wanted is not None
        status = "success"
        try:
            batch: list[dict[str, Any]] | None = first
            while batch is not None and out.finish is None:
                for item in batch:
                    pieces.append(out.feed(item))
                    if want_lp and out.kept:
                        if is_chat:
                            chat_lp.extend(out.chat_logprobs(item))
                        else:
                            lp = out.completion_logprobs(item)
                            for key in cmpl_lp:
                                cmpl_lp[key].extend(lp[key])
                    if out.finish is not None:
                        break
                if out.finish is None:
                    batch = await anext(batches, None)
        except errors.DynamoError as exc:
            status = "error"
            return _error_for(exc, fmt.id)
        finally:
            await batches.aclose()
            m.ended(model, endpoint, "unary", status, out.completion_tokens, t0)
        text = "".join(pieces)
        usage = usage_dict(prompt_len, out.completion_tokens, out.cached)
        reason = out.finish or "stop"
        if is_chat:
            body = fmt.whole(text, reason, usage, chat_lp if want_lp else None)  # type: ignore[arg-type]
        else:
            body = fmt.whole(text, reason, usage, cmpl_lp if want_lp else None)  # type: ignore[arg-type]
        return Response(body)


class _PrefillLeg:
    """The prefill half of a disaggregated request.

    The prefill worker's first output with `disaggregated_params` starts the decode leg; the
    rest of the prefill stream keeps running (sglang transfers the KV cache while both legs are
    live). If the prefill leg fails after that, the decode leg is cancelled at once and the
    request fails; if it fails before, the request is served aggregated by a decode worker.
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
        ctx.add_stop_callback(self.ctx.stop_generating)

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
            async for _ in stream:
                pass
        except errors.DynamoError as exc:
            self.error = errors.EngineError(f"prefill failed: {_public(exc)[2]}")
            log.warning("request %s: prefill failed after hand-off: %s", self.ctx.id, exc)
            if self._decode is not None:
                self._decode.cancel()  # stop the decode leg now, not after a transfer timeout
        finally:
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


def _shutdown_event(fmt: ChatStreamFormatter | CompletionStreamFormatter) -> bytes:
    """How a stream ends when the frontend stops before it finished."""
    return (
        fmt.error("the server is shutting down; retry the request", "service_unavailable") + _DONE
    )


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        return _error(400, f"invalid request: {exc}", "invalid_request_error")
    except msgspec.DecodeError as exc:
        return _error(400, f"invalid JSON body: {exc}", "invalid_request_error")


def _chat_prompt(entry: ModelEntry, body: ChatCompletionRequest) -> list[int] | Response:
    """The prompt's token ids (template applied), or the error; work bounded by the context."""
    if not body.messages:
        return _error(400, "messages must not be empty", "invalid_request_error", param="messages")
    for i, message in enumerate(body.messages):
        if not isinstance(message.get("role"), str):
            return _error(
                400, f"messages[{i}] has no role", "invalid_request_error", param="messages"
            )
    try:
        prompt = entry.template.render(
            body.messages,
            add_generation_prompt=True,
            tools=body.tools,
            **(body.chat_template_kwargs or {}),
        )
    except errors.InvalidRequestError as exc:
        return _error(400, str(exc), "invalid_request_error", param="messages")
    context_length = entry.card.context_length
    encoded = entry.tokenizer.encode_within(prompt, context_length, add_special_tokens=False)
    if not encoded.complete:
        return _context_error(context_length, len(encoded.ids), None, at_least=True)
    return encoded.ids


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
    body: ChatCompletionRequest | CompletionRequest,
    token_ids: list[int],
    max_tokens: int,
    logprobs: int | None,
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
        output_options=OutputOptions(logprobs=logprobs),
        eos_token_ids=entry.eos_token_ids,
        request_id=request_id,
    )
