"""`dynamo_sglang.embedding` on the fake `sglang` (tests/fakes: `EmbeddingReqInput`, the tokenizer
manager's `generate_request`, `Engine.async_encode`, SGLang 0.5.23's checks and messages): the
handler alone (single and batch inputs, `dimensions`, SGLang's refusals, an engine failure,
cancellation), then the role's own `worker()` in this process behind the real frontend and the
`openai` client (the card, vectors for text and token ids, the 400s)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from dynamo_core.errors import ConfigError, EngineError, InvalidRequestError
from dynamo_core.llm import Tokenizer
from dynamo_core.llm.model_card import EmbeddingSpec
from dynamo_core.llm.protocol import unpack_embedding
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.inprocess import frontend, record_adapters, serving
from dynamo_sglang import embedding
from dynamo_sglang.engine import SglangAdapter, embedding_spec
from dynamo_sglang.handlers import EmbeddingHandler
from sglang_testing import TINY

pytestmark = pytest.mark.usefixtures("fake_sglang")

SIZE = 64  # the tiny model's hidden_size
CONTEXT = 2048  # its max_position_embeddings


def fake_vector(ids: list[int], dimensions: int | None = None) -> list[float]:
    from sglang.srt.entrypoints.engine import unit_vector

    return unit_vector(ids, SIZE, dimensions)


def matryoshka_model(tmp_path: Path, **config: Any) -> Path:
    """The tiny model with Matryoshka settings in its config.json."""
    model = tmp_path / "tiny-mrl"
    shutil.copytree(TINY, model)
    data = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**data, **config}))
    return model


def make_handler(
    engines: list[Any], model: Path = TINY, *, is_embedding: bool = True, **spec: Any
) -> EmbeddingHandler:
    import sglang

    engine = sglang.Engine(
        server_args=sglang.ServerArgs(model_path=str(model), is_embedding=is_embedding)
    )
    engines.append(engine)
    return EmbeddingHandler(
        engine,
        spec=EmbeddingSpec(**{"size": SIZE, **spec}),
        context_length=engine.tokenizer_manager.context_len - 1,
    )


async def embed(handler: EmbeddingHandler, request: dict[str, Any]) -> list[list[float]]:
    (out,) = [o async for o in handler.generate(request, Context())]
    return [unpack_embedding(v) for v in out["embeddings"]]


# -- the handler ---------------------------------------------------------------------------


async def test_one_input_and_a_batch_are_one_engine_call_each(engines: list[Any]) -> None:
    handler = make_handler(engines)
    tm = handler.engine.tokenizer_manager
    (vector,) = await embed(handler, {"token_ids": [[5, 6, 7]]})
    assert vector == pytest.approx(fake_vector([5, 6, 7]), rel=1e-6)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)

    batch = [[9], [10, 11], [9]]  # in order, a repeated input included
    (out,) = [o async for o in handler.generate({"token_ids": batch}, Context())]
    assert [unpack_embedding(v) for v in out["embeddings"]] == [
        pytest.approx(fake_vector(ids), rel=1e-6) for ids in batch
    ]
    assert out["prompt_tokens"] == 4
    first, second = tm.embed_calls
    assert first.input_ids == [[5, 6, 7]] and second.input_ids == batch  # lists: batches
    assert len(set(second.rid)) == 3 and first.dimensions is None
    assert not tm.rid_to_state and not tm.aborted  # every input ended in the engine


async def test_dimensions_reach_sglang_on_a_matryoshka_model(
    engines: list[Any], tmp_path: Path
) -> None:
    model = matryoshka_model(tmp_path, matryoshka_dimensions=[16, 32])
    handler = make_handler(engines, model, matryoshka=True, matryoshka_dimensions=[16, 32])
    (vector,) = await embed(handler, {"token_ids": [[5, 6]], "dimensions": 16})
    assert vector == pytest.approx(fake_vector([5, 6], 16), rel=1e-6)
    assert handler.engine.tokenizer_manager.embed_calls[-1].dimensions == 16
    # the card's check, before the engine is asked
    with pytest.raises(InvalidRequestError, match=r"one of \[16, 32\]"):
        await embed(handler, {"token_ids": [[5, 6]], "dimensions": 8})
    assert len(handler.engine.tokenizer_manager.embed_calls) == 1


async def test_dimensions_on_a_model_that_cannot_shorten(engines: list[Any]) -> None:
    handler = make_handler(engines)
    with pytest.raises(InvalidRequestError, match="does not support specifying dimensions"):
        await embed(handler, {"token_ids": [[5]], "dimensions": 8})
    assert not handler.engine.tokenizer_manager.embed_calls
    # a card that claims more than SGLang grants: SGLang's refusal is the client's error
    wrong = make_handler(engines, matryoshka=True)
    with pytest.raises(InvalidRequestError, match=r"SGLang rejected.*matryoshka"):
        await embed(wrong, {"token_ids": [[5]], "dimensions": 8})
    assert not wrong.engine.tokenizer_manager.rid_to_state


async def test_an_engine_without_is_embedding_refuses(engines: list[Any]) -> None:
    handler = make_handler(engines, is_embedding=False)
    with pytest.raises(InvalidRequestError, match="--is-embedding"):
        await embed(handler, {"token_ids": [[5]]})


async def test_inputs_longer_than_sglang_takes(engines: list[Any]) -> None:
    handler = make_handler(engines)
    with pytest.raises(InvalidRequestError, match=f"at most {CONTEXT - 1}"):
        await embed(handler, {"token_ids": [[5], [7] * CONTEXT]})
    (vector,) = await embed(handler, {"token_ids": [[7] * (CONTEXT - 1)]})
    assert len(vector) == SIZE
    handler.context_length = None  # SGLang's own check: `>=` its context
    with pytest.raises(InvalidRequestError, match="longer than the model's context length"):
        await embed(handler, {"token_ids": [[7] * CONTEXT]})


async def test_an_engine_failure_fails_that_request_only(engines: list[Any]) -> None:
    handler = make_handler(engines)
    tm = handler.engine.tokenizer_manager
    tm.fail_next = RuntimeError("CUDA error: out of memory")
    with pytest.raises(EngineError, match="RuntimeError: CUDA error: out of memory"):
        await embed(handler, {"token_ids": [[1], [2]]})
    assert handler.metrics.errors_total == 1
    assert not tm.rid_to_state and len(tm.aborted) == 2  # SGLang aborted what it dispatched
    # and the engine goes on serving
    (vector,) = await embed(handler, {"token_ids": [[1]]})
    assert vector == pytest.approx(fake_vector([1]), rel=1e-6)
    assert handler.metrics.inflight == 0 and not handler._rids


async def test_cancellation_aborts_every_input(engines: list[Any]) -> None:
    handler = make_handler(engines)
    tm = handler.engine.tokenizer_manager
    tm.embed_delay_s = 30
    call = asyncio.create_task(anext(handler.generate({"token_ids": [[1, 2], [3]]}, Context())))
    async with asyncio.timeout(5):
        while len(tm.rid_to_state) < 2:
            await asyncio.sleep(0)  # the engine's own state: no event to await
    rids = sorted(tm.rid_to_state)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not tm.rid_to_state and sorted(tm.aborted) == rids
    assert handler.metrics.cancelled_total == 1 and not handler._rids


async def test_the_fakes_async_encode_answers_as_sglangs(engines: list[Any]) -> None:
    """`Engine.async_encode` (text in): a dict for one prompt, a list for a list of them."""
    engine = make_handler(engines).engine
    one = await engine.async_encode(prompt="hi")
    assert one["embedding"] == fake_vector([ord("h") + 3, ord("i") + 3])
    assert one["meta_info"]["prompt_tokens"] == 2
    many = await engine.async_encode(prompt=["a", "bc"], rid=["r1", "r2"])
    assert [m["meta_info"]["id"] for m in many] == ["r1", "r2"]


def test_embedding_spec_from_sglangs_model_config() -> None:
    from types import SimpleNamespace as Config

    assert embedding_spec(Config(hidden_size=64)) == EmbeddingSpec(size=64)
    mrl = Config(hidden_size=64, is_matryoshka=True, matryoshka_dimensions=[32, 16, 32])
    assert embedding_spec(mrl) == EmbeddingSpec(
        size=64, matryoshka=True, matryoshka_dimensions=[16, 32]
    )
    any_length = Config(hidden_size=64, is_matryoshka=True, matryoshka_dimensions=None)
    assert embedding_spec(any_length) == EmbeddingSpec(size=64, matryoshka=True)
    # an SGLang that cannot pass `dimensions` on: never shortened
    assert embedding_spec(mrl, takes_dimensions=False) == EmbeddingSpec(size=64)


# -- the role, in this process, behind the frontend ------------------------------------------


def args(namespace: str, model: Path = TINY, *extra: str) -> Any:
    return embedding.build_parser().parse(
        ["--model-path", str(model), "--served-model-name", "tiny-embed",
         "--namespace", namespace, "--discovery-backend", "mem", "--request-plane", "inproc",
         *extra]
    )  # fmt: skip


@pytest.fixture
async def served(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, SglangAdapter, openai.AsyncOpenAI]]:
    """The role's own `worker()` in this process, the frontend beside it: yields the card, the
    adapter (its engine) and an `openai` client."""
    adapters = record_adapters(monkeypatch, embedding, "SglangAdapter")
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt,
        serving(embedding.worker, rt, args(namespace)) as card,
        frontend(rt, namespace) as (_, client),
    ):
        yield card, adapters[0], client


async def test_the_card_is_an_embedding_model(served: Any) -> None:
    card, adapter, _ = served
    assert card.model_type == ["embedding"]
    assert card.embedding == EmbeddingSpec(size=SIZE)  # hidden_size; not Matryoshka
    assert card.context_length == CONTEXT - 1
    assert adapter.server_args.is_embedding and adapter.server_args.disaggregation_mode == "null"
    assert adapter.kv_relay is None  # embeddings are not routed by KV cache
    with pytest.raises(RuntimeError, match="embedding_handler"):
        adapter.handler()


async def test_vectors_through_the_frontend(served: Any) -> None:
    _, adapter, client = served
    tok = Tokenizer.from_dir(TINY)
    texts = ["a first text", "a second, longer text"]
    r = await client.embeddings.create(model="tiny-embed", input=texts)  # base64 by default
    for text, item in zip(texts, r.data, strict=True):
        want = fake_vector(tok.encode(text, add_special_tokens=True))
        assert item.embedding == pytest.approx(want, rel=1e-6)
    ids = [[5, 6, 7], [8]]
    r = await client.embeddings.create(model="tiny-embed", input=ids, encoding_format="float")
    assert [d.embedding for d in r.data] == [pytest.approx(fake_vector(i), rel=1e-6) for i in ids]
    assert r.usage.prompt_tokens == 4
    assert not adapter.engine.tokenizer_manager.rid_to_state

    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        await client.embeddings.create(model="tiny-embed", input="a", dimensions=8)
    # the card's context: the frontend refuses what SGLang would (an input as long as it)
    asked = len(adapter.engine.tokenizer_manager.embed_calls)
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.embeddings.create(model="tiny-embed", input=[[7] * CONTEXT])
    assert too_long.value.code == "context_length_exceeded"
    assert len(adapter.engine.tokenizer_manager.embed_calls) == asked  # the engine not asked
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        await client.chat.completions.create(
            model="tiny-embed", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        await client.completions.create(model="tiny-embed", prompt="hi")


async def test_a_matryoshka_model_card(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = matryoshka_model(tmp_path, matryoshka_dimensions=[32, 16])
    adapters = record_adapters(monkeypatch, embedding, "SglangAdapter")
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt,
        serving(embedding.worker, rt, args(namespace, model)) as card,
    ):
        assert card.embedding == EmbeddingSpec(
            size=SIZE, matryoshka=True, matryoshka_dimensions=[16, 32]
        )
        (vector,) = await embed(
            adapters[0].embedding_handler(), {"token_ids": [[5, 6]], "dimensions": 32}
        )
        assert vector == pytest.approx(fake_vector([5, 6], 32), rel=1e-6)


def test_the_role_refuses_a_disaggregation_mode(namespace: str) -> None:
    with pytest.raises(ConfigError, match="embedding worker serves whole requests"):
        SglangAdapter(args(namespace, TINY, "--disaggregation-mode", "prefill"), role="embedding")
