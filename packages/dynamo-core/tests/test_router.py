"""Routing policies, the KV indexer and the KV router; KV routing end to end with mockers."""

from __future__ import annotations

import asyncio
import importlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import openai
import pytest

from dynamo_core.errors import ConfigError, NoInstancesError
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import serve_http
from dynamo_core.llm.kv import (
    KV_EVENTS_TOPIC,
    LOAD_METRICS_TOPIC,
    KvCleared,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    block_hashes,
)
from dynamo_core.router import (
    AdmissionLimits,
    KvIndexer,
    KvRouter,
    LeastLoaded,
    LocalRouter,
    RandomPolicy,
    RoundRobin,
    RouterConfig,
    follow_worker_events,
    make_router,
)
from dynamo_core.router.kv import DEFAULT_DECODE_STEP_S, DEFAULT_PREFILL_TOKENS_PER_S
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.runtime.events import EventPublisher
from dynamo_core.testing.inprocess import record_adapters, serving

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
            if rng.random() < 0.2 and model[w]:
                ids[-1] = rng.choice(sorted(model[w]))  # an id announced again names a new block
            next_id += len(ids)
            if rng.random() < 0.5:
                idx.apply(w, stored(event_ids[w], tokens, ids))
            else:  # one block per event, each continuing the chain (as a decoding sequence does)
                events = [
                    KvStored(
                        block_hashes=[i],
                        token_ids=[tokens[n * BS : (n + 1) * BS]],
                        parent_hash=ids[n - 1] if n else None,
                    )
                    for n, i in enumerate(ids)
                ]
                idx.apply(w, KvEventBatch(event_id=event_ids[w], block_size=BS, events=events))
            for i in ids:
                model[w].pop(i, None)
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


# -- the cost model: estimated time to first token ------------------------------------------

PROMPT = list(range(2000, 3300))  # 1,300 tokens: 325 blocks of 4
RATE = 10_000.0  # prefill tokens per second
STEP_MS = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def kv_router(**kwargs: object) -> tuple[KvRouter, Clock]:
    clock = Clock()
    router = KvRouter(BS, rng=random.Random(1), clock=clock, **kwargs)  # type: ignore[arg-type]
    return router, clock


def report(router: KvRouter, worker: int, **fields: float) -> None:
    values: dict[str, float] = {
        "active_blocks": 0,
        "total_blocks": 10_000,
        "prefill_tokens_per_s": RATE,
        "decode_step_ms": STEP_MS,
    }
    values.update(fields)
    router.update_load(worker, msgspec.convert(values, LoadMetrics))


