"""Routing policies, the KV indexer and the KV router; KV routing end to end with mockers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import openai
import pytest

from dynamo_core.errors import NoInstancesError
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import serve_http
from dynamo_core.llm.kv import KvCleared, KvEventBatch, KvRemoved, KvStored, block_hashes
from dynamo_core.router import KvIndexer, KvRouter, LeastLoaded, RandomPolicy, RoundRobin
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
BS = 4


def stored(
    event_id: int, tokens: list[int], ids: list[int], parent: int | None = None
) -> KvEventBatch:
    blocks = [tokens[i : i + BS] for i in range(0, len(tokens), BS)]
    return KvEventBatch(
        event_id=event_id,
        block_size=BS,
        events=[KvStored(block_hashes=ids, token_ids=blocks, parent_hash=parent)],
    )


def test_round_robin_random_least_loaded() -> None:
    rr = RoundRobin()
    assert [rr.select([1, 2, 3]) for _ in range(4)] == [1, 2, 3, 1]
    assert rr.select([1, 2, 3], exclude=[2, 3]) == 1
    with pytest.raises(NoInstancesError):
        rr.select([1], exclude=[1])
    rnd = RandomPolicy(random.Random(0))
    assert {rnd.select([1, 2]) for _ in range(50)} == {1, 2}
    ll = LeastLoaded()
    ll.started(1)
    ll.started(1)
    ll.started(2)
    assert ll.select([1, 2, 3]) == 3
    ll.finished(1)
    ll.finished(1)
    assert ll.select([1, 2]) == 1


def test_indexer_stored_removed_cleared() -> None:
    idx = KvIndexer(BS)
    tokens = list(range(12))
    idx.apply(7, stored(0, tokens, [101, 102, 103]))
    hashes = block_hashes(tokens, BS)
    assert idx.overlaps(hashes, [7, 8]) == {7: 3, 8: 0}
    # a continuation event: parent given by the engine's id
    idx.apply(7, stored(1, list(range(12, 16)), [104], parent=103))
    assert idx.overlaps(block_hashes(list(range(16)), BS), [7]) == {7: 4}
    # removing a middle block cuts the prefix there
    idx.apply(7, KvEventBatch(event_id=2, block_size=BS, events=[KvRemoved(block_hashes=[102])]))
    assert idx.overlaps(hashes, [7]) == {7: 1}
    idx.apply(7, KvEventBatch(event_id=3, block_size=BS, events=[KvCleared()]))
    assert idx.overlaps(hashes, [7]) == {7: 0} and idx.blocks == {}


def test_indexer_two_workers_and_worker_removal() -> None:
    idx = KvIndexer(BS)
    idx.apply(1, stored(0, list(range(8)), [11, 12]))
    idx.apply(2, stored(0, list(range(4)), [21]))
    hashes = block_hashes(list(range(8)), BS)
    assert idx.overlaps(hashes, [1, 2]) == {1: 2, 2: 1}
    idx.remove_worker(1)
    assert idx.overlaps(hashes, [1, 2]) == {1: 0, 2: 1}


def test_indexer_ignores_what_it_cannot_place() -> None:
    idx = KvIndexer(BS)
    idx.apply(1, stored(0, list(range(4)), [11], parent=999))  # unknown parent
    wrong = KvEventBatch(
        event_id=1, block_size=8, events=[KvStored(block_hashes=[1], token_ids=[list(range(8))])]
    )
    idx.apply(1, wrong)  # another block size
    idx.apply(1, msgspec_map(stored(2, list(range(4)), [12])))  # maps are accepted too
    assert len(idx.blocks) == 1


def msgspec_map(batch: KvEventBatch) -> dict[str, object]:
    import msgspec

    return msgspec.to_builtins(batch)  # type: ignore[no-any-return]


def test_kv_router_prefers_cached_prefix_until_load_outweighs_it() -> None:
    router = KvRouter(BS, overlap_weight=1.0, rng=random.Random(1))
    prompt = list(range(40))  # 10 blocks
    router.indexer.apply(1, stored(0, prompt[:32], list(range(100, 108))))  # 8 blocks on worker 1
    assert router.select([1, 2], prompt) == 1
    assert router.costs([1, 2], prompt) == {1: 2.0, 2: 10.0}
    for _ in range(3):  # three requests of 10 blocks in flight on worker 1
        router.started(1, prompt)
    assert router.costs([1, 2], prompt) == {1: 32.0, 2: 10.0}
    assert router.select([1, 2], prompt) == 2
    for _ in range(3):
        router.finished(1, prompt)
    assert router.active_blocks == {}
    assert router.select([1, 2], prompt) == 1


def test_kv_router_temperature_spreads_choices() -> None:
    router = KvRouter(BS, temperature=5.0, rng=random.Random(0))
    prompt = list(range(8))
    router.indexer.apply(1, stored(0, prompt[:4], [1]))
    picks = [router.select([1, 2], prompt) for _ in range(200)]
    assert picks.count(1) > picks.count(2) > 0


async def test_kv_routing_end_to_end_reuses_the_cache(namespace: str) -> None:
    from dynamo_core.mocker.main import MockerConfig, start_mocker

    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with (
        DistributedRuntime(cfg) as rt_a,
        DistributedRuntime(cfg) as rt_b,
        DistributedRuntime(cfg) as front,
    ):
        workers = []
        for rt in (rt_a, rt_b):
            config = MockerConfig(
                model_path=TINY,
                namespace=namespace,
                discovery_backend="mem",
                request_plane="inproc",
                speedup_ratio=1000,
            )
            workers.append(await start_mocker(rt, config))
        tasks = [asyncio.create_task(w.serve()) for w in workers]
        service = OpenAIService(front, namespace=namespace, router_mode="kv")
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        try:
            async with asyncio.timeout(5):
                while not (entry := service.models.get("tiny")) or len(entry.live_instances()) < 2:
                    await service.models.wait_for_change()
            router = entry.policy
            assert isinstance(router, KvRouter)
            system = "You are a helpful assistant who answers in full sentences. " * 6

            async def ask(question: str) -> int:
                r = await client.chat.completions.create(
                    model="tiny",
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": question},
                    ],
                    max_tokens=4,
                )
                assert r.usage is not None and r.usage.prompt_tokens_details is not None
                return r.usage.prompt_tokens_details.cached_tokens or 0

            assert await ask("What is the first question?") == 0
            async with asyncio.timeout(5):  # the stored events reach the router
                while not router.indexer.blocks:
                    await asyncio.sleep(0.01)
            cached = [await ask(f"And question number {i}?") for i in range(4)]
            # every follow-up went where the shared system prompt is cached
            assert all(c >= 48 for c in cached), cached
            totals = sorted(w.engine.stats()["requests_total"] for w in workers)
            assert totals == [0, 5]
        finally:
            await client.close()
            await server.close()
            await service.close()
            for rt in (rt_a, rt_b):
                rt.request_shutdown()
            await asyncio.gather(*tasks)
            for w in workers:
                await w.close()
