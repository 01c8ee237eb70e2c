"""The frontend off the happy path, in one process: migration by default (streams and whole
responses, token-exact), the limit a card may lower, what a client is shown when the request
plane fails (never an internal address, never 401), streams ended cleanly on shutdown, and
structured-output answers never continued from a prefix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from dynamo_core.echo import EchoHandler
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.http import HttpServer, serve_http
from dynamo_core.llm import register_model
from dynamo_core.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


async def add_worker(runtime: DistributedRuntime, handler: BaseWorkerHandler, **card: Any) -> None:
    ep = runtime.namespace().component("backend").endpoint("generate")
    await register_model(ep, model_path=TINY, model_name="tiny", **card)
    await ep.start_serving(handler.generate)


async def frontend(rt: DistributedRuntime, namespace: str, n: int, **kw: Any) -> Any:
    service = OpenAIService(rt, namespace=namespace, **kw)
    await service.start()
    async with asyncio.timeout(10):
        while len(((e := service.models.get("tiny")) and e.live_instances()) or []) < n:
            await service.models.wait_for_change()
    server = await serve_http(service.handle, "127.0.0.1", 0)
    return service, server


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@contextlib.asynccontextmanager
async def two_workers(
    namespace: str, handler: type[EchoHandler]
) -> AsyncIterator[tuple[dict[Any, DistributedRuntime], OpenAIService, HttpServer]]:
    """A frontend and two slow echo workers, each in its own runtime of one process: yields
    {handler: its runtime}, the service and its HTTP server."""
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    async with (
        DistributedRuntime(cfg) as front,
        DistributedRuntime(cfg) as a,
        DistributedRuntime(cfg) as b,
    ):
        workers = {handler(delay=0.01): a, handler(delay=0.01): b}
        for h, rt in workers.items():
            await add_worker(rt, h)
        service, server = await frontend(front, namespace, 2)
        yield workers, service, server


async def kill_the_busy_one(workers: dict[Any, DistributedRuntime]) -> Any:
    """Once one of the handlers is a few tokens into a request, shut its runtime down; return
    that handler."""
    async with asyncio.timeout(10):
        while not any(h.active for h in workers):
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # a few tokens out
    busy = next(h for h in workers if h.active)
    await workers[busy].shutdown()
    return busy


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_migration_is_on_by_default_and_token_exact(namespace: str, stream: bool) -> None:
    """No limit configured anywhere: a worker that goes away mid-answer is replaced, for a
    stream and for a whole response, and the text is what one worker alone gives."""
    async with two_workers(namespace, EchoHandler) as (workers, service, server):
        ha, hb = workers
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": chat("the quick brown fox jumps over the lazy dog"),
            "max_tokens": 40,
            "extra_body": {"ignore_eos": True},
        }
        expected = (await client.chat.completions.create(**body)).choices[0].message.content

        killer = asyncio.create_task(kill_the_busy_one(workers))
        if stream:
            chunks = await client.chat.completions.create(**body, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks])
        else:
            text = (await client.chat.completions.create(**body)).choices[0].message.content
        await killer
        assert text == expected
        assert ha.metrics.cancelled_total + hb.metrics.cancelled_total == 1
        await client.close()
        await server.close()
        await service.close()


class RecordingEcho(EchoHandler):
    """An echo worker that keeps each request object as the inproc plane hands it over, with
    its wire encoding at arrival."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.received: list[tuple[Any, bytes]] = []

    async def generate(self, request: Any, context: Any) -> AsyncGenerator[dict[str, Any], None]:
        self.received.append((request, msgspec.msgpack.encode(request)))
        async for out in super().generate(request, context):
            yield out


