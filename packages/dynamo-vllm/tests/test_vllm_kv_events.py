"""Where vLLM's KV events come from under data parallelism (`dynamo_vllm.kv_events`): which
ranks a worker's engine hosts, and the relay hearing each of them from vLLM's own publishers.

Each test runs on vLLM's real parser and publishers where vLLM is installed (`nox -s vllm_cpu`)
and on the fake's elsewhere (`nox -s vllm`); the ranks are also checked against the config vLLM
itself builds from the same flags, where it is installed."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq.asyncio

from conftest import TINY, real_vllm_installed
from dynamo_core.llm.kv_relay import fetch_engine_replay, free_local_port
from dynamo_vllm import worker
from dynamo_vllm.args import engine_args
from dynamo_vllm.kv_events import data_parallel_ranks, kv_event_relay

#: (vLLM's flags, the data-parallel ranks whose engine cores the worker's AsyncLLM starts)
MODES = {
    "no data parallelism": ([], [0]),
    "internal, all local": (["--data-parallel-size", "4"], [0, 1, 2, 3]),
    "internal, some local": (["-dp", "4", "--data-parallel-size-local", "2"], [0, 1]),
    "hybrid, inferred": (["-dp", "4", "-dpl", "2", "--data-parallel-start-rank", "2"], [2, 3]),
    "hybrid, asked": (["-dp", "4", "-dpl", "2", "-dpr", "2", "--data-parallel-hybrid-lb"], [2, 3]),
    "hybrid of one is external": (["-dp", "4", "-dpl", "1", "-dpr", "3"], [3]),
    "external": (["-dp", "4", "--data-parallel-rank", "3"], [3]),
    "external, rank 0": (["-dp", "4", "--data-parallel-rank", "0"], [0]),
    "external, from the node": (
        ["-dp", "4", "--data-parallel-external-lb", "--nnodes", "4", "--node-rank", "2"],
        [2],
    ),
    "internal, second node": (["-dp", "4", "--nnodes", "2", "--node-rank", "1"], [2, 3]),
    "internal, tp across nodes": (["-tp", "2", "--nnodes", "2", "--node-rank", "1"], [0]),
    "no local engine": (["-dp", "4", "--data-parallel-size-local", "0"], []),
}
#: The modes vLLM allows only for an MoE model (it refuses external ranks of a dense one).
MOE_ONLY = {"hybrid of one is external", "external", "external, rank 0", "external, from the node"}


@pytest.fixture
def vllm_package(request: pytest.FixtureRequest) -> str:
    """vLLM's real package where it is installed (`nox -s vllm_cpu`), else the fake."""
    if real_vllm_installed():
        with warnings.catch_warnings():  # torch's deprecations, as vLLM imports it: not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("vllm.engine.arg_utils")
            importlib.import_module("vllm.distributed.kv_events")
        return "real"
    request.getfixturevalue("fake_vllm")
    return "fake"


def parse(*argv: str, model: Path = TINY) -> tuple[Any, Any]:
    """(Dynamo's config, vLLM's engine args) of a worker started with `argv`."""
    parsed = worker.build_parser().parse(["--model", str(model), "--block-size", "32", *argv])
    return parsed.config, engine_args(parsed)


@pytest.mark.parametrize(("argv", "ranks"), MODES.values(), ids=MODES.keys())
def test_the_ranks_a_workers_engine_hosts(
    vllm_package: str, argv: list[str], ranks: list[int]
) -> None:
    _, args = parse(*argv)
    assert list(data_parallel_ranks(args)) == ranks


