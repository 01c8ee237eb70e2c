"""The frontend in one process (mem discovery, inproc requests) with the echo engine."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dynamo_core.echo import EchoHandler
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import HttpServer, serve_http
from dynamo_core.llm import register_model
from dynamo_core.router import RouterConfig
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.inprocess import record_adapters, serving

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


@dataclass
class Graph:
    runtime: DistributedRuntime
    service: OpenAIService
    server: HttpServer
    handler: EchoHandler
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


async def add_worker(
    runtime: DistributedRuntime,
    handler: EchoHandler,
    model: str = "tiny",
    model_path_override: Path | None = None,
    **card: Any,
) -> None:
    ep = runtime.namespace().component("backend").endpoint("generate")
    await register_model(ep, model_path=model_path_override or TINY, model_name=model, **card)
    await ep.start_serving(handler.generate)


@pytest.fixture
async def graph(namespace: str) -> AsyncIterator[Graph]:
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as rt:
        handler = EchoHandler()
        await add_worker(rt, handler, context_length=64)
        service = OpenAIService(rt, namespace=namespace)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=url) as http:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            yield Graph(rt, service, server, handler, client, http)
            await client.close()
        await server.close()
        await service.close()


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


async def test_models_listed(graph: Graph) -> None:
    import time

    models = await graph.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert abs(models.data[0].created - time.time()) < 60  # a Unix time, as OpenAI's


async def test_chat_whole_and_usage(graph: Graph) -> None:
    r = await graph.client.chat.completions.create(
        model="tiny", messages=chat("Hello there"), max_tokens=40
    )
    # the echo engine returns the rendered prompt, whose <|im_end|> is an end-of-sequence token
    assert r.choices[0].message.content == "user\nHello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < 40
    r = await graph.client.chat.completions.create(
        model="tiny", messages=chat("Hello there"), max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 40
    assert r.usage.prompt_tokens + 40 == r.usage.total_tokens


async def test_chat_stream_with_usage_in_last_chunk(graph: Graph) -> None:
    stream = await graph.client.chat.completions.create(
        model="tiny",
        messages=chat("Streaming works"),
        max_tokens=12,
        extra_body={"nvext": {"ignore_eos": True}},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_completion_and_stop_string_never_leaks(graph: Graph) -> None:
    r = await graph.client.completions.create(
        model="tiny", prompt="one two three four five", max_tokens=20, stop=["three"]
    )
    assert r.choices[0].text == "one two "
    assert r.choices[0].finish_reason == "stop"
    stream = await graph.client.completions.create(
        model="tiny",
        prompt="one two three four five",
        max_tokens=20,
        stop=["thr", "ee"],
        stream=True,
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "one two "


async def test_token_id_prompt(graph: Graph) -> None:
    r = await graph.client.completions.create(model="tiny", prompt=[10, 11, 12], max_tokens=3)
    assert r.usage is not None and r.usage.prompt_tokens == 3


async def test_unknown_model_is_404(graph: Graph) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await graph.client.chat.completions.create(model="nope", messages=chat("x"))
    assert "nope" in str(info.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"model": "tiny"}', "messages"),
        (b'{"model": "tiny", "messages": "hi"}', "messages"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "a"}',
            "max_tokens",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            "temperature",
        ),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 129}', "n"),
        (b'{"model": "tiny", "messages": []}', "empty"),
        (b'{"model": "tiny", "messages": [{"content": "x"}]}', "role"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}',
            "context length",
        ),
    ],
)
async def test_bad_input_is_openai_shaped_400(graph: Graph, body: bytes, needle: str) -> None:
    r = await graph.http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    ok = await graph.client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=2)
    assert ok.choices[0].finish_reason == "length"  # "<|im_start|>user" is longer than that


async def test_long_prompt_is_rejected(graph: Graph) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
        await graph.client.chat.completions.create(
            model="tiny", messages=chat("word " * 200), max_tokens=1
        )


async def test_openai_client_bad_request(graph: Graph) -> None:
    with pytest.raises(openai.BadRequestError):
        await graph.client.chat.completions.create(model="tiny", messages=chat("x"), top_p=5.0)


async def test_health_live_metrics_routes(graph: Graph) -> None:
    await graph.client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=3)
    health = (await graph.http.get("/health")).json()
    assert health["status"] == "healthy" and health["models"] == ["tiny"]
    assert (await graph.http.get("/live")).status_code == 200
    metrics = (await graph.http.get("/metrics")).text
    for name in (
        "dynamo_frontend_requests_total",
        "dynamo_frontend_inflight_requests",
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_frontend_request_duration_seconds",
        "dynamo_frontend_input_sequence_tokens",
        "dynamo_frontend_output_sequence_tokens",
    ):
        assert name in metrics
    assert 'model="tiny"' in metrics
    assert (await graph.http.get("/nowhere")).status_code == 404
    assert (await graph.http.get("/v1/chat/completions")).status_code == 405


async def test_no_live_instance_is_503(graph: Graph) -> None:
    # a card whose endpoint has no live instance (the window between a worker's death and
    # discovery noticing it)
    ep = graph.runtime.namespace().component("ghost").endpoint("generate")
    await register_model(ep, model_path=TINY, model_name="ghost")
    async with asyncio.timeout(5):
        while graph.service.models.get("ghost") is None:
            await graph.service.models.wait_for_change()
    r = await graph.http.post(
        "/v1/chat/completions", json={"model": "ghost", "messages": chat("x")}
    )
    assert r.status_code == 503
    assert r.json()["error"]["message"]


async def test_disconnect_cancels_worker_request(graph: Graph) -> None:
    graph.handler.delay = 0.01
    async with graph.http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": chat("x"),
            "max_tokens": 50,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        lines = r.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass
        assert graph.handler.active
    async with asyncio.timeout(1):
        while graph.handler.active:
            await asyncio.sleep(0.005)
    assert graph.handler.metrics.cancelled_total == 1


async def test_requests_spread_and_migrate(namespace: str) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    async with (
        DistributedRuntime(cfg) as front,
        DistributedRuntime(cfg) as a,
        DistributedRuntime(cfg) as b,
    ):
        ha, hb = EchoHandler(delay=0.002), EchoHandler(delay=0.002)
        await add_worker(a, ha, migration_limit=2)
        await add_worker(b, hb, migration_limit=2)
        service = OpenAIService(
            front, namespace=namespace, router=RouterConfig(router_mode="least-loaded")
        )
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        async with asyncio.timeout(5):
            while len(((entry := service.models.get("tiny")) and entry.live_instances()) or []) < 2:
                await service.models.wait_for_change()
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="tiny", messages=chat("x"), max_tokens=5, extra_body={"ignore_eos": True}
                )
                for _ in range(8)
            )
        )
        assert ha.metrics.requests_total == 4 and hb.metrics.requests_total == 4

        # a worker dies mid-stream: the client still gets every token, from the other one
        stream = await client.chat.completions.create(
            model="tiny",
            messages=chat("migrate me"),
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 5:
                    victim = a if ha.active else b
                    await victim.shutdown()
        finally:
            await client.close()
            await server.close()
            await service.close()
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 60
        assert (ha.metrics.cancelled_total + hb.metrics.cancelled_total) == 1


async def test_disaggregated_prefill_then_decode(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mocker = importlib.import_module("dynamo_core.mocker.main")  # the package's `main` is main()

    adapters = record_adapters(monkeypatch, mocker, "MockerAdapter")
    cfg = RuntimeConfig.in_process(namespace=namespace)

    def mocker_args(mode: str) -> Any:
        flags = ["--model-path", str(TINY), "--namespace", namespace, "--discovery-backend",
                 "mem", "--request-plane", "inproc", "--disaggregation-mode", mode,
                 "--speedup-ratio", "1000"]  # fmt: skip
        return mocker.build_parser().parse(flags, environ={})

    async with (
        DistributedRuntime(cfg) as rt,
        serving(mocker.worker, rt, mocker_args("prefill")),
        serving(mocker.worker, rt, mocker_args("decode")),
    ):
        prefill, decode = adapters
        service = OpenAIService(rt, namespace=namespace)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        try:
            async with asyncio.timeout(5):
                while service.models.prefill_pool("tiny") is None or not service.models.listed():
                    await service.models.wait_for_change()
            # the prefill pool alone does not list a second model
            assert [m.id for m in (await client.models.list()).data] == ["tiny"]
            r = await client.chat.completions.create(
                model="tiny",
                messages=chat("a disaggregated request"),
                max_tokens=9,
                extra_body={"ignore_eos": True},
            )
            assert r.usage is not None and r.usage.completion_tokens == 9
            p_stats, d_stats = prefill.engine.stats(), decode.engine.stats()
            assert p_stats["requests_total"] == 1 and p_stats["prefill_tokens"] > 0
            assert d_stats["transferred_tokens"] > 0 and d_stats["prefill_tokens"] == 0

            # the prompt's log-probabilities come from the prefill worker (which ran the
            # prompt), whole and streamed, the decode leg not asked for them
            prompt = service.models.get("tiny").tokenizer.encode(  # type: ignore[union-attr]
                "score this prompt", add_special_tokens=True
            )
            values = prefill.engine.prompt_logprobs(prompt, 2)[0]
            body: dict[str, Any] = {"model": "tiny", "prompt": "score this prompt", "echo": True,
                                    "logprobs": 2, "max_tokens": 3}  # fmt: skip
            whole = await client.completions.create(**body)
            lp = whole.choices[0].logprobs
            assert lp is not None and lp.token_logprobs[: len(prompt)] == values
            assert len(lp.tokens) == len(prompt) + 3
            assert [len(t) for t in lp.top_logprobs[1 : len(prompt)]] == [2] * (len(prompt) - 1)
            chunks = [c async for c in await client.completions.create(**body, stream=True)]
            streamed = [v for c in chunks if c.choices[0].logprobs
                        for v in c.choices[0].logprobs.token_logprobs]  # fmt: skip
            assert streamed == lp.token_logprobs
            assert decode.engine.stats()["prefill_tokens"] == 0  # every prompt was transferred

            # a prefill leg that fails before the hand-off: served aggregated instead
            prefill.engine.fail_next = RuntimeError("prefill GPU fell over")
            r = await client.chat.completions.create(
                model="tiny", messages=chat("again"), max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert r.usage is not None and r.usage.completion_tokens == 4
        finally:
            await client.close()
            await server.close()
            await service.close()


async def test_expect_100_continue_is_answered(graph: Graph) -> None:
    import asyncio as aio

    body = (  # over 1 KiB (where curl asks), mostly in a field the frontend ignores
        b'{"model": "tiny", "max_tokens": 2, "user": "' + b"u" * 2000 + b'", '
        b'"messages": [{"role": "user", "content": "x"}]}'
    )
    reader, writer = await aio.open_connection("127.0.0.1", graph.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    assert await aio.wait_for(reader.readline(), 1) == b"HTTP/1.1 100 Continue\r\n"
    await reader.readline()
    writer.write(body)
    assert (await aio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()


async def test_frontend_fetches_model_files_it_does_not_have(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frontend on another machine: the card's folder does not exist there."""
    import shutil

    monkeypatch.setenv("DYN_MODEL_CACHE", str(tmp_path / "cache"))
    worker_copy = tmp_path / "worker-disk" / "tiny"
    shutil.copytree(TINY, worker_copy)
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as worker_rt, DistributedRuntime(cfg) as front_rt:
        handler = EchoHandler()
        await add_worker(worker_rt, handler, model="remote", model_path_override=worker_copy)
        shutil.rmtree(worker_copy)  # gone from "this" machine; the worker holds its files
        service = OpenAIService(front_rt, namespace=namespace)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        try:
            async with asyncio.timeout(10):
                while service.models.get("remote") is None:
                    await service.models.wait_for_change()
            r = await client.chat.completions.create(
                model="remote", messages=chat("fetched"), max_tokens=30
            )
            assert r.choices[0].message.content == "user\nfetched"
            cached = list((tmp_path / "cache").iterdir())
            assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
        finally:
            await client.close()
            await server.close()
            await service.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\x13 not http at all\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n{",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_http_is_refused_and_the_server_keeps_serving(
    graph: Graph, garbage: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", graph.server.port)
    writer.write(garbage)
    async with asyncio.timeout(5):
        reply = await reader.read()  # the server answers (4xx) and closes, or just closes
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
    writer.close()
    await writer.wait_closed()
    ok = await graph.client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


async def test_completion_echo_and_suffix(graph: Graph) -> None:
    r = await graph.client.completions.create(
        model="tiny", prompt="one two", max_tokens=2, echo=True, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text.startswith("one two")
    stream = await graph.client.completions.create(
        model="tiny", prompt="one two", max_tokens=2, echo=True, stream=True
    )
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert texts[0] == "one two"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        await graph.client.completions.create(model="tiny", prompt="x", suffix="y")


async def test_the_path_a_worker_was_started_with_is_an_alias(graph: Graph) -> None:
    # the graph's worker registered TINY as "tiny": a client may send the path instead
    for name in (str(TINY), str(TINY.resolve())):
        r = await graph.client.chat.completions.create(model=name, messages=chat("x"), max_tokens=2)
        assert r.usage is not None and r.usage.completion_tokens == 2
    assert [m.id for m in (await graph.client.models.list()).data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        await graph.client.chat.completions.create(
            model=str(TINY / "nope"), messages=chat("x"), max_tokens=2
        )


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": 2**70}, "top_k"),
        ({"min_tokens": 2**40}, "min_tokens"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"nvext": {"top_k": 2**64}}, "top_k"),
        ({"n": 10**30}, "n"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"top_logprobs": 2**63, "logprobs": True}, "top_logprobs"),
    ],
)
async def test_numbers_out_of_range_are_a_400_naming_the_field(
    graph: Graph, extra: dict[str, Any], field: str
) -> None:
    body = {"model": "tiny", "messages": chat("x"), "max_tokens": 2, **extra}
    async with asyncio.timeout(5):  # before: an OverflowError on the way to the worker, no answer
        r = await graph.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    ok = await graph.http.post(
        "/v1/chat/completions",
        json={**body, **dict.fromkeys(extra)},  # the same, without it
    )
    assert ok.status_code == 200, ok.text