def cache(router: KvRouter, worker: int, tokens: list[int]) -> None:
    ids = list(range(len(tokens) // BS))
    router.indexer.apply(worker, stored(0, tokens[: len(ids) * BS], ids))


def test_estimate_is_the_time_to_first_token_in_seconds() -> None:
    router, _ = kv_router()
    report(router, 1)
    report(router, 2)
    cache(router, 1, PROMPT[:1200])  # 300 of the 325 blocks
    costs = router.costs([1, 2], PROMPT)
    assert costs[1] == pytest.approx(100 / RATE + STEP_MS / 1000)
    assert costs[2] == pytest.approx(1300 / RATE + STEP_MS / 1000)


def test_prefers_the_cached_worker_when_prefill_dominates() -> None:
    router, _ = kv_router()
    report(router, 1, running_requests=6, active_blocks=400, decode_step_ms=STEP_MS + 0.3)
    report(router, 2)
    cache(router, 1, PROMPT[:1200])
    for i in range(3):  # decoding requests of this router on the cached worker, prefill done
        router.started(1, PROMPT, f"r{i}")
        router.first_token(1, PROMPT, f"r{i}")
    assert router.load_key(1) > router.load_key(2)
    assert router.select([1, 2], PROMPT) == 1


def test_prefers_the_idle_worker_when_load_dominates() -> None:
    router, clock = kv_router()
    report(router, 1)
    report(router, 2)
    cache(router, 1, PROMPT[:1200])
    others = [[9000 + i] * 1300 for i in range(2)]
    for i, other in enumerate(others):  # two cold prompts queued for prefill on worker 1
        router.started(1, other, f"q{i}")
    assert router.costs([1, 2], PROMPT)[1] == pytest.approx((2600 + 100) / RATE + 0.005)
    assert router.select([1, 2], PROMPT) == 2
    # the queue drains with time: half a second later the cached worker is free again
    clock.now += 0.5
    assert router.select([1, 2], PROMPT) == 1


def test_decode_load_alone_can_outweigh_a_cache_hit() -> None:
    router, _ = kv_router()
    report(router, 1, running_requests=200, decode_step_ms=150.0)  # a saturated decode batch
    report(router, 2)
    cache(router, 1, PROMPT[:1200])
    assert router.select([1, 2], PROMPT) == 2


def test_no_per_workload_weight_the_speeds_decide() -> None:
    """The same defaults pick differently when the measured speeds change the arithmetic."""
    router, _ = kv_router()
    cache(router, 1, PROMPT[:1200])
    router.started(1, [7] * 800, "queued")  # 800 tokens of prefill queued on the cached worker
    report(router, 1, prefill_tokens_per_s=RATE)
    report(router, 2, prefill_tokens_per_s=RATE)
    # equal speeds: 0.09 s queued + 0.01 s own on worker 1 beats 0.13 s on worker 2
    assert router.select([1, 2], PROMPT) == 1
    # worker 2 measures three times faster: 0.043 s from scratch beats waiting on worker 1
    report(router, 2, prefill_tokens_per_s=3 * RATE)
    assert router.select([1, 2], PROMPT) == 2


def test_queue_accounting_follows_first_tokens_and_ends() -> None:
    router, clock = kv_router()
    report(router, 1)
    load = lambda: router.loads[1]  # noqa: E731
    other = [7] * 1300
    router.started(1, PROMPT, "a")
    router.started(1, other, "b")
    assert load().queued_s(clock.now) == pytest.approx(2 * 1300 / RATE)
    clock.now += 0.05
    router.first_token(1, PROMPT, "a")  # faster than estimated: only b's share is left
    assert load().queued_s(clock.now) == pytest.approx(1300 / RATE)
    router.finished(1, other, "b")  # b cancelled before its first token: nothing is queued
    assert load().queued_s(clock.now) == 0
    assert (load().requests, load().blocks) == (1, 326)
    router.finished(1, PROMPT, "a")
    assert (load().requests, load().blocks, load().pending) == (0, 0, {})
    assert router.inflight == {}
    # unknown ids and repeated ends change nothing
    router.first_token(1, PROMPT, "zzz")
    router.finished(1, PROMPT, "a")
    assert router.inflight == {} and load().requests == 0


def test_a_prefix_in_flight_counts_as_cached_on_its_worker() -> None:
    """Two requests for one new prefix: the second queues behind the first's prefill (which
    will leave the prefix cached there) rather than computing it again on an idle worker."""
    router, clock = kv_router()
    report(router, 1)
    report(router, 2)
    first = [*PROMPT, 1, 2, 3]
    second = [*PROMPT, 4, 5, 6]
    assert router.select([1, 2], first) in (1, 2)
    router.started(1, first, "first")
    costs = router.costs([1, 2], second)
    assert costs[1] == pytest.approx(1303 / RATE + 3 / RATE + 0.005)  # its queue + 3 tokens
    assert router.select([1, 2], second) == 1
    router.started(1, second, "second")
    assert router.loads[1].blocks == 326 + 1  # the shared prefix is not counted twice
    # once both ended, only the KV events (not sent here) say what worker 1 holds
    router.finished(1, first, "first")
    router.finished(1, second, "second")
    clock.now += 1
    assert router.overlaps([1, 2], second) == {1: 0, 2: 0}


def test_requests_without_ids_are_tracked_by_their_token_list() -> None:
    router, _ = kv_router()
    a, b = list(PROMPT), list(PROMPT)
    router.started(1, a)
    router.started(1, b)
    router.finished(1, a)
    assert router.loads[1].requests == 1 and router.inflight == {1: 1}
    router.finished(1, b)
    assert 1 not in router.loads and router.inflight == {}


def test_load_reports_correct_the_dispatch_accounting() -> None:
    router, _ = kv_router()
    report(router, 1, total_blocks=400, active_blocks=350, running_requests=5)
    report(router, 2, total_blocks=400)
    cache(router, 1, PROMPT[:1200])
    # other routers' requests fill worker 1: 350 + 26 new blocks fit in 400
    assert router.load_key(1) == (5, 350)
    assert router.select([1, 2], PROMPT) == 1
    router.started(1, [5] * 1600, "mine")  # 401 more blocks, counted at once
    router.first_token(1, [5] * 1600, "mine")  # prefilled: it holds memory, queues nothing
    assert router.load_key(1) == (6, 751)
    # 377 blocks over capacity: recomputing them costs more than the cache saves
    costs = router.costs([1, 2], PROMPT)
    assert costs[1] == pytest.approx(0.01 + 0.005 + 377 * BS / RATE)
    assert router.select([1, 2], PROMPT) == 2
    # the next report includes this router's request: it is not counted twice
    report(router, 1, total_blocks=400, active_blocks=751, running_requests=6)
    assert router.load_key(1) == (6, 751)
    router.finished(1, [5] * 1600, "mine")
    assert router.load_key(1) == (5, 350)


def test_ties_go_to_the_least_loaded_then_take_turns() -> None:
    router, _ = kv_router()
    report(router, 1, running_requests=3, active_blocks=30)
    report(router, 2, running_requests=1, active_blocks=10)
    report(router, 3, running_requests=2, active_blocks=5)
    assert {router.select([1, 2, 3], PROMPT) for _ in range(10)} == {2}
    report(router, 3, running_requests=1, active_blocks=5)
    picks = [router.select([1, 2, 3], PROMPT) for _ in range(10)]
    assert picks[::2] == [picks[0]] * 5 and picks[1::2] == [picks[1]] * 5
    assert {picks[0], picks[1]} == {2, 3}


def test_a_removed_workers_late_events_are_ignored() -> None:
    router, _ = kv_router()
    router.apply_kv_events(1, stored(0, list(range(8)), [1, 2]))
    report(router, 1)
    router.remove_worker(1)
    router.apply_kv_events(1, msgspec_map(stored(1, list(range(8, 16)), [3, 4])))
    report(router, 1)
    assert len(router.indexer) == 0 and router.indexer.workers() == set()
    assert 1 not in router.loads


def test_unreported_workers_are_assumed_as_fast_as_the_others() -> None:
    router, _ = kv_router()
    assert router.speeds(1) == (DEFAULT_PREFILL_TOKENS_PER_S, DEFAULT_DECODE_STEP_S)
    report(router, 1, prefill_tokens_per_s=4000, decode_step_ms=20)
    report(router, 2, prefill_tokens_per_s=8000, decode_step_ms=10)
    assert router.speeds(3) == (6000, 0.015)
    router.remove_worker(1)
    assert router.speeds(3) == (8000, 0.010)


def test_overlap_weight_overrides_the_balance() -> None:
    router, _ = kv_router(overlap_weight=0.0)  # load only: the cache is not worth anything
    report(router, 1, running_requests=1)
    report(router, 2)
    cache(router, 1, PROMPT[:1200])
    assert router.select([1, 2], PROMPT) == 2


def test_kv_router_temperature_spreads_choices() -> None:
    router, _ = kv_router(temperature=1.0)
    prompt = list(range(80))
    cache(router, 1, prompt[:40])
    picks = [router.select([1, 2], prompt) for _ in range(400)]
    assert picks.count(1) > picks.count(2) > 0


@pytest.mark.parametrize("events", [True, False], ids=["kv-events", "approximate"])
async def test_kv_routing_end_to_end_reuses_the_cache(
    namespace: str, monkeypatch: pytest.MonkeyPatch, events: bool
) -> None:
    """With the workers' KV events, and without them (`--no-router-kv-events`: the router
    predicts the cache from where it sent prompts): every follow-up finds the shared prefix."""
    mocker = importlib.import_module("dynamo_core.mocker.main")  # the package's `main` is main()

    workers = record_adapters(monkeypatch, mocker, "MockerAdapter")
    flags = ["--model-path", str(TINY), "--namespace", namespace, "--discovery-backend", "mem",
             "--request-plane", "inproc", "--speedup-ratio", "1000"]  # fmt: skip
    args = mocker.build_parser().parse(flags, environ={})
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with (
        DistributedRuntime(cfg) as rt_a,
        DistributedRuntime(cfg) as rt_b,
        DistributedRuntime(cfg) as front,
        serving(mocker.worker, rt_a, args),
        serving(mocker.worker, rt_b, args),
    ):
        config = RouterConfig(router_mode="kv", router_kv_events=events)
        service = OpenAIService(front, namespace=namespace, router=config)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        try:
            async with asyncio.timeout(5):
                while not (entry := service.models.get("tiny")) or len(entry.live_instances()) < 2:
                    await service.models.wait_for_change()
            assert isinstance(entry.router, LocalRouter)
            router = entry.router.policy
            assert isinstance(router, KvRouter)
            assert (router.approximate_ttl is None) is events
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
            # approximate: the workers' KV events are not even subscribed to
            publishers = [w.kv_publisher for w in workers]
            assert all(p is not None and bool(p.subscriber_count) is events for p in publishers)
            # every request ended in the router's accounting (first token, then its end) ...
            assert all(not load.requests and not load.pending for load in router.loads.values())
            assert router.inflight == {}
            # ... and the workers' reports carry their speeds (13.3k tokens/s at speedup 1000)
            async with asyncio.timeout(5):
                while len([m for m in router.loads.values() if m.metrics]) < 2:
                    await asyncio.sleep(0.01)
            for load in router.loads.values():
                assert load.metrics is not None
                assert load.metrics.prefill_tokens_per_s == pytest.approx(1000 * 1000 / 0.075)
        finally:
            await client.close()
            await server.close()
            await service.close()


async def publishing_worker(
    runtime: DistributedRuntime, namespace: str
) -> tuple[EventPublisher, EventPublisher, asyncio.Task[None]]:
    """A `backend` component on `runtime` that serves a do-nothing `generate` and publishes
    KV events and load metrics by hand: (kv publisher, load publisher, the serving task)."""
    component = runtime.namespace(namespace).component("backend")
    await component.create_service()
    kv_pub = await component.event_publisher(KV_EVENTS_TOPIC)
    load_pub = await component.event_publisher(LOAD_METRICS_TOPIC)

    async def handler(request: object) -> AsyncIterator[dict[str, object]]:
        yield {}

    serving = asyncio.create_task(component.endpoint("generate").serve_endpoint(handler))
    return kv_pub, load_pub, serving


async def test_router_follows_events_skips_garbage_and_forgets_dead_workers(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that sends malformed KV events or load metrics costs a log line each, never the
    subscription; a worker that leaves discovery leaves the router's index and load tables."""
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as front:
        worker_rt = DistributedRuntime(cfg)
        await worker_rt.start()
        kv_pub, load_pub, serving = await publishing_worker(worker_rt, namespace)
        client = await front.endpoint(f"{namespace}.backend.generate").client()
        router = KvRouter(BS)
        follow = asyncio.create_task(
            follow_worker_events(router, front.namespace(namespace).component("backend"), client)
        )
        try:
            await client.wait_for_instances()
            (worker,) = client.instance_ids()
            async with asyncio.timeout(5):  # both subscriptions reached the publishers
                while not (kv_pub.subscriber_count and load_pub.subscriber_count):
                    await asyncio.sleep(0.01)
            kv_pub.publish({"event_id": 0, "events": "garbage", "block_size": BS})
            kv_pub.publish("not a batch at all")
            kv_pub.publish(msgspec_map(stored(1, [5, 6, 7], [1])))  # a partial block
            load_pub.publish({"active_blocks": "many"})
            kv_pub.publish(msgspec_map(stored(2, list(range(8)), [1, 2])))
            load_pub.publish({"active_blocks": 3, "total_blocks": 10, "decode_step_ms": 7.0})
            async with asyncio.timeout(5):
                while not len(router.indexer) or worker not in router.loads:
                    await asyncio.sleep(0.01)
            assert router.overlaps([worker], list(range(8))) == {worker: 2}
            assert router.speeds(worker)[1] == 0.007
            bad = [r for r in caplog.records if r.getMessage().startswith("bad ")]
            assert len(bad) == 4, [r.getMessage() for r in bad]
            assert not follow.done()

            worker_rt.request_shutdown()  # the worker leaves discovery
            await serving
            async with asyncio.timeout(5):
                while router.indexer.workers() or worker in router.loads:
                    await client.wait_for_change()
            assert router.overlaps([worker], list(range(8))) == {worker: 0}
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await client.close()
            await kv_pub.close()
            await load_pub.close()
            await worker_rt.shutdown()


# -- RouterConfig and make_router: the router owns routing ----------------------------------


def test_router_config_is_declared_once_and_composed() -> None:
    from dynamo_core.frontend.main import FrontendConfig, build_parser
    from dynamo_core.router import ROUTER_MODES, make_policy
    from dynamo_core.run import RunConfig

    for composed in (FrontendConfig, RunConfig):
        assert set(RouterConfig.model_fields) <= set(composed.model_fields)
        assert issubclass(composed, RouterConfig)
    help_text = build_parser().format_help()
    assert "{" + ",".join(ROUTER_MODES) + "}" in help_text
    assert help_text.index("Routing:") < help_text.index("--kv-overlap-score-weight")
    with pytest.raises(ConfigError, match="round-robin, random, least-loaded"):
        make_policy("kv")  # kv is a KvRouter, made by make_router


async def test_route_counts_until_done_and_done_frees_a_queued_request() -> None:
    live = [1, 2]
    router = LocalRouter(
        LeastLoaded(), lambda: live, AdmissionLimits(active_requests=1, max_queued=4)
    )
    first = await router.route([1, 2, 3], live, request_id="a")
    second = await router.route([1, 2, 3], live, request_id="b")
    assert {first.instance_id, second.instance_id} == {1, 2}
    assert router.policy.inflight == {1: 1, 2: 1}
    waiting = asyncio.create_task(router.admit())  # both busy: it queues
    await asyncio.sleep(0)
    assert not waiting.done() and router.admission.queued == 1
    first.first_token()
    first.done()
    first.done()  # idempotent
    first.first_token()  # after the end: nothing
    await asyncio.wait_for(waiting, 5)
    assert router.policy.inflight == {second.instance_id: 1}
    third = await router.route([9], live, exclude=[second.instance_id])
    assert third.instance_id == first.instance_id
    with pytest.raises(NoInstancesError):
        await router.route([9], live, exclude=live)


async def test_make_router_builds_the_mode_and_one_feed(namespace: str) -> None:
    """kv mode with a KV-cache threshold: a `KvRouter` with the config's knobs, and one
    subscription per topic feeding both the index/loads and admission control."""
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as front, DistributedRuntime(cfg) as worker_rt:
        kv_pub, load_pub, serving = await publishing_worker(worker_rt, namespace)
        endpoint = f"{namespace}.backend.generate"
        client = await front.endpoint(endpoint).client()
        await client.wait_for_instances()
        (worker,) = client.instance_ids()
        config = RouterConfig(
            router_mode="kv",
            kv_overlap_score_weight=2.0,
            router_temperature=0.25,
            active_decode_blocks_threshold=0.5,
        )
        router = await make_router(config, front, endpoint=endpoint, block_size=BS, client=client)
        plain = await make_router(
            RouterConfig(), front, endpoint=endpoint, block_size=BS, client=client
        )
        try:
            assert isinstance(router, LocalRouter) and isinstance(plain, LocalRouter)
            kv = router.policy
            assert isinstance(kv, KvRouter)
            assert (kv.overlap_weight, kv.temperature, kv.block_size) == (2.0, 0.25, BS)
            assert isinstance(plain.policy, RoundRobin) and plain._feed is None
            async with asyncio.timeout(5):
                while not (kv_pub.subscriber_count and load_pub.subscriber_count):
                    await asyncio.sleep(0.01)
            kv_pub.publish(msgspec_map(stored(0, list(range(8)), [1, 2])))
            load_pub.publish({"active_blocks": 6, "total_blocks": 10})
            async with asyncio.timeout(5):
                while not len(kv.indexer) or worker not in router.admission.loads:
                    await asyncio.sleep(0.01)
            assert kv.loads[worker].metrics is not None  # the same report, both readers
            assert (kv_pub.subscriber_count, load_pub.subscriber_count) == (1, 1)
            assert router.admission.busy(worker)  # 6 of 10 blocks > 0.5
        finally:
            await router.close()
            await plain.close()
            async with asyncio.timeout(5):  # closing the router ends its subscriptions
                while kv_pub.subscriber_count or load_pub.subscriber_count:
                    await asyncio.sleep(0.01)
            await client.close()
            worker_rt.request_shutdown()
            await serving


def test_approximate_mode_predicts_the_prompts_it_sent_for_a_while() -> None:
    router, clock = kv_router(approximate_ttl=10.0)
    report(router, 1)
    report(router, 2)
    prompt = list(range(400))  # 100 blocks
    first = router.select([1, 2], prompt)
    router.started(first, prompt, "a")
    router.finished(first, prompt, "a")
    assert router.overlaps([1, 2], prompt)[first] == 100  # no event said so: predicted
    clock.now += 6
    router.started(first, prompt[:200], "b")  # half the prompt again: renewed for 10 s
    router.finished(first, prompt[:200], "b")
    clock.now += 5  # 11 s after the first guess, 5 after the renewal
    router.select([1, 2], [9999] * 8)  # expired guesses go before a decision
    assert router.overlaps([first], prompt)[first] == 50
    clock.now += 10
    router.select([1, 2], [9999] * 8)
    assert router.overlaps([first], prompt)[first] == 0
    assert len(router.indexer) == 0
