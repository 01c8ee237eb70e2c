"""vLLM's KV events as vllm/distributed/kv_events.py encodes them (read by core's relay, whose
own tests hold the wire format's table: dynamo-core's test_kv_relay.py), and its stat loggers,
re-published as Dynamo events."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from dynamo_core.llm.kv_relay import convert_events
from dynamo_vllm.events import LoadMetricsLogger


def batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode([1700000000.0, list(events), None])


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
