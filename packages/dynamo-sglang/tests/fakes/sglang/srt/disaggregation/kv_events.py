"""Fake `sglang.srt.disaggregation.kv_events`: SGLang 0.5.23's event structs and wire format
(three ZMQ frames: topic, 8-byte big-endian sequence number, msgpack `KVEventBatch`)."""

from __future__ import annotations

import json
import time
from itertools import count
from typing import Any

import msgspec


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


class ZmqEventPublisher:
    """Binds wildcard endpoints, connects to concrete ones (as SGLang's does)."""

    def __init__(self, config_json: str) -> None:
        import zmq

        config = json.loads(config_json)
        endpoint = config.get("endpoint", "tcp://*:5557")
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        bind = config.get("bind")
        if bind is None:
            bind = "*" in endpoint or "0.0.0.0" in endpoint or not endpoint.startswith("tcp://")
        if bind:
            self._pub.bind(endpoint.replace("*", "127.0.0.1"))
        else:
            self._pub.connect(endpoint)
        self._topic = str(config.get("topic", "")).encode()
        self._seq = count()
        self._encoder = msgspec.msgpack.Encoder()

    def publish(self, events: list[Any]) -> None:
        batch = KVEventBatch(ts=time.time(), events=events)
        seq = next(self._seq).to_bytes(8, "big")
        self._pub.send_multipart((self._topic, seq, self._encoder.encode(batch)))

    def shutdown(self) -> None:
        self._pub.close(linger=0)
        self._ctx.term()
