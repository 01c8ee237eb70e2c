"""`python -m dynamo_vllm.embedding` on the fake `vllm` (its `AsyncLLM.encode`, `PoolingParams`
and `PoolingRequestOutput` as vLLM 0.32 has them): the embedding card, vectors through the real
frontend and the `openai` client, `dimensions` as vLLM checks them, cancellation reaching the
engine, and vLLM's refusals as the client's errors."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from conftest import TINY
from dynamo_core.errors import ConfigError, InvalidRequestError
from dynamo_core.llm import Tokenizer
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.inprocess import frontend, record_adapters, serving
from dynamo_vllm import embedding
from dynamo_vllm.engine import VllmAdapter

pytestmark = pytest.mark.usefixtures("fake_vllm")


def fake_vector(ids: list[int], size: int = 64, dimensions: int | None = None) -> list[float]:
    from vllm.v1.engine.async_llm import _unit_vector

    return list(_unit_vector(ids, size, dimensions))


def args(namespace: str, *extra: str) -> Any:
    return embedding.build_parser().parse(
        ["--model", str(TINY), "--served-model-name", "tiny-embed", "--namespace", namespace,
         "--discovery-backend", "mem", "--request-plane", "inproc", *extra]
    )  # fmt: skip


@pytest.fixture
async def served(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, Any, openai.AsyncOpenAI]]:
    """The role's own `worker()` in this process, the frontend beside it: yields the card, the
    adapter (its `AsyncLLM`) and an `openai` client."""
    adapters = record_adapters(monkeypatch, embedding, "VllmAdapter")
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt,
        serving(embedding.worker, rt, args(namespace)) as card,
        frontend(rt, namespace) as (_, client),
    ):
        yield card, adapters[0], client


async def test_the_card_is_an_embedding_model_with_vllms_size(served: Any) -> None:
    card, adapter, _ = served
    assert card.model_type == ["embedding"]
    assert card.embedding == EmbeddingSpec(size=64)  # hidden_size; not Matryoshka
    assert adapter.llm.vllm_config.model_config.runner_type == "pooling"


async def test_vectors_through_the_frontend(served: Any) -> None:
    _, adapter, client = served
    tok = Tokenizer.from_dir(TINY)
    texts = ["a first text", "a second, longer text"]
    r = await client.embeddings.create(model="tiny-embed", input=texts)
    for text, item in zip(texts, r.data, strict=True):
        want = fake_vector(tok.encode(text, add_special_tokens=True))
        assert item.embedding == pytest.approx(want, rel=1e-6)
        assert math.isclose(math.fsum(x * x for x in item.embedding), 1.0, rel_tol=1e-5)
    ids = [[5, 6, 7], [8]]
    r = await client.embeddings.create(model="tiny-embed", input=ids, encoding_format="float")
    assert [d.embedding for d in r.data] == [pytest.approx(fake_vector(i), rel=1e-6) for i in ids]
    assert r.usage.prompt_tokens == 4
    assert not adapter.llm.requests  # every input's request ended in the engine

    # this model is not Matryoshka: `dimensions` is the client's error, found by the frontend
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        await client.embeddings.create(model="tiny-embed", input="a", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        await client.chat.completions.create(
            model="tiny-embed", messages=[{"role": "user", "content": "hi"}]
        )


async def test_dimensions_on_a_matryoshka_model(
    namespace: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    model = tmp_path / "tiny-mrl"
    shutil.copytree(TINY, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32]}))
    adapters = record_adapters(monkeypatch, embedding, "VllmAdapter")
    parsed = embedding.build_parser().parse(
        ["--model", str(model), "--namespace", namespace, "--discovery-backend", "mem",
         "--request-plane", "inproc"]
    )  # fmt: skip
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt,
        serving(embedding.worker, rt, parsed) as card,
    ):
        assert card.embedding == EmbeddingSpec(
            size=64, matryoshka=True, matryoshka_dimensions=[16, 32]
        )
        handler = adapters[0].embedding_handler()
        request = {"token_ids": [[5, 6]], "dimensions": 16}
        (out,) = [o async for o in handler.generate(request, Context())]
        assert len(out["embeddings"][0]) == 4 * 16
        with pytest.raises(InvalidRequestError, match=r"one of \[16, 32\]"):
            [o async for o in handler.generate({**request, "dimensions": 8}, Context())]


async def test_cancellation_and_refusals_reach_the_engine(served: Any) -> None:
    _, adapter, _ = served
    handler, llm = adapter.embedding_handler(), adapter.llm
    ctx = Context()
    call = asyncio.create_task(anext(handler.generate({"token_ids": [[1, 2], [3]]}, ctx)))
    async with asyncio.timeout(5):
        while not llm.requests:
            await asyncio.sleep(0)  # the engine's own state: no event to await
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not llm.requests and handler.metrics.cancelled_total == 1

    from vllm.exceptions import VLLMValidationError

    llm.fail_next = VLLMValidationError("The prompt is too long")
    with pytest.raises(InvalidRequestError, match="vLLM rejected the request: The prompt"):
        [o async for o in handler.generate({"token_ids": [[1]]}, Context())]
    # and the engine goes on serving
    (out,) = [o async for o in handler.generate({"token_ids": [[1]]}, Context())]
    assert len(out["embeddings"]) == 1


async def test_a_generate_runner_is_refused_before_anything_starts(namespace: str) -> None:
    with pytest.raises(ConfigError, match="--runner generate cannot serve embeddings"):
        VllmAdapter(args(namespace, "--runner", "generate"), role="embedding")
