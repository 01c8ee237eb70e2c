"""vLLM's KV events and scheduler stats, re-published on Dynamo's event plane.

**KV events.** With `KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=...)`
vLLM's engine core publishes every step's cache changes on a ZMQ PUB socket, as multipart
messages `(topic, sequence number: 8 bytes big-endian, payload)`. The payload is a msgpack
`KVEventBatch`: `[ts, [event, ...], data_parallel_rank]` (the batch is `array_like`); each event
a map tagged by `type` (`vllm.distributed.kv_events`):

- `BlockStored`: `block_hashes`, `parent_block_hash`, `token_ids` (all the blocks' tokens, in
  order), `block_size`, and fields Dynamo does not need (`lora_id`, `medium`, ...);
- `BlockRemoved`: `block_hashes`;
- `AllBlocksCleared`.

(Older vLLM releases encoded events as arrays, tag first and fields in declaration order; both
are read.) `KvEventRelay` subscribes to that socket and re-publishes each batch as a Dynamo
`KvEventBatch` (`KvStored` with each block's tokens, `KvRemoved`, `KvCleared`) on the component's
`kv_events` topic. Block hashes are vLLM's own ids: ints by default
(`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`); bytes hashes are folded into the same 64-bit int
vLLM would have given. A gap in the sequence numbers (the PUB socket drops when a subscriber
lags) is logged: the router's view of this worker is then stale until blocks are stored again.

**Load metrics.** `LoadMetricsLogger` is a vLLM stat logger (passed to
`AsyncLLM.from_engine_args(stat_loggers=[...])`, called with each step's `SchedulerStats`) that
publishes `LoadMetrics` (running and waiting requests, KV blocks in use of the total) on the
`load_metrics` topic when they change, with the speeds a KV router plans with, measured from each
step's `IterationStats` (`_StepSpeeds`): the decode step is the mean inter-token latency of
steps that finished no prefill; the prefill speed is the prompt tokens computed (cache hits
excluded) over the step time beyond a decode step, both as decaying averages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvCleared, KvEvent, KvEventBatch, KvRemoved, KvStored, LoadMetrics

__all__ = [
    "KvEventRelay",
    "LoadMetricsLogger",
    "connect_address",
    "convert_events",
    "external_hash",
]

log = logging.getLogger("dynamo.vllm.events")

_U64 = (1 << 64) - 1
# field order of vLLM's array-encoded events (older releases)
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size")
_REMOVED_FIELDS = ("block_hashes",)


def external_hash(value: Any) -> int:
    """A vLLM block hash as an unsigned 64-bit int (what vLLM sends with int hashes on)."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big") & _U64
    return int(value) & _U64


