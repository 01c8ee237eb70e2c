"""vLLM's KV-event wire types and ZMQ publisher (vllm/distributed/kv_events.py), as encoded:
the batch is an array `[ts, events, data_parallel_rank]`, each event a map tagged by `type`;
messages are `(topic, seq: 8 bytes big-endian, msgpack payload)`; an endpoint with a wildcard
is bound, any other is connected to; the replay socket (`replay_endpoint`) is always bound.
Each engine core's publisher is made by `EventPublisherFactory.create(config, data_parallel_rank)`
and offsets both endpoints by its rank (`offset_endpoint_port`), and stamps its batches with it."""

from __future__ import annotations

from dataclasses import asdict
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
    `drop_live` keeps batches out of the live stream). Both endpoints offset by the rank."""

    def __init__(
        self,
        data_parallel_rank: int,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
        topic: str = "",
    ) -> None:
        self._data_parallel_rank = data_parallel_rank
        endpoint = str(self.offset_endpoint_port(endpoint, data_parallel_rank))
        replay_endpoint = self.offset_endpoint_port(replay_endpoint, data_parallel_rank)
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
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._data_parallel_rank
        self.send(self._pack.encode(batch))

    def shutdown(self) -> None:
        self.close()

    @staticmethod
    def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
        """tcp: the port plus the rank (a port 0 is left for the OS); inproc: `_dp{rank}`."""
        if not endpoint or data_parallel_rank == 0:
            return endpoint
        if "inproc" in endpoint:
            return f"{endpoint}_dp{data_parallel_rank}"
        if "tcp" in endpoint:
            base, _, port = endpoint.rpartition(":")
            return endpoint if int(port) == 0 else f"{base}:{int(port) + data_parallel_rank}"
        raise ValueError("Invalid endpoint: must contain 'inproc' or 'tcp'")


class EventPublisherFactory:
    @classmethod
    def create(cls, config: Any, data_parallel_rank: int = 0) -> ZmqEventPublisher | None:
        """The zmq publisher of engine core `data_parallel_rank` (None: vLLM's null one)."""
        if config is None or not config.enable_kv_cache_events or config.publisher != "zmq":
            return None
        fields = asdict(config)
        del fields["publisher"], fields["enable_kv_cache_events"]
        return ZmqEventPublisher(data_parallel_rank=data_parallel_rank, **fields)
