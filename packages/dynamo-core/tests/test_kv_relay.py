"""Core's ZMQ KV-event relay: the engines' wire format (vLLM's, which SGLang shares) in both
encodings, the relay's sockets, and what it does with garbage and gaps."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest
import zmq

from dynamo_core.llm.kv import KvCleared, KvRemoved, KvStored
from dynamo_core.llm.kv_relay import (
    ZmqKvEventRelay,
    connectable,
    convert_events,
    external_hash,
    free_local_port,
    rank_endpoint,
    rank_replays,
)

U64 = 2**64


def batch(*events: Any, rank: int | None = None) -> bytes:
    return msgspec.msgpack.encode([1700000000.0, list(events), rank])


def stored(
    hashes: list[Any], tokens: list[int], parent: Any = None, size: int = 4
) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": size, "lora_id": None, "medium": "GPU",
            "lora_name": None}  # fmt: skip


def test_stored_removed_cleared_as_tagged_maps() -> None:
    events = convert_events(
        batch(
            stored([11, 12], list(range(8)), parent=10),
            {"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
            {"type": "SomethingNew"},
        ),
        block_size=4,
    )
    assert msgspec.to_builtins(events) == [
        {"type": "stored", "block_hashes": [11, 12], "token_ids": [[0, 1, 2, 3], [4, 5, 6, 7]],
         "parent_hash": 10},
        {"type": "removed", "block_hashes": [11]},
        {"type": "cleared"},
    ]  # fmt: skip


def test_tagged_arrays_of_older_releases_and_bytes_hashes() -> None:
    digest = bytes(range(32))
    events = convert_events(
        batch(["BlockStored", [digest], None, [1, 2], 2, None, "GPU"], ["BlockRemoved", [digest]]),
        block_size=16,
    )
    expected = int.from_bytes(digest, "big") & (U64 - 1)  # as vLLM's int hashes
    assert external_hash(digest) == expected
    assert events == [
        KvStored(block_hashes=[expected], token_ids=[[1, 2]], parent_hash=None),
        KvRemoved(block_hashes=[expected]),
    ]


def test_negative_hashes_are_unsigned_and_uneven_blocks_split_evenly() -> None:
    # SGLang hashes are signed 64-bit; its last page may not be full
    events = convert_events(batch(stored([-5, 7], [1, 2, 3, 4, 5, 6], parent=-1, size=4)), 4)
    assert events == [
        KvStored(block_hashes=[U64 - 5, 7], token_ids=[[1, 2, 3], [4, 5, 6]], parent_hash=U64 - 1)
    ]
    assert convert_events(batch(stored([], [1, 2])), 2) == []  # nothing stored: no event


def test_a_batch_encoded_as_a_map() -> None:
    payload = msgspec.msgpack.encode({"ts": 1.0, "events": [{"type": "AllBlocksCleared"}]})
    assert convert_events(payload, 4) == [KvCleared()]
    assert convert_events(batch(), 4) == []


def test_endpoints() -> None:
    assert connectable("tcp://*:5557") == "tcp://127.0.0.1:5557"
    assert connectable("tcp://0.0.0.0:5557") == "tcp://127.0.0.1:5557"
    assert connectable("tcp://10.0.0.2:5557") == "tcp://10.0.0.2:5557"
    assert connectable("ipc:///tmp/x") == "ipc:///tmp/x"
    assert rank_endpoint("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert rank_endpoint("tcp://127.0.0.1:5557", 2) == "tcp://127.0.0.1:5559"
    assert rank_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"


def frames(seq: int, payload: bytes) -> list[bytes]:
    return [b"kv-events", seq.to_bytes(8, "big"), payload]


def test_garbage_is_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Any] = []
    relay = ZmqKvEventRelay(got.append, block_size=2, engine="vLLM")
    try:
        relay.handle([b"only one frame"])
        relay.handle(frames(0, b"\xc1 not msgpack"))
        relay.handle(frames(1, msgspec.msgpack.encode("a string")))
        relay.handle(frames(2, batch({"type": "AllBlocksCleared"})))
    finally:
        relay._socket.close(0)
        relay._context.term()
    assert relay.bad == 3
    assert (relay.batches, relay.events) == (1, 1)
    assert got == [{"event_id": 0, "events": [{"type": "cleared"}], "block_size": 2}]
    assert "unreadable vLLM KV event batch skipped" in caplog.text


def test_a_gap_in_a_ranks_sequence_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    relay = ZmqKvEventRelay(lambda _: None, block_size=2, engine="SGLang")
    cleared = {"type": "AllBlocksCleared"}
    try:
        with caplog.at_level(logging.WARNING, "dynamo.kv_relay"):
            for seq, rank in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (5, 0), (0, 0)]:
                relay.handle(frames(seq, batch(cleared, rank=rank)))
    finally:
        relay._socket.close(0)
        relay._context.term()
    # ranks count apart; 2..4 of rank 0 were lost; a restart from 0 is no gap
    assert relay.lost == 3
    assert caplog.messages == ["SGLang KV events 2..4 of rank 0 were lost"]


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_bound_locally_the_engines_publishers_connect_one_per_rank() -> None:
    got: list[Any] = []
    relay = ZmqKvEventRelay(got.append, topic="kv-events", block_size=4)
    endpoint = relay.bind_local(ranks=2)
    relay.start()
    ctx = zmq.Context()
    pubs = [ctx.socket(zmq.PUB) for _ in range(2)]
    try:
        for rank, pub in enumerate(pubs):
            pub.connect(rank_endpoint(endpoint, rank))  # what the engine's ranks do
        async with asyncio.timeout(30):  # PUB/SUB drops what precedes the link; a bound
            seq = 0
            while {tuple(e["events"][0]["block_hashes"]) for e in got} != {(1,), (2,)}:
                for rank, pub in enumerate(pubs):
                    payload = batch(stored([rank + 1], [1, 2, 3, 4]), rank=rank)
                    pub.send_multipart(frames(seq, payload))
                seq += 1
                await asyncio.sleep(0.05)
        assert [e["event_id"] for e in got] == list(range(len(got)))
        assert got[0]["block_size"] == 4 and got[0]["events"][0]["token_ids"] == [[1, 2, 3, 4]]
        assert relay.lost == 0
    finally:
        for pub in pubs:
            pub.close(0)
        ctx.term()
        await relay.close()


class _FirstPortTaken:
    """The relay's SUB socket, whose first random port is one whose successor another process
    holds: what happens to a free port's neighbour on a busy machine."""

    def __init__(self, sock: Any, port: int) -> None:
        self._sock, self._port = sock, port

    def bind_to_random_port(self, addr: str) -> int:
        if self._port:
            port, self._port = self._port, 0
            self._sock.bind(f"{addr}:{port}")
            return port
        return int(self._sock.bind_to_random_port(addr))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _free_port_with_its_successor_held() -> tuple[int, Any]:
    import socket

    while True:
        port = free_local_port()
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
        except OSError:  # the successor is someone else's already: another try
            holder.close()
            continue
        holder.listen()
        return port, holder


