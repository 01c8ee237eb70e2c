"""vLLM's KV-event wire types and ZMQ publisher (vllm/distributed/kv_events.py), as encoded:
the batch is an array `[ts, events, data_parallel_rank]`, each event a map tagged by `type`;
messages are `(topic, seq: 8 bytes big-endian, msgpack payload)`; an endpoint with a wildcard
is bound, any other is connected to."""

from __future__ import annotations

from itertools import count
from typing import Any

import msgspec


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class ZmqEventPublisher:
    def __init__(self, endpoint: str, topic: str = "") -> None:
        import zmq

        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self._topic = topic.encode()
        self._seq = count()
        self._pack = msgspec.msgpack.Encoder()

    def publish(self, batch: KVEventBatch) -> None:
        seq = next(self._seq)
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), self._pack.encode(batch)))

    def shutdown(self) -> None:
        self._pub.close(0)
        self._ctx.term()
