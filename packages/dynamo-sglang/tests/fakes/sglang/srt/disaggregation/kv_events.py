"""Fake `sglang.srt.disaggregation.kv_events`: SGLang 0.5.23's event structs and wire format
(three ZMQ frames: topic, 8-byte big-endian sequence number, msgpack `KVEventBatch`)."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from dynamo_core.testing.engine_replay import PublisherSockets


class EventBatch(msgspec.Struct, array_like=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    attn_dp_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class ZmqEventPublisher(PublisherSockets):
    """Binds wildcard endpoints, connects to concrete ones (as SGLang's does); with a
    `replay_endpoint`, keeps the last `buffer_steps` batches for replay as SGLang does
    (`dynamo_core.testing.engine_replay`, whose `drop_live` keeps batches out of the live
    stream)."""

    def __init__(self, config_json: str) -> None:
        config = json.loads(config_json)
        endpoint = config.get("endpoint", "tcp://*:5557")
        bind = config.get("bind")
        if bind is None:
            bind = "*" in endpoint or "0.0.0.0" in endpoint or not endpoint.startswith("tcp://")
        replay = config.get("replay_endpoint")
        super().__init__(
            endpoint.replace("*", "127.0.0.1") if bind else endpoint,
            bind=bool(bind),
            topic=str(config.get("topic", "")),
            replay_endpoint=replay.replace("*", "127.0.0.1") if replay else None,
            buffer_steps=int(config.get("buffer_steps", 10_000)),
        )
        self._encoder = msgspec.msgpack.Encoder()

    def publish(self, events: list[Any]) -> None:
        self.send(self._encoder.encode(KVEventBatch(ts=time.time(), events=events)))

    def shutdown(self) -> None:
        self.close()