@pytest.mark.parametrize("first_rank", [0, 2])
def test_a_free_base_port_is_one_whose_rank_ports_are_free_too(first_rank: int) -> None:
    """The first random port is the first hosted rank's; the next rank's port is taken, so the
    relay picks another base."""
    first, holder = _free_port_with_its_successor_held()
    relay = ZmqKvEventRelay(lambda _: None, block_size=4)
    relay._socket = _FirstPortTaken(relay._socket, first)
    try:
        endpoint = relay.bind_local(ranks=2, first_rank=first_rank)
        port = int(endpoint.rpartition(":")[2])
        assert port + first_rank != first
        assert relay.addresses == [
            f"tcp://127.0.0.1:{port + r}" for r in (first_rank, first_rank + 1)
        ]
        probe = zmq.Context.instance().socket(zmq.PUB)
        try:
            with pytest.raises(zmq.ZMQError):  # the relay holds its second rank's port
                probe.bind(f"tcp://127.0.0.1:{port + first_rank + 1}")
        finally:
            probe.close(0)
    finally:
        holder.close()
        relay._socket.close(0)
        relay._context.term()


async def test_a_relay_of_some_ranks_listens_on_the_base_port_plus_each_of_them() -> None:
    """An engine hosting ranks 2 and 3 of 4 is given rank 0's port, and its ranks publish on
    the port plus their rank: the relay listens there, and only there."""
    relay = ZmqKvEventRelay(lambda _: None)
    given = ZmqKvEventRelay(lambda _: None)
    try:
        endpoint = relay.bind_local(ranks=2, first_rank=2)
        base = int(endpoint.rpartition(":")[2])
        assert relay.addresses == [f"tcp://127.0.0.1:{base + 2}", f"tcp://127.0.0.1:{base + 3}"]
        port = free_local_port(ranks=2, first_rank=2)  # the user's --kv-events-port
        assert given.bind_local(port, ranks=2, first_rank=2) == f"tcp://127.0.0.1:{port}"
        assert given.addresses == [f"tcp://127.0.0.1:{port + 2}", f"tcp://127.0.0.1:{port + 3}"]
        with pytest.raises(ValueError):
            ZmqKvEventRelay(lambda _: None).bind_local(ranks=0)
    finally:
        await relay.close()
        await given.close()


