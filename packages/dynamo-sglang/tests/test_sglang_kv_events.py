"""SGLang's ZMQ KV events (the wire format of sglang.srt.disaggregation.kv_events, 0.5.23 and
the tagged-array encoding of earlier releases) re-published as Dynamo's KvEventBatch."""

from __future__ import annotations

import asyncio
import json
import time
from types import ModuleType
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvCleared, KvEventBatch, KvRemoved, KvStored
from dynamo_core.llm.kv_log import KV_REPLAY_ENDPOINT
from dynamo_core.llm.kv_relay import convert_events
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.conformance import collect, make_request
from dynamo_sglang import worker
from dynamo_sglang.engine import SglangAdapter, prepare_kv_events
from dynamo_sglang.handlers import WorkerHandler
from dynamo_sglang.kv_events import subscriber_endpoints
from sglang_testing import TINY, free_port


def test_convert_tagged_maps(fake_sglang: ModuleType) -> None:
    from sglang.srt.disaggregation import kv_events as sk

    batch = sk.KVEventBatch(
        ts=time.time(),
        events=[
            sk.BlockStored(
                block_hashes=[-5, 7],
                parent_block_hash=-1,
                token_ids=[1, 2, 3, 4],
                block_size=2,
                lora_id=None,
                medium="GPU",
            ),
            sk.BlockRemoved(block_hashes=[7]),
            sk.AllBlocksCleared(),
        ],
    )
    assert convert_events(msgspec.msgpack.encode(batch), 2) == [
        KvStored(block_hashes=[2**64 - 5, 7], token_ids=[[1, 2], [3, 4]], parent_hash=2**64 - 1),
        KvRemoved(block_hashes=[7]),
        KvCleared(),
    ]


def test_subscriber_endpoints() -> None:
    assert subscriber_endpoints({"endpoint": "tcp://*:5557"}, 2) == (
        ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"],
        False,
    )
    assert subscriber_endpoints({"endpoint": "tcp://10.0.0.5:6000"}) == (
        ["tcp://10.0.0.5:6000"],
        True,
    )
    assert subscriber_endpoints({"endpoint": "tcp://127.0.0.1:6000", "bind": True}) == (
        ["tcp://127.0.0.1:6000"],
        False,
    )


class Collector:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def publish(self, item: Any) -> None:
        self.items.append(item)

    async def wait(self, n: int) -> list[KvEventBatch]:
        async with asyncio.timeout(5):
            while len(self.items) < n:
                await asyncio.sleep(0.01)
        return [msgspec.convert(i, KvEventBatch) for i in self.items]


async def _relay_roundtrip(sglang: ModuleType, server_args: Any) -> list[KvEventBatch]:
    sink = Collector()
    relay = prepare_kv_events(server_args, sink, enabled=True)
    assert relay is not None
    engine = sglang.Engine(server_args=server_args)
    try:
        relay.start(engine.page_size)
        handler = WorkerHandler(engine)
        # ZMQ connections take a moment: send new prompts until an event arrives
        async with asyncio.timeout(5):
            i = 0
            while not sink.items:
                prompt = [100 + 10 * i + k for k in range(10)]
                await collect(handler, make_request(prompt, max_tokens=1))
                i += 1
                await asyncio.sleep(0.02)
        engine.flush_cache()
        batches = await sink.wait(len(sink.items) + 1)
    finally:
        await relay.close()
        engine.shutdown()
    return batches


async def test_relay_sets_up_a_local_publisher(fake_sglang: ModuleType) -> None:
    server_args = fake_sglang.ServerArgs(model_path=str(TINY), page_size=4)
    batches = await _relay_roundtrip(fake_sglang, server_args)
    config = json.loads(server_args.kv_events_config)
    assert config["publisher"] == "zmq" and config["endpoint"].startswith("tcp://127.0.0.1:")
    stored = batches[0].events[0]
    assert isinstance(stored, KvStored)
    assert batches[0].block_size == 4
    assert all(len(t) == 4 for t in stored.token_ids)
    flat = [t for block in stored.token_ids for t in block]
    assert flat == list(range(flat[0], flat[0] + 8))  # the prompt's two full pages
    assert all(0 <= h < 2**64 for h in stored.block_hashes)
    assert isinstance(batches[-1].events[-1], KvCleared)
    assert [b.event_id for b in batches] == list(range(len(batches)))


