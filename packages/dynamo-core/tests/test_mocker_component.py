"""The mocker as a component: served on a runtime, in this process and as `python -m`."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from dynamo_core.deploy import load_deployment, load_parser
from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.chat_template import ChatTemplate
from dynamo_core.llm.detokenizer import IncrementalDetokenizer
from dynamo_core.llm.kv import (
    KV_EVENTS_TOPIC,
    LOAD_METRICS_TOPIC,
    KvCleared,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
)
from dynamo_core.llm.model_card import MODELS_PREFIX, ModelCard
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.mocker import Deployment, MockerAdapter, MockerConfig, build_parser, worker
from dynamo_core.runtime import Client, Context, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.conformance import make_request
from dynamo_core.testing.inprocess import record_adapters, serving
from dynamo_core.testing.procs import run_python

mocker_main = importlib.import_module("dynamo_core.mocker.main")  # the package's `main` is main()
TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


def replay(batches: list[KvEventBatch]) -> set[int]:
    """The cached blocks a KV-event subscriber (a router) believes in."""
    cached: set[int] = set()
    for batch in batches:
        for event in batch.events:
            if isinstance(event, KvStored):
                cached |= set(event.block_hashes)
            elif isinstance(event, KvRemoved):
                cached -= set(event.block_hashes)
            elif isinstance(event, KvCleared):
                cached.clear()
    return cached


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def tokens_of(outs: list[dict[str, Any]]) -> list[int]:
    return [t for out in outs for t in out.get("token_ids", [])]


async def call(client: Client, request: dict[str, Any]) -> list[dict[str, Any]]:
    return await collect(await client.round_robin(request))


async def client_for(rt: DistributedRuntime, namespace: str, endpoint: str) -> Client:
    client = await rt.namespace(namespace).component("backend").endpoint(endpoint).client()
    await client.wait_for_instances(timeout=20)
    return client


async def stats(rt: DistributedRuntime, namespace: str, **request: Any) -> dict[str, Any]:
    client = await client_for(rt, namespace, "stats")
    (result,) = await collect(await client.generate(request))
    assert isinstance(result, dict)
    return result


# -- the component module --------------------------------------------------------------------


def test_module_shape() -> None:
    assert load_deployment("dynamo_core.mocker") is Deployment
    assert Deployment.name == "mocker" and Deployment.resources.gpu == 0
    parser = load_parser("dynamo_core.mocker")
    agg = parser.parse(["--model-path", str(TINY), "--no-enable-prefix-caching"], environ={})
    config = agg.config
    assert isinstance(config, MockerConfig)
    assert config.enable_prefix_caching is False and config.block_size == 16
    assert config.resolved_component(MockerAdapter(agg).role) == "backend"
    prefill = build_parser().parse(
        ["--model-path", str(TINY), "--disaggregation-mode", "prefill"], environ={}
    )
    assert prefill.config.resolved_component(MockerAdapter(prefill).role) == "prefill"


def test_help_imports_no_engine() -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['dynamo_core.mocker', '--help']\n"
        "try:\n"
        "    runpy.run_module('dynamo_core.mocker', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = ('vllm', 'sglang', 'tensorrt_llm', 'torch', 'dynamo_core.mocker.engine')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "--model-path" in out and "--speedup-ratio" in out
    assert "LOADED []" in out


# -- in this process, on both runtime set-ups (mem+inproc, file+tcp) -------------------------


@pytest.fixture
async def mocker(
    runtime: DistributedRuntime, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MockerAdapter]:
    """`python -m dynamo_core.mocker`'s own worker, on this test's runtime."""
    adapters = record_adapters(monkeypatch, mocker_main, "MockerAdapter")
    flags = ["--model-path", str(TINY), "--namespace", namespace, "--speedup-ratio", "1000",
             "--num-gpu-blocks", "40", "--block-size", "4", "--max-num-seqs", "8"]  # fmt: skip
    args = build_parser().parse(flags, environ={})
    async with serving(worker, runtime, args):
        yield adapters[0]


async def test_serves_tokens_and_registers_the_model(
    runtime: DistributedRuntime, namespace: str, mocker: MockerAdapter
) -> None:
    client = await client_for(runtime, namespace, "generate")
    outs = await collect(await client.round_robin(make_request(list(range(10, 40)), max_tokens=9)))
    assert len(tokens_of(outs)) == 9 and outs[-1]["finish_reason"] == "length"
    cards = await runtime.discovery.get_prefix(MODELS_PREFIX)
    (card,) = [ModelCard.decode(v) for v in cards.values()]
    assert card.name == "tiny" and card.endpoint == f"{namespace}.backend.generate"
    assert card.kv_block_size == 4 and card.context_length == 2048
    s = await stats(runtime, namespace)
    assert s["requests_finished"] == 1 and s["total_blocks"] == 40


async def test_kv_events_on_the_event_plane_replay_to_the_cache(
    runtime: DistributedRuntime, namespace: str, mocker: MockerAdapter
) -> None:
    component = runtime.namespace(namespace).component("backend")
    events = await component.subscribe(KV_EVENTS_TOPIC)
    metrics = await component.subscribe(LOAD_METRICS_TOPIC)
    await events.wait_for_publishers(1, timeout=10)
    await metrics.wait_for_publishers(1, timeout=10)
    client = await client_for(runtime, namespace, "generate")
    shared = list(range(500, 524))
    prompts = [[*shared, *range(1000 * i, 1000 * i + 3 + i)] for i in range(1, 19)]
    for start in range(0, len(prompts), 6):
        await asyncio.gather(
            *(call(client, make_request(p, max_tokens=10)) for p in prompts[start : start + 6])
        )
    final = await stats(runtime, namespace, cached_block_hashes=True)
    assert final["evicted_blocks"] > 0, "the workload should have evicted blocks"
    batches: list[KvEventBatch] = []
    async with asyncio.timeout(10):
        while not batches or batches[-1].event_id < final["kv_event_id"]:
            event = await events.__anext__()
            batches.append(msgspec.convert(event.payload, KvEventBatch))
    assert replay(batches) == set(final["cached_block_hashes"])
    async with asyncio.timeout(10):
        while True:  # the idle state is always published in the end
            load = msgspec.convert((await metrics.__anext__()).payload, LoadMetrics)
            if load.running_requests == 0 and load.active_blocks == 0:
                break
    assert load.total_blocks == 40
    assert load.prefill_tokens_per_s > 0 and load.decode_step_ms > 0  # what a router plans with
    await events.close()
    await metrics.close()


async def test_cancelling_a_stream_frees_its_blocks(
    runtime: DistributedRuntime, namespace: str, mocker: MockerAdapter
) -> None:
    # real-time steps: at the fixture's speed the request would run to the end of the cache
    # (80 steps) in well under a millisecond, before the test could look at it
    mocker.engine.args = dataclasses.replace(mocker.engine.args, speedup_ratio=1.0)
    client = await client_for(runtime, namespace, "generate")
    ctx = Context()
    stream = await client.round_robin(
        make_request(list(range(10, 90)), max_tokens=100_000), context=ctx
    )
    await stream.__anext__()
    # live in the engine (its blocks may already have been preempted: at 1000x the sequence
    # outgrows this 40-block cache within milliseconds, before a loaded test reads a token)
    assert mocker.engine.num_requests == 1
    ctx.stop_generating()
    await stream.aclose()
    async with asyncio.timeout(5):
        while mocker.engine.num_requests:  # the cancel crosses the request plane
            await asyncio.sleep(0.005)
    s = await stats(runtime, namespace)
    assert s["requests_running"] == 0 and s["active_blocks"] == 0
    assert s["requests_cancelled"] == 1 and s["handler"]["cancelled_total"] == 1


async def test_requests_beyond_the_cache_queue_and_complete(
    runtime: DistributedRuntime, namespace: str, mocker: MockerAdapter
) -> None:
    client = await client_for(runtime, namespace, "generate")
    prompts = [list(range(1000 * i, 1000 * i + 60)) for i in range(1, 9)]  # 16 blocks each
    results = await asyncio.gather(*(call(client, make_request(p, max_tokens=20)) for p in prompts))
    assert [len(tokens_of(r)) for r in results] == [20] * 8
    s = await stats(runtime, namespace)
    assert s["requests_finished"] == 8 and s["requests_failed"] == 0 and s["active_blocks"] == 0


# -- as a process ----------------------------------------------------------------------------


async def test_mocker_process_serves_a_runtime_client(
    kv_dir: Path, namespace: str, proc_env: dict[str, str]
) -> None:
    args = ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "1000"]
    env = {**proc_env, "DYN_NAMESPACE": namespace}
    with run_python(args, env=env) as proc:
        config = RuntimeConfig.model_validate({"file_kv": kv_dir, "namespace": namespace})
        rt = await DistributedRuntime.create(config)
        try:
            client = await client_for(rt, namespace, "generate")
            prompt = list(range(10, 60))
            outs = await collect(await client.round_robin(make_request(prompt, max_tokens=16)))
            assert len(tokens_of(outs)) == 16 and outs[-1]["finish_reason"] == "length"
            again = await collect(await client.round_robin(make_request(prompt, max_tokens=16)))
            assert tokens_of(again) == tokens_of(outs)
            assert again[-1]["usage"]["cached_tokens"] == 48

            cards = await rt.discovery.get_prefix(f"{MODELS_PREFIX}{namespace}/")
            (card,) = [ModelCard.decode(v) for v in cards.values()]
            assert card.name == "tiny" and card.endpoint == f"{namespace}.backend.generate"
            assert Path(card.model_path) == TINY.resolve()

            s = await stats(rt, namespace)
            assert s["requests_finished"] == 2 and s["cached_tokens"] == 48

            os.killpg(proc.pid, signal.SIGTERM)  # graceful: the card goes with the process
            assert await asyncio.to_thread(proc.popen.wait, 15) == 0
            assert await rt.discovery.get_prefix(f"{MODELS_PREFIX}{namespace}/") == {}
        finally:
            await rt.shutdown()
    assert "dynamo.mocker" in proc.output()


async def test_mocker_process_honours_a_json_schema_and_a_reply_script(
    kv_dir: Path, namespace: str, proc_env: dict[str, str], tmp_path: Path
) -> None:
    """A runtime client sends `PreprocessedRequest`s with a constraint to `python -m
    dynamo_core.mocker --reply-script ...`: the answer validates against the schema, a scripted
    prompt gets its reply, and a constraint the mocker cannot honour fails that request only."""
    script = tmp_path / "replies.yaml"
    script.write_text(
        yaml.safe_dump([{"when": {"user": "ping"}, "reply": "<think>a game</think>pong"}]),
        encoding="utf-8",
    )
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0},
            "districts": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["city", "population", "districts"],
        "additionalProperties": False,
    }
    tok = Tokenizer.from_dir(TINY)
    template = ChatTemplate.from_tokenizer(tok)

    def chat(text: str) -> list[int]:
        return tok.encode(template.render([{"role": "user", "content": text}]))

    def shown(prompt: list[int], outs: list[dict[str, Any]]) -> str:
        detok = IncrementalDetokenizer(tok, prompt_tail=prompt[-6:])
        return "".join(detok.push(o.get("token_ids", [])) for o in outs)

    args = [
        "-m",
        "dynamo_core.mocker",
        "--model-path",
        str(TINY),
        "--speedup-ratio",
        "1000",
        "--reply-script",
        str(script),
    ]
    env = {**proc_env, "DYN_NAMESPACE": namespace}
    with run_python(args, env=env):
        config = RuntimeConfig.model_validate({"file_kv": kv_dir, "namespace": namespace})
        rt = await DistributedRuntime.create(config)
        try:
            client = await client_for(rt, namespace, "generate")
            eos = {"ignore_eos": False, "eos_token_ids": tok.eos_token_ids}
            prompt = chat("Describe a city as JSON.")
            for seed in (1, 2):
                req = make_request(
                    prompt, max_tokens=300, seed=seed, **eos, guided_decoding={"json": schema}
                )
                outs = await collect(await client.round_robin(req))
                assert outs[-1]["finish_reason"] == "eos"
                jsonschema.validate(json.loads(shown(prompt, outs)), schema)

            ping = chat("ping?")
            outs = await collect(await client.round_robin(make_request(ping, max_tokens=50, **eos)))
            assert shown(ping, outs) == "<think>a game</think>pong"

            bad = make_request(prompt, guided_decoding={"json": {"not": {"type": "null"}}})
            with pytest.raises(InvalidRequestError, match="keyword 'not'"):
                await collect(await client.round_robin(bad))
            outs = await collect(await client.round_robin(make_request(prompt, max_tokens=4)))
            assert len(tokens_of(outs)) == 4
        finally:
            await rt.shutdown()
