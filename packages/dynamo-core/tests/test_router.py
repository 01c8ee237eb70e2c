"""Routing policies, the KV indexer and the KV router; KV routing end to end with mockers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import msgspec
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
    assert idx.holders(hashes[0]) == {7} and idx.holders(hashes[1]) == set()
    idx.apply(7, KvEventBatch(event_id=3, block_size=BS, events=[KvCleared()]))
    assert idx.overlaps(hashes, [7]) == {7: 0} and len(idx) == 0
    # after a clear, the worker stores again under the same engine ids
    idx.apply(7, stored(4, tokens, [101, 102, 103]))
    assert idx.overlaps(hashes, [7]) == {7: 3}


def test_indexer_applies_a_batch_of_events_in_order() -> None:
    idx = KvIndexer(BS)
    a, b = list(range(100, 116)), list(range(200, 208))
    batch = KvEventBatch(
        event_id=0,
        block_size=BS,
        events=[
            KvStored(
                block_hashes=[1, 2, 3, 4], token_ids=[a[i : i + BS] for i in range(0, 16, BS)]
            ),
            KvStored(block_hashes=[5, 6], token_ids=[b[:BS], b[BS:]]),
            KvRemoved(block_hashes=[4, 6, 999]),  # 999 was never stored: ignored
            KvStored(block_hashes=[7], token_ids=[b[BS:]], parent_hash=5),  # 6 again, new id
        ],
    )
    idx.apply(3, batch)
    assert idx.overlaps(block_hashes(a, BS), [3]) == {3: 3}
    assert idx.overlaps(block_hashes(b, BS), [3]) == {3: 2}
    assert idx.events_applied == 4 and idx.blocks_applied == 7
    assert len(idx.cached_blocks(3)) == 5 == len(idx)


def test_indexer_counts_engine_ids_behind_one_block() -> None:
    """An engine may hold the same tokens under two ids (keys the router does not see): the
    block stays indexed until its last id goes. An id announced again names its new block."""
    idx = KvIndexer(BS)
    tokens = list(range(8))
    hashes = block_hashes(tokens, BS)
    idx.apply(1, stored(0, tokens, [11, 12]))
    idx.apply(1, stored(1, tokens, [21, 22]))  # the same blocks again, as other ids
    idx.apply(1, KvEventBatch(event_id=2, block_size=BS, events=[KvRemoved(block_hashes=[12])]))
    assert idx.overlaps(hashes, [1]) == {1: 2}
    idx.apply(1, KvEventBatch(event_id=3, block_size=BS, events=[KvRemoved(block_hashes=[22])]))
    assert idx.overlaps(hashes, [1]) == {1: 1}
    idx.apply(1, stored(4, list(range(100, 104)), [11]))  # id 11 reused for other tokens
    assert idx.overlaps(hashes, [1]) == {1: 1}  # 21 still holds the first block
    idx.apply(1, KvEventBatch(event_id=5, block_size=BS, events=[KvRemoved(block_hashes=[21])]))
    assert idx.overlaps(hashes, [1]) == {1: 0}
    assert idx.cached_blocks(1) == set(block_hashes(list(range(100, 104)), BS))


def test_indexer_two_workers_and_worker_removal() -> None:
    idx = KvIndexer(BS)
    idx.apply(1, stored(0, list(range(8)), [11, 12]))
    idx.apply(2, stored(0, list(range(4)), [21]))
    hashes = block_hashes(list(range(8)), BS)
    assert idx.overlaps(hashes, [1, 2]) == {1: 2, 2: 1}
    idx.remove_worker(1)
    assert idx.overlaps(hashes, [1, 2]) == {1: 0, 2: 1}
    assert idx.workers() == {2} and len(idx) == 1
    # a new worker reuses the removed one's slot without inheriting its blocks
    idx.apply(3, stored(0, list(range(4)), [31]))
    assert idx.overlaps(hashes, [1, 2, 3]) == {1: 0, 2: 1, 3: 1}
    idx.remove_worker(2)
    idx.remove_worker(3)
    assert len(idx) == 0


def test_indexer_overlaps_over_many_workers() -> None:
    idx = KvIndexer(BS)
    tokens = list(range(40))  # 10 blocks
    workers = list(range(1000, 1100))  # more workers than bits in a machine word
    for n, w in enumerate(workers):
        depth = n % 11
        if depth:
            idx.apply(w, stored(0, tokens[: depth * BS], list(range(depth))))
    got = idx.overlaps(block_hashes(tokens, BS), workers)
    assert got == {w: n % 11 for n, w in enumerate(workers)}
    # only the candidates asked for are reported
    assert idx.overlaps(block_hashes(tokens, BS), workers[5:7]) == {1005: 5, 1006: 6}


def test_indexer_matches_a_reference_model_under_random_events() -> None:
    """Random stores, evictions, clears and removals on 5 workers, checked against a plain
    dict-of-sets model after every batch."""
    rng = random.Random(7)
    idx = KvIndexer(BS)
    model: dict[int, dict[int, int]] = {w: {} for w in range(5)}  # worker -> engine id -> hash
    prompts = [[rng.randrange(50) for _ in range(6 * BS)] for _ in range(6)]
    event_ids = dict.fromkeys(range(5), 0)
    next_id = 1
    for _ in range(300):
        w = rng.randrange(5)
        roll = rng.random()
        if roll < 0.6:
            tokens = rng.choice(prompts)[: rng.randrange(1, 7) * BS]
            ids = list(range(next_id, next_id + len(tokens) // BS))
            next_id += len(ids)
            idx.apply(w, stored(event_ids[w], tokens, ids))
            model[w].update(zip(ids, block_hashes(tokens, BS), strict=True))
        elif roll < 0.9 and model[w]:
            gone = rng.sample(sorted(model[w]), rng.randrange(1, len(model[w]) + 1))
            removed = KvRemoved(block_hashes=gone)
            idx.apply(w, KvEventBatch(event_id=event_ids[w], block_size=BS, events=[removed]))
            for e in gone:
                del model[w][e]
        elif roll < 0.95:
            idx.apply(w, KvEventBatch(event_id=event_ids[w], block_size=BS, events=[KvCleared()]))
            model[w].clear()
        else:
            idx.remove_worker(w)
            model[w].clear()
            event_ids[w] = -1
        event_ids[w] += 1
        for prompt in prompts:
            hashes = block_hashes(prompt, BS)
            want = {}
            for v, held in model.items():
                have = set(held.values())
                want[v] = next((i for i, h in enumerate(hashes) if h not in have), len(hashes))
            assert idx.overlaps(hashes, list(range(5))) == want
        assert len(idx) == len({h for held in model.values() for h in held.values()})


def test_indexer_ignores_what_it_cannot_place() -> None:
    idx = KvIndexer(BS)
    idx.apply(1, stored(0, list(range(4)), [11], parent=999))  # unknown parent
    wrong = KvEventBatch(
        event_id=1, block_size=8, events=[KvStored(block_hashes=[1], token_ids=[list(range(8))])]
    )
    idx.apply(1, wrong)  # another block size
    idx.apply(1, msgspec_map(stored(2, list(range(4)), [12])))  # maps are accepted too
    assert len(idx) == 1
    partial = KvEventBatch(
        event_id=3,
        block_size=BS,
        events=[
            KvStored(block_hashes=[13], token_ids=[list(range(4, 8))], parent_hash=12),
            KvStored(block_hashes=[14], token_ids=[[1, 2]]),
        ],
    )
    with pytest.raises(ValueError, match="tokens"):
        idx.apply(1, partial)
    assert len(idx) == 2  # the good event before the bad one stayed applied
    with pytest.raises(msgspec.ValidationError):
        idx.apply(1, {"event_id": 4, "events": "garbage", "block_size": BS})


def msgspec_map(batch: KvEventBatch) -> dict[str, object]:
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
                while not len(router.indexer):
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