async def test_head_and_405_carry_allow_and_no_body(graph: Graph) -> None:
    r = await graph.http.head("/v1/models")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    r = await graph.http.head("/v1/chat/completions")
    assert r.status_code == 405 and r.content == b"" and r.headers["allow"] == "POST"
    r = await graph.http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]
    r = await graph.http.delete("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert "date" in r.headers
    assert (await graph.http.get("/v1/models")).status_code == 200  # the connection still works


async def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it(
    graph: Graph, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = graph.service.models.get("tiny")
    assert entry is not None
    tokenized: list[int] = []
    encode = entry.tokenizer.encode_released

    def counting(text: str, add_special_tokens: bool = False) -> list[int]:
        tokenized.append(len(text))
        return encode(text, add_special_tokens)

    monkeypatch.setattr(entry.tokenizer, "encode_released", counting)
    words = "The quick brown fox jumps over the lazy dog. " * 50_000  # 2.2 MB
    for route, body in (
        ("/v1/chat/completions", {"messages": chat(words)}),
        ("/v1/completions", {"prompt": words}),
        ("/v1/completions", {"prompt": list(range(100)) * 10_000}),
    ):
        r = await graph.http.post(route, json={"model": "tiny", **body}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded", error
        assert "maximum context length is 64" in error["message"]
    assert tokenized and max(tokenized) < 50_000  # prefixes only: bounded by the context (64)


async def test_all_workers_busy_queues_then_sheds_with_retry_after(namespace: str) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as rt:
        handler = EchoHandler(delay=0.05)
        await add_worker(rt, handler)
        limits = RouterConfig(active_requests_threshold=2, max_queued_requests=2, queue_timeout=30)
        service = OpenAIService(rt, namespace=namespace, router=limits)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                body = {"model": "tiny", "messages": chat("x"), "max_tokens": 5, "ignore_eos": True}
                replies = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=body, timeout=30) for _ in range(8))
                )
                codes = sorted(r.status_code for r in replies)
                # 2 run, 2 wait for them, the other 4 are refused at once
                assert codes == [200] * 4 + [503] * 4, codes
                shed = [r for r in replies if r.status_code == 503]
                assert all(r.headers["retry-after"] == "1" for r in shed)
                assert all(r.json()["error"]["code"] == "overloaded" for r in shed)
                assert handler.metrics.requests_total == 4
                # the queue drained: everything is accepted again
                r = await http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200
        finally:
            await server.close()
            await service.close()