async def test_a_migration_derives_from_the_request_no_worker_changed(namespace: str) -> None:
    """In one process the worker gets the frontend's own request object: neither side changes
    it, and the continuation is the original prompt plus what was generated."""
    async with two_workers(namespace, RecordingEcho) as (workers, service, server):
        ha, hb = workers
        killer = asyncio.create_task(kill_the_busy_one(workers))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            body = {"model": "tiny", "messages": chat("a b c d"), "max_tokens": 30}
            reply = await http.post("/v1/chat/completions", json={**body, "ignore_eos": True})
        first = await killer
        second = hb if first is ha else ha
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] == 30
        ((original, at_arrival),) = first.received
        ((continued, _),) = second.received
        assert msgspec.msgpack.encode(original) == at_arrival  # unchanged by either side
        assert original.request_id == continued.request_id
        generated = continued.generated_tokens
        assert 0 < generated < 30
        assert continued.token_ids[: len(original.token_ids)] == original.token_ids
        assert len(continued.token_ids) == len(original.token_ids) + generated
        assert continued.stop_conditions.max_tokens == 30 - generated
        await server.close()
        await service.close()


def _score(token: int) -> float:
    return -((token % 5) + 1) / 4


class ScoringEcho(RecordingEcho):
    """A recording echo worker that also returns log-probabilities: the generated tokens' and,
    with its first output, the prompt's (each a function of the token)."""

    supports_prompt_logprobs = True

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        options = request.output_options
        first = True
        async for out in super().engine_generate(request, context):
            if options.logprobs is not None:
                out.log_probs = [_score(t) for t in out.token_ids]
                out.top_logprobs = [[(t, _score(t))] for t in out.token_ids]
            if first and options.prompt_logprobs is not None:
                rest = request.token_ids[1:]
                out.prompt_log_probs = [None, *(_score(t) for t in rest)]
                out.prompt_top_logprobs = [[], *([(t, _score(t))] for t in rest)]
            first = False
            yield out


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_prompt_logprobs_are_neither_lost_nor_repeated_by_a_migration(
    namespace: str, stream: bool
) -> None:
    """Completions with echo and logprobs: the prompt's entries come with the first worker's
    first output; the continuation does not ask for them again, and the client's logprobs are
    those of an unbroken answer."""
    async with two_workers(namespace, ScoringEcho) as (workers, service, server):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        body: dict[str, Any] = {
            "model": "tiny",
            "prompt": "the quick brown fox jumps over the lazy dog",
            "max_tokens": 30,
            "echo": True,
            "logprobs": 1,
            "extra_body": {"ignore_eos": True},
        }
        expected = (await client.completions.create(**body)).choices[0]
        for h in workers:
            h.received.clear()
        killer = asyncio.create_task(kill_the_busy_one(workers))
        if stream:
            chunks = [c async for c in await client.completions.create(**body, stream=True)]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            tokens = [
                t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
            ]
            values = [v for c in chunks if c.choices[0].logprobs
                      for v in c.choices[0].logprobs.token_logprobs]  # fmt: skip
            offsets = [o for c in chunks if c.choices[0].logprobs
                       for o in c.choices[0].logprobs.text_offset]  # fmt: skip
        else:
            choice = (await client.completions.create(**body)).choices[0]
            assert choice.logprobs is not None
            text, tokens = choice.text, choice.logprobs.tokens
            values, offsets = choice.logprobs.token_logprobs, choice.logprobs.text_offset
        first = await killer
        second = next(h for h in workers if h is not first)
        assert expected.logprobs is not None
        assert text == expected.text
        assert tokens == expected.logprobs.tokens
        assert values == expected.logprobs.token_logprobs
        assert offsets == expected.logprobs.text_offset
        ((original, _),) = first.received
        ((continued, _),) = second.received
        assert original.output_options.prompt_logprobs == 1
        assert continued.generated_tokens > 0
        assert continued.output_options.prompt_logprobs is None
        await client.close()
        await server.close()
        await service.close()