async def test_relay_subscribes_to_a_configured_publisher(fake_sglang: ModuleType) -> None:
    config = {"publisher": "zmq", "endpoint": f"tcp://*:{free_port()}", "topic": "kv"}
    server_args = fake_sglang.ServerArgs(
        model_path=str(TINY), page_size=2, kv_events_config=json.dumps(config)
    )
    batches = await _relay_roundtrip(fake_sglang, server_args)
    assert isinstance(batches[0].events[0], KvStored)
    assert batches[0].block_size == 2


async def test_the_relay_fetches_what_sglangs_publisher_dropped(fake_sglang: ModuleType) -> None:
    """SGLang's PUB socket drops what it sends before the relay's subscription is up (ZMQ's
    slow joiner) and, here, batches 1 and 2 later on; the relay asks SGLang's replay socket
    (which the worker configured) for both, so every batch is relayed, in order."""
    server_args = fake_sglang.ServerArgs(model_path=str(TINY), page_size=4)
    sink = Collector()
    relay = prepare_kv_events(server_args, sink, enabled=True)
    assert relay is not None
    assert relay.replays == {0: json.loads(server_args.kv_events_config)["replay_endpoint"]}
    engine = fake_sglang.Engine(server_args=server_args)
    try:
        engine._publisher.drop_live.update({1, 2})
        relay.start(engine.page_size)
        handler = WorkerHandler(engine)
        prompts: list[int] = []
        async with asyncio.timeout(10):
            while relay.batches < 5:  # each new prompt stores two pages: one batch
                prompts.append(100 + 10 * len(prompts))
                await collect(handler, make_request(list(range(prompts[-1], prompts[-1] + 8))))
                await asyncio.sleep(0.02)
        batches = await sink.wait(relay.batches)
        assert [b.event_id for b in batches] == list(range(len(batches)))
        firsts = [b.events[0].token_ids[0][0] for b in batches if isinstance(b.events[0], KvStored)]
        assert firsts == prompts[: len(firsts)] and len(firsts) >= 5
        assert relay.replayed >= 2 and engine._publisher.replay.replays >= 1
    finally:
        await relay.close()
        engine.shutdown()


async def test_a_worker_serves_its_kv_events_for_replay(
    fake_sglang: ModuleType, namespace: str
) -> None:
    """The adapter keeps what its relay re-publishes and serves it on the worker's
    `kv_replay`, from the first batch SGLang published on (the slow joiner's too)."""
    parsed = worker.build_parser().parse(
        ["--model-path", str(TINY), "--page-size", "4", "--namespace", namespace], environ={}
    )
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as runtime,
        SglangAdapter(parsed) as adapter,
    ):
        component = runtime.namespace(namespace).component("backend")
        await component.create_service()
        await adapter.start(component)
        handler = adapter.handler()
        replay = await component.endpoint(KV_REPLAY_ENDPOINT).client()
        await replay.wait_for_instances(timeout=5)
        kept: list[Any] = []
        prompts: list[int] = []
        async with asyncio.timeout(10):
            while len(kept) < 2:
                prompts.append(300 + 10 * len(prompts))
                await collect(handler, make_request(list(range(prompts[-1], prompts[-1] + 8))))
                kept = [b async for b in await replay.round_robin({"start": 0})]
        assert [b["event_id"] for b in kept] == list(range(len(kept)))
        assert [b["events"][0]["token_ids"][0][0] for b in kept] == prompts[: len(kept)]


def test_no_relay_when_disabled_or_not_zmq(fake_sglang: ModuleType) -> None:
    server_args = fake_sglang.ServerArgs(model_path="m")
    assert prepare_kv_events(server_args, Collector(), enabled=False) is None
    assert server_args.kv_events_config is None
    server_args.kv_events_config = json.dumps({"publisher": "null"})
    assert prepare_kv_events(server_args, Collector(), enabled=True) is None


async def test_the_local_publisher_listens_on_kv_events_port(fake_sglang: ModuleType) -> None:
    port = free_port()
    server_args = fake_sglang.ServerArgs(model_path=str(TINY), page_size=4)
    relay = prepare_kv_events(server_args, Collector(), enabled=True, port=port)
    assert relay is not None
    try:
        config = json.loads(server_args.kv_events_config)
        assert config["endpoint"] == f"tcp://127.0.0.1:{port}"
    finally:
        await relay.close()
