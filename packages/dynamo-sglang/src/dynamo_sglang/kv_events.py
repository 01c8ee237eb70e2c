"""Where SGLang publishes its KV cache events, and where the worker listens for them.

SGLang's scheduler publishes its radix cache's changes over ZMQ when started with
`--kv-events-config '{"publisher": "zmq", "endpoint": ..., "topic": ...}'`
(`sglang.srt.disaggregation.kv_events.ZmqEventPublisher`), in vLLM's format; core's
`dynamo_core.llm.kv_relay.ZmqKvEventRelay` reads them and re-publishes them on the event plane
(`dynamo_sglang.engine.prepare_kv_events` sets it up). What is SGLang's own:

- `local_kv_events_config(endpoint, replay)`: what the worker passes to SGLang when the user
  gave no `--kv-events-config`. SGLang *connects* to a concrete address, so the relay binds a
  port on 127.0.0.1 (`--kv-events-port`, default a free one) and nothing is exposed beyond the
  machine; SGLang binds its replay socket (`replay_endpoint`) on another 127.0.0.1 port.
- `replay_endpoints(config, dp_size)`: where the relay asks each rank's replay socket for the
  batches it missed (none when the config has no `replay_endpoint`).
- `subscriber_endpoints(config, dp_size)`: for a user's `--kv-events-config`, which addresses
  to subscribe to (one per data-parallel rank: SGLang offsets the port by the rank) and
  whether the relay binds them (SGLang binds wildcard, ipc and inproc addresses, or when the
  config's `bind` says so, and connects otherwise).
"""

from __future__ import annotations

import json
from typing import Any

from dynamo_core.llm.kv_relay import connectable, rank_endpoint, rank_replays

__all__ = ["local_kv_events_config", "replay_endpoints", "subscriber_endpoints"]

#: The topic of the publisher the worker sets up itself.
LOCAL_TOPIC = "kv-events"


def subscriber_endpoints(config: dict[str, Any], dp_size: int = 1) -> tuple[list[str], bool]:
    """Where to subscribe for SGLang's `--kv-events-config`, and whether the relay binds."""
    endpoint = str(config.get("endpoint") or "tcp://*:5557")
    sglang_binds = config.get("bind")
    if sglang_binds is None:
        sglang_binds = any(
            w in endpoint for w in ("*", "::", "0.0.0.0")
        ) or not endpoint.startswith("tcp://")
    endpoints = [rank_endpoint(endpoint, r) for r in range(max(1, dp_size))]
    if sglang_binds:
        return [connectable(e) for e in endpoints], False
    return endpoints, True


def local_kv_events_config(
    endpoint: str, replay: str | None = None, topic: str = LOCAL_TOPIC
) -> str:
    """A `--kv-events-config` that makes SGLang connect to `endpoint` (the relay's) and bind its
    replay socket at `replay`."""
    config = {"publisher": "zmq", "endpoint": endpoint, "topic": topic}
    if replay is not None:
        config["replay_endpoint"] = replay
    return json.dumps(config)


def replay_endpoints(config: dict[str, Any], dp_size: int = 1) -> dict[int, str]:
    """Each rank's replay socket for a `--kv-events-config`, by rank (offset per rank, as SGLang
    does)."""
    endpoint = config.get("replay_endpoint")
    if not endpoint:
        return {}
    return rank_replays(str(endpoint), range(max(1, dp_size)))