def _fields(event: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(event, dict):
        return str(event.get("type", "")), event
    if isinstance(event, list | tuple) and event:
        return str(event[0]), dict(zip(names, event[1:], strict=False))
    return "", {}


def convert_events(payload: bytes, block_size: int) -> list[KvEvent]:
    """Dynamo KV events for one msgpack `KVEventBatch` from vLLM's publisher."""
    batch = msgspec.msgpack.decode(payload)
    raw_events = batch[1] if isinstance(batch, list | tuple) else batch.get("events", [])
    events: list[KvEvent] = []
    for raw in raw_events:
        kind = raw.get("type") if isinstance(raw, dict) else (raw[0] if raw else None)
        if kind == "BlockStored":
            _, f = _fields(raw, _STORED_FIELDS)
            size = int(f.get("block_size") or block_size)
            tokens = list(f.get("token_ids") or [])
            hashes = [external_hash(h) for h in f.get("block_hashes") or []]
            parent = f.get("parent_block_hash")
            events.append(
                KvStored(
                    block_hashes=hashes,
                    token_ids=[tokens[i * size : (i + 1) * size] for i in range(len(hashes))],
                    parent_hash=None if parent is None else external_hash(parent),
                )
            )
        elif kind == "BlockRemoved":
            _, f = _fields(raw, _REMOVED_FIELDS)
            events.append(
                KvRemoved(block_hashes=[external_hash(h) for h in f.get("block_hashes") or []])
            )
        elif kind == "AllBlocksCleared":
            events.append(KvCleared())
        else:
            log.debug("ignoring vLLM KV event %r", kind)
    return events


def connect_address(endpoint: str) -> str:
    """Where a subscriber connects for a publisher bound to `endpoint` (`tcp://*:5557`)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    host, _, port = rest.rpartition(":")
    if host in ("*", "0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"


class KvEventRelay:
    """Reads vLLM's ZMQ KV-events publisher and re-publishes on the event plane.

    Either `bind()` a local SUB socket first and point vLLM's publisher at the returned
    endpoint (vLLM's PUB socket *connects* to an endpoint without a wildcard), or `connect()` to
    a publisher the user configured (`tcp://*:5557`: vLLM binds). `start()` begins relaying.
    """

    def __init__(
        self, publish: Callable[[Any], None], *, topic: str = "", block_size: int = 0
    ) -> None:
        import zmq
        import zmq.asyncio

        self.publish = publish
        self.topic = topic
        self.block_size = block_size
        self.batches = 0
        self.events = 0
        self._next_id = 0
        self._last_seq: int | None = None
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._task: asyncio.Task[None] | None = None
        self.address = ""

    def bind(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port); returns the endpoint vLLM connects to."""
        import zmq

        self._socket.bind(f"tcp://{host}:{port}")
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.address

    def connect(self, endpoint: str) -> None:
        """Follow a publisher that binds `endpoint` itself."""
        self.address = connect_address(endpoint)
        self._socket.connect(self.address)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("relaying vLLM KV events from %s", self.address)

    def handle(self, frames: list[bytes]) -> None:
        """One ZMQ message: (topic, seq, payload)."""
        if len(frames) < 3:
            return
        seq = int.from_bytes(frames[-2], "big")
        if self._last_seq is not None and seq != self._last_seq + 1:
            log.warning("vLLM KV events %d..%d were lost", self._last_seq + 1, seq - 1)
        self._last_seq = seq
        events = convert_events(frames[-1], self.block_size)
        if not events:
            return
        batch = KvEventBatch(event_id=self._next_id, events=events, block_size=self.block_size)
        self._next_id += 1
        self.batches += 1
        self.events += len(events)
        self.publish(msgspec.to_builtins(batch))

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.handle(frames)
            except Exception:  # a malformed batch must not stop the relay
                log.exception("could not read a vLLM KV event batch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close(0)
        self._context.term()


class _StepSpeeds:
    """Prefill tokens/s and decode step seconds from vLLM's per-step `IterationStats`."""

    DECAY = 0.9  # weight of the past in each decaying sum (about the last 10 steps)

    def __init__(self) -> None:
        self.step_s = 0.0
        self._tokens = 0.0
        self._prefill_s = 0.0
        self._last_at: float | None = None

    def observe(self, stats: Any, busy: bool) -> None:
        """One step's stats; `busy`: the engine had work since the previous step."""
        at = getattr(stats, "iteration_timestamp", None)
        prompt = getattr(stats, "prompt_token_stats", None)
        # prompt tokens computed this step (cache hits excluded where vLLM reports them)
        computed = getattr(prompt, "computed", None) if prompt is not None else None
        if computed is None:
            computed = getattr(stats, "num_prompt_tokens", 0)
        tokens = int(computed or 0)
        itl = getattr(stats, "inter_token_latencies_iter", None) or getattr(
            stats, "time_per_output_tokens_iter", None
        )
        if itl and not tokens:
            mean = sum(itl) / len(itl)
            self.step_s = mean if not self.step_s else 0.8 * self.step_s + 0.2 * mean
        if busy and at is not None and self._last_at is not None:
            extra = max(0.0, at - self._last_at - self.step_s)  # time beyond a decode step
            self._tokens = self._tokens * self.DECAY + tokens
            self._prefill_s = self._prefill_s * self.DECAY + extra
        self._last_at = at

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._tokens / self._prefill_s if self._tokens and self._prefill_s > 0 else 0.0


def _rounded(value: float) -> float | None:
    """3 significant figures (a new report when a speed really changes, not every step); None
    when not measured yet."""
    return float(f"{value:.3g}") if value > 0 else None


class LoadMetricsLogger:
    """A vLLM stat logger (the `StatLoggerBase` interface) that publishes `LoadMetrics`.

    vLLM calls a stat-logger factory as `factory(vllm_config, engine_index)`; use
    `LoadMetricsLogger.factory(publish)` for that.
    """

    def __init__(self, publish: Callable[[Any], None], vllm_config: Any = None) -> None:
        self.publish = publish
        self.vllm_config = vllm_config
        self.last: LoadMetrics | None = None
        self.speeds = _StepSpeeds()
        self._busy = False

    @classmethod
    def factory(cls, publish: Callable[[Any], None]) -> Callable[..., LoadMetricsLogger]:
        def make(vllm_config: Any = None, engine_index: int = 0) -> LoadMetricsLogger:
            return cls(publish, vllm_config)

        return make

    def total_blocks(self) -> int:
        cache = getattr(self.vllm_config, "cache_config", None)
        return int(getattr(cache, "num_gpu_blocks", None) or 0)

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any = None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if iteration_stats is not None:
            self.speeds.observe(iteration_stats, self._busy)
        if scheduler_stats is None:
            return
        total = self.total_blocks()
        usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
        running = int(getattr(scheduler_stats, "num_running_reqs", 0))
        waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
        self._busy = bool(running or waiting)
        metrics = LoadMetrics(
            active_blocks=round(usage * total),
            total_blocks=total,
            waiting_requests=waiting,
            running_requests=running,
            prefill_tokens_per_s=_rounded(self.speeds.prefill_tokens_per_s),
            decode_step_ms=_rounded(self.speeds.step_s * 1000),
        )
        if metrics != self.last:
            self.last = metrics
            self.publish(msgspec.to_builtins(metrics))

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
