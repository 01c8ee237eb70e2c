"""vLLM's KV-event wire types and ZMQ publisher (vllm/distributed/kv_events.py), as encoded:
the batch is an array `[ts, events, data_parallel_rank]`, each event a map tagged by `type`;
messages are `(topic, seq: 8 bytes big-endian, msgpack payload)`; an endpoint with a wildcard
is bound, any other is connected to; the replay socket (`replay_endpoint`) is always bound."""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_core.testing.engine_replay import PublisherSockets


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


class ZmqEventPublisher(PublisherSockets):
    """vLLM's publisher: PUB at `endpoint`; with `replay_endpoint`, the last `buffer_steps`
    batches served for replay as vLLM does (`dynamo_core.testing.engine_replay`, whose
    `drop_live` keeps batches out of the live stream)."""

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
    ) -> None:
        binds = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
        super().__init__(
            endpoint,
            bind=binds,
            topic=topic,
            replay_endpoint=replay_endpoint,
            buffer_steps=buffer_steps,
        )
        self._pack = msgspec.msgpack.Encoder()

    def publish(self, batch: KVEventBatch) -> None:
        self.send(self._pack.encode(batch))

    def shutdown(self) -> None:
        self.close()
