"""The system status port of a component process: /live, /health (readiness), /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_core.errors import HandlerError
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig


async def numbers(request: dict[str, Any]) -> AsyncIterator[int]:
    if request.get("fail"):
        raise ValueError("no")
    for i in range(request["n"]):
        yield i


async def test_status_port_follows_the_process_life(kv_dir: Path, namespace: str) -> None:
    cfg = RuntimeConfig(file_kv=kv_dir, namespace=namespace, system_port=0, system_host="127.0.0.1")
    runtime = await DistributedRuntime.create(cfg)
    try:
        assert runtime.system is not None
        url = f"http://127.0.0.1:{runtime.system.port}"
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/live")).status_code == 200
            r = await http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "notready"  # nothing served yet

            ep = runtime.namespace().component("worker").endpoint("generate")
            await ep.start_serving(numbers)
            r = await http.get("/health")
            assert r.status_code == 200
            assert r.json()["endpoints"] == [f"{namespace}/worker/generate"]
            assert r.json()["instance_id"] == f"{runtime.instance_id:x}"

            client = await ep.client()
            await client.wait_for_instances(timeout=5)
            assert [x async for x in await client.generate({"n": 3})] == [0, 1, 2]
            with pytest.raises(HandlerError):
                [x async for x in await client.generate({"fail": True})]
            metrics = (await http.get("/metrics")).text
            path = f"{namespace}/worker/generate"
            assert f'dynamo_component_requests_total{{endpoint="{path}"}} 2' in metrics
            assert f'dynamo_component_errors_total{{endpoint="{path}"}} 1' in metrics
            assert f'dynamo_component_inflight_requests{{endpoint="{path}"}} 0' in metrics

            runtime.request_shutdown()  # draining: no longer ready, still live
            assert (await http.get("/health")).status_code == 503
            assert (await http.get("/live")).status_code == 200
            assert (await http.get("/nowhere")).status_code == 404
    finally:
        await runtime.shutdown()


async def test_no_status_port_unless_asked(kv_dir: Path) -> None:
    async with DistributedRuntime(RuntimeConfig(file_kv=kv_dir)) as runtime:
        assert runtime.system is None
