"""The role modules end to end, on the fake `vllm`: each module's own `worker()` in a runtime
(model card, KV events, load metrics; `dynamo_core.testing.inprocess.serving`), and real processes (`python -m dynamo_vllm.worker|prefill|decode` next to
`python -m dynamo_core.frontend`) driven by the `openai` client."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import TINY
from dynamo_core.errors import ConfigError
from dynamo_core.llm.model_card import MODELS_PREFIX, ModelCard
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.runtime.discovery import keys
from dynamo_core.testing.inprocess import record_adapters, serving
from dynamo_core.testing.procs import Proc, card_of_module, registered_card, run_python
from dynamo_vllm import prefill, worker
from dynamo_vllm.engine import VllmAdapter

pytestmark = pytest.mark.usefixtures("fake_vllm")
CONNECTOR = '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'


async def _cards(runtime: DistributedRuntime) -> list[ModelCard]:
    found = await runtime.discovery.get_prefix(MODELS_PREFIX)
    return [ModelCard.decode(v) for v in found.values()]


async def test_worker_registers_the_engines_limits_and_publishes_events(namespace: str) -> None:
    config = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(config) as runtime:
        component = runtime.namespace(namespace).component("backend")
        kv = await component.subscribe("kv_events")
        load = await component.subscribe("load_metrics")
        parsed = worker.build_parser().parse(
            ["--model", str(TINY), "--max-model-len", "512", "--block-size", "16",
             "--served-model-name", "tiny-vllm", "--namespace", namespace,
             "--discovery-backend", "mem", "--request-plane", "inproc"]
        )  # fmt: skip
        async with serving(worker.worker, runtime, parsed):
            # events published before a subscription is in place are not replayed
            await kv.wait_for_publishers(1, timeout=10)
            await load.wait_for_publishers(1, timeout=10)
            (card,) = await _cards(runtime)
            assert (card.name, card.context_length, card.kv_block_size) == ("tiny-vllm", 512, 16)
            assert card.endpoint == f"{namespace}.backend.generate"
            assert card.model_type == ["chat", "completions"]
            assert Path(card.model_path) == TINY.resolve()

            client = await component.endpoint("generate").client()
            await client.wait_for_instances(timeout=5)

            async def run(token_ids: list[int]) -> int:
                request = {"token_ids": token_ids, "stop_conditions": {"max_tokens": 3}}
                outs = [o async for o in await client.round_robin(request)]
                return sum(len(o.get("token_ids", [])) for o in outs)

            # vLLM's ZMQ PUB socket drops what it sends before our relay's subscription reaches
            # it (ZMQ's slow joiner): warm the path until an event comes through
            async with asyncio.timeout(20):
                for n in itertools.count():
                    await run(list(range(2000 + 100 * n, 2016 + 100 * n)))
                    try:
                        await asyncio.wait_for(anext(aiter(kv)), 0.5)
                        break
                    except TimeoutError:
                        continue
            assert await run(list(range(100, 140))) == 3
            expected = [list(range(100, 116)), list(range(116, 132))]
            async with asyncio.timeout(5):
                while True:
                    event = await anext(aiter(kv))
                    stored = event.payload["events"][0]
                    if stored.get("token_ids") == expected:
                        break
                metrics = await anext(aiter(load))
            assert stored["type"] == "stored" and event.payload["block_size"] == 16
            assert metrics.payload["total_blocks"] == 1024


async def test_the_worker_replays_every_batch_vllm_published(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's PUB socket drops what it sends before the relay's subscription reaches it (ZMQ's
    slow joiner) and what a lagging subscriber cannot take (here batches 2 and 3); the relay
    fetches both from vLLM's replay socket, so the worker's `kv_replay` holds every batch, in
    order and without a gap: what a router that starts late, or misses some, is given."""
    adapters = record_adapters(monkeypatch, worker, "VllmAdapter")
    async with DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as runtime:
        component = runtime.namespace(namespace).component("backend")
        parsed = worker.build_parser().parse(
            ["--model", str(TINY), "--max-model-len", "512", "--block-size", "16",
             "--namespace", namespace, "--discovery-backend", "mem", "--request-plane", "inproc"]
        )  # fmt: skip
        async with serving(worker.worker, runtime, parsed):
            (adapter,) = adapters
            relay = adapter.kv_relay
            assert relay is not None and relay.replays
            publisher = adapter.llm.publisher
            publisher.drop_live.update({2, 3})
            client = await component.endpoint("generate").client()
            await client.wait_for_instances(timeout=5)
            prompts: list[int] = []
            async with asyncio.timeout(20):
                while relay.batches < 6:  # each request stores one new block: one batch
                    prompts.append(1000 + 100 * len(prompts))
                    request = {
                        "token_ids": list(range(prompts[-1], prompts[-1] + 16)),
                        "stop_conditions": {"max_tokens": 1},
                    }
                    _ = [o async for o in await client.round_robin(request)]
                    await asyncio.sleep(0.02)
            replay = await component.endpoint("kv_replay").client()
            await replay.wait_for_instances(timeout=5)
            kept = [b async for b in await replay.round_robin({"start": 0})]
            assert [b["event_id"] for b in kept] == list(range(len(kept)))
            assert len(kept) >= 6
            firsts = [b["events"][0]["token_ids"][0][0] for b in kept]
            assert firsts == prompts[: len(kept)]  # engine batch i is worker event i
            assert relay.replayed >= 2 and publisher.replay.replays >= 1