def test_without_data_parallelism_vllm_reads_the_offline_rank_from_the_environment(
    vllm_package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_DP_RANK", "2")
    assert list(data_parallel_ranks(parse()[1])) == [2]
    assert list(data_parallel_ranks(parse("-dp", "4")[1])) == [0, 1, 2, 3]  # flags win


def test_ray_starts_every_rank(vllm_package: str) -> None:
    args = parse("-dp", "4", "-dpl", "2", "--data-parallel-backend", "ray")[1]
    assert list(data_parallel_ranks(args)) == [0, 1, 2, 3]


@pytest.fixture
def moe_model(tmp_path: Path) -> Path:
    """The tiny model's folder as a two-expert Mixtral (its config only: nothing is loaded)."""
    folder = tmp_path / "tiny-moe"
    folder.mkdir()
    for file in TINY.glob("*.json"):
        shutil.copy(file, folder)
    config = json.loads((TINY / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                  num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.engine
@pytest.mark.skipif(not real_vllm_installed(), reason="needs vLLM (nox -s vllm_cpu)")
@pytest.mark.parametrize("mode", MODES)
def test_the_ranks_are_the_engine_cores_vllm_configures(moe_model: Path, mode: str) -> None:
    """vLLM's own `create_engine_config` from the same flags: its cores are `data_parallel_rank`
    .. plus `data_parallel_size_local` (`launch_core_engines`)."""
    _, args = parse(*MODES[mode][0], model=moe_model if mode in MOE_ONLY else TINY)
    ours = data_parallel_ranks(args)  # before vLLM rewrites the args
    parallel = args.create_engine_config().parallel_config
    first = parallel.data_parallel_rank
    assert ours == range(first, first + parallel.data_parallel_size_local)


def stored(rank: int) -> Any:
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    block = BlockStored(block_hashes=[100 + rank], parent_block_hash=None, token_ids=[1, 2, 3, 4],
                        block_size=4, lora_id=None, medium="GPU", lora_name=None)  # fmt: skip
    return KVEventBatch(ts=time.time(), events=[block])


def _free(ranks: int = 1, first_rank: int = 0) -> int:
    return free_local_port(ranks=ranks, first_rank=first_rank)


def _user_config(endpoint: str) -> list[str]:
    replay = f"tcp://*:{_free(4)}"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
              "replay_endpoint": replay, "topic": "kv"}  # fmt: skip
    return ["--kv-events-config", json.dumps(config)]


#: (flags, hosted ranks): the worker's own config, on free ports or `--kv-events-port`, and the
#: user's `--kv-events-config` that vLLM binds (wildcard) or connects to (the relay binds).
RELAYED = {
    "no data parallelism": lambda: ([], [0]),
    "internal": lambda: (["-dp", "3"], [0, 1, 2]),
    "hybrid": lambda: (["-dp", "4", "-dpl", "2", "-dpr", "2"], [2, 3]),
    "external": lambda: (["-dp", "4", "-dpn", "3"], [3]),
    "external, on a given port": lambda: (
        ["-dp", "4", "-dpn", "3", "--kv-events-port", str(_free(1, 3))],
        [3],
    ),
    "the user's, vLLM binds": lambda: (
        ["-dp", "2", *_user_config(f"tcp://*:{_free(2)}")],
        [0, 1],
    ),
    "the user's, vLLM connects": lambda: (
        ["-dp", "4", "-dpl", "2", "-dpr", "2", *_user_config(f"tcp://127.0.0.1:{_free(2, 2)}")],
        [2, 3],
    ),
}


@pytest.mark.parametrize("mode", RELAYED.values(), ids=RELAYED.keys())
async def test_the_relay_hears_every_rank_of_vllms_own_publishers(
    vllm_package: str, mode: Any
) -> None:
    """What each engine core does with the `KVEventsConfig` the worker builds: vLLM's scheduler
    makes its publisher with `EventPublisherFactory.create(config, data_parallel_index)`, which
    offsets the endpoint and the replay endpoint by the rank. The relay hears every hosted
    rank, and reaches each one's replay socket."""
    from vllm.distributed.kv_events import EventPublisherFactory

    argv, ranks = mode()
    config, args = parse(*argv)
    got: list[Any] = []
    relay = kv_event_relay(config, args, got.append)
    assert relay is not None and sorted(relay.replays) == ranks
    publishers = {r: EventPublisherFactory.create(args.kv_events_config, r) for r in ranks}
    context = zmq.asyncio.Context()
    try:
        relay.start(block_size=4)

        def heard() -> set[int]:
            return {e["events"][0]["block_hashes"][0] - 100 for e in got}

        # a PUB socket drops what it sends before its subscriber's link is up (ZMQ's slow
        # joiner): publish until each rank is heard, within a bound
        async with asyncio.timeout(15):
            while heard() != set(ranks):
                for rank, publisher in publishers.items():
                    publisher.publish(stored(rank))
                await asyncio.sleep(0.05)
        assert relay.lost == 0  # what the relay missed, it fetched from that rank's replay
        for rank in ranks:
            kept = await fetch_engine_replay(context, relay.replays[rank], 0, timeout=5)
            assert kept and [seq for seq, _ in kept] == list(range(len(kept)))
            assert {msgspec.msgpack.decode(payload)[2] for _, payload in kept} == {rank}
    finally:
        for publisher in publishers.values():
            publisher.shutdown()
        await relay.close()
        context.term()


async def test_the_worker_listens_on_exactly_the_hosted_ranks_ports(vllm_package: str) -> None:
    config, args = parse("-dp", "4", "-dpl", "2", "-dpr", "2")
    relay = kv_event_relay(config, args, lambda _: None)
    assert relay is not None
    try:
        endpoint = args.kv_events_config.endpoint  # rank 0's: vLLM offsets it per rank
        base = int(endpoint.rpartition(":")[2])
        assert relay.addresses == [f"tcp://127.0.0.1:{base + r}" for r in (2, 3)]
        replay = int(args.kv_events_config.replay_endpoint.rpartition(":")[2])
        assert relay.replays == {r: f"tcp://127.0.0.1:{replay + r}" for r in (2, 3)}
    finally:
        await relay.close()


def test_no_relay_for_an_api_server_without_engine_cores(vllm_package: str) -> None:
    config, args = parse("-dp", "4", "--data-parallel-size-local", "0")
    assert kv_event_relay(config, args, lambda _: None) is None
    assert args.kv_events_config is None
