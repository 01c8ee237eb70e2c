"""vLLM's KV events (its ZMQ wire format, as vllm/distributed/kv_events.py encodes it) and stat
loggers, re-published as Dynamo events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import zmq

from dynamo_vllm.events import (
    KvEventRelay,
    LoadMetricsLogger,
    connect_address,
    convert_events,
    external_hash,
)


def batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode([1700000000.0, list(events), None])


def stored(
    hashes: list[Any], tokens: list[int], parent: Any = None, size: int = 4
) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": size, "lora_id": None, "medium": "GPU",
            "lora_name": None}  # fmt: skip


def test_stored_removed_cleared() -> None:
    events = convert_events(
        batch(
            stored([11, 12], list(range(8)), parent=10),
            {"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
        ),
        block_size=4,
    )
    out = msgspec.to_builtins(events)
    assert out == [
        {"type": "stored", "block_hashes": [11, 12], "token_ids": [[0, 1, 2, 3], [4, 5, 6, 7]],
         "parent_hash": 10},
        {"type": "removed", "block_hashes": [11]},
        {"type": "cleared"},
    ]  # fmt: skip


def test_array_encoded_events_and_bytes_hashes() -> None:
    digest = bytes(range(32))
    events = convert_events(
        batch(["BlockStored", [digest], None, [1, 2], 2, None, "GPU"], ["BlockRemoved", [digest]]),
        block_size=16,
    )
    expected = int.from_bytes(digest, "big") & ((1 << 64) - 1)  # as vLLM's int hashes
    assert external_hash(digest) == expected
    assert events[0].block_hashes == [expected] and events[0].token_ids == [[1, 2]]
    assert events[1].block_hashes == [expected]


def test_the_fake_engines_own_encoding_is_read(fake_vllm: Path) -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVEventBatch

    payload = msgspec.msgpack.encode(
        KVEventBatch(
            ts=1.0,
            events=[
                BlockStored(block_hashes=[5], parent_block_hash=None, token_ids=[9, 9],
                            block_size=2, lora_id=None, medium="GPU", lora_name=None),
                AllBlocksCleared(),
            ],
        )
    )  # fmt: skip
    kinds = [type(e).__name__ for e in convert_events(payload, 2)]
    assert kinds == ["KvStored", "KvCleared"]


def test_connect_address() -> None:
    assert connect_address("tcp://*:5557") == "tcp://127.0.0.1:5557"
    assert connect_address("tcp://10.0.0.2:5557") == "tcp://10.0.0.2:5557"
    assert connect_address("ipc:///tmp/x") == "ipc:///tmp/x"


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_relay_binds_and_vllms_publisher_connects() -> None:
    got: list[Any] = []
    relay = KvEventRelay(got.append, topic="kv-events", block_size=4)
    endpoint = relay.bind()
    await relay.start()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(endpoint)  # what vLLM does for an endpoint without a wildcard
    try:
        seq = 0

        def send(payload: bytes) -> None:
            nonlocal seq
            pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])
            seq += 1

        async with asyncio.timeout(5):  # PUB/SUB: messages before the link is up are dropped
            while not got:
                send(batch(stored([1], [1, 2, 3, 4])))
                await asyncio.sleep(0.05)
        send(batch({"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}))
        await _until(lambda: any(e["events"][0]["type"] == "removed" for e in got))
        ids = [e["event_id"] for e in got]
        assert ids == list(range(len(ids)))
        assert got[0]["block_size"] == 4
        assert got[0]["events"][0]["token_ids"] == [[1, 2, 3, 4]]
    finally:
        pub.close(0)
        ctx.term()
        await relay.close()


async def test_relay_follows_a_publisher_that_binds(caplog: pytest.LogCaptureFixture) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    got: list[Any] = []
    relay = KvEventRelay(got.append, block_size=2)
    relay.connect(f"tcp://*:{port}")
    await relay.start()
    try:
        async with asyncio.timeout(5):
            seq = 0
            while not got:
                pub.send_multipart(
                    [b"", seq.to_bytes(8, "big"), batch({"type": "AllBlocksCleared"})]
                )
                seq += 2  # every other one: a gap
                await asyncio.sleep(0.05)
        pub.send_multipart([b"", (seq + 5).to_bytes(8, "big"), batch({"type": "AllBlocksCleared"})])
        await _until(lambda: "were lost" in caplog.text)
    finally:
        pub.close(0)
        ctx.term()
        await relay.close()


def vllm_config(num_gpu_blocks: int) -> Any:
    """What the logger reads of vLLM's `VllmConfig`."""
    return SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=num_gpu_blocks))


def test_load_metrics_logger_publishes_changes_only() -> None:
    class Stats:
        num_running_reqs = 3
        num_waiting_reqs = 1
        kv_cache_usage = 0.25

    sent: list[Any] = []
    logger = LoadMetricsLogger.factory(sent.append)(vllm_config(200), 0)
    logger.log_engine_initialized()
    logger.record(Stats(), None)
    logger.record(Stats(), None, None, 0)
    logger.record(None, None)
    assert sent == [
        {"active_blocks": 50, "total_blocks": 200, "waiting_requests": 1, "running_requests": 3}
    ]


def test_load_metrics_logger_measures_speeds_from_iteration_stats() -> None:
    class Sched:
        num_running_reqs = 2
        num_waiting_reqs = 0
        kv_cache_usage = 0.5

    class Prompt:
        def __init__(self, computed: int) -> None:
            self.computed = computed

    class Iteration:  # vLLM's IterationStats, the fields the logger reads
        def __init__(self, at: float, computed: int, itl: list[float]) -> None:
            self.iteration_timestamp = at
            self.prompt_token_stats = Prompt(computed)
            self.inter_token_latencies_iter = itl

    sent: list[Any] = []
    logger = LoadMetricsLogger.factory(sent.append)(vllm_config(100), 0)
    logger.record(Sched(), Iteration(100.00, 0, []))
    logger.record(Sched(), Iteration(100.01, 0, [0.01, 0.01]))  # decode steps of 10 ms
    logger.record(Sched(), Iteration(100.02, 0, [0.01, 0.01]))
    # a step that also prefilled 1,000 new tokens took 90 ms more than a decode step
    logger.record(Sched(), Iteration(100.12, 1000, [0.1, 0.1]))
    last = sent[-1]
    assert last["decode_step_ms"] == 10.0
    assert last["prefill_tokens_per_s"] == pytest.approx(1000 / 0.09, rel=1e-2)
    assert last["active_blocks"] == 50 and last["running_requests"] == 2
