"""Where vLLM publishes its KV cache events, and where the worker listens for them.

vLLM's scheduler publishes its prefix cache's changes over ZMQ when its `KVEventsConfig` says
so (`vllm.distributed.kv_events.ZmqEventPublisher`); core's
`dynamo_core.llm.kv_relay.ZmqKvEventRelay` reads them and re-publishes them on the event plane.
What is vLLM's own:

- Data parallelism. Each engine core (one per data-parallel rank) has its own publisher, made
  with the core's rank r (`parallel_config.data_parallel_index`): it publishes on the
  configured `endpoint` plus r and binds its replay socket at `replay_endpoint` plus r (a tcp
  port plus r, inproc `_dp{r}`), and stamps its batches with r. One worker's `AsyncLLM` starts
  the cores of `data_parallel_ranks(engine_args)` only: all of them without data parallelism
  flags or with `--data-parallel-size N` alone; `--data-parallel-size-local M` of them from
  `--data-parallel-start-rank S` (hybrid load balancing: one worker per node); the one of
  `--data-parallel-rank r` (external load balancing: one worker per rank, as Dynamo runs
  them). The relay listens for exactly those ranks and asks each one's replay socket for what
  it missed.
- `kv_event_relay(config, engine_args, publish)`: without `--kv-events-config`, vLLM is
  pointed at 127.0.0.1:`--kv-events-port` (0: free ports, chosen so that every hosted rank's
  port is free) and the relay binds the port plus each hosted rank (vLLM *connects* to a
  concrete address); vLLM's replay sockets go on other free 127.0.0.1 ports. With the user's
  `--kv-events-config`, the relay follows each hosted rank's offset endpoint: it connects
  where vLLM binds (a wildcard, `::`, ipc or inproc address) and binds where vLLM connects.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from dynamo_core.llm.kv_relay import (
    ZmqKvEventRelay,
    free_local_port,
    rank_endpoint,
    rank_replays,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from dynamo_vllm.args import VllmConfig

__all__ = ["LOCAL_TOPIC", "data_parallel_ranks", "kv_event_relay", "vllm_binds"]

log = logging.getLogger("dynamo.vllm")

#: The topic of the publisher the worker sets up itself.
LOCAL_TOPIC = "kv-events"


def data_parallel_ranks(engine_args: Any) -> range:
    """The data-parallel ranks whose engine cores this worker's `AsyncLLM` starts, from vLLM's
    parsed engine args, read before vLLM builds its config from them (which rewrites some).

    vLLM 0.32's `EngineArgs.create_engine_config` and `launch_core_engines`, restated:
    - `--data-parallel-backend ray`: every rank (Ray actors, perhaps on other nodes, whose
      events cannot reach a relay on this node's 127.0.0.1);
    - no `--data-parallel-size`: one core, at the offline SPMD rank `VLLM_DP_RANK` (0 unset);
    - an external rank (`--data-parallel-rank r`, or `--data-parallel-external-lb` with the
      rank inferred from `--nnodes` and `--node-rank`): that one core;
    - `--data-parallel-size-local M`: M cores from `--data-parallel-start-rank` (default: the
      node's first rank with `--nnodes`, else 0), hybrid load balancing; M = 0: none (an API
      server for other nodes' cores);
    - otherwise (`--data-parallel-size N` alone): all N.
    """
    size = int(engine_args.data_parallel_size or 1)
    rank = engine_args.data_parallel_rank
    local = engine_args.data_parallel_size_local
    external = bool(engine_args.data_parallel_external_lb)
    inferred = 0
    nnodes = int(engine_args.nnodes or 1)
    if nnodes > 1:
        within = (
            int(engine_args.pipeline_parallel_size or 1)
            * int(engine_args.tensor_parallel_size or 1)
            * int(engine_args.prefill_context_parallel_size or 1)
        )
        node_world = size * within // nnodes
        inferred = int(engine_args.node_rank or 0) * node_world // within
        if size > 1 and external:
            rank = inferred if rank is None else rank
        elif local is None:
            local = max(node_world // within, 1)
    if engine_args.data_parallel_backend == "ray":
        return range(size)  # its actor manager starts every rank, some on other nodes
    if size == 1 and local != 0:  # vLLM's ParallelConfig: the environment's (offline) rank
        rank = int(os.environ.get("VLLM_DP_RANK", "0"))
        return range(rank, rank + 1)
    if external or rank is not None:
        return range(rank or 0, (rank or 0) + 1)
    if local is not None:
        start = engine_args.data_parallel_start_rank
        start = inferred if start is None else int(start)
        return range(start, start + int(local))
    return range(size)


def vllm_binds(endpoint: str) -> bool:
    """Whether vLLM's publisher binds `endpoint` (else it connects to it), as it decides."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def kv_event_relay(
    config: VllmConfig, engine_args: Any, publish: Callable[[Any], Any]
) -> ZmqKvEventRelay | None:
    """A relay of vLLM's KV events from each hosted data-parallel rank to `publish`, with vLLM's
    publisher pointed at it (unless the user configured one with --kv-events-config: then the
    relay follows that one); None when there are no events to relay."""
    from vllm.config import KVEventsConfig

    if engine_args.enable_prefix_caching is False:
        return None  # no prefix cache, no events worth routing on
    events = engine_args.kv_events_config
    if events is None and not config.kv_events:
        return None
    if events is not None and (not events.enable_kv_cache_events or events.publisher != "zmq"):
        return None
    ranks = data_parallel_ranks(engine_args)
    if not ranks:
        log.info("no engine core runs in this worker (--data-parallel-size-local 0): no KV events")
        return None
    if events is None:
        relay = ZmqKvEventRelay(publish, topic=LOCAL_TOPIC, engine="vLLM")
        endpoint = relay.bind_local(config.kv_events_port, ranks=len(ranks), first_rank=ranks.start)
        # vLLM binds each rank's replay socket at this port plus the rank
        replay = f"tcp://127.0.0.1:{free_local_port(ranks=len(ranks), first_rank=ranks.start)}"
        engine_args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=endpoint,
            replay_endpoint=replay,
            topic=LOCAL_TOPIC,
        )
        relay.replays = rank_replays(replay, ranks)
        return relay
    relay = ZmqKvEventRelay(publish, topic=str(events.topic or ""), engine="vLLM")
    endpoint = str(events.endpoint)
    endpoints = [rank_endpoint(endpoint, rank) for rank in ranks]
    if vllm_binds(endpoint):
        relay.connect(endpoints)
    else:
        relay.bind(endpoints)
    replay_endpoint = getattr(events, "replay_endpoint", None)
    if replay_endpoint:  # the user's: follow it
        relay.replays = rank_replays(str(replay_endpoint), ranks)
    return relay
