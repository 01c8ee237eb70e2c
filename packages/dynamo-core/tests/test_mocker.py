"""The mocker's simulation: KV cache, scheduler, timing, tokens, KV events, handlers (in process)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.errors import InvalidRequestError
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.kv import KvCleared, KvEventBatch, KvRemoved, KvStored, block_hashes
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.mocker.engine import MockerEngine, MockerEngineArgs, StepOutput, TimingModel
from dynamo_core.mocker.handlers import MockerDecodeHandler, MockerHandler, MockerPrefillHandler
from dynamo_core.mocker.kv_cache import KvCache
from dynamo_core.mocker.replies import Replies
from dynamo_core.runtime import Context
from dynamo_core.testing.conformance import HandlerConformance, collect, make_request

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
VOCAB = 2315
SPECIAL = frozenset(range(4))
_ids = itertools.count()


def make_engine(**overrides: Any) -> MockerEngine:
    args = MockerEngineArgs(**{"speedup_ratio": 10_000.0, **overrides})
    return MockerEngine(args, vocab_size=VOCAB, special_token_ids=SPECIAL)


@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    e = make_engine()
    yield e
    await e.close()


async def run(
    engine: MockerEngine, prompt: list[int], max_tokens: int = 8, **kw: Any
) -> tuple[list[int], StepOutput]:
    tokens: list[int] = []
    last: StepOutput | None = None
    async for out in engine.generate(f"r{next(_ids)}", prompt, max_tokens=max_tokens, **kw):
        tokens.extend(out.token_ids)
        last = out
    assert last is not None and last.finish_reason is not None
    return tokens, last


def replay(batches: list[KvEventBatch]) -> set[int]:
    cached: set[int] = set()
    for batch in batches:
        for event in batch.events:
            if isinstance(event, KvStored):
                assert not cached & set(event.block_hashes), "stored twice without removal"
                cached |= set(event.block_hashes)
            elif isinstance(event, KvRemoved):
                assert set(event.block_hashes) <= cached, "removed a block never stored"
                cached -= set(event.block_hashes)
            elif isinstance(event, KvCleared):
                cached.clear()
    return cached


# -- the KV cache --------------------------------------------------------------------------


def test_kv_cache_shares_prefixes_and_evicts_lru_tail_first() -> None:
    cache = KvCache(capacity=4, block_size=2)
    tokens = [5, 6, 7, 8, 9, 10]
    hashes = block_hashes(tokens, 2)
    assert cache.allocate(3)
    cache.commit(None, hashes, [[5, 6], [7, 8], [9, 10]])
    assert cache.cached_blocks == 3 and cache.active_blocks == 3 and cache.free_blocks == 1
    (stored,) = cache.drain_events()
    assert isinstance(stored, KvStored)
    assert stored.block_hashes == hashes and stored.parent_hash is None
    assert stored.token_ids == [[5, 6], [7, 8], [9, 10]]

    assert cache.match_prefix(hashes) == 3
    assert cache.match_prefix([hashes[0], 12345]) == 1
    cache.acquire(hashes[:2])  # a second request shares the first two blocks
    cache.release(hashes)  # the first request ends
    assert cache.evictable_blocks == 1 and cache.active_blocks == 2
    cache.release(hashes[:2])
    assert cache.evictable_blocks == 3 and cache.active_blocks == 0

    assert cache.allocate(2)  # one free block plus one eviction: the tail goes first
    assert cache.drain_events() == [KvRemoved(block_hashes=[hashes[2]])]
    assert cache.cached_hashes() == set(hashes[:2])
    assert not cache.allocate(3)  # 0 free + 2 evictable: refused without side effects
    assert cache.cached_blocks == 2 and cache.drain_events() == []


def test_kv_cache_commit_of_a_block_already_cached_shares_it() -> None:
    cache = KvCache(capacity=8, block_size=2)
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2)
    blocks = [[1, 2], [3, 4], [5, 6]]
    assert cache.allocate(1)
    cache.commit(None, hashes[1:2], blocks[1:2])  # as if some other prefix chain made it
    assert cache.allocate(3)
    cache.commit(None, hashes, blocks)
    events = cache.drain_events()
    assert events == [
        KvStored(block_hashes=[hashes[1]], token_ids=[blocks[1]], parent_hash=None),
        KvStored(block_hashes=[hashes[0]], token_ids=[blocks[0]], parent_hash=None),
        KvStored(block_hashes=[hashes[2]], token_ids=[blocks[2]], parent_hash=hashes[1]),
    ]
    assert cache.refs(hashes[1]) == 2 and cache.used_blocks == 3


# -- tokens ----------------------------------------------------------------------------------


async def test_tokens_are_deterministic_ordinary_and_seeded(engine: MockerEngine) -> None:
    prompt = list(range(10, 50))
    a, _ = await run(engine, prompt, 32)
    b, _ = await run(engine, prompt, 32)
    c, _ = await run(engine, prompt, 32, seed=7)
    d, _ = await run(engine, [*prompt, 99], 32)
    assert a == b and a != c and a != d
    assert len(a) == 32 and not set(a) & SPECIAL and all(0 <= t < VOCAB for t in a)


async def test_max_tokens_is_capped_by_the_context_length() -> None:
    e = make_engine(context_length=64)
    try:
        tokens, last = await run(e, list(range(10, 50)), 1000)
        assert len(tokens) == 24 and last.finish_reason == "length"
        with pytest.raises(InvalidRequestError, match="context length"):
            await run(e, list(range(10, 80)), 4)
    finally:
        await e.close()


async def test_an_answer_ends_with_eos_after_a_seeded_length(engine: MockerEngine) -> None:
    prompt = list(range(10, 50))
    tokens, last = await run(engine, prompt, 1000, eos_token_ids=[3, 1])
    assert last.finish_reason == "eos" and tokens[-1] == 3 and not set(tokens[:-1]) & SPECIAL
    assert (await run(engine, prompt, 1000, eos_token_ids=[3, 1]))[0] == tokens  # deterministic
    # the same tokens as without eos, up to the answer's end
    assert (await run(engine, prompt, len(tokens) - 1))[0] == tokens[:-1]
    lengths = [len((await run(engine, [7, i], 1000, eos_token_ids=[1]))[0]) for i in range(200)]
    assert 40 <= statistics.median(lengths) <= 56  # short answers, around mean_output_tokens
    assert min(lengths) < 24 and max(lengths) > 96  # spread like real answers


async def test_max_tokens_min_tokens_and_no_eos_ids_shape_the_length(
    engine: MockerEngine,
) -> None:
    prompt = list(range(10, 50))
    natural, _ = await run(engine, prompt, 1000, eos_token_ids=[1])
    cut, last = await run(engine, prompt, len(natural) - 1, eos_token_ids=[1])
    assert last.finish_reason == "length" and cut == natural[:-1]
    floor, last = await run(engine, prompt, 1000, eos_token_ids=[1], min_tokens=len(natural) + 5)
    assert last.finish_reason == "eos" and len(floor) == len(natural) + 5
    whole, last = await run(engine, prompt, 300)  # no eos ids (ignore_eos): to max_tokens
    assert last.finish_reason == "length" and len(whole) == 300


@pytest.mark.parametrize("min_tokens", [0, 30])
async def test_a_migrated_continuation_is_token_exact(
    engine: MockerEngine, min_tokens: int
) -> None:
    """What the frontend sends after a worker died at token g (prompt + the g tokens, the
    budgets reduced by g, `generated` = g) goes on exactly as the first run did, eos included."""
    prompt = list(range(10, 50))
    whole, end = await run(engine, prompt, 1000, eos_token_ids=[3], min_tokens=min_tokens)
    assert end.finish_reason == "eos"
    for g in (1, 7, len(whole) - 1):
        rest, last = await run(
            engine,
            prompt + whole[:g],
            1000 - g,
            eos_token_ids=[3],
            min_tokens=max(0, min_tokens - g),
            generated=g,
        )
        assert whole[:g] + rest == whole and last.finish_reason == "eos", g


async def test_a_migrated_scripted_reply_is_token_exact(
    tiny_vocab: tuple[int, frozenset[int]], tiny_replies: Replies
) -> None:
    vocab, special = tiny_vocab
    e = MockerEngine(
        MockerEngineArgs(speedup_ratio=10_000.0), vocab_size=vocab, special_token_ids=special
    )
    handler = MockerHandler(e, replies=tiny_replies)
    guided = {"guided_decoding": {"choice": ["the first answer", "another one"]}}
    req = {**make_request(list(range(10, 50)), max_tokens=100, eos_token_ids=[1]), **guided}
    whole = [t for out in await collect(handler, req) for t in out.get("token_ids", [])]
    assert len(whole) > 2
    g = 2
    cont = {
        **req,
        "token_ids": req["token_ids"] + whole[:g],
        "generated_tokens": g,
        "stop_conditions": {**req["stop_conditions"], "max_tokens": 100 - g},
    }
    rest = [t for out in await collect(handler, cont) for t in out.get("token_ids", [])]
    assert whole[:g] + rest == whole
    await e.close()


async def test_the_handler_ends_at_eos_unless_ignore_eos(engine: MockerEngine) -> None:
    handler = MockerHandler(engine)
    prompt = list(range(10, 50))
    req = make_request(prompt, max_tokens=1000, eos_token_ids=[1, 3], ignore_eos=False)
    natural = await collect(handler, req)
    assert natural[-1]["finish_reason"] == "eos"
    assert natural[-1]["usage"]["completion_tokens"] < 1000
    req = make_request(prompt, max_tokens=1000, eos_token_ids=[1, 3], ignore_eos=True)
    forced = await collect(handler, req)
    assert forced[-1]["finish_reason"] == "length"
    assert forced[-1]["usage"]["completion_tokens"] == 1000


async def test_a_prompt_larger_than_the_cache_is_rejected() -> None:
    e = make_engine(num_gpu_blocks=4, block_size=4)
    try:
        with pytest.raises(InvalidRequestError, match="KV blocks"):
            await run(e, list(range(10, 30)), 4)
    finally:
        await e.close()


# -- prefix reuse ----------------------------------------------------------------------------


async def test_shared_prefix_is_reused_and_costs_less(engine: MockerEngine) -> None:
    system = list(range(100, 228))  # 8 full blocks
    _, first = await run(engine, [*system, 1000, 1001, 1002], 4)
    _, second = await run(engine, [*system, 2000, 2001, 2002], 4)
    m1, m2 = first.metrics, second.metrics
    assert m1 is not None and m2 is not None
    assert m1.cached_tokens == 0 and m1.prefill_tokens == 131
    assert m2.cached_tokens == 128 and m2.prefill_tokens == 3
    assert second.cached_tokens == 128
    assert m2.prefill_time_ms < m1.prefill_time_ms
    assert engine.stats()["cached_tokens"] == 128


async def test_generated_blocks_are_reused_by_the_next_turn(engine: MockerEngine) -> None:
    prompt = list(range(10, 42))  # 2 blocks
    answer, _ = await run(engine, prompt, 40)  # 72 tokens: 4 full blocks cached
    _, turn2 = await run(engine, [*prompt, *answer, 500, 501], 4)
    assert turn2.metrics is not None and turn2.metrics.cached_tokens == 64


async def test_without_prefix_caching_nothing_is_shared_or_published() -> None:
    e = make_engine(enable_prefix_caching=False)
    batches: list[KvEventBatch] = []
    e.on_kv_events = batches.append
    try:
        prompt = list(range(10, 74))
        await run(e, prompt, 4)
        _, again = await run(e, prompt, 4)
        assert again.metrics is not None and again.metrics.cached_tokens == 0
        assert batches == [] and e.stats()["cached_blocks"] == 0
        assert e.cache.free_blocks == e.cache.capacity
    finally:
        await e.close()


async def test_long_prompts_are_prefilled_in_chunks_within_the_token_budget() -> None:
    e = make_engine(max_num_batched_tokens=64)
    try:
        _, last = await run(e, list(range(10, 310)), 2)  # 300 tokens: 5 chunks, then 1 decode
        assert last.metrics is not None and last.metrics.prefill_tokens == 300
        assert e.stats()["steps"] == 6
    finally:
        await e.close()


# -- memory pressure and cancellation -----------------------------------------------------


async def test_more_requests_than_the_cache_holds_queue_and_all_complete() -> None:
    e = make_engine(num_gpu_blocks=24, block_size=4, max_num_seqs=64)
    try:
        prompts = [list(range(1000 * i + 10, 1000 * i + 50)) for i in range(1, 13)]  # 10 blocks
        results = await asyncio.gather(*(run(e, p, 30) for p in prompts))
        assert all(len(tokens) == 30 for tokens, _ in results)
        assert all(last.finish_reason == "length" for _, last in results)
        stats = e.stats()
        assert stats["requests_finished"] == 12 and stats["requests_failed"] == 0
        assert stats["preemptions"] > 0  # decode growth forced some out; they came back
        assert stats["active_blocks"] == 0 and e.num_requests == 0
        # preempted requests still produce exactly the tokens they would have alone
        alone, _ = await run(e, prompts[-1], 30)
        assert alone == results[-1][0]
    finally:
        await e.close()


async def test_abort_frees_the_requests_blocks_at_once(engine: MockerEngine) -> None:
    gen = engine.generate("victim", list(range(10, 110)), max_tokens=100_000)
    await gen.__anext__()
    assert engine.cache.active_blocks >= 7 and engine.num_requests == 1
    assert engine.abort("victim")
    assert engine.cache.active_blocks == 0 and engine.num_requests == 0
    assert engine.cache.cached_blocks == 6  # computed full blocks stay cached, unreferenced
    rest = [out async for out in gen]
    assert rest[-1].finish_reason == "cancelled"
    assert engine.stats()["requests_cancelled"] == 1
    assert not engine.abort("victim")


async def test_closing_the_stream_aborts_the_request(engine: MockerEngine) -> None:
    gen = engine.generate("leaver", list(range(10, 60)), max_tokens=100_000)
    await gen.__anext__()
    await gen.aclose()
    assert engine.num_requests == 0 and engine.cache.active_blocks == 0


# -- KV events -------------------------------------------------------------------------------


async def test_kv_events_replay_to_the_cached_blocks_under_eviction() -> None:
    e = make_engine(num_gpu_blocks=40, block_size=4, max_num_seqs=8)
    batches: list[KvEventBatch] = []
    e.on_kv_events = batches.append
    try:
        shared = list(range(500, 532))
        prompts = [[*shared, *range(1000 * i, 1000 * i + 4 + i)] for i in range(1, 25)]
        for chunk in range(0, len(prompts), 6):
            await asyncio.gather(*(run(e, p, 12) for p in prompts[chunk : chunk + 6]))
        assert e.cache.evicted_total > 0
        assert [b.event_id for b in batches] == list(range(1, len(batches) + 1))
        assert replay(batches) == e.cache.cached_hashes()
        # every stored block's tokens hash to its id: a router can rebuild the chain
        by_hash = {
            h: (ev.parent_hash if i == 0 else ev.block_hashes[i - 1], toks)
            for b in batches
            for ev in b.events
            if isinstance(ev, KvStored)
            for i, (h, toks) in enumerate(zip(ev.block_hashes, ev.token_ids, strict=True))
        }
        for h, (parent, toks) in by_hash.items():
            assert block_hashes(toks, 4, parent=parent) == [h]
    finally:
        await e.close()


async def test_load_metrics_are_published_and_end_idle() -> None:
    e = make_engine()
    seen: list[Any] = []
    e.on_load_metrics = seen.append
    try:
        await run(e, list(range(10, 60)), 5)
        for _ in range(100):  # the loop publishes the idle state once it has nothing to do
            if seen and seen[-1].running_requests == 0:
                break
            await asyncio.sleep(0.005)
        assert seen[-1].running_requests == 0 and seen[-1].active_blocks == 0
        assert seen[-1].total_blocks == 16384 and seen[-1].cached_blocks == 3
    finally:
        await e.close()


async def test_unchanged_load_metrics_are_published_again_for_late_subscribers() -> None:
    e = make_engine(metrics_refresh=0.02)
    seen: list[Any] = []
    e.on_load_metrics = seen.append
    try:
        await run(e, list(range(10, 30)), 2)
        async with asyncio.timeout(5):
            while len(seen) < 2 or seen[-1] != seen[-2]:
                await asyncio.sleep(0.01)
        assert seen[-1].running_requests == 0
    finally:
        await e.close()


def test_load_metrics_carry_the_timing_models_speeds_in_wall_clock() -> None:
    """What a KV router plans with: prefill tokens/s and the decode step at the current batch,
    scaled by the speedup ratio."""
    timing = TimingModel(step_base_ms=4.0, prefill_ms_per_token=0.1, decode_ms_per_seq=0.5)
    e = make_engine(timing=timing, speedup_ratio=2.0)
    m = e.load_metrics()
    assert m.prefill_tokens_per_s == pytest.approx(2.0 * 1000 / 0.1)
    assert m.decode_step_ms == pytest.approx((4.0 + 0.5) / 2.0)  # a batch of one at least


# -- handlers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vocab() -> tuple[int, frozenset[int]]:
    tok = Tokenizer.from_dir(TINY)
    return tok.vocab_size, tok.special_token_ids


@pytest.fixture(scope="session")
def tiny_replies() -> Replies:
    return Replies.for_model(Tokenizer.from_dir(TINY))


class TestMockerConformance(HandlerConformance):
    supports_logprobs = True
    supports_prompt_logprobs = True
    supports_disaggregation = True
    supports_guided_decoding = True

    def _engine(self, tiny_vocab: tuple[int, frozenset[int]]) -> MockerEngine:
        vocab, special = tiny_vocab
        e = MockerEngine(
            MockerEngineArgs(speedup_ratio=10_000.0), vocab_size=vocab, special_token_ids=special
        )
        self._made.append(e)
        return e

    @pytest.fixture(autouse=True)
    async def _close_engines(self) -> AsyncIterator[None]:
        self._made: list[MockerEngine] = []
        yield
        for e in self._made:
            await e.close()

    @pytest.fixture
    def handler(
        self, tiny_vocab: tuple[int, frozenset[int]], tiny_replies: Replies
    ) -> BaseWorkerHandler:
        return MockerHandler(self._engine(tiny_vocab), replies=tiny_replies)

    @pytest.fixture
    def prefill_handler(self, tiny_vocab: tuple[int, frozenset[int]]) -> BaseWorkerHandler:
        return MockerPrefillHandler(self._engine(tiny_vocab))

    @pytest.fixture
    def decode_handler(self, tiny_vocab: tuple[int, frozenset[int]]) -> BaseWorkerHandler:
        return MockerDecodeHandler(self._engine(tiny_vocab))

    def active_requests(self, handler: BaseWorkerHandler) -> int:
        assert isinstance(handler, MockerHandler)
        return handler.engine.num_requests

    def break_engine(self, handler: BaseWorkerHandler) -> None:
        assert isinstance(handler, MockerHandler)
        handler.engine.fail_next = RuntimeError("simulated CUDA error: out of memory")


async def test_usage_reports_cached_tokens(engine: MockerEngine) -> None:
    handler = MockerHandler(engine)
    prompt = list(range(10, 60))
    first = await collect(handler, make_request(prompt, max_tokens=3))
    second = await collect(handler, make_request(prompt, max_tokens=3))
    assert first[-1]["usage"]["cached_tokens"] == 0
    assert second[-1]["usage"]["cached_tokens"] == 48


async def test_disaggregated_decode_skips_prefill_and_matches_aggregated() -> None:
    prefill_engine, decode_engine, agg_engine = make_engine(), make_engine(), make_engine()
    try:
        prompt = list(range(10, 210))
        req = make_request(prompt, max_tokens=6)
        pre = await collect(MockerPrefillHandler(prefill_engine), req)
        assert len(pre) == 1 and len(pre[0]["token_ids"]) == 1
        params = pre[0]["disaggregated_params"]
        assert params["mocker"]["prompt_tokens"] == 200
        assert prefill_engine.num_requests == 0 and prefill_engine.cache.cached_blocks == 12

        decode = MockerDecodeHandler(decode_engine)
        outs = await collect(decode, {**req, "disaggregated_params": params})
        agg = await collect(MockerHandler(agg_engine), req)
        tokens = [t for o in outs for t in o["token_ids"]]
        assert tokens == [t for o in agg for t in o["token_ids"]]
        assert tokens[0] == pre[0]["token_ids"][0]
        d, a = decode_engine.stats(), agg_engine.stats()
        assert d["prefill_tokens"] == 0 and d["transferred_tokens"] == 200
        assert d["simulated_ms"] < a["simulated_ms"]

        with pytest.raises(InvalidRequestError, match="200-token prompt"):
            await collect(decode, {**make_request(prompt[:50]), "disaggregated_params": params})
        # without parameters, the decode worker serves the request whole
        alone = await collect(decode, make_request(list(range(300, 340)), max_tokens=4))
        assert sum(len(o["token_ids"]) for o in alone) == 4
    finally:
        for e in (prefill_engine, decode_engine, agg_engine):
            await e.close()


async def test_stats_handler(engine: MockerEngine) -> None:
    handler = MockerHandler(engine)
    req = make_request(list(range(10, 60)), max_tokens=3, request_id="known")
    await collect(handler, req)
    stats = await handler.stats({"request_id": "known", "cached_block_hashes": True}, Context())
    assert stats["role"] == "worker" and stats["requests_total"] == 1
    assert stats["request"]["output_tokens"] == 3
    assert len(stats["cached_block_hashes"]) == stats["cached_blocks"] == 3
    assert stats["handler"]["requests_total"] == 1