def test_free_local_port_is_a_base_whose_ranks_ports_are_free() -> None:
    import socket

    base = free_local_port(ranks=3, first_rank=5)
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for sock, rank in ((a, 5), (b, 6), (c, 7)):
            sock.bind(("127.0.0.1", base + rank))


@pytest.mark.parametrize("encoding", ["array", "map"])
async def test_a_ranks_gap_is_fetched_from_that_ranks_replay_socket(encoding: str) -> None:
    """Rank 3 of an engine whose ranks 2 and 3 the worker hosts drops its batches 1 and 2 (and
    what precedes the subscription): the relay asks rank 3's replay socket, not another's."""
    from dynamo_core.testing.engine_replay import PublisherSockets

    def payload(n: int) -> bytes:
        events = [stored([n], [1, 2, 3, 4])]
        if encoding == "map":
            return msgspec.msgpack.encode({"ts": 1.0, "events": events, "data_parallel_rank": 3})
        return batch(*events, rank=3)

    got: list[Any] = []
    relay = ZmqKvEventRelay(got.append, topic="kv", block_size=4)
    publisher = None
    try:
        endpoint = relay.bind_local(ranks=2, first_rank=2)
        replay = free_local_port(ranks=2, first_rank=2)
        relay.replays = rank_replays(f"tcp://*:{replay}", [2, 3])
        assert relay.replays == {r: f"tcp://127.0.0.1:{replay + r}" for r in (2, 3)}
        publisher = PublisherSockets(
            rank_endpoint(endpoint, 3),
            bind=False,
            topic="kv",
            replay_endpoint=f"tcp://127.0.0.1:{replay + 3}",
        )
        publisher.drop_live.update({1, 2})
        relay.start()
        n = 0
        async with asyncio.timeout(30):
            while not got or n < 4:
                publisher.send(payload(n))
                n += 1
                await asyncio.sleep(0.05)
            while len(got) < n:
                await asyncio.sleep(0.01)
        assert [e["events"][0]["block_hashes"] for e in got] == [[i] for i in range(n)]
        assert relay.lost == 0 and relay.replayed >= 2
    finally:
        if publisher is not None:
            publisher.close()
        await relay.close()


async def test_connected_it_follows_a_publisher_that_binds() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    got: list[Any] = []
    relay = ZmqKvEventRelay(got.append, block_size=2)
    relay.connect([f"tcp://*:{port}"])
    assert relay.address == f"tcp://127.0.0.1:{port}"
    relay.start(block_size=8)
    try:
        seq = 0
        async with asyncio.timeout(30):
            while not got:
                pub.send_multipart(frames(seq, batch({"type": "AllBlocksCleared"})))
                seq += 1
                await asyncio.sleep(0.05)
        assert got[0]["block_size"] == 8
    finally:
        pub.close(0)
        ctx.term()
        await relay.close()
