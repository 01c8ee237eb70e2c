"""SGLang workers as users run them, with the fake `sglang` (tests/fakes) in each process:
`python -m dynamo_sglang.{worker,prefill,decode,embedding}` behind the real frontend
(`python -m dynamo_core.frontend`), driven by the `openai` client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator
from contextlib import ExitStack
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import httpx
import openai
import pytest

from dynamo_core.llm import Tokenizer
from dynamo_core.testing.procs import Proc, card_of_module, registered_card, run_python
from sglang_testing import TINY, free_port


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start(stack: ExitStack, env: dict[str, str], role: str, *extra: str) -> Proc:
    proc = stack.enter_context(
        run_python(["-m", f"dynamo_sglang.{role}", "--model-path", str(TINY), *extra], env=env)
    )
    proc.wait_for_line("/generate as instance")
    return proc


def start_frontend(stack: ExitStack, env: dict[str, str]) -> str:
    port = free_port()
    proc = stack.enter_context(
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        )
    )
    proc.wait_for_line("OpenAI API on")
    return f"http://127.0.0.1:{port}"


async def wait_ready(url: str, prefill: bool = False) -> None:
    """The model is listed (and, for a disaggregated graph, its prefill pool is known)."""
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(15):
        while not (await http.get("/v1/models")).json()["data"]:
            await asyncio.sleep(0.02)
    if prefill:  # the prefill card may land a moment after the decode card
        await asyncio.sleep(0.5)


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def disagg(stack: ExitStack, env: dict[str, str], **prefill_env: str) -> Proc:
    bootstrap = str(free_port())
    prefill = start(
        stack,
        {**env, **prefill_env},
        "prefill",
        "--bootstrap-host",
        "127.0.0.1",
        "--disaggregation-bootstrap-port",
        bootstrap,
    )
    assert f"bootstrap 127.0.0.1:{bootstrap}" in prefill.output()
    start(stack, env, "decode")
    return prefill


async def test_aggregated_worker(procs: ExitStack, proc_env: dict[str, str]) -> None:
    worker = start(procs, proc_env, "worker", "--page-size", "16")
    assert "sglang aggregated worker" in worker.output()
    url = start_frontend(procs, proc_env)
    await wait_ready(url)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=chat("Tell me a story"),
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    finally:
        await client.close()


async def test_disaggregated_chat(procs: ExitStack, proc_env: dict[str, str]) -> None:
    disagg(procs, proc_env)
    url = start_frontend(procs, proc_env)
    await wait_ready(url, prefill=True)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        results = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="tiny", messages=chat(f"question {i}"), max_tokens=8, seed=3
                )
                for i in range(4)
            )
        )
        for r in results:
            assert r.choices[0].finish_reason == "length"
            assert r.usage is not None and r.usage.completion_tokens == 8
    finally:
        await client.close()


async def test_prefill_failure_after_handoff_ends_the_request_promptly(
    procs: ExitStack, proc_env: dict[str, str]
) -> None:
    # the decode engine would wait 300 s for a KV cache that never comes
    env = {**proc_env, "FAKE_SGLANG_TRANSFER_TIMEOUT": "300"}
    prefill = disagg(procs, env, FAKE_SGLANG_PREFILL_FAIL="1")
    url = start_frontend(procs, env)
    await wait_ready(url, prefill=True)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APIError) as info:
            await client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=8)
        assert time.monotonic() - t0 < 5
        assert "prefill failed" in str(info.value) or "KV transfer failed" in str(info.value)

        t0 = time.monotonic()
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="tiny", messages=chat("y"), max_tokens=8, stream=True
            )
            async for _ in stream:
                pass
        assert time.monotonic() - t0 < 5
    finally:
        await client.close()
    assert prefill.popen.poll() is None


async def test_embedding_worker(
    procs: ExitStack, proc_env: dict[str, str], fake_sglang: ModuleType
) -> None:
    """`python -m dynamo_sglang.embedding`: vectors for text and token ids, float and base64,
    usage; an input the engine fails on fails its own request only, and the worker stays up."""
    from sglang.srt.entrypoints.engine import unit_vector

    env = {**proc_env, "FAKE_SGLANG_EMBED_FAIL_TOKEN": "2000"}  # the engine fails on it
    worker = start(procs, env, "embedding", "--served-model-name", "tiny-embed")
    assert "sglang embedding (vectors of 64) worker" in worker.output()
    url = start_frontend(procs, env)
    await wait_ready(url)
    tok = Tokenizer.from_dir(TINY)
    texts = ["The quick brown fox", "jumps", "over the lazy dog"]
    want = [unit_vector(tok.encode(t, add_special_tokens=True), 64) for t in texts]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        floats = await client.embeddings.create(
            model="tiny-embed", input=texts, encoding_format="float"
        )
        assert [d.embedding for d in floats.data] == [pytest.approx(w, rel=1e-6) for w in want]
        assert [d.index for d in floats.data] == [0, 1, 2]
        tokens = sum(len(tok.encode(t, add_special_tokens=True)) for t in texts)
        assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
        raw = await client.embeddings.create(
            model="tiny-embed", input=texts, encoding_format="base64"
        )
        for item, w in zip(raw.data, want, strict=True):
            assert isinstance(item.embedding, str)
            values = array("f", base64.b64decode(item.embedding))  # little-endian float32
            assert list(values) == pytest.approx(w, rel=1e-6)
        decoded = await client.embeddings.create(model="tiny-embed", input=texts)  # the default
        assert [d.embedding for d in decoded.data] == [pytest.approx(w, rel=1e-6) for w in want]
        ids = await client.embeddings.create(model="tiny-embed", input=[[5, 6, 7], [8]])
        assert ids.usage.prompt_tokens == 4
        assert ids.data[1].embedding == pytest.approx(unit_vector([8], 64), rel=1e-6)

        async def good(i: int) -> None:
            r = await client.embeddings.create(model="tiny-embed", input=[[10 + i, 11]])
            assert r.data[0].embedding == pytest.approx(unit_vector([10 + i, 11], 64), rel=1e-6)

        async def bad() -> BaseException:
            with pytest.raises(openai.InternalServerError) as info:
                await client.embeddings.create(model="tiny-embed", input=[[1, 2], [2000, 5]])
            return info.value

        *_, error = await asyncio.gather(*(good(i) for i in range(6)), bad())
        assert "CUDA error" in str(error) and "RuntimeError" in str(error)
        assert worker.popen.poll() is None
        await good(99)  # and it goes on serving
    finally:
        await client.close()


def test_dynamo_run_out_sglang(proc_env: dict[str, str], tmp_path: Path) -> None:
    """`dynamo-run out=sglang` finds the worker through the entry point (installed wheel) and
    runs its own `worker()`: the model card is the one `python -m dynamo_sglang.worker`
    registers with the same flags."""
    if "sglang" not in {ep.name for ep in entry_points(group="dynamo.engines")}:
        pytest.skip("dynamo-sglang is not installed (its entry point is not registered)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Hello"}\n{"prompt": "Once upon", "max_tokens": 4}\n')
    out = tmp_path / "out.jsonl"
    flags = ["--model-path", str(TINY), "--page-size", "32", "--context-length", "256",
             "--served-model-name", "tiny-sglang"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env["PYTHONPATH"] = proc_env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", f"in=batch:{prompts}", "out=sglang", *flags,
         "--max-tokens", "6", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tokens_out"], r["finish_reason"]) for r in rows] == [(6, "length"), (4, "length")]
    card = registered_card(result.stderr)
    assert card == (
        "model tiny-sglang registered on dynamo.backend.generate: context length 256, "
        "KV block size 32"
    )
    assert card_of_module("dynamo_sglang.worker", [*flags, "--no-kv-events"], env) == card
