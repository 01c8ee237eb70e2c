"""`/v1/embeddings` in one process: the `openai` client on the frontend and an embedding mocker
(`--embedding-worker`) beside a chat mocker; OpenAI's schema rules one by one; model types kept
apart both ways; and a worker that dies or hangs mid-request (a migrated answer or an
OpenAI-shaped 503, never a hang)."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest

from _graph import TINY, Graph, assert_param_error, in_process_graph
from dynamo_core.handlers import BaseEmbeddingHandler
from dynamo_core.llm import Tokenizer, register_model
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.llm.protocol import PreprocessedEmbeddingRequest
from dynamo_core.mocker.embedding import mock_embedding
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig
from test_frontend_faults import frontend

SIZE = 64  # the tiny model's hidden_size: the mocker's default vector size


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


@pytest.fixture
async def graph(namespace: str) -> AsyncIterator[Graph]:
    models = {"embed": {"embedding_worker": True}, "chat": {}}
    async with in_process_graph(namespace, models) as g:
        yield g


def expected(tokenizer: Tokenizer, text: str, dimensions: int | None = None) -> list[float]:
    return mock_embedding(tokenizer.encode(text, add_special_tokens=True), SIZE, dimensions)


def close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(a, b, strict=True))  # fmt: skip


def norm(v: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


# -- the happy path, through the openai client ----------------------------------------------------


async def test_float_and_base64_give_the_same_unit_vectors(
    graph: Graph, tokenizer: Tokenizer
) -> None:
    texts = ["the quick brown fox", "jumps over", "the lazy dog"]
    floats = await graph.client.embeddings.create(
        model="embed", input=texts, encoding_format="float"
    )
    # the SDK asks for base64 when not told, and decodes it (numpy, little-endian float32)
    default = await graph.client.embeddings.create(model="embed", input=texts)
    assert floats.object == "list" and floats.model == "embed"
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in floats.data)
    for text, a, b in zip(texts, floats.data, default.data, strict=True):
        assert close(a.embedding, expected(tokenizer, text))
        assert close(b.embedding, a.embedding)
        assert math.isclose(norm(a.embedding), 1.0, rel_tol=1e-5)
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=True)) for t in texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    assert default.usage.prompt_tokens == tokens


async def test_base64_is_little_endian_float32(graph: Graph, tokenizer: Tokenizer) -> None:
    r = await graph.http.post(
        "/v1/embeddings", json={"model": "embed", "input": "hello", "encoding_format": "base64"}
    )
    assert r.status_code == 200
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 4 * SIZE
    assert close(struct.unpack(f"<{SIZE}f", raw), expected(tokenizer, "hello"))


async def test_token_id_inputs(graph: Graph, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello world", add_special_tokens=True)
    one = await graph.client.embeddings.create(model="embed", input=ids, encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids)
    assert close(one.data[0].embedding, mock_embedding(ids, SIZE))
    # the text and its token ids are the same input
    text = await graph.client.embeddings.create(model="embed", input="hello world", encoding_format="float")  # fmt: skip
    assert close(text.data[0].embedding, one.data[0].embedding)
    many = await graph.client.embeddings.create(model="embed", input=[ids, [5, 6, 7], ids])
    assert many.usage.prompt_tokens == 2 * len(ids) + 3
    vectors = [d.embedding for d in many.data]
    assert close(vectors[0], vectors[2]) and not close(vectors[0], vectors[1])
    assert close(vectors[1], mock_embedding([5, 6, 7], SIZE))


async def test_dimensions_shorten_and_renormalise(graph: Graph, tokenizer: Tokenizer) -> None:
    r = await graph.client.embeddings.create(
        model="embed", input="hello", dimensions=8, encoding_format="float"
    )
    short = r.data[0].embedding
    assert len(short) == 8 and math.isclose(norm(short), 1.0, rel_tol=1e-5)
    full = expected(tokenizer, "hello")
    scale = norm(full[:8])
    assert close(short, [x / scale for x in full[:8]])  # a Matryoshka prefix


async def test_the_same_input_gives_the_same_vector_in_a_big_batch(graph: Graph) -> None:
    texts = [f"sentence number {i}" for i in range(200)] + ["sentence number 7"]
    r = await graph.client.embeddings.create(model="embed", input=texts, encoding_format="float")
    assert len(r.data) == 201
    assert close(r.data[7].embedding, r.data[200].embedding)
    assert len({tuple(d.embedding) for d in r.data}) == 200


async def test_models_lists_the_embedding_model_and_routes_stay_apart(graph: Graph) -> None:
    assert {m.id async for m in graph.client.models.list()} == {"embed", "chat"}
    with pytest.raises(openai.BadRequestError) as chat_on_embed:
        await graph.client.chat.completions.create(
            model="embed", messages=[{"role": "user", "content": "hi"}]
        )
    error = chat_on_embed.value.body
    assert isinstance(error, dict) and error["param"] == "model"
    assert "embedding model" in error["message"] and "/v1/embeddings" in error["message"]
    with pytest.raises(openai.BadRequestError):
        await graph.client.completions.create(model="embed", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        await graph.client.responses.create(model="embed", input="hi")
    with pytest.raises(openai.BadRequestError) as embed_on_chat:
        await graph.client.embeddings.create(model="chat", input="hi")
    error = embed_on_chat.value.body
    assert isinstance(error, dict) and error["param"] == "model"
    assert "/v1/chat/completions" in error["message"]
    with pytest.raises(openai.NotFoundError):
        await graph.client.embeddings.create(model="nope", input="hi")


async def test_metrics_count_embedding_requests(graph: Graph) -> None:
    await graph.client.embeddings.create(model="embed", input=["a b", "c"])
    await graph.http.post("/v1/embeddings", json={"model": "embed", "input": ""})
    text = await graph.metrics()
    assert (
        'dynamo_frontend_requests_total{endpoint="embeddings",model="embed",'
        'request_type="unary",status="success"} 1.0' in text
    )
    assert 'dynamo_frontend_inflight_requests{model="embed"} 0.0' in text


# -- OpenAI's schema, rule by rule --------------------------------------------------------------

CONTEXT = 2048  # the tiny model's
LONG_IDS = [5] * (CONTEXT + 1)
BAD: list[tuple[dict[str, Any], str | None, str | None]] = [
    # body (model "embed" unless given), param, code
    ({}, "input", None),
    ({"input": None}, "input", None),
    ({"input": 5}, "input", None),
    ({"input": {"text": "a"}}, "input", None),
    ({"input": ""}, "input", "empty_string"),
    ({"input": []}, "input", "empty_array"),
    ({"input": ["a", ""]}, "input[1]", "empty_string"),
    ({"input": ["a", 5]}, "input[1]", "invalid_type"),
    ({"input": [[1, 2], []]}, "input[1]", "empty_array"),
    ({"input": [[1, 2], 3]}, "input[1]", "invalid_type"),
    ({"input": [1, "a"]}, "input[1]", "invalid_value"),
    ({"input": [1, True]}, "input[1]", "invalid_value"),
    ({"input": [1, -1]}, "input[1]", "invalid_value"),
    ({"input": [1, 10**9]}, "input[1]", "invalid_value"),
    ({"input": [[1], [2.5]]}, "input[1][0]", "invalid_value"),
    ({"input": [None]}, "input[0]", "invalid_type"),
    ({"input": [{"a": 1}]}, "input[0]", "invalid_type"),
    ({"input": ["a"] * 2049}, "input", "invalid_value"),
    ({"input": LONG_IDS}, "input", "context_length_exceeded"),
    ({"input": [[1], LONG_IDS]}, "input[1]", "context_length_exceeded"),
    ({"input": ["a", "word " * 3000]}, "input[1]", "context_length_exceeded"),
    ({"input": "word " * 100_000}, "input", "context_length_exceeded"),
    ({"input": "a", "encoding_format": "binary"}, "encoding_format", None),
    ({"input": "a", "encoding_format": 1}, "encoding_format", None),
    ({"input": "a", "dimensions": 0}, "dimensions", None),
    ({"input": "a", "dimensions": "8"}, "dimensions", None),
    ({"input": "a", "dimensions": SIZE + 1}, "dimensions", "invalid_value"),
    ({"input": "a", "user": 5}, "user", None),
    ({"input": "a", "model": 5}, "model", None),
    ({"input": "a", "model": None}, "model", None),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD, ids=[f"{p}-{c}" for _, p, c in BAD])
async def test_invalid_requests_are_400_naming_the_param(
    graph: Graph, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    r = await graph.http.post("/v1/embeddings", json={"model": "embed", **body})
    assert_param_error(r, param, code)


async def test_what_the_schema_allows_is_served(graph: Graph) -> None:
    exactly_the_context = [5] * CONTEXT  # nothing is generated after an embedding's input
    for body in (
        {"input": exactly_the_context},
        {"input": "a", "encoding_format": None, "dimensions": None, "user": None},
        {"input": ["a"] * 2048},
        {"input": "a", "user": "someone", "extra_field": 1},
    ):
        r = await graph.http.post("/v1/embeddings", json={"model": "embed", **body})
        assert r.status_code == 200, (body, r.text)
    r = await graph.http.post("/v1/embeddings", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# -- a model that cannot shorten its vectors; workers that fail --------------------------------


class Embedder(BaseEmbeddingHandler):
    """Mock vectors; while `hang` is set, a request waits forever (until cancelled)."""

    def __init__(self, spec: EmbeddingSpec) -> None:
        super().__init__(spec=spec)
        self.hang = False
        self.started = asyncio.Event()

    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        self.started.set()
        if self.hang:
            await asyncio.Event().wait()
        return [
            mock_embedding(ids, self.spec.size, request.dimensions) for ids in request.token_ids
        ]


async def add_embedder(rt: DistributedRuntime, handler: Embedder) -> None:
    ep = rt.namespace().component("backend").endpoint("generate")
    await register_model(ep, model_path=TINY, model_name="tiny", embedding=handler.spec)
    await ep.start_serving(handler.generate)


async def embedders(namespace: str, n: int, spec: EmbeddingSpec) -> Any:
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    runtimes = [DistributedRuntime(cfg) for _ in range(n + 1)]
    for rt in runtimes:
        await rt.__aenter__()
    handlers = [Embedder(spec) for _ in range(n)]
    for rt, h in zip(runtimes[1:], handlers, strict=True):
        await add_embedder(rt, h)
    service, server = await frontend(runtimes[0], namespace, n)
    return runtimes, handlers, service, server


async def stop(runtimes: list[DistributedRuntime], service: Any, server: Any) -> None:
    await server.close()
    await service.close()
    for rt in reversed(runtimes):
        await rt.__aexit__(None, None, None)


async def test_dimensions_on_a_model_that_cannot_shorten(namespace: str) -> None:
    runtimes, _, service, server = await embedders(namespace, 1, EmbeddingSpec(size=16))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            r = await http.post("/v1/embeddings", json={"model": "tiny", "input": "a", "dimensions": 8})  # fmt: skip
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["param"] == "dimensions"
            assert error["message"] == "This model does not support specifying dimensions."
            r = await http.post("/v1/embeddings", json={"model": "tiny", "input": "a"})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 16
    finally:
        await stop(runtimes, service, server)


async def test_a_worker_that_dies_mid_request_is_replaced(namespace: str) -> None:
    runtimes, handlers, service, server = await embedders(namespace, 2, EmbeddingSpec(size=16))
    try:
        for h in handlers:
            h.hang = True
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        call = asyncio.create_task(
            client.embeddings.create(model="tiny", input=[[1, 2], [3]], encoding_format="float")
        )
        async with asyncio.timeout(10):
            await asyncio.wait(
                [asyncio.create_task(h.started.wait()) for h in handlers],
                return_when=asyncio.FIRST_COMPLETED,
            )
        busy = next(i for i, h in enumerate(handlers) if h.started.is_set())
        for h in handlers:
            h.hang = False
        await runtimes[1 + busy].shutdown()
        async with asyncio.timeout(10):
            r = await call
        assert [len(d.embedding) for d in r.data] == [16, 16]
        assert close(r.data[1].embedding, mock_embedding([3], 16))
        assert handlers[busy].metrics.cancelled_total == 1
        assert handlers[1 - busy].metrics.requests_total == 1
        await client.close()
    finally:
        await stop(runtimes, service, server)


async def test_the_last_worker_dying_mid_request_is_a_503_not_a_hang(namespace: str) -> None:
    runtimes, handlers, service, server = await embedders(namespace, 1, EmbeddingSpec(size=16))
    try:
        handlers[0].hang = True
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            call = asyncio.create_task(
                http.post("/v1/embeddings", json={"model": "tiny", "input": "a"})
            )
            async with asyncio.timeout(10):
                await handlers[0].started.wait()
            await runtimes[1].shutdown()
            async with asyncio.timeout(10):
                r = await call
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["type"] == "service_unavailable" and "127.0.0.1" not in error["message"]
        text = service.metrics.render().decode()
        assert 'endpoint="embeddings",model="tiny",request_type="unary",status="error"} 1.0' in text
    finally:
        await stop(runtimes, service, server)


class Garbage(Embedder):
    async def engine_embed(
        self, request: PreprocessedEmbeddingRequest, context: Context
    ) -> list[Sequence[float]]:
        return [[math.nan] * self.spec.size for _ in request.token_ids]


async def test_an_engine_answering_garbage_is_a_500_and_the_worker_lives_on(namespace: str) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as front, DistributedRuntime(cfg) as worker:
        await add_embedder(worker, Garbage(EmbeddingSpec(size=4)))
        service, server = await frontend(front, namespace, 1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            for _ in range(2):
                r = await http.post("/v1/embeddings", json={"model": "tiny", "input": "a"})
                assert r.status_code == 500
                assert "NaN" in r.json()["error"]["message"]
        await server.close()
        await service.close()


def test_mock_vectors_are_deterministic_units(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello", add_special_tokens=True)
    v = mock_embedding(ids, 32)
    assert v == mock_embedding(list(ids), 32)  # bit for bit, no per-process salt
    assert math.isclose(norm(v), 1.0, rel_tol=1e-12)
    assert mock_embedding(ids, 32, seed=1) != v
    assert mock_embedding(ids, 32, 4) == pytest.approx([x / norm(v[:4]) for x in v[:4]])
    # a pinned value: the same on every machine and in every Python process
    assert round(mock_embedding([1, 2, 3], 4)[0], 6) == PINNED


PINNED = -0.874574
