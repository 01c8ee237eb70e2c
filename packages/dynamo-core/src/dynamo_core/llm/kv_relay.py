"""An engine's ZMQ KV-cache events, re-published as Dynamo's (`dynamo_core.llm.kv`).

vLLM and SGLang publish their prefix cache's changes the same way (SGLang took vLLM's format):
a ZMQ PUB socket sends multipart messages `(topic, sequence number: 8 bytes big-endian,
payload)`, the payload a msgpack `KVEventBatch` `[ts, events, data_parallel_rank]` (an array;
a map in some releases). An event is a map tagged by `type`, or (older releases) an array,
tag first and fields in declaration order:

- `BlockStored`: `block_hashes`, `parent_block_hash`, `token_ids` (every block's tokens, in
  order), `block_size`, and fields Dynamo does not need (`lora_id`, `medium`, ...);
- `BlockRemoved`: `block_hashes`;
- `AllBlocksCleared`.

`ZmqKvEventRelay` subscribes and publishes each batch as a `KvEventBatch` (`KvStored` keeps the
engine's block hashes and parent hash as unsigned 64-bit ids and splits the flat `token_ids`
into one list per block, so the router hashes the tokens itself). Hashes that arrive as bytes
are folded into the int vLLM would have sent (big-endian, low 64 bits); a block count that does
not divide the tokens evenly is split evenly anyway (SGLang's last page). A frame that cannot be
read is skipped and counted (`bad`), never stops the relay.

Missed batches: a PUB socket drops messages when its subscriber lags, and everything it sends
before the subscription is up (ZMQ's slow joiner). vLLM and SGLang keep their last
`buffer_steps` batches for replay on a ROUTER socket at `replay_endpoint` (per rank, offset as
the PUB endpoint): a DEALER sends ``b""`` and the first wanted sequence number (8 bytes,
big-endian), the engine answers ``(b"", seq, payload)`` per kept batch from there, then
``(b"", -1 as 8 signed bytes, b"")`` (`fetch_engine_replay`). With `replays` set (each rank's
replay address; the workers ask their engine for one), a skipped sequence number, or a rank's
first batch after others the relay never saw, is fetched and relayed first (`replayed`). Without
one, or past what the engine keeps, the gap is logged and counted (`lost`): the router's view of
this worker is then stale until blocks are stored again. The workers publish through a
`KvEventLog` and serve `kv_replay` (`dynamo_core.llm.kv_log`), so routers that miss batches on
the event plane fetch them from the worker in turn.

Which side binds: an engine pointed at a concrete address *connects* to it, so the worker
`bind_local()`s a free port on 127.0.0.1 and tells the engine that address (nothing is exposed
beyond the machine, replicas never clash); an engine configured by the user with a wildcard
address binds itself, and the relay `connect()`s (a wildcard becomes loopback).

Data parallelism: the engine's rank r publishes on the configured port plus r, and binds its
replay socket at the replay port plus r (`rank_endpoint`; ipc/inproc: `_dp{r}`), and stamps its
batches with r. A worker whose engine hosts only some ranks (vLLM's `--data-parallel-rank`,
`--data-parallel-start-rank`) still gives the engine rank 0's address: `bind_local(port,
ranks=n, first_rank=s)` listens on the port plus each of ranks s .. s+n-1 (with port 0, a base
whose every such port is free), `free_local_port` picks such a base for the replay sockets, and
`replays` maps each rank to its own (`rank_replays`). Sequence numbers are counted per rank.

zmq is imported when a relay is made: `pip install "dynamo-core[zmq]"` (the engine packages
depend on that extra). `KvRelayConfig` holds the two flags every relaying worker has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
from pydantic import BaseModel, Field

from dynamo_core.llm.kv import KvCleared, KvEvent, KvEventBatch, KvRemoved, KvStored

__all__ = [
    "KvRelayConfig",
    "ZmqKvEventRelay",
    "connectable",
    "convert_events",
    "external_hash",
    "fetch_engine_replay",
    "free_local_port",
    "rank_endpoint",
    "rank_replays",
]

log = logging.getLogger("dynamo.kv_relay")

_U64 = (1 << 64) - 1
_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size")
_REMOVED = ("block_hashes",)
_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "", "[::]", "::"})


class KvRelayConfig(BaseModel):
    """The flags of a worker that relays its engine's KV events (mixed into its config)."""

    kv_events: bool = Field(
        default=True,
        description="Publish the engine's KV cache events (blocks stored and removed) for "
        "KV-aware routing: the engine's ZMQ KV-events publisher is enabled (unless "
        "--kv-events-config is given) and its events re-published on the event plane.",
    )
    kv_events_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Local TCP port on which the worker receives the engine's KV events (0: any "
        "free port; data-parallel rank r uses the port plus r).",
    )


