"""SGLang's KV cache events, re-published as Dynamo's (`dynamo_core.llm.kv`).

SGLang's scheduler publishes its radix cache's changes over ZMQ when started with
`--kv-events-config '{"publisher": "zmq", "endpoint": ..., "topic": ...}'`
(`sglang.srt.disaggregation.kv_events.ZmqEventPublisher`). Each message is three frames:
topic, an 8-byte big-endian sequence number, and a msgpack `KVEventBatch`: the array
`[ts, events, attn_dp_rank]`, where an event is `BlockStored` (block_hashes,
parent_block_hash, token_ids, block_size, lora_id, ...), `BlockRemoved` (block_hashes, ...) or
`AllBlocksCleared`. SGLang 0.5 encodes events as tagged maps (`{"type": "BlockStored", ...}`),
earlier releases as tagged arrays (`["BlockStored", ...]`); both are read.

`KvEventRelay` subscribes to that socket (one per data-parallel rank: SGLang offsets the port
by the rank) and publishes each batch as a `KvEventBatch` on the component's `kv_events`
topic: `KvStored` keeps SGLang's block hashes and parent hash (as unsigned 64-bit ids) and
splits the flat `token_ids` into one list per block, so the router hashes the tokens itself.

`local_kv_events_config()` is what the worker passes to SGLang when the user gave no
`--kv-events-config`: SGLang *connects* to a concrete address, so the relay binds a free port on
127.0.0.1 and nothing is exposed beyond the machine (and replicas never clash on a port).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvCleared, KvEvent, KvEventBatch, KvRemoved, KvStored

__all__ = ["KvEventRelay", "convert_batch", "local_kv_events_config", "subscriber_endpoints"]

log = logging.getLogger("dynamo.sglang.kv_events")

_U64 = (1 << 64) - 1
_WILDCARDS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "::1"}


def _u64(value: Any) -> int:
    return int(value) & _U64


def _fields(event: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(tag, fields) of an event encoded as a tagged map or a tagged array."""
    if isinstance(event, dict):
        return str(event.get("type", "")), event
    if isinstance(event, list | tuple) and event:
        return str(event[0]), dict(zip(names, event[1:], strict=False))
    return "", {}


_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id")


def _convert_event(event: Any, default_block_size: int) -> KvEvent | None:
    tag, _ = _fields(event, ())
    if tag == "BlockStored":
        _, f = _fields(event, _STORED)
        hashes = [_u64(h) for h in f.get("block_hashes") or []]
        if not hashes:
            return None
        tokens = list(f.get("token_ids") or [])
        size = int(f.get("block_size") or default_block_size)
        if size * len(hashes) != len(tokens):  # be lenient: split the tokens evenly
            size = max(1, len(tokens) // len(hashes))
        parent = f.get("parent_block_hash")
        return KvStored(
            block_hashes=hashes,
            token_ids=[tokens[i * size : (i + 1) * size] for i in range(len(hashes))],
            parent_hash=None if parent is None else _u64(parent),
        )
    if tag == "BlockRemoved":
        _, f = _fields(event, ("block_hashes",))
        return KvRemoved(block_hashes=[_u64(h) for h in f.get("block_hashes") or []])
    if tag == "AllBlocksCleared":
        return KvCleared()
    return None


def convert_batch(payload: bytes, event_id: int, block_size: int) -> KvEventBatch | None:
    """One SGLang `KVEventBatch` (msgpack) as a Dynamo `KvEventBatch`, or None if empty."""
    data = msgspec.msgpack.decode(payload)
    events_raw = data.get("events") if isinstance(data, dict) else data[1]
    events = [e for e in (_convert_event(x, block_size) for x in events_raw or []) if e]
    if not events:
        return None
    return KvEventBatch(event_id=event_id, events=events, block_size=block_size)


def _connectable(endpoint: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and host in _WILDCARDS:
        return f"{scheme}://{_WILDCARDS[host]}:{port}"
    return endpoint


def _offset(endpoint: str, rank: int) -> str:
    """SGLang's per-rank endpoint: the port plus the rank (ipc/inproc: a `_rank` suffix)."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def subscriber_endpoints(config: dict[str, Any], dp_size: int = 1) -> tuple[list[str], bool]:
    """Where to subscribe for SGLang's `--kv-events-config`, and whether we bind (SGLang
    binds wildcard, ipc and inproc addresses, or when `bind` says so, and connects otherwise)."""
    endpoint = str(config.get("endpoint") or "tcp://*:5557")
    sglang_binds = config.get("bind")
    if sglang_binds is None:
        sglang_binds = any(
            w in endpoint for w in ("*", "::", "0.0.0.0")
        ) or not endpoint.startswith("tcp://")
    endpoints = [_offset(endpoint, r) for r in range(max(1, dp_size))]
    if sglang_binds:
        return [_connectable(e) for e in endpoints], False
    return endpoints, True


def local_kv_events_config(port: int, topic: str = "kv-events") -> str:
    """A `--kv-events-config` that makes SGLang connect to 127.0.0.1:`port`."""
    return json.dumps({"publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}", "topic": topic})


class KvEventRelay:
    """SGLang's ZMQ KV events in, `KvEventBatch` maps out through `publish`."""

    def __init__(
        self,
        publish: Callable[[Any], Any],
        *,
        block_size: int,
        endpoints: list[str],
        topic: str = "",
        bind: bool = False,
    ) -> None:
        import zmq
        import zmq.asyncio

        self.publish = publish
        self.block_size = block_size
        self.endpoints = endpoints
        self.topic = topic
        self.bind = bind
        self.batches = 0
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        self._task: asyncio.Task[None] | None = None
        self._event_id = 0
        #: The port bound by `bound_locally` (0 otherwise).
        self.port = 0

    @classmethod
    def bound_locally(
        cls, publish: Callable[[Any], Any], *, block_size: int, dp_size: int = 1
    ) -> KvEventRelay:
        """A relay bound to a free port on 127.0.0.1 (`.port`, and the next `dp_size - 1`
        ports, as SGLang offsets them per rank), for SGLang to connect to."""
        import zmq

        relay = cls(publish, block_size=block_size, endpoints=[], topic="kv-events", bind=True)
        relay.port = relay._sock.bind_to_random_port("tcp://127.0.0.1")
        for rank in range(1, dp_size):
            try:
                relay._sock.bind(f"tcp://127.0.0.1:{relay.port + rank}")
            except zmq.ZMQError as exc:
                log.warning("KV events of data-parallel rank %d will be missed: %s", rank, exc)
        return relay

    def start(self, block_size: int | None = None) -> None:
        """Subscribe and relay; `block_size` is the engine's page size, once it is known."""
        if block_size is not None:
            self.block_size = block_size
        for endpoint in self.endpoints:
            if self.bind:
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) < 3:
                continue
            try:
                batch = convert_batch(frames[-1], self._event_id, self.block_size)
            except (msgspec.DecodeError, TypeError, ValueError, IndexError) as exc:
                log.warning("unreadable SGLang KV event batch skipped: %s", exc)
                continue
            if batch is None:
                continue
            self._event_id += 1
            self.batches += 1
            self.publish(msgspec.to_builtins(batch))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
