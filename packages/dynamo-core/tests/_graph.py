"""A graph in one process for the OpenAI-surface tests: mockers (one per model, each with its
own flags: reply script, parsers) and the frontend, with the real `openai` client on it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from dynamo_core.args import ParsedArgs
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import HttpServer, serve_http
from dynamo_core.mocker.main import MockerConfig, worker
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.inprocess import serving

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


@dataclass
class Graph:
    service: OpenAIService
    server: HttpServer
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient

    async def metrics(self) -> str:
        return (await self.http.get("/metrics")).text


def assert_param_error(response: httpx.Response, param: str | None, code: str | None) -> None:
    """`response` is OpenAI's 400 for a bad request: `invalid_request_error` naming `param`
    (and `code`, when given)."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def qwen_flags(folder: Path, script: list[dict[str, Any]]) -> dict[str, Any]:
    """A Qwen-like model's mocker flags: hermes tool calls, qwen3 reasoning, and `script` (a
    reply script's rules, written to a file in `folder`)."""
    path = folder / "script.json"
    path.write_text(json.dumps(script))
    return {"reply_script": path, "dyn_tool_call_parser": "hermes", "dyn_reasoning_parser": "qwen3"}


@asynccontextmanager
async def in_process_graph(
    namespace: str, models: dict[str, dict[str, Any]], **service: Any
) -> AsyncIterator[Graph]:
    """`models`: served name -> the mocker's flags (`MockerConfig` fields)."""
    async with (
        DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt,
        AsyncExitStack() as workers,  # the mocker's own worker(), as python -m runs it
    ):
        for i, (name, flags) in enumerate(models.items()):
            config = MockerConfig(
                model_path=TINY,
                model_name=name,
                component_name=f"backend{i}",
                namespace=namespace,
                discovery_backend="mem",
                request_plane="inproc",
                speedup_ratio=1000,
                **flags,
            )
            args = ParsedArgs(config, None, [], {}, {}, {})
            await workers.enter_async_context(serving(worker, rt, args))
        front = OpenAIService(rt, namespace=namespace, **service)
        await front.start()
        try:
            async with asyncio.timeout(10):
                while len(front.models.listed()) < len(models):
                    await front.models.wait_for_change()
            server = await serve_http(front.handle, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{server.port}"
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            async with httpx.AsyncClient(base_url=url) as http:
                yield Graph(front, server, client, http)
            await client.close()
            await server.close()
        finally:
            await front.close()