async def test_n_choices_each_migrate_on_their_own(namespace: str) -> None:
    """n = 3 over two workers: the one that dies takes some choices with it; each moves to the
    other worker and the stream ends with every choice whole."""
    async with two_workers(namespace, EchoHandler) as (workers, service, server):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": chat("the quick brown fox jumps over the lazy dog"),
            "max_tokens": 30,
            "extra_body": {"ignore_eos": True},
        }
        expected = (await client.chat.completions.create(**body)).choices[0].message.content
        stream = await client.chat.completions.create(
            **body, n=3, stream=True, stream_options={"include_usage": True}
        )
        texts = ["", "", ""]
        victim = None
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
            if victim is None and all(texts):
                # round robin: both workers hold one or two of the three choices
                victim = next(h for h in workers if h.active)
                await workers[victim].shutdown()
        assert victim is not None and texts == [expected] * 3
        assert chunk.usage is not None and chunk.usage.completion_tokens == 90
        assert victim.metrics.cancelled_total >= 1
        await client.close()
        await server.close()
        await service.close()


async def test_a_card_lowers_the_limit_and_the_error_names_no_address(namespace: str) -> None:
    """migration-limit 0 on the card: the stream fails (file + tcp: the failure is a broken
    connection, whose message names host:port), and the client sees a generic error event."""
    cfg = RuntimeConfig(
        file_kv=None, discovery_backend="mem", namespace=namespace, graceful_shutdown_timeout=0
    )
    async with DistributedRuntime(cfg) as front, DistributedRuntime(cfg) as worker:
        handler = EchoHandler(delay=0.01)
        await add_worker(worker, handler, migration_limit=0)
        service, server = await frontend(front, namespace, 1)
        url = f"http://127.0.0.1:{server.port}"
        events: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            body = {"model": "tiny", "messages": chat("x y z"), "max_tokens": 200, "stream": True}
            body["ignore_eos"] = True
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            tcp = worker._server
                            assert tcp is not None
                            for conn in list(tcp.connections):  # type: ignore[attr-defined]
                                conn.transport.abort()  # the worker's process "died"
        error = json.loads(events[-2])["error"]
        assert events[-1] == "[DONE]"
        assert error["type"] == "service_unavailable"
        assert "127.0.0.1" not in error["message"] and ":" not in error["message"]
        await server.close()
        await service.close()


async def test_auth_mismatch_is_503_not_401_and_logged(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"discovery_backend": "mem", "namespace": namespace}
    async with (
        DistributedRuntime(RuntimeConfig(**base, auth_token="frontend-secret")) as front,
        DistributedRuntime(RuntimeConfig(**base, auth_token="worker-secret")) as worker,
    ):
        await add_worker(worker, EchoHandler())
        service, server = await frontend(front, namespace, 1)
        with caplog.at_level(logging.WARNING):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                r = await http.post(
                    "/v1/chat/completions", json={"model": "tiny", "messages": chat("hi")}
                )
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["type"] == "service_unavailable"
        assert "127.0.0.1" not in error["message"] and "auth" not in error["message"].lower()
        assert "DYN_AUTH_TOKEN differ" in caplog.text
        await server.close()
        await service.close()


async def test_shutdown_ends_open_streams_with_an_error_event_and_done(namespace: str) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as rt:
        await add_worker(rt, EchoHandler(delay=0.01))
        service, server = await frontend(rt, namespace, 1)
        assert isinstance(server, HttpServer)
        received: list[str] = []

        async def one() -> bool:
            body = {"model": "tiny", "messages": chat("a b"), "max_tokens": 1000, "stream": True}
            body["ignore_eos"] = True
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
                http.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                async for line in response.aiter_lines():  # reads to the terminating chunk
                    received.append(line)
            return True

        async def whole() -> httpx.Response:
            body = {"model": "tiny", "messages": chat("a b"), "max_tokens": 1000}
            body["ignore_eos"] = True
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                return await http.post("/v1/chat/completions", json=body, timeout=30)

        streams = [asyncio.create_task(one()) for _ in range(3)]
        waiting = asyncio.create_task(whole())
        async with asyncio.timeout(10):
            while len(received) < 10:
                await asyncio.sleep(0.01)
        await server.close(grace=0.2)
        assert await asyncio.gather(*streams) == [True, True, True]  # no protocol error
        reply = await waiting  # a whole response still being made: 503, not a cut connection
        assert reply.status_code == 503
        assert reply.json()["error"]["type"] == "service_unavailable"
        data = [ln[6:] for ln in received if ln.startswith("data: ")]
        errors = [json.loads(d)["error"] for d in data if d.startswith('{"error"')]
        assert len(errors) == 3 and data.count("[DONE]") == 3
        assert {e["type"] for e in errors} == {"service_unavailable"}
        await service.close()