async def test_no_kv_events_when_asked(namespace: str) -> None:
    async with DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as runtime:
        parsed = worker.build_parser().parse(
            ["--model", str(TINY), "--no-kv-events", "--namespace", namespace]
        )
        async with VllmAdapter(parsed, role="worker") as adapter:
            await adapter.start(runtime.namespace(namespace).component("backend"))
            assert adapter.kv_relay is None
            assert adapter.vllm_config.kv_events_config is None
        assert adapter.llm is None  # closed


async def test_prefill_registers_as_the_prefill_pool_and_needs_a_connector(
    namespace: str,
) -> None:
    async with DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as runtime:
        flags = ["--model", str(TINY), "--namespace", namespace]
        with pytest.raises(ConfigError, match="--kv-transfer-config"):
            async with serving(prefill.worker, runtime, prefill.build_parser().parse(flags)):
                pass
        assert await runtime.discovery.get_prefix(keys.instances_prefix(namespace)) == {}
        parsed = prefill.build_parser().parse([*flags, "--kv-transfer-config", CONNECTOR])
        async with serving(prefill.worker, runtime, parsed):
            (card,) = await _cards(runtime)
            assert card.model_type == ["prefill"]
            assert card.endpoint == f"{namespace}.prefill.generate"


# -- real processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start(stack: ExitStack, env: dict[str, str], module: str, *flags: str) -> Proc:
    proc = stack.enter_context(run_python(["-m", module, "--model", str(TINY), *flags], env=env))
    proc.wait_for_line("/generate as instance", timeout=60)
    return proc


def start_frontend(stack: ExitStack, env: dict[str, str]) -> str:
    port = free_port()
    proc = stack.enter_context(
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        )
    )
    proc.wait_for_line("OpenAI API on", timeout=60)
    return f"http://127.0.0.1:{port}"


async def wait_model(url: str, timeout: float = 20) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(timeout):
        while not (await http.get("/v1/models")).json()["data"]:
            await asyncio.sleep(0.05)


async def chat(url: str, max_tokens: int = 12) -> tuple[str, Any]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    finally:
        await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


async def test_worker_process_behind_the_frontend(
    procs: ExitStack, fake_env: dict[str, str]
) -> None:
    start(procs, fake_env, "dynamo_vllm.worker")
    url = start_frontend(procs, fake_env)
    await wait_model(url)
    text, usage = await chat(url)
    assert text and usage.completion_tokens == 12


async def test_disaggregated_prefill_and_decode_processes(
    procs: ExitStack, fake_env: dict[str, str]
) -> None:
    p = start(procs, fake_env, "dynamo_vllm.prefill", "--kv-transfer-config", CONNECTOR)
    d = start(procs, fake_env, "dynamo_vllm.decode", "--kv-transfer-config", CONNECTOR)
    url = start_frontend(procs, fake_env)
    await wait_model(url)
    text, usage = await chat(url, max_tokens=9)
    assert text and usage.completion_tokens == 9
    p.wait_for_line("is prefilled for a remote decode", timeout=5)
    # the decode engine got the prefill engine's transfer parameters
    d.wait_for_line("pulls its KV cache from fake-", timeout=5)


def test_engine_that_cannot_start_says_why_in_one_line(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    # RoPE scaling hides the model's length from the preflight check: the engine finds it
    model = tmp_path / "scaled"
    shutil.copytree(TINY, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_scaling": {"factor": 1.0}}))
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_vllm.worker", "--model", str(model),
         "--max-model-len", "100000"],
        env={**os.environ, **fake_env},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 78  # a configuration error: dynamo serve does not restart it
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: vLLM cannot start: ModelConfig: User-specified max_model_len (100000) is "
        "greater than the derived max_model_len (max_position_embeddings=2048 in model's "
        "config.json)"
    ]
    assert "Traceback" not in done.stderr


def test_dynamo_run_out_vllm_runs_the_same_worker(fake_env: dict[str, str], tmp_path: Path) -> None:
    """`dynamo-run out=vllm` runs `dynamo_vllm.worker`'s own `worker()` in one process, vLLM's
    flags included: the batch is answered token-exactly to its limits, and the model card is the
    one `python -m dynamo_vllm.worker` registers with the same flags."""
    from importlib.metadata import entry_points

    if "vllm" not in {ep.name for ep in entry_points(group="dynamo.engines")}:
        pytest.skip("dynamo-vllm is not installed (its entry point is not registered)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Hello"}\n{"prompt": "Once upon", "max_tokens": 3}\n')
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(TINY), "--max-model-len", "256", "--block-size", "32",
             "--served-model-name", "tiny-vllm"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env["PYTHONPATH"] = fake_env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", f"in=batch:{prompts}", "out=vllm", *flags,
         "--max-tokens", "5", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tokens_out"], r["finish_reason"]) for r in rows] == [(5, "length"), (3, "length")]
    card = registered_card(result.stderr)
    assert card == (
        "model tiny-vllm registered on dynamo.backend.generate: context length 256, "
        "KV block size 32"
    )
    assert card_of_module("dynamo_vllm.worker", [*flags, "--no-kv-events"], env) == card