def external_hash(value: Any) -> int:
    """An engine's block hash as an unsigned 64-bit int (bytes: big-endian, low 64 bits)."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big") & _U64
    return int(value) & _U64


def _fields(event: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(tag, fields) of an event encoded as a tagged map or a tagged array."""
    if isinstance(event, dict):
        return str(event.get("type", "")), event
    if isinstance(event, list | tuple) and event:
        return str(event[0]), dict(zip(names, event[1:], strict=False))
    return "", {}


def _stored(f: dict[str, Any], block_size: int) -> KvStored | None:
    hashes = [external_hash(h) for h in f.get("block_hashes") or []]
    if not hashes:
        return None
    tokens = list(f.get("token_ids") or [])
    size = int(f.get("block_size") or block_size or 1)
    if size * len(hashes) != len(tokens):  # lenient: split the tokens evenly
        size = max(1, len(tokens) // len(hashes))
    parent = f.get("parent_block_hash")
    return KvStored(
        block_hashes=hashes,
        token_ids=[tokens[i * size : (i + 1) * size] for i in range(len(hashes))],
        parent_hash=None if parent is None else external_hash(parent),
    )


def _event(raw: Any, block_size: int) -> KvEvent | None:
    tag, _ = _fields(raw, ())
    if tag == "BlockStored":
        return _stored(_fields(raw, _STORED)[1], block_size)
    if tag == "BlockRemoved":
        hashes = _fields(raw, _REMOVED)[1].get("block_hashes") or []
        return KvRemoved(block_hashes=[external_hash(h) for h in hashes])
    if tag == "AllBlocksCleared":
        return KvCleared()
    log.debug("ignoring KV event %r", tag)
    return None


def _batch(payload: bytes) -> tuple[list[Any], int]:
    """(raw events, data-parallel rank) of one msgpack `KVEventBatch`."""
    batch = msgspec.msgpack.decode(payload)
    if isinstance(batch, dict):
        rank = batch.get("data_parallel_rank", batch.get("attn_dp_rank"))
        return list(batch.get("events") or []), int(rank or 0)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        rank = batch[2] if len(batch) > 2 else None
        return list(batch[1] or []), int(rank or 0)
    raise ValueError("not a KVEventBatch")


def convert_events(payload: bytes, block_size: int) -> list[KvEvent]:
    """Dynamo KV events for one msgpack `KVEventBatch` (see the module docstring)."""
    raw, _ = _batch(payload)
    return [e for e in (_event(x, block_size) for x in raw) if e is not None]


def connectable(endpoint: str) -> str:
    """Where a subscriber connects for a publisher bound to `endpoint` (`tcp://*:5557` ->
    `tcp://127.0.0.1:5557`); ipc and inproc addresses are left as they are."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme == "tcp" and sep and colon and host in _WILDCARD_HOSTS:
        return f"tcp://127.0.0.1:{port}"
    return endpoint


def free_local_port(*, ranks: int = 1, first_rank: int = 0) -> int:
    """A free TCP port on 127.0.0.1, for a socket the engine binds itself (its replay socket).
    For data-parallel ranks `first_rank` .. `first_rank + ranks - 1`, which bind the port plus
    their rank: a base port (above 0) whose every such port is free."""
    for _ in range(_BIND_ATTEMPTS):
        with contextlib.ExitStack() as held:  # each free port held until all are found
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            base = int(first.getsockname()[1]) - first_rank
            others = range(first_rank + 1, first_rank + ranks)
            if base > 0 and all(_hold(held, base + rank) for rank in others):
                return base
    raise OSError(f"no {ranks} free ports on 127.0.0.1 for the engine's replay sockets")


def _hold(held: contextlib.ExitStack, port: int) -> bool:
    """Whether `port` on 127.0.0.1 is free (then held until `held` closes)."""
    probe = held.enter_context(socket.socket())
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


_BIND_ATTEMPTS = 32
_END_SEQ = (-1).to_bytes(8, "big", signed=True)
_HEAD = msgspec.msgpack.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_NONE = msgspec.Raw(msgspec.msgpack.encode(None))


def _rank_of(payload: bytes) -> int:
    """A batch's data-parallel rank, without decoding its events (0 when it has none): the
    rank `handle` counts its sequence numbers under."""
    try:
        head = _HEAD.decode(payload)
        if isinstance(head, dict):
            raw = head.get("data_parallel_rank", head.get("attn_dp_rank", _NONE))
        else:
            raw = head[2] if len(head) > 2 else _NONE
        rank = msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return rank if isinstance(rank, int) and rank >= 0 else 0


async def fetch_engine_replay(
    context: Any, address: str, start: int, timeout: float = 1.0
) -> list[tuple[int, bytes]]:
    """The batches an engine's replay socket at `address` still keeps from sequence number
    `start` on, as `(seq, payload)` in order (see the module docstring); `context` is the
    caller's `zmq.asyncio.Context`. What arrived within `timeout` (an engine that is gone, or
    busy) is returned and the shortfall logged: the caller goes on without the rest."""
    import zmq

    got: list[tuple[int, bytes]] = []
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        async with asyncio.timeout(timeout):
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3 or frames[-2] == _END_SEQ:
                    break
                got.append((int.from_bytes(frames[-2], "big"), frames[-1]))
    except TimeoutError:
        log.warning(
            "the engine's KV event replay at %s did not end within %.1f s (%d batches)",
            address,
            timeout,
            len(got),
        )
    finally:
        sock.close(0)
    return got


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Data-parallel rank `rank`'s endpoint: the port plus the rank (ipc/inproc: `_dp{rank}`)."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def rank_replays(replay_endpoint: str, ranks: Iterable[int]) -> dict[int, str]:
    """Where the relay asks each of `ranks` for what it missed (`ZmqKvEventRelay.replays`): the
    engine's `replay_endpoint` offset per rank, as its PUB endpoint is, which each rank binds
    (wildcards become loopback)."""
    return {rank: connectable(rank_endpoint(replay_endpoint, rank)) for rank in ranks}


class ZmqKvEventRelay:
    """An engine's ZMQ KV events in, `KvEventBatch` maps out through `publish`.

    Set up with `bind_local()` (the engine connects), `connect()` (the engine binds) or
    `bind()` (the user's concrete address, which the engine connects to); then `start()` on
    the event loop, `close()` when done.
    """

    def __init__(
        self,
        publish: Callable[[Any], Any],
        *,
        topic: str = "",
        block_size: int = 0,
        engine: str = "engine",
    ) -> None:
        import zmq
        import zmq.asyncio

        self.publish = publish
        self.topic = topic
        self.block_size = block_size
        self.engine = engine
        self.batches = 0
        self.events = 0
        self.lost = 0
        self.bad = 0
        self.replays: dict[int, str] = {}
        """Each data-parallel rank's replay socket, by rank (`rank_replays`; see the module
        docstring); empty: none."""
        self.replayed = 0
        self.addresses: list[str] = []
        self._next_id = 0
        self._last_seq: dict[int, int] = {}
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.addresses[0] if self.addresses else ""

    def bind_local(self, port: int = 0, *, ranks: int = 1, first_rank: int = 0) -> str:
        """Listen on 127.0.0.1 for the engine's data-parallel ranks `first_rank` ..
        `first_rank + ranks - 1`, rank r on `port` plus r (where the engine's rank r connects);
        the endpoint the engine is configured with: `port`, rank 0's, hosted here or not.

        With `port` 0 the relay picks a base port whose every hosted rank's port is free
        (another process may hold the port after a random one). A given `port` is the user's:
        the first hosted rank's port must be free; another hosted rank whose port is taken is
        logged, and its events are missed."""
        if ranks < 1:
            raise ValueError(f"bind_local for {ranks} ranks")
        hosted = range(first_rank, first_rank + ranks)
        if port:
            self._socket.bind(f"tcp://127.0.0.1:{port + first_rank}")  # taken: the error is seen
            bound = [port + first_rank, *self._bind_lenient(port, hosted[1:])]
        else:
            port, bound = self._bind_free_run(hosted)
        self.addresses.extend(f"tcp://127.0.0.1:{p}" for p in bound)
        return f"tcp://127.0.0.1:{port}"

    def _bind_lenient(self, port: int, ranks: range) -> list[int]:
        """Bind base `port` plus each of `ranks`; a port that is taken is logged and skipped."""
        import zmq

        bound = []
        for rank in ranks:
            try:
                self._socket.bind(f"tcp://127.0.0.1:{port + rank}")
            except zmq.ZMQError as exc:
                log.warning("KV events of data-parallel rank %d will be missed: %s", rank, exc)
                continue
            bound.append(port + rank)
        return bound

    def _bind_free_run(self, ranks: range) -> tuple[int, list[int]]:
        """A base port (above 0: vLLM offsets no rank of a port 0) whose port plus each of
        `ranks` the relay could bind, and those ports."""
        import zmq

        for _ in range(_BIND_ATTEMPTS):
            first = int(self._socket.bind_to_random_port("tcp://127.0.0.1"))
            base, bound = first - ranks.start, [first]
            if base > 0:
                for rank in ranks[1:]:
                    try:
                        self._socket.bind(f"tcp://127.0.0.1:{base + rank}")
                    except zmq.ZMQError:
                        break
                    bound.append(base + rank)
                else:
                    return base, bound
            for done in bound:
                self._socket.unbind(f"tcp://127.0.0.1:{done}")
        raise zmq.ZMQError(msg=f"no free 127.0.0.1 ports for the engine's KV events of {ranks}")

    def bind(self, endpoints: Sequence[str]) -> None:
        """Listen on endpoints a user configured the engine to connect to."""
        for endpoint in endpoints:
            self._socket.bind(endpoint)
            self.addresses.append(endpoint)

    def connect(self, endpoints: Sequence[str]) -> None:
        """Follow publishers that bind the endpoints themselves (wildcards become loopback)."""
        for endpoint in endpoints:
            address = connectable(endpoint)
            self._socket.connect(address)
            self.addresses.append(address)

    def start(self, block_size: int | None = None) -> None:
        """Relay from now on; `block_size` is the engine's, once it is known."""
        if block_size is not None:
            self.block_size = block_size
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("relaying %s KV events from %s", self.engine, ", ".join(self.addresses))

    def handle(self, frames: Sequence[bytes]) -> None:
        """One ZMQ message: (topic, seq, payload)."""
        if len(frames) < 3:
            self.bad += 1
            return
        try:
            raw, rank = _batch(frames[-1])
            events = [e for e in (_event(x, self.block_size) for x in raw) if e is not None]
        except (msgspec.DecodeError, TypeError, ValueError, AttributeError) as exc:
            self.bad += 1
            log.warning("unreadable %s KV event batch skipped: %s", self.engine, exc)
            return
        self._sequence(rank, int.from_bytes(frames[-2], "big"))
        if not events:
            return
        batch = KvEventBatch(event_id=self._next_id, events=events, block_size=self.block_size)
        self._next_id += 1
        self.batches += 1
        self.events += len(events)
        self.publish(msgspec.to_builtins(batch))

    def _sequence(self, rank: int, seq: int) -> None:
        last = self._last_seq.get(rank)
        if last is not None and seq > last + 1:
            self.lost += seq - last - 1
            log.warning(
                "%s KV events %d..%d of rank %d were lost", self.engine, last + 1, seq - 1, rank
            )
        self._last_seq[rank] = seq

    async def catch_up(self, rank: int, seq: int) -> None:
        """Before `rank`'s batch `seq`: relay what was missed before it, from its replay socket."""
        last = self._last_seq.get(rank)
        start = 0 if last is None else last + 1
        address = self.replays.get(rank)
        if address is None or seq <= start:
            return
        for missed, payload in await fetch_engine_replay(self._context, address, start):
            last = self._last_seq.get(rank)
            if start <= missed < seq and (last is None or missed > last):
                self.handle((b"", missed.to_bytes(8, "big"), payload))
                self.replayed += 1

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                if self.replays and len(frames) >= 3:
                    await self.catch_up(_rank_of(frames[-1]), int.from_bytes(frames[-2], "big"))
                self.handle(frames)
            except Exception:  # a failing publish must not stop the relay
                log.exception("could not relay a %s KV event batch", self.engine)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close(0)
        self._context.term()