class RegrammarHandler(BaseWorkerHandler):
    """An engine as real ones treat a structured-output constraint: the constrained answer
    starts from its beginning on every request, whatever the prompt already holds (a grammar
    is matched from the first generated token). The mocker continues token-exactly instead;
    this is what vLLM, SGLang and TensorRT-LLM would do with a migration's continuation."""

    def __init__(self, answer: list[int], die: asyncio.Event | None = None) -> None:
        super().__init__(name="regrammar")
        self.answer = answer
        self.die = die
        """Set after the fifth token: the test stops this worker's runtime then."""
        self.requests: list[PreprocessedRequest] = []
        self.release = asyncio.Event()

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        assert request.guided_decoding is not None
        for i, token in enumerate(self.answer):
            yield EngineOutput(token_ids=[token])
            if i == 4 and self.die is not None:
                self.die.set()
                await self.release.wait()  # until the test has stopped this worker
        yield EngineOutput(finish_reason="stop")


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ANSWER = '{"city": "Paris, the capital of France"}'


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_constrained_answer_is_never_continued_on_another_worker(
    namespace: str, stream: bool
) -> None:
    """A worker dies mid-way through a structured-output answer. Continuing elsewhere would
    give the prefix plus a whole new answer (invalid JSON): a whole response starts again from
    scratch on the other worker (the client gets one valid answer), a stream fails with a
    retryable error (part of the answer was sent already)."""
    from dynamo_core.llm.tokenizer import Tokenizer

    answer = Tokenizer.from_dir(TINY).encode(ANSWER)
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    async with (
        DistributedRuntime(cfg) as front,
        DistributedRuntime(cfg) as a,
        DistributedRuntime(cfg) as b,
    ):
        die = asyncio.Event()
        ha, hb = RegrammarHandler(answer, die), RegrammarHandler(answer)
        await add_worker(a, ha)
        service, server = await frontend(front, namespace, 1)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )

        async def kill_a() -> None:
            """Five tokens into `a`'s answer: `b` joins, `a` dies."""
            await die.wait()
            await add_worker(b, hb)
            async with asyncio.timeout(10):
                while len(service.models.get("tiny").live_instances()) < 2:
                    await service.models.wait_for_change()
            await a.shutdown()
            ha.release.set()

        killer = asyncio.create_task(kill_a())
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": chat("where?"),
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
        }  # fmt: skip
        try:
            if stream:
                chunks = await client.chat.completions.create(**body, stream=True)
                text = ""
                with pytest.raises(openai.APIError, match="retry the request"):
                    async for chunk in chunks:
                        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                assert ANSWER.startswith(text) and text != ANSWER  # only the first worker's part
                assert hb.requests == []  # never continued elsewhere
            else:
                r = await client.chat.completions.create(**body)
                assert r.choices[0].message.content == ANSWER  # once, valid
                assert json.loads(ANSWER) == {"city": "Paris, the capital of France"}
                [again] = hb.requests  # started from scratch on `b`: the original prompt
                assert again.generated_tokens == 0
                assert again.token_ids == ha.requests[0].token_ids
                assert r.usage is not None and r.usage.completion_tokens == len(answer)
            await killer
        finally:
            killer.cancel()
            await client.close()
            await server.close()
            await service.close()
