"""The workers as users run them: `python -m dynamo_trtllm.{worker,prefill,decode}` (on the fake
engine) behind the real frontend (`python -m dynamo_core.frontend`), driven by the `openai`
client. The disaggregated test checks the hand-off across processes: the prefill worker's
`DisaggregatedParams` travel through the frontend to the decode worker, whose (fake) engine
refuses them unless they match the prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from dynamo_core.testing.procs import Proc, run_python
from trtllm_testing import TINY, free_port


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start(stack: ExitStack, env: dict[str, str], role: str, *extra: str) -> Proc:
    proc = stack.enter_context(
        run_python(["-m", f"dynamo_trtllm.{role}", "--model-path", str(TINY), *extra], env=env)
    )
    proc.wait_for_line("/generate as instance", timeout=30)
    return proc


def start_frontend(stack: ExitStack, env: dict[str, str]) -> str:
    port = free_port()
    proc = stack.enter_context(
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        )
    )
    proc.wait_for_line("OpenAI API on", timeout=30)
    return f"http://127.0.0.1:{port}"


async def wait_model(url: str, timeout: float = 15) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(timeout):
        while [m["id"] for m in (await http.get("/v1/models")).json()["data"]] != ["tiny"]:
            await asyncio.sleep(0.05)  # polling HTTP: nothing to await on from outside


async def stream_chat(url: str, max_tokens: int) -> tuple[str, int, str]:
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
    usage = chunks[-1].usage
    assert usage is not None
    reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, usage.completion_tokens, reason or ""


async def test_aggregated_worker_behind_the_frontend(
    procs: ExitStack, proc_env: dict[str, str]
) -> None:
    start(procs, proc_env, "worker", "--max-seq-len", "1024")
    url = start_frontend(procs, proc_env)
    await wait_model(url)
    text, tokens, reason = await stream_chat(url, 16)
    assert text and tokens == 16 and reason == "length"
    async with httpx.AsyncClient(base_url=url) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
    assert card["id"] == "tiny"


async def test_disaggregated_handoff_across_processes(
    procs: ExitStack, proc_env: dict[str, str]
) -> None:
    prefill = start(procs, proc_env, "prefill")
    decode = start(procs, proc_env, "decode")
    url = start_frontend(procs, proc_env)
    await wait_model(url)
    disagg_text, tokens, reason = await stream_chat(url, 12)
    assert tokens == 12 and reason == "length"
    prefill.wait_for_line("context_only request")
    decode.wait_for_line("generation_only request")

    # the same request served by an aggregated worker gives the same text
    prefill.stop()
    decode.stop()
    start(procs, proc_env, "worker")
    await wait_model(url)
    agg_text, _, _ = await stream_chat(url, 12)
    assert disagg_text == agg_text
