"""Engine KV events and iteration stats -> Dynamo `KvEventBatch` / `LoadMetrics`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dynamo_core.llm.kv import KvRemoved, KvStored, LoadMetrics
from dynamo_core.testing.conformance import collect, make_request
from dynamo_trtllm.publisher import EnginePublisher, kv_events_from_engine, load_metrics_from_stats
from trtllm_testing import TINY


def block(h: int, tokens: list[int]) -> dict[str, Any]:
    return {
        "type": "stored_block",
        "block_hash": h,
        "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens],
    }


def test_kv_events_translation() -> None:
    events = [
        {
            "event_id": 0,
            "data": {"type": "created", "num_blocks_per_cache_level": [10]},
            "window_size": 64,
        },
        {"event_id": 1, "data": {"type": "created"}, "window_size": 4096},
        {
            "event_id": 2,
            "data": {
                "type": "stored",
                "parent_hash": None,
                "blocks": [block(11, [1, 2]), block(-2, [3, 4]), block(13, [5])],
            },
            "window_size": 4096,
        },
        # a sliding-window layer's event: not the global attention's, dropped
        {
            "event_id": 3,
            "data": {"type": "stored", "parent_hash": None, "blocks": [block(99, [1, 2])]},
            "window_size": 64,
        },
        {"event_id": 4, "data": {"type": "removed", "block_hashes": [13, 11]}, "window_size": 4096},
        {"event_id": 5, "data": {"type": "updated"}, "window_size": 4096},
    ]
    assert kv_events_from_engine(events, block_size=2) == [
        KvStored(block_hashes=[11, (1 << 64) - 2], token_ids=[[1, 2], [3, 4]], parent_hash=None),
        KvRemoved(block_hashes=[11]),  # 13 was partial: the router never saw it
    ]


def test_load_metrics_from_stats() -> None:
    stat = {
        "numActiveRequests": 3,
        "numQueuedRequests": 1,
        "kvCacheStats": {"maxNumBlocks": 100, "usedNumBlocks": 7, "tokensPerBlock": 32},
    }
    expected = LoadMetrics(
        active_blocks=7, total_blocks=100, running_requests=3, waiting_requests=1
    )
    assert load_metrics_from_stats(stat) == expected
    assert load_metrics_from_stats(json.dumps(stat)) == expected  # older releases: JSON text
    assert load_metrics_from_stats({"iter": 1}) is None


class Recorder:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.closed = False

    def publish(self, payload: Any) -> None:
        self.items.append(payload)

    async def close(self) -> None:
        self.closed = True


async def test_publisher_polls_the_engine(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    llm = fake_trtllm.LLM(
        str(TINY),
        enable_iter_perf_stats=True,
        kv_cache_config=fake_trtllm.KvCacheConfig(event_buffer_max_size=100, tokens_per_block=16),
    )
    kv, metrics = Recorder(), Recorder()
    publisher = EnginePublisher(llm, kv, metrics, block_size=16)
    publisher.start()
    prompt = list(range(100, 140))  # 2 full blocks of 16 and a partial one
    await collect(TrtllmHandler(llm), make_request(prompt, max_tokens=3))
    async with asyncio.timeout(5):
        while not (kv.items and metrics.items):
            await asyncio.sleep(0.01)
    await publisher.close()
    assert kv.closed and metrics.closed
    batch = kv.items[0]
    assert batch["event_id"] == 1 and batch["block_size"] == 16
    (stored,) = batch["events"]
    assert stored["type"] == "stored"
    assert stored["token_ids"] == [prompt[:16], prompt[16:32]]
    assert metrics.items[-1]["total_blocks"] == 64
    assert metrics.items[-1]["active_blocks"] == 3
